//! The audit chain through the store — SQLite, or PostgreSQL when the suite runs on it
//! (`backend_tests::Fixture`): every write path appends to one chain, a failed audit write
//! leaves no change behind, history from before the chain is chained once (SQLite's upgrade),
//! and rows edited or removed behind the store's back are named by `verify_audit`.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

use super::backend_tests::{Fixture, Raw};
use super::migrations_up_to;
use crate::store::{
    AgentRecord, AuditEvent, AuditFilter, JobHostRow, JobRow, Problem, RunRow, SnapshotRow,
    SqliteStore, Store, StoreError,
};

const ALICE: &str = "spiffe://fleet.test/operator/alice";

fn audit(actor: &str, action: &str, target: &str) -> AuditEvent {
    AuditEvent {
        at_ms: rollback_common::now_unix_ms(),
        actor: actor.into(),
        action: action.into(),
        target: target.into(),
        detail: format!("{action} on {target}"),
    }
}

fn job(id: &str) -> JobRow {
    JobRow {
        job_id: id.into(),
        procedure: "configuration".into(),
        request: Vec::new(),
        plan: Vec::new(),
        state: "running".into(),
        reason: "test".into(),
        requested_by: ALICE.into(),
        created_at_ms: 1,
        finished_at_ms: None,
        halt_reason: String::new(),
        request_id: String::new(),
    }
}

fn host(job: &str, host: &str) -> JobHostRow {
    JobHostRow {
        job_id: job.into(),
        host_id: host.into(),
        ord: 0,
        outcome: "pending".into(),
        phase: String::new(),
        failed_step: String::new(),
        exit_code: 0,
        detail: String::new(),
        duration_ms: 0,
        once_only: false,
        done_phases: Vec::new(),
    }
}

/// A run of `job_id` for `host_id` that nothing has happened to yet.
pub(crate) fn run(run_id: &str, job_id: &str, host_id: &str) -> RunRow {
    RunRow {
        run_id: run_id.into(),
        job_id: job_id.into(),
        host_id: host_id.into(),
        requested_by: ALICE.into(),
        reason: "test".into(),
        procedure: Vec::new(),
        status: 0,
        created_at_ms: 1,
        finished_at_ms: None,
        result: None,
        phase: String::new(),
    }
}

/// A second connection to the store's file, as someone with access to the disk would have.
async fn raw(path: &Path) -> SqlitePool {
    SqlitePool::connect_with(
        SqliteConnectOptions::from_str("sqlite://")
            .expect("options")
            .filename(path)
            .busy_timeout(std::time::Duration::from_secs(5)),
    )
    .await
    .expect("raw connection")
}

