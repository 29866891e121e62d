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

/// An online agent held by `coordinator`, connected and last seen at 1.
pub(super) fn agent(host: &str, coordinator: &str) -> AgentRecord {
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

fn host_row(job_id: &str, outcome: &str) -> super::JobHostRow {
    super::JobHostRow {
        job_id: job_id.into(),
        host_id: "web-1".into(),
        outcome: outcome.into(),
        ..Default::default()
    }
}

fn run_row(run_id: &str, job_id: &str) -> super::RunRow {
    super::RunRow {
        run_id: run_id.into(),
        job_id: job_id.into(),
        host_id: "web-1".into(),
        requested_by: "test".into(),
        ..Default::default()
    }
}

fn is_not_owner<T: std::fmt::Debug>(r: Result<T, super::StoreError>, what: &str) {
    assert!(
        matches!(r, Err(super::StoreError::NotOwner { ref job_id }) if job_id == "j"),
        "{what} by the coordinator that lost the job: {r:?}"
    );
}

/// A job's own event (no host) as the pipeline stores it.
fn event(seq: u64, at_ms: i64, body: Vec<u8>) -> super::EventRow {
    super::EventRow {
        seq,
        at_ms,
        host_id: String::new(),
        event: body,
    }
}

async fn seqs(store: &dyn Store, job_id: &str) -> Vec<u64> {
    store
        .job_events(job_id, 0, super::Events::All)
        .await
        .expect("store")
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

/// A coordinator whose job was claimed by another (its lease lapsed while it went on) writes
/// nothing more for it — events, host rows, runs, its end — so the new owner, which reads
/// the job once it holds it, numbers its events after the last one stored and never meets a
/// write of the old owner. Two stores of one database, as two coordinator processes have.
#[tokio::test]
async fn a_coordinator_that_lost_a_job_writes_nothing_more_for_it() {
    let fixture = super::backend_tests::Fixture::new().await;
    let (a_opened, b_opened) = (fixture.open().await, fixture.open().await);
    let (a, b) = (a_opened.shared(), b_opened.shared());
    let now = 3_000_000;
    let (a_me, b_me) = (owner("a", "a1"), owner("b", "b1"));
    a.create_job(&job("j", now), &[], &[], &audit("job/j"))
        .await
        .expect("store");
    // Written before the job is claimed, and by its owner once it is: taken.
    a.append_job_events("j", "a1", vec![event(1, now, b"e1".to_vec())])
        .await
        .expect("nobody's job yet");
    assert!(matches!(
        a.claim_job("j", &a_me, now, LEASE).await.expect("store"),
        Claim::Claimed { .. }
    ));
    a.append_job_events("j", "a1", vec![event(2, now, b"e2".to_vec())])
        .await
        .expect("the owner's event");
    a.update_job_hosts(&[host_row("j", "running")], "a1")
        .await
        .expect("the owner's host row");
    a.create_run(&run_row("r1", "j"), "a1")
        .await
        .expect("the owner's run");

    // a stalls past its lease; b takes the job over.
    assert!(matches!(
        b.claim_job("j", &b_me, now + 2 * LEASE, LEASE).await.expect("store"),
        Claim::Claimed { previous } if previous == "a"
    ));
    is_not_owner(
        a.append_job_events("j", "a1", vec![event(3, now, b"late".to_vec())])
            .await,
        "an event",
    );
    is_not_owner(
        a.update_job_hosts(&[host_row("j", "failed")], "a1").await,
        "a host row",
    );
    is_not_owner(a.create_run(&run_row("r2", "j"), "a1").await, "a run");
    is_not_owner(
        a.update_job_state("j", "a1", "failed", Some(now), "", &audit("job/j"))
            .await,
        "the job's end",
    );
    // Nothing of it is stored; b writes on from where the store says.
    assert_eq!(seqs(&*b, "j").await, vec![1, 2]);
    let (_, hosts) = b.get_job("j").await.expect("store").expect("job");
    assert_eq!(
        hosts[0].outcome, "running",
        "a's late host row is not stored"
    );
    assert!(
        b.get_run("r2").await.expect("store").is_none(),
        "a's late run is not stored"
    );
    b.append_job_events("j", "b1", vec![event(3, now, b"b3".to_vec())])
        .await
        .expect("the new owner's event");
    b.update_job_state("j", "b1", "succeeded", Some(now), "", &audit("job/j"))
        .await
        .expect("the new owner ends the job");

    // The race: a appends as fast as it can while b claims at some moment. Whatever b reads
    // once its claim is stored is all a ever stored.
    for round in 0..25_i64 {
        let id = format!("race-{round}");
        a.create_job(&job(&id, now), &[], &[], &audit(&format!("job/{id}")))
            .await
            .expect("store");
        assert!(matches!(
            a.claim_job(&id, &a_me, now, LEASE).await.expect("store"),
            Claim::Claimed { .. }
        ));
        let writer = {
            let (a, id) = (a.clone(), id.clone());
            tokio::spawn(async move {
                for seq in 1..10_000_u64 {
                    match a
                        .append_job_events(&id, "a1", vec![event(seq, now, vec![1])])
                        .await
                    {
                        Ok(()) => {}
                        Err(super::StoreError::NotOwner { .. }) => return seq,
                        Err(e) => panic!("store failed: {e}"),
                    }
                }
                panic!("a was never refused");
            })
        };
        tokio::time::sleep(std::time::Duration::from_micros(
            u64::try_from(round % 5).unwrap_or(0) * 700 + 300,
        ))
        .await;
        assert!(matches!(
            b.claim_job(&id, &b_me, now + 2 * LEASE, LEASE)
                .await
                .expect("store"),
            Claim::Claimed { .. }
        ));
        let seen_by_b = seqs(&*b, &id).await;
        let refused_at = writer.await.expect("writer task");
        let stored = seqs(&*b, &id).await;
        assert_eq!(
            stored, seen_by_b,
            "round {round}: a stored events after b's claim (a was refused at seq {refused_at})"
        );
    }
}

/// `list_jobs` filters: state, procedure, a host the job targeted, since, kind (rollbacks are
/// every procedure but snapshot and diagnose) and an id prefix; newest first, within the limit.
#[tokio::test]
async fn jobs_are_listed_by_filter_newest_first() {
    use super::JobFilter;
    let fixture = super::backend_tests::Fixture::new().await;
    let opened = fixture.open().await;
    let store = opened.shared();
    let jobs = [
        (
            "3fa90000000000000000000000000001",
            "database",
            "halted",
            10,
            "web-1",
        ),
        (
            "3fa91111111111111111111111111111",
            "configuration",
            "succeeded",
            20,
            "web-2",
        ),
        (
            "abcd0000000000000000000000000000",
            "snapshot",
            "succeeded",
            30,
            "web-1",
        ),
        (
            "abce0000000000000000000000000000",
            "diagnose",
            "succeeded",
            40,
            "web-1",
        ),
    ];
    for (id, procedure, state, at, host) in jobs {
        let mut row = job(id, at);
        row.procedure = procedure.into();
        row.state = state.into();
        let hosts = [super::JobHostRow {
            job_id: id.into(),
            host_id: host.into(),
            outcome: "pending".into(),
            ..Default::default()
        }];
        store
            .create_job(&row, &hosts, &[], &audit(&format!("job/{id}")))
            .await
            .expect("store");
    }
    let ids = |f: JobFilter| {
        let store = store.clone();
        async move {
            store
                .list_jobs(&JobFilter { limit: 10, ..f })
                .await
                .expect("store")
                .into_iter()
                .map(|r| r.job_id[..4].to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ids(JobFilter::default()).await,
        ["abce", "abcd", "3fa9", "3fa9"]
    );
    let kind = |k: &str| JobFilter {
        kind: k.into(),
        ..Default::default()
    };
    assert_eq!(ids(kind("rollback")).await, ["3fa9", "3fa9"]);
    assert_eq!(ids(kind("snapshot")).await, ["abcd"]);
    assert_eq!(ids(kind("diagnose")).await, ["abce"]);
    let f = JobFilter {
        state: "halted".into(),
        ..Default::default()
    };
    assert_eq!(ids(f).await, ["3fa9"]);
    let f = JobFilter {
        procedure: "configuration".into(),
        ..Default::default()
    };
    assert_eq!(ids(f).await, ["3fa9"]);
    let f = JobFilter {
        host_id: "web-1".into(),
        kind: "rollback".into(),
        ..Default::default()
    };
    assert_eq!(ids(f).await, ["3fa9"]);
    let f = JobFilter {
        since_ms: 20,
        ..Default::default()
    };
    assert_eq!(ids(f).await, ["abce", "abcd", "3fa9"]);
    let f = JobFilter {
        id_prefix: "3fa9".into(),
        ..Default::default()
    };
    assert_eq!(ids(f).await.len(), 2, "both jobs of the prefix");
    let f = JobFilter {
        id_prefix: "3fa91".into(),
        ..Default::default()
    };
    assert_eq!(ids(f).await, ["3fa9"]);
    let one = store
        .list_jobs(&JobFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("store");
    assert_eq!(one.len(), 1);
}
