//! The coordinators of one store: this one registers at start (refused while another live
//! process has its name), and `rollbackctl coordinators` lists them with their heartbeat, the
//! agents they hold and the jobs they drive.

use std::collections::HashMap;

use rollback_common::now_unix_ms;
use rollback_common::proto::{CoordinatorInfo, ListCoordinatorsResponse};
use tonic::Status;

use super::Cluster;
use crate::store::StoreError;
use crate::store::cluster::CoordinatorRow;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "another coordinator named `{name}` is alive at {address} (heartbeat {age_ms} ms ago): each coordinator sharing a store needs its own `name` in coordinator.toml; if that process is gone, wait {lease_secs} s for its lease to lapse"
    )]
    NameTaken {
        name: String,
        address: String,
        age_ms: i64,
        lease_secs: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Registers this process under its name (see `ClusterStore::register_coordinator`).
pub async fn register(cluster: &Cluster, version: &str) -> Result<(), RegisterError> {
    let now = now_unix_ms();
    let me = CoordinatorRow {
        name: cluster.me.name.clone(),
        instance: cluster.me.instance.clone(),
        address: cluster.address.clone(),
        version: version.to_string(),
        started_at_ms: now,
        heartbeat_ms: now,
    };
    match cluster
        .store
        .register_coordinator(&me, cluster.lease_ms())
        .await?
    {
        Ok(()) => Ok(()),
        // Our own predecessor, killed a moment ago: same machine, same address — and this
        // process holds that address's listening socket now, so it is not alive.
        Err(other)
            if same_machine(&other.instance, &me.instance) && other.address == me.address =>
        {
            tracing::info!(name = %me.name, "the previous process of this coordinator stopped without saying so; taking its place");
            cluster
                .store
                .register_coordinator(&me, -1)
                .await?
                .map_err(|o| RegisterError::NameTaken {
                    name: o.name,
                    address: o.address,
                    age_ms: now - o.heartbeat_ms,
                    lease_secs: cluster.lease.as_secs(),
                })
        }
        Err(other) => Err(RegisterError::NameTaken {
            name: other.name,
            address: other.address,
            age_ms: now - other.heartbeat_ms,
            lease_secs: cluster.lease.as_secs(),
        }),
    }
}

/// An instance id is `MACHINE/RANDOM` (see `instance_id`).
fn same_machine(a: &str, b: &str) -> bool {
    let machine = |s: &str| s.split_once('/').map(|(m, _)| m.to_string());
    machine(a).is_some_and(|m| Some(m) == machine(b))
}

/// A process's instance id: the machine's id and a random part.
pub fn instance_id(random: &str) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{machine}/{random}")
}

/// Tells the peers this process is gone (a clean stop): its name is free at once.
pub async fn leave(cluster: &Cluster) {
    if let Err(e) = cluster.store.coordinator_heartbeat(&cluster.me, 0).await {
        tracing::warn!(error = %e, "store failed recording this coordinator's stop");
    }
}

/// `ListCoordinators`.
pub async fn list(cluster: &Cluster) -> Result<ListCoordinatorsResponse, Status> {
    let store = &cluster.store;
    let now = now_unix_ms();
    let mut agents: HashMap<String, u32> = HashMap::new();
    for a in store.list_agents().await?.into_iter().filter(|a| a.online) {
        *agents.entry(a.coordinator).or_default() += 1;
    }
    // This process's own count is its registry: exact, not the store's last word.
    agents.insert(
        cluster.me.name.clone(),
        u32::try_from(cluster.registry.len()).unwrap_or(u32::MAX),
    );
    let mut jobs: HashMap<String, u32> = HashMap::new();
    for job in store.running_jobs().await? {
        if let Some((owner, until)) = store.job_owner(&job).await?
            && until >= now
        {
            *jobs.entry(owner).or_default() += 1;
        }
    }
    let coordinators = store
        .list_coordinators()
        .await?
        .into_iter()
        .map(|c| {
            let alive = c.alive(now, cluster.lease_ms());
            CoordinatorInfo {
                is_self: c.instance == cluster.me.instance,
                agents: if alive {
                    agents.get(&c.name).copied().unwrap_or(0)
                } else {
                    0
                },
                jobs: jobs.get(&c.name).copied().unwrap_or(0),
                name: c.name,
                address: c.address,
                version: c.version,
                started_at_unix_ms: c.started_at_ms,
                heartbeat_unix_ms: c.heartbeat_ms,
                alive,
            }
        })
        .collect();
    Ok(ListCoordinatorsResponse {
        coordinators,
        lease_secs: cluster.lease.as_secs(),
    })
}
