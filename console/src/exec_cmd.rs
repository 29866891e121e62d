//! `rollbackctl exec HOST ACTION [PARAM=VALUE...]`: one typed action on one host, for
//! diagnosis, with its output streamed live. The agent validates every parameter.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{Result, bail};
use clap::Args;
use rollback_common::proto::{
    ExecRequest, Step, StepFinished, StepStatus, exec_event, step_event, step_status_name,
};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::Output;

#[derive(Debug, Args)]
#[command(after_help = "\
Actions: service.stop|start|restart|status, alembic.downgrade [steps=N | to_revision=REV],
alembic.current, postgres.restore backup=FILE, postgres.backup, git.checkout revision=REV,
git.log [count=N], file.restore [file=env], http.check [endpoint=/readyz expect=200 retries=N
interval_ms=MS], log.scan [patterns=ERROR,Traceback].

Examples:
    rollbackctl exec app1 git.log
    rollbackctl exec app1 http.check endpoint=/readyz retries=10
    rollbackctl exec app1 alembic.current")]
pub struct ExecArgs {
    /// The host to run on (its agent must be online).
    pub host: String,
    /// The action, e.g. git.log or http.check.
    pub action: String,
    /// Parameters as NAME=VALUE.
    #[arg(value_name = "PARAM=VALUE")]
    pub params: Vec<String>,
    /// Why you are running this (recorded in the audit trail).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Seconds before the agent stops the step (default: the host's configured timeout).
    #[arg(long, default_value_t = 0)]
    pub timeout: u32,
}

fn parse_params(raw: &[String]) -> Result<HashMap<String, String>> {
    let mut params = HashMap::new();
    for p in raw {
        let Some((k, v)) = p.split_once('=') else {
            bail!("parameter `{p}` is not NAME=VALUE (e.g. revision=abc123)");
        };
        if params.insert(k.to_string(), v.to_string()).is_some() {
            bail!("parameter `{k}` is given twice");
        }
    }
    Ok(params)
}

pub async fn run(args: ExecArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let params = parse_params(&args.params)?;
    let mut client = connect::console(flags).await?;
    let request = ExecRequest {
        host_id: args.host.clone(),
        step: Some(Step {
            action: args.action.clone(),
            params,
            timeout_secs: args.timeout,
        }),
        reason: args.reason.clone(),
    };
    let mut stream = client
        .exec(request)
        .await
        .map_err(|s| status_error(&format!("exec on {}", args.host), s))?
        .into_inner();
    let mut run_id = String::new();
    let mut finished: Option<StepFinished> = None;
    let live = output == Output::Table;
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| status_error(&format!("exec on {}", args.host), s))?
    {
        match event.kind {
            Some(exec_event::Kind::RunId(id)) => run_id = id,
            Some(exec_event::Kind::StepEvent(e)) => match e.kind {
                Some(step_event::Kind::Output(chunk)) if live => {
                    if chunk.stderr {
                        let _ = std::io::stderr().write_all(&chunk.data);
                    } else {
                        let _ = std::io::stdout().write_all(&chunk.data);
                    }
                }
                Some(step_event::Kind::Finished(f)) => finished = Some(f),
                _ => {}
            },
            Some(exec_event::Kind::Finished(run)) => {
                if finished.is_none() {
                    finished = run.steps.into_iter().next();
                }
                break;
            }
            None => {}
        }
    }
    let _ = std::io::stdout().flush();
    let Some(step) = finished else {
        bail!(
            "{}: the stream ended before the agent reported a result (run {run_id})",
            args.host
        );
    };
    let facts: BTreeMap<_, _> = step.facts.iter().collect();
    let status = step_status_name(step.status);
    match output {
        Output::Json => {
            let doc = json!({
                "run_id": run_id,
                "host_id": args.host,
                "action": args.action,
                "status": status,
                "exit_code": step.exit_code,
                "duration_ms": step.duration_ms,
                "error": step.error,
                "facts": facts,
                "output": String::from_utf8_lossy(&step.output_tail),
                "output_truncated": step.output_truncated,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Table => {
            let facts_text: Vec<String> = facts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!(
                "{} {}: {status} (exit {}) in {:.2}s{}{}",
                args.host,
                args.action,
                step.exit_code,
                step.duration_ms as f64 / 1000.0,
                if facts_text.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", facts_text.join(" "))
                },
                if step.output_truncated {
                    " [output truncated]"
                } else {
                    ""
                }
            );
        }
    }
    if step.status != StepStatus::Succeeded as i32 {
        bail!(
            "{}",
            if step.error.is_empty() {
                format!("{} {}: {status}", args.host, args.action)
            } else {
                step.error
            }
        );
    }
    Ok(())
}
