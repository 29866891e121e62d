//! `rollbackctl agents`: the fleet as the coordinator sees it, with a warning line for each
//! agent whose certificate expires within 30 days (or has expired).

use anyhow::Result;
use clap::Args;
use rollback_common::expiry::Expiry;
use rollback_common::proto::{AgentInfo, AgentStatus, ListAgentsRequest};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::{Output, format_age, format_time, human_time};

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Only hosts matching every KEY=VALUE term, e.g. role=web,env=prod (host=ID picks one host).
    #[arg(long, default_value = "")]
    pub select: String,
    #[command(subcommand)]
    pub command: Option<AgentsCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentsCmd {
    /// Remove a decommissioned host from the coordinator's agents (admin). Its job history
    /// stays. Refused while the agent is connected or the host is leased to a job; a host that
    /// comes back later is simply registered again.
    Forget {
        /// The host, as `rollbackctl agents` lists it.
        host: String,
    },
    /// Set or remove inventory labels of a host (admin): the labels `--select` matches.
    ///
    /// Labels that choose hosts come from the coordinator's inventory (this command and
    /// [inventory] in coordinator.toml), never from the agent: what an agent reports is shown
    /// beside them in `agents`, and a mismatch is flagged there.
    ///
    /// KEY- removes a label.
    #[command(after_help = "\
Examples:
    rollbackctl agents label app2 canary=true --reason 'first to take the next rollback'
    rollbackctl agents label app2 canary-")]
    Label {
        /// The host, as `rollbackctl agents` lists it.
        host: String,
        /// KEY=VALUE sets a label, KEY- removes one.
        #[arg(required = true, num_args = 1..)]
        changes: Vec<String>,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Splits `KEY=VALUE` (set) and `KEY-` (remove) arguments.
fn parse_label_changes(
    changes: &[String],
) -> Result<(std::collections::HashMap<String, String>, Vec<String>)> {
    let mut set = std::collections::HashMap::new();
    let mut remove = Vec::new();
    for change in changes {
        if let Some((k, v)) = change.split_once('=') {
            if set.insert(k.to_string(), v.to_string()).is_some() {
                anyhow::bail!("label `{k}` is given twice");
            }
        } else if let Some(k) = change.strip_suffix('-') {
            remove.push(k.to_string());
        } else {
            anyhow::bail!("`{change}` is neither KEY=VALUE (set a label) nor KEY- (remove one)");
        }
    }
    Ok((set, remove))
}

async fn label(
    client: &mut rollback_common::proto::console_client::ConsoleClient<tonic::transport::Channel>,
    host: &str,
    changes: &[String],
    reason: &str,
    output: Output,
) -> Result<()> {
    let (set, remove) = parse_label_changes(changes)?;
    let resp = client
        .label_agent(rollback_common::proto::LabelAgentRequest {
            host_id: host.to_string(),
            set,
            remove,
            reason: reason.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("labelling agent {host}"), s))?
        .into_inner();
    let sorted = |m: &std::collections::HashMap<String, String>| {
        m.iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "host_id": host,
                "labels": resp.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "reported_labels": resp.reported_labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "label_mismatch": resp.label_mismatch,
                "note": resp.note,
            })
        ),
        Output::Table => {
            println!("{host}: inventory labels {}", sorted(&resp.labels));
            for m in &resp.label_mismatch {
                println!("warning: {host} reports otherwise — {m}");
            }
            if !resp.note.is_empty() {
                println!("note: {}", resp.note);
            }
        }
    }
    Ok(())
}

pub async fn run(args: AgentsArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    if let Some(AgentsCmd::Label {
        host,
        changes,
        reason,
    }) = &args.command
    {
        return label(&mut client, host, changes, reason, output).await;
    }
    if let Some(AgentsCmd::Forget { host }) = &args.command {
        client
            .forget_agent(rollback_common::proto::ForgetAgentRequest {
                host_id: host.clone(),
            })
            .await
            .map_err(|s| status_error(&format!("forgetting agent {host}"), s))?;
        match output {
            Output::Table => println!(
                "agent {host} forgotten: it is no longer a target; its job history is kept"
            ),
            Output::Json => println!("{}", json!({"host_id": host, "forgotten": true})),
        }
        return Ok(());
    }
    let agents = client
        .list_agents(ListAgentsRequest {
            selector: args.select.clone(),
        })
        .await
        .map_err(|s| status_error("listing agents", s))?
        .into_inner()
        .agents;
    let now = rollback_common::now_unix_ms();
    match output {
        Output::Json => {
            let rows: Vec<_> = agents.iter().map(|a| agent_json(a, now)).collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => print_table(&agents, now, &args.select),
    }
    Ok(())
}

pub fn status_name(status: i32) -> &'static str {
    match AgentStatus::try_from(status) {
        Ok(AgentStatus::Online) => "online",
        Ok(AgentStatus::Disconnected) => "disconnected",
        Ok(AgentStatus::Lost) => "lost",
        _ => "unknown",
    }
}

