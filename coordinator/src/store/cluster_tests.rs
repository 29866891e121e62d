//! The cluster's store contract (`ClusterStore`), written against `&dyn Store` so every
//! backend runs the same checks: a name has one live process, a job has one owner at a time,
//! a lapsed lease is taken over once, a lost lease is not renewed, and an agent's session
//! ending at one coordinator does not mark it offline when another holds it.

use super::cluster::{Claim, CoordinatorRow, Owner};
use super::{AgentRecord, AuditEvent, JobRow, Store};

fn owner(name: &str, instance: &str) -> Owner {
    Owner {
        name: name.into(),
        instance: instance.into(),
    }
}

fn row(name: &str, instance: &str, now: i64) -> CoordinatorRow {
    CoordinatorRow {
        name: name.into(),
        instance: instance.into(),
        address: format!("{name}:7443"),
        version: "test".into(),
        started_at_ms: now,
        heartbeat_ms: now,
    }
}

fn audit(target: &str) -> AuditEvent {
    AuditEvent {
        at_ms: 1,
        actor: "test".into(),
        action: "rollback.started".into(),
        target: target.into(),
        detail: String::new(),
    }
}

fn job(id: &str, created_at_ms: i64) -> JobRow {
    JobRow {
        job_id: id.into(),
        procedure: "configuration".into(),
        request: Vec::new(),
        plan: Vec::new(),
        state: "running".into(),
        reason: "test".into(),
        requested_by: "test".into(),
        created_at_ms,
        finished_at_ms: None,
        halt_reason: String::new(),
        request_id: String::new(),
    }
}

fn agent(host: &str, coordinator: &str) -> AgentRecord {
    AgentRecord {
        host_id: host.into(),
        labels: Default::default(),
        reported_labels: Default::default(),
        agent_version: "1".into(),
        address: "127.0.0.1:1".into(),
        online: true,
        connected_at_ms: 1,
        last_seen_ms: 1,
        state: Vec::new(),
        cert_not_after_ms: None,
        coordinator: coordinator.into(),
    }
}

const LEASE: i64 = 5_000;

/// One live process per name; a dead one's name is free, and so is the name of one that left.
pub async fn names(store: &dyn Store) {
    let now = 1_000_000;
    assert_eq!(
        store
            .register_coordinator(&row("a", "a1", now), LEASE)
            .await
            .expect("store"),
        Ok(())
    );
    let taken = store
        .register_coordinator(&row("a", "a2", now + 1_000), LEASE)
        .await
        .expect("store");
    assert_eq!(
        taken.map_err(|r| r.instance),
        Err("a1".to_string()),
        "a live name is refused"
    );
    // a1 still heartbeats as itself; a2 does not own the name.
    assert!(
        store
            .coordinator_heartbeat(&owner("a", "a1"), now + 2_000)
            .await
            .expect("store")
    );
    assert!(
        !store
            .coordinator_heartbeat(&owner("a", "a2"), now + 2_000)
            .await
            .expect("store")
    );
    // Silent for a lease: the name is free, and the old process learns it lost it.
    assert_eq!(
        store
            .register_coordinator(&row("a", "a3", now + 2_000 + LEASE + 1), LEASE)
            .await
            .expect("store"),
        Ok(())
    );
    assert!(
        !store
            .coordinator_heartbeat(&owner("a", "a1"), now + 9_000)
            .await
            .expect("store")
    );
    assert!(
        store
            .register_coordinator(&row("b", "b1", now), LEASE)
            .await
            .expect("store")
            .is_ok()
    );
    let names: Vec<String> = store
        .list_coordinators()
        .await
        .expect("store")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

/// A job has one owner; its lease is renewed by that owner only; a lapsed lease is free, a
/// lost one is not renewed; a released job is free at once; an unowned job is an orphan only
/// after a lease.
pub async fn leases(store: &dyn Store) {
    let now = 2_000_000;
    let (a, b) = (owner("a", "a1"), owner("b", "b1"));
    store
        .create_job(&job("j1", now), &[], &[], &audit("job/j1"))
        .await
        .expect("store");
    assert!(
        store
            .orphaned_jobs(now + 10, LEASE)
            .await
            .expect("store")
            .is_empty(),
        "a job its creator has not claimed yet is nobody's orphan"
    );
    assert_eq!(
        store
            .claim_job("j1", &a, now + 10, LEASE)
            .await
            .expect("store"),
        Claim::Claimed {
            previous: String::new()
        }
    );
    assert!(matches!(
        store.claim_job("j1", &b, now + 20, LEASE).await.expect("store"),
        Claim::HeldBy { owner, .. } if owner == "a"
    ));
    assert_eq!(
        store
            .claim_job("nope", &b, now, LEASE)
            .await
            .expect("store"),
        Claim::Missing
    );
    // a renews; b cannot.
    let ids = vec!["j1".to_string()];
    assert_eq!(
        store
            .renew_jobs(&a, &ids, now + 3_000 + LEASE)
            .await
            .expect("store"),
        ids
    );
    assert!(
        store
            .renew_jobs(&b, &ids, now + 9_999_999)
            .await
            .expect("store")
            .is_empty()
    );
    assert!(
        store
            .orphaned_jobs(now + 3_000 + LEASE - 1, LEASE)
            .await
            .expect("store")
            .is_empty()
    );
    // a goes silent: the lease lapses, b takes it over once, and a's renewal fails.
    let later = now + 3_000 + LEASE + 1;
    let orphans = store.orphaned_jobs(later, LEASE).await.expect("store");
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].owner, "a");
    assert_eq!(
        store
            .claim_job("j1", &b, later, LEASE)
            .await
            .expect("store"),
        Claim::Claimed {
            previous: "a".into()
        }
    );
    assert!(matches!(
        store
            .claim_job("j1", &owner("c", "c1"), later + 1, LEASE)
            .await
            .expect("store"),
        Claim::HeldBy { .. }
    ));
    assert!(
        store
            .renew_jobs(&a, &ids, later + LEASE)
            .await
            .expect("store")
            .is_empty(),
        "a lost it"
    );
    assert_eq!(
        store.job_owner("j1").await.expect("store"),
        Some(("b".into(), later + LEASE))
    );
    // b's restarted process (same name) takes it back at once; a release frees it at once.
    let b2 = owner("b", "b2");
    assert!(matches!(
        store
            .claim_job("j1", &b2, later + 2, LEASE)
            .await
            .expect("store"),
        Claim::Claimed { .. }
    ));
    store.release_job("j1", &b).await.expect("store");
    assert!(
        matches!(
            store
                .claim_job("j1", &a, later + 3, LEASE)
                .await
                .expect("store"),
            Claim::HeldBy { .. }
        ),
        "only the holder's release counts"
    );
    store.release_job("j1", &b2).await.expect("store");
    assert!(matches!(
        store
            .claim_job("j1", &a, later + 3, LEASE)
            .await
            .expect("store"),
        Claim::Claimed { .. }
    ));
    // A job nobody claimed (its creator died at once) is an orphan after a lease.
    store
        .create_job(&job("j2", now), &[], &[], &audit("job/j2"))
        .await
        .expect("store");
    let orphans: Vec<String> = store
        .orphaned_jobs(now + LEASE + 1, LEASE)
        .await
        .expect("store")
        .into_iter()
        .map(|o| o.job_id)
        .collect();
    assert!(orphans.contains(&"j2".to_string()));
}

