//! `rollbackctl coordinators`: the coordinators sharing the store of the one asked — which is
//! alive, where, how many agents each holds and how many jobs each drives.

use anyhow::Result;
use rollback_common::proto::{CoordinatorInfo, ListCoordinatorsRequest};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::{Output, format_age, format_time, print_columns};

pub async fn run(flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let answer = client
        .list_coordinators(ListCoordinatorsRequest {})
        .await
        .map_err(|s| status_error("listing coordinators", s))?
        .into_inner();
    let now = rollback_common::now_unix_ms();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "coordinators": answer.coordinators.iter().map(info_json).collect::<Vec<_>>(),
                "lease_secs": answer.lease_secs,
            }))?
        ),
        Output::Table => {
            let rows: Vec<[String; 7]> = answer
                .coordinators
                .iter()
                .map(|c| {
                    [
                        if c.is_self {
                            format!("{} (this one)", c.name)
                        } else {
                            c.name.clone()
                        },
                        if c.alive { "alive" } else { "dead" }.to_string(),
                        c.address.clone(),
                        format_age(now, c.heartbeat_unix_ms),
                        c.agents.to_string(),
                        c.jobs.to_string(),
                        c.version.clone(),
                    ]
                })
                .collect();
            print_columns(
                &[
                    "NAME",
                    "STATUS",
                    "ADDRESS",
                    "HEARTBEAT",
                    "AGENTS",
                    "JOBS",
                    "VERSION",
                ],
                &rows,
            );
            println!(
                "\na coordinator silent for {} s is dead: its agents move to another, its jobs are taken over",
                answer.lease_secs
            );
        }
    }
    Ok(())
}

fn info_json(c: &CoordinatorInfo) -> serde_json::Value {
    json!({
        "name": c.name,
        "alive": c.alive,
        "is_self": c.is_self,
        "address": c.address,
        "version": c.version,
        "started_at": format_time(c.started_at_unix_ms),
        "heartbeat_unix_ms": c.heartbeat_unix_ms,
        "agents": c.agents,
        "jobs": c.jobs,
    })
}