fn labels_text(a: &AgentInfo) -> String {
    let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels.join(",")
}

/// Where an agent's certificate stands (None: the coordinator has not seen it yet).
fn cert_expiry(a: &AgentInfo, now_ms: i64) -> Option<Expiry> {
    (a.cert_not_after_unix_ms > 0)
        .then(|| Expiry::at(a.cert_not_after_unix_ms / 1000, now_ms / 1000))
}

pub(crate) fn agent_json(a: &AgentInfo, now_ms: i64) -> serde_json::Value {
    let state = a.state.as_ref();
    let cert = cert_expiry(a, now_ms);
    json!({
        "host_id": a.host_id,
        "status": status_name(a.status),
        "labels": a.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "reported_labels": a.reported_labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "label_mismatch": a.label_mismatch,
        "agent_version": a.agent_version,
        "address": a.address,
        "coordinator": a.coordinator,
        "last_seen": format_time(a.last_seen_unix_ms),
        "last_seen_unix_ms": a.last_seen_unix_ms,
        "connected_at": format_time(a.connected_at_unix_ms),
        "cert_not_after": format_time(a.cert_not_after_unix_ms),
        "cert_not_after_unix_ms": a.cert_not_after_unix_ms,
        "cert_days_left": cert.map(Expiry::days_left),
        "cert_status": cert.map_or("unknown", Expiry::status),
        "cert_warning": cert.and_then(Expiry::mark),
        "state": {
            "git_head_sha": state.map(|s| s.git_head_sha.as_str()).unwrap_or_default(),
            "git_head_subject": state.map(|s| s.git_head_subject.as_str()).unwrap_or_default(),
            "alembic_revision": state.map(|s| s.alembic_revision.as_str()).unwrap_or_default(),
            "env_sha256": state.map(|s| s.env_sha256.as_str()).unwrap_or_default(),
            "unit_active_state": state.map(|s| s.unit_active_state.as_str()).unwrap_or_default(),
        },
    })
}

fn print_table(agents: &[AgentInfo], now: i64, select: &str) {
    if agents.is_empty() {
        if select.is_empty() {
            println!("no agents have connected to this coordinator yet");
        } else {
            println!("no agents match --select {select}");
        }
        return;
    }
    let rows: Vec<[String; 6]> = agents
        .iter()
        .map(|a| {
            [
                a.host_id.clone(),
                status_name(a.status).to_string(),
                format_age(now, a.last_seen_unix_ms),
                a.coordinator.clone(),
                a.agent_version.clone(),
                labels_text(a),
            ]
        })
        .collect();
    crate::output::print_columns(
        &[
            "HOST",
            "STATUS",
            "LAST SEEN",
            "COORDINATOR",
            "VERSION",
            "LABELS",
        ],
        &rows,
    );
    let online = agents
        .iter()
        .filter(|a| a.status == AgentStatus::Online as i32)
        .count();
    println!("\n{online} of {} online", agents.len());
    for a in agents {
        if let Some(mark) = cert_expiry(a, now).and_then(Expiry::mark) {
            println!(
                "warning: {}'s certificate {mark} ({}): renew it with `rollbackctl pki renew agent {}`",
                a.host_id,
                human_time(a.cert_not_after_unix_ms),
                a.host_id
            );
        }
    }
    let mismatched: Vec<&AgentInfo> = agents
        .iter()
        .filter(|a| !a.label_mismatch.is_empty())
        .collect();
    if !mismatched.is_empty() {
        println!(
            "\nLABELS are the coordinator's inventory; these agents report otherwise (their claim targets nothing):"
        );
        for a in mismatched {
            println!("  {}: {}", a.host_id, a.label_mismatch.join("; "));
        }
        println!(
            "if the agent is right, `rollbackctl agents label HOST KEY=VALUE` (admin) changes the inventory"
        );
    }
}