/// An agent that moved from a to b stays online when its old session at a ends; it goes
/// offline when b's does, and when b dies.
pub async fn agents(store: &dyn Store) {
    let now = rollback_common::now_unix_ms();
    store
        .register_coordinator(&row("a", "a1", now), LEASE)
        .await
        .expect("store")
        .expect("store");
    store
        .register_coordinator(&row("b", "b1", now), LEASE)
        .await
        .expect("store")
        .expect("store");
    store
        .agent_connected(&agent("web-1", "a"))
        .await
        .expect("store");
    assert_eq!(
        store
            .agent_holder("web-1", "b", now, LEASE)
            .await
            .expect("store"),
        Some("a".into())
    );
    assert_eq!(
        store
            .agent_holder("web-1", "a", now, LEASE)
            .await
            .expect("store"),
        None,
        "not elsewhere"
    );
    store
        .agent_connected(&agent("web-1", "b"))
        .await
        .expect("store");
    assert!(
        !store.agent_released("web-1", 5, "a").await.expect("store"),
        "a's late disconnect"
    );
    assert_eq!(
        store
            .agent_holder("web-1", "a", now, LEASE)
            .await
            .expect("store"),
        Some("b".into())
    );
    // b dies: its agents count as offline.
    assert_eq!(
        store
            .agent_holder("web-1", "a", now + LEASE + 1, LEASE)
            .await
            .expect("store"),
        None
    );
    assert_eq!(
        store
            .release_agents_of_dead(now + LEASE + 1, LEASE)
            .await
            .expect("store"),
        1
    );
    let listed = store.list_agents().await.expect("store");
    assert!(!listed[0].online);
    assert_eq!(listed[0].coordinator, "b");
    store
        .agent_connected(&agent("web-1", "b"))
        .await
        .expect("store");
    assert!(store.agent_released("web-1", 5, "b").await.expect("store"));
    assert_eq!(
        store.mark_disconnected_held_by("b").await.expect("store"),
        0
    );
}

#[tokio::test]
async fn the_store_keeps_the_cluster_contract() {
    // SQLite, or a fresh PostgreSQL database when the suite runs on PostgreSQL.
    let fixture = super::backend_tests::Fixture::new().await;
    let store = fixture.open().await.shared();
    names(&*store).await;
    leases(&*store).await;
    agents(&*store).await;
}