async fn exec(pool: &SqlitePool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn ex(db: &Raw, sql: &str) {
    db.exec(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn broken(store: &dyn Store) -> (u64, Problem, String) {
    let v = store.verify_audit().await.expect("verify");
    let b = v.broken.expect("the chain is reported broken");
    (b.seq, b.problem, b.message)
}

async fn intact(store: &dyn Store) -> u64 {
    let v = store.verify_audit().await.expect("verify");
    assert_eq!(v.broken, None, "the chain is intact");
    v.count
}

#[tokio::test]
async fn every_write_path_appends_to_one_chain_even_concurrently() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    assert_eq!(intact(&*store).await, 0, "an empty chain is intact");
    store
        .create_run(&run("r1", "j0", "h1"), "test")
        .await
        .expect("run");

    // The group-commit writer and the store's own transactions, all at once.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let s = store.clone();
        tasks.spawn(async move {
            s.append_audit(&audit(ALICE, "exec", &format!("host/h{i}")))
                .await
        });
    }
    for i in 0..30 {
        let s = store.clone();
        tasks.spawn(async move {
            let id = format!("j{i}");
            s.create_job(
                &job(&id),
                &[host(&id, &format!("x{i}"))],
                &[format!("x{i}")],
                &audit(ALICE, "rollback.started", &format!("job/{id}")),
            )
            .await
        });
    }
    {
        let s = store.clone();
        tasks.spawn(async move {
            s.finish_run(
                "r1",
                "h1",
                1,
                2,
                b"result",
                &audit("agent/h1", "run.finished", "run/r1"),
            )
            .await
            .map(|_| ())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("write");
    }
    assert_eq!(intact(&*store).await, 131);

    let all = store
        .list_audit(&AuditFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list");
    let seqs: Vec<u64> = all.iter().rev().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=131).collect::<Vec<_>>(),
        "one gapless chain, newest first"
    );
    assert!(all.iter().all(|r| !r.event.actor.is_empty()));

    // The job id comes from the target: the job's own record, and its run's result.
    let j0 = store
        .list_audit(&AuditFilter {
            job_id: "j0".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    let actions: Vec<&str> = j0.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(actions.contains(&"run.finished") && actions.contains(&"rollback.started"));

    // An actor matches exactly or by the end of its name after a `/`.
    for (name, n) in [
        ("alice", 130),
        ("operator/alice", 130),
        (ALICE, 130),
        ("h1", 1),
        ("lice", 0),
    ] {
        let got = store
            .list_audit(&AuditFilter {
                actor: name.into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(got.len(), n, "actor {name}");
    }
    let future = store
        .list_audit(&AuditFilter {
            since_ms: rollback_common::now_unix_ms() + 60_000,
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(future.is_empty());
}

#[tokio::test]
async fn a_failed_audit_write_fails_the_change_and_leaves_nothing() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    let agent = AgentRecord {
        host_id: "h1".into(),
        labels: Default::default(),
        reported_labels: Default::default(),
        cert_not_after_ms: None,
        coordinator: String::new(),
        agent_version: "1".into(),
        address: "127.0.0.1".into(),
        online: false,
        connected_at_ms: 1,
        last_seen_ms: 1,
        state: Vec::new(),
    };
    store.agent_connected(&agent).await.expect("agent");
    store
        .create_job(
            &job("old"),
            &[host("old", "h1")],
            &["h1".to_string()],
            &audit(ALICE, "rollback.started", "job/old"),
        )
        .await
        .expect("job");
    store
        .create_run(&run("r1", "old", "h1"), "test")
        .await
        .expect("run");
    // An ended job, for the reopen below (only an ended job can be reopened).
    store
        .create_job(
            &job("ended"),
            &[host("ended", "h3")],
            &[],
            &audit(ALICE, "rollback.started", "job/ended"),
        )
        .await
        .expect("job");
    store
        .update_job_state(
            "ended",
            "test",
            "halted",
            Some(2),
            "test",
            &audit("coordinator", "rollback.halted", "job/ended"),
        )
        .await
        .expect("halt");
    let before = intact(&*store).await;

    let db = fixture.raw().await;
    db.refuse_audit("refuse_audit", "audit table refuses writes (test)")
        .await;
    let is_audit_failure = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Audit { reason, .. }) => {
            assert!(reason.contains("refuses writes"), "{what}: {reason}")
        }
        other => panic!("{what}: expected an audit failure, got {other:?}"),
    };

    is_audit_failure(
        store
            .create_job(
                &job("new"),
                &[host("new", "h2")],
                &["h2".to_string()],
                &audit(ALICE, "rollback.started", "job/new"),
            )
            .await,
        "create_job",
    );
    assert!(
        store.get_job("new").await.expect("read").is_none(),
        "no job"
    );
    assert!(
        store
            .lease_holders(&["h2".into()])
            .await
            .expect("leases")
            .is_empty()
    );

    is_audit_failure(
        store
            .update_job_state(
                "old",
                "test",
                "succeeded",
                Some(5),
                "",
                &audit("coordinator", "rollback.finished", "job/old"),
            )
            .await,
        "update_job_state",
    );
    let (row, _) = store.get_job("old").await.expect("read").expect("old");
    assert_eq!(row.state, "running", "the job has not ended");
    assert_eq!(
        store
            .lease_holders(&["h1".into()])
            .await
            .expect("leases")
            .len(),
        1
    );

    is_audit_failure(
        store
            .reopen_job(
                "ended",
                &["h3".into()],
                &[],
                &audit(ALICE, "rollback.resume", "job/ended"),
            )
            .await,
        "reopen_job",
    );
    let (row, _) = store.get_job("ended").await.expect("read").expect("ended");
    assert_eq!(row.state, "halted", "the job was not reopened");
    is_audit_failure(
        store
            .forget_agent("h1", &audit(ALICE, "agent.forgotten", "host/h1"))
            .await
            .map(|_| ()),
        "forget_agent",
    );
    assert_eq!(
        store.list_agents().await.expect("agents").len(),
        1,
        "agent kept"
    );

    is_audit_failure(
        store
            .insert_snapshot(
                &SnapshotRow {
                    snapshot_id: "s1".into(),
                    host_id: "h1".into(),
                    ..Default::default()
                },
                &audit(ALICE, "snapshot.recorded", "job/old"),
            )
            .await,
        "insert_snapshot",
    );
    assert!(store.list_snapshots().await.expect("snapshots").is_empty());

    is_audit_failure(
        store
            .finish_run(
                "r1",
                "h1",
                1,
                2,
                b"result",
                &audit("agent/h1", "run.finished", "run/r1"),
            )
            .await
            .map(|_| ()),
        "finish_run",
    );
    let r1 = store.get_run("r1").await.expect("read").expect("r1");
    assert_eq!(r1.result, None, "no result without its audit record");

    is_audit_failure(
        store.append_audit(&audit(ALICE, "exec", "host/h1")).await,
        "append_audit",
    );

    db.drop_trigger("refuse_audit").await;
    assert_eq!(
        intact(&*store).await,
        before,
        "the refused writes left no trace"
    );
    store
        .finish_run(
            "r1",
            "h1",
            1,
            2,
            b"result",
            &audit("agent/h1", "run.finished", "run/r1"),
        )
        .await
        .expect("stored once the audit table takes writes");
    assert_eq!(intact(&*store).await, before + 1);
}

#[tokio::test]
async fn a_record_without_an_actor_is_refused_by_the_store_and_by_the_schema() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    for actor in ["", "  "] {
        match store.append_audit(&audit(actor, "exec", "host/h1")).await {
            Err(StoreError::Audit { reason, .. }) => assert!(reason.contains("names no actor")),
            other => panic!("empty actor accepted: {other:?}"),
        }
    }
    let db = fixture.raw().await;
    let err = db
        .exec(&format!(
            "INSERT INTO audit_events (at_ms, actor, action, target, detail, seq, prev_hash, hash, job_id)
             VALUES (1, '', 'exec', 'host/h1', '', 1, '{}', 'ab', '')",
            super::chain::GENESIS
        ))
        .await
        .expect_err("the schema refuses it too");
    assert!(err.to_string().contains("without an actor"), "{err}");
    assert_eq!(intact(&*store).await, 0);
}

#[tokio::test]
async fn history_from_before_the_chain_is_chained_once_in_id_order() {
    // SQLite's upgrade from migration 0008; PostgreSQL's schema starts with the chain.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sqlite");
    // A store as the previous release left it: migrations up to 0008, audit rows unchained.
    {
        let db = SqlitePool::connect_with(
            SqliteConnectOptions::from_str("sqlite://")
                .expect("options")
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .expect("old store");
        migrations_up_to(8).run(&db).await.expect("old migrations");
        exec(
            &db,
            "INSERT INTO runs (run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms)
                 VALUES ('r1', 'j1', 'h1', 'alice', 'test', x'', 1, 1);
             INSERT INTO audit_events (at_ms, actor, action, target, detail) VALUES
                 (1, 'alice', 'rollback.started', 'job/j1', 'first'),
                 (2, 'agent/h1', 'run.finished', 'run/r1', 'status=1'),
                 (3, 'coordinator', 'rollback.finished', 'job/j1', 'succeeded');",
        )
        .await;
        db.close().await;
    }
    let store = SqliteStore::open(&path).await.expect("store migrates");
    assert_eq!(intact(&store).await, 3);
    let records = store
        .list_audit(&AuditFilter {
            job_id: "j1".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    let order: Vec<(u64, &str)> = records
        .iter()
        .map(|r| (r.seq, r.event.detail.as_str()))
        .collect();
    assert_eq!(order, [(3, "succeeded"), (2, "status=1"), (1, "first")]);
    let hashes: Vec<String> = records.iter().map(|r| r.hash.clone()).collect();
    store
        .append_audit(&audit(ALICE, "exec", "host/h1"))
        .await
        .expect("append");
    store.close().await;

    // Once: a row slipped in outside the chain later is not chained by the next start.
    let db = raw(&path).await;
    exec(
        &db,
        "DROP TRIGGER audit_events_are_chained;
         INSERT INTO audit_events (at_ms, actor, action, target, detail) VALUES (9, 'mallory', 'exec', 'host/h1', 'planted');",
    )
    .await;
    db.close().await;
    let store = SqliteStore::open(&path).await.expect("reopens");
    let again = store
        .list_audit(&AuditFilter {
            job_id: "j1".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        again.iter().map(|r| r.hash.clone()).collect::<Vec<_>>(),
        hashes
    );
    let (seq, problem, message) = broken(&store).await;
    assert_eq!((seq, problem), (0, Problem::Unchained), "{message}");
    assert!(message.contains("not in the chain"), "{message}");
}

#[tokio::test]
async fn records_edited_or_removed_behind_the_stores_back_are_named() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    let store = &*store;
    for i in 1..=5 {
        store
            .append_audit(&audit(ALICE, "exec", &format!("host/h{i}")))
            .await
            .expect("append");
    }
    assert_eq!(intact(store).await, 5);
    let db = fixture.raw().await;

    // The append-only triggers stop a plain UPDATE or DELETE.
    for sql in [
        "UPDATE audit_events SET detail = 'x' WHERE seq = 3",
        "DELETE FROM audit_events WHERE seq = 3",
    ] {
        let err = db.exec(sql).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{err}");
    }

    // Whoever drops them changes a record: named.
    db.drop_trigger("audit_events_are_not_changed").await;
    db.drop_trigger("audit_events_are_not_removed").await;
    ex(
        &db,
        "UPDATE audit_events SET detail = 'nothing to see' WHERE seq = 3",
    )
    .await;
    let (seq, problem, message) = broken(store).await;
    assert_eq!((seq, problem), (3, Problem::Changed));
    assert!(
        message.starts_with("hash mismatch: record 3 was changed"),
        "{message}"
    );
    ex(
        &db,
        "UPDATE audit_events SET detail = 'exec on host/h3' WHERE seq = 3",
    )
    .await;
    assert_eq!(intact(store).await, 5, "restored");

    // The newest record removed: the running store remembers it.
    ex(&db, "DELETE FROM audit_events WHERE seq = 5").await;
    let (seq, problem, message) = broken(store).await;
    assert_eq!((seq, problem), (5, Problem::Missing), "{message}");
    // And the next record chains on from it, so the gap stays visible.
    store
        .append_audit(&audit(ALICE, "exec", "host/h6"))
        .await
        .expect("append");
    let (seq, problem, message) = broken(store).await;
    assert_eq!((seq, problem), (5, Problem::Missing));
    assert!(
        message.contains("record 5 is missing (seq gap: record 4 is followed by record 6)"),
        "{message}"
    );

    // A record in the middle removed.
    ex(&db, "DELETE FROM audit_events WHERE seq = 2").await;
    let (seq, problem, _) = broken(store).await;
    assert_eq!((seq, problem), (2, Problem::Missing));
}

/// A group commit records a batch's runs and results many rows a statement: every result is
/// still taken only once and only from its own host, in the order the callers sent them, and
/// each has its audit record with the run's job, in one gapless chain.
#[tokio::test]
async fn results_recorded_together_are_each_taken_once_from_their_own_host_and_chained() {
    use crate::store::ResultTaken;
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    const N: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = store.clone();
        tasks.spawn(async move {
            s.create_run(&run(&format!("r{i}"), "jb", &format!("h{i}")), "test")
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("create_run");
    }
    // Every run's result from its host, sent twice for the even ones; a result for the
    // first ten from another host; and results for runs nobody created.
    // The intruder's come first: a result from the wrong host, just before the right one in
    // the same group, must neither block it nor be taken for it.
    let mut sends = Vec::new();
    for i in 0..10 {
        sends.push((format!("r{i}"), "intruder".to_string(), 3));
        sends.push((format!("ghost{i}"), format!("h{i}"), 4));
    }
    for i in 0..N {
        sends.push((format!("r{i}"), format!("h{i}"), 1));
        if i % 2 == 0 {
            sends.push((format!("r{i}"), format!("h{i}"), 2));
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (run_id, host_id, status) in sends.clone() {
        let s = store.clone();
        tasks.spawn(async move {
            let taken = s
                .finish_run(
                    &run_id,
                    &host_id,
                    status,
                    2,
                    format!("result {status}").as_bytes(),
                    &audit(
                        &format!("agent/{host_id}"),
                        "run.finished",
                        &format!("run/{run_id}"),
                    ),
                )
                .await;
            (run_id, host_id, status, taken)
        });
    }
    let mut recorded = std::collections::HashMap::new();
    let mut repeated = 0;
    while let Some(done) = tasks.join_next().await {
        let (run_id, host_id, status, taken) = done.expect("task");
        match (taken.expect("finish_run"), status) {
            (ResultTaken::Recorded, 1 | 2) => {
                assert!(
                    recorded.insert(run_id.clone(), status).is_none(),
                    "{run_id} recorded twice"
                );
            }
            (ResultTaken::AlreadyRecorded, 1 | 2) => repeated += 1,
            (ResultTaken::OtherHost(owner), 3) => {
                assert_eq!(format!("r{}", &owner[1..]), run_id, "{host_id}")
            }
            (ResultTaken::UnknownRun, 4) => {}
            (other, status) => panic!("{run_id} from {host_id} ({status}): {other:?}"),
        }
    }
    assert_eq!(recorded.len(), N, "every run recorded once");
    assert_eq!(repeated, N / 2, "every second send found its run recorded");
    for i in 0..N {
        let r = store
            .get_run(&format!("r{i}"))
            .await
            .expect("read")
            .expect("run");
        let status = recorded[&format!("r{i}")];
        assert_eq!(
            r.status, status,
            "r{i}: the result that was taken is stored"
        );
        assert_eq!(r.result, Some(format!("result {status}").into_bytes()));
    }
    // One record per result sent, whatever became of it, all in one chain.
    assert_eq!(intact(&*store).await, sends.len() as u64);
    let all = store
        .list_audit(&AuditFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    let count = |action: &str| all.iter().filter(|r| r.event.action == action).count();
    assert_eq!(count("run.finished"), N);
    assert_eq!(count("run.result_repeated"), N / 2);
    assert_eq!(count("run.result_refused"), 10);
    assert_eq!(count("run.result_unknown_run"), 10);
    let of_job = store
        .list_audit(&AuditFilter {
            job_id: "jb".into(),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        of_job.len(),
        sends.len() - 10,
        "every record about a stored run names its job"
    );
}
