//! `rollbackctl agents`: the fleet as the coordinator sees it, with a warning line for each
//! agent whose certificate expires within 30 days (or has expired).

use anyhow::Result;
use clap::Args;
use rollback_common::expiry::Expiry;
use rollback_common::proto::{AgentInfo, AgentStatus, ListAgentsRequest};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::{Output, format_age, format_time};

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
    Forget { host: String },
}

pub async fn run(args: AgentsArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
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

fn agent_json(a: &AgentInfo, now_ms: i64) -> serde_json::Value {
    let state = a.state.as_ref();
    let cert = cert_expiry(a, now_ms);
    json!({
        "host_id": a.host_id,
        "status": status_name(a.status),
        "labels": a.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "agent_version": a.agent_version,
        "address": a.address,
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
    let rows: Vec<[String; 5]> = agents
        .iter()
        .map(|a| {
            [
                a.host_id.clone(),
                status_name(a.status).to_string(),
                format_age(now, a.last_seen_unix_ms),
                a.agent_version.clone(),
                labels_text(a),
            ]
        })
        .collect();
    crate::output::print_columns(&["HOST", "STATUS", "LAST SEEN", "VERSION", "LABELS"], &rows);
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
                format_time(a.cert_not_after_unix_ms),
                a.host_id
            );
        }
    }
}
