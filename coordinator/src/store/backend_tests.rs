//! The store's tests against either backend: `Fixture` is a fresh store of the backend the
//! suite runs on (`ROLLBACK_TEST_STORE=postgres` and the cluster `cargo xtask test` exports in
//! `ROLLBACK_TEST_POSTGRES` / `ROLLBACK_TEST_POSTGRES_PASSWORD_FILE`; SQLite otherwise) with a
//! raw connection for SQL behind the store's back. The tests here: a lease refusing a reopen,
//! and — on PostgreSQL, where several coordinators share one database — two stores (separate
//! pools and sessions, as two processes have) appending to one chain and racing for one host.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

use crate::config::Database;
use crate::store::{
    AuditEvent, EventRow, Events, JobHostRow, JobRow, Opened, Password, PgTarget, RunRow, Store,
    StoreError,
};

/// A fresh store of the backend under test.
pub(crate) enum Fixture {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        target: PgTarget,
        password: Password,
    },
}

/// A connection to a fixture's database behind the store's back, as someone with access to
/// the database would have.
pub(super) enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Fixture {
    pub(crate) async fn new() -> Self {
        if std::env::var("ROLLBACK_TEST_STORE").as_deref() != Ok("postgres") {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("s.sqlite");
            return Self::Sqlite { _dir: dir, path };
        }
        let (Ok(url), Ok(file)) = (
            std::env::var("ROLLBACK_TEST_POSTGRES"),
            std::env::var("ROLLBACK_TEST_POSTGRES_PASSWORD_FILE"),
        ) else {
            panic!(
                "ROLLBACK_TEST_STORE=postgres needs ROLLBACK_TEST_POSTGRES and ROLLBACK_TEST_POSTGRES_PASSWORD_FILE: run `cargo xtask test`"
            );
        };
        let password = Password::new(&std::fs::read_to_string(&file).expect("password file"));
        let mut target = PgTarget::parse(&format!("{url}/postgres")).expect("cluster url");
        let admin = pg_pool(&target, &password).await;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "u_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rollback_common::now_unix_ms()
        );
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        target.database = name;
        Self::Postgres { target, password }
    }

    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    pub(super) fn database(&self) -> Database {
        match self {
            Self::Sqlite { path, .. } => Database::Sqlite(path.clone()),
            Self::Postgres { target, password } => Database::Postgres {
                target: target.clone(),
                password: Some(password.clone()),
            },
        }
    }

    /// Opens the store (as a coordinator does at start).
    pub(crate) async fn open(&self) -> Opened {
        Opened::open(&self.database()).await.expect("store")
    }

    pub(super) async fn raw(&self) -> Raw {
        match self {
            Self::Sqlite { path, .. } => Raw::Sqlite(
                SqlitePool::connect_with(
                    SqliteConnectOptions::from_str("sqlite://")
                        .expect("options")
                        .filename(path)
                        .busy_timeout(std::time::Duration::from_secs(5)),
                )
                .await
                .expect("raw connection"),
            ),
            Self::Postgres { target, password } => Raw::Postgres(pg_pool(target, password).await),
        }
    }
}

async fn pg_pool(target: &PgTarget, password: &Password) -> PgPool {
    let options = PgConnectOptions::new_without_pgpass()
        .host(&target.host)
        .port(target.port)
        .username(&target.user)
        .database(&target.database)
        .password(password.expose());
    PgPool::connect_with(options).await.expect("raw connection")
}

impl Raw {
    /// Runs an SQL script.
    pub(super) async fn exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            Raw::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Raw::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
    }

    /// Makes the audit table refuse every insert with `message` (a trigger named `name`).
    pub(super) async fn refuse_audit(&self, name: &str, message: &str) {
        let sql = match self {
            Raw::Sqlite(_) => format!(
                "CREATE TRIGGER {name} BEFORE INSERT ON audit_events
                 BEGIN SELECT RAISE(ABORT, '{message}'); END;"
            ),
            Raw::Postgres(_) => format!(
                "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION '{message}'; END $$;
                 CREATE TRIGGER {name} BEFORE INSERT ON audit_events FOR EACH ROW
                 EXECUTE FUNCTION {name}();"
            ),
        };
        self.exec(&sql).await.expect("refusing trigger");
    }

    /// Drops a trigger on `audit_events`.
    pub(super) async fn drop_trigger(&self, name: &str) {
        let sql = match self {
            Raw::Sqlite(_) => format!("DROP TRIGGER {name}"),
            Raw::Postgres(_) => format!("DROP TRIGGER {name} ON audit_events"),
        };
        self.exec(&sql).await.expect("drop trigger");
    }
}

fn job(id: &str, state: &str) -> JobRow {
    JobRow {
        job_id: id.into(),
        procedure: "configuration".into(),
        request: Vec::new(),
        plan: Vec::new(),
        state: state.into(),
        reason: "test".into(),
        requested_by: "test".into(),
        created_at_ms: 1,
        finished_at_ms: None,
        halt_reason: String::new(),
        request_id: String::new(),
    }
}

fn audit(action: &str, target: &str) -> AuditEvent {
    AuditEvent {
        at_ms: 1,
        actor: "spiffe://fleet.test/operator/alice".into(),
        action: action.into(),
        target: target.into(),
        detail: "test".into(),
    }
}

fn host(job: &str, outcome: &str) -> JobHostRow {
    JobHostRow {
        job_id: job.into(),
        host_id: "h1".into(),
        ord: 0,
        outcome: outcome.into(),
        phase: "rollback".into(),
        failed_step: "http.check".into(),
        exit_code: 1,
        detail: "failed".into(),
        duration_ms: 0,
        once_only: false,
        done_phases: Vec::new(),
    }
}

#[tokio::test]
async fn a_reopen_refused_by_a_lease_writes_nothing_and_one_allowed_writes_everything() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    let hosts = ["h1".to_string()];
    store
        .create_job(
            &job("old", "running"),
            &[host("old", "failed")],
            &hosts,
            &audit("rollback.started", "job/old"),
        )
        .await
        .expect("old job");
    store
        .update_job_state(
            "old",
            "test",
            "halted",
            Some(2),
            "halted",
            &audit("rollback.finished", "job/old"),
        )
        .await
        .expect("old job halts");
    store
        .create_job(
            &job("holder", "running"),
            &[host("holder", "pending")],
            &hosts,
            &audit("rollback.started", "job/holder"),
        )
        .await
        .expect("holder takes h1");

    let mut reset = host("old", "pending");
    reset.detail = "retried".into();
    let resume = audit("rollback.resume", "job/old");
    let refused = store
        .reopen_job("old", &hosts, &[reset.clone()], &resume)
        .await;
    assert!(
        matches!(refused, Err(StoreError::Leased { ref holders }) if holders[0].job_id == "holder")
    );
    let (row, rows) = store.get_job("old").await.expect("read").expect("old");
    assert_eq!(row.state, "halted", "nothing written");
    assert_eq!(rows[0].outcome, "failed", "nothing written");

    store
        .update_job_state(
            "holder",
            "test",
            "succeeded",
            Some(3),
            "",
            &audit("rollback.finished", "job/holder"),
        )
        .await
        .expect("holder ends, releasing h1");
    store
        .reopen_job("old", &hosts, &[reset], &resume)
        .await
        .expect("reopened");
    let (row, rows) = store.get_job("old").await.expect("read").expect("old");
    assert_eq!((row.state.as_str(), row.finished_at_ms), ("running", None));
    // The row alone is the same row, and an unknown job has none.
    assert_eq!(store.job_row("old").await.expect("read row"), Some(row));
    assert_eq!(store.job_row("nope").await.expect("read row"), None);
    assert_eq!(
        (rows[0].outcome.as_str(), rows[0].detail.as_str()),
        ("pending", "retried")
    );
    assert_eq!(
        store.lease_holders(&hosts).await.expect("leases")[0].job_id,
        "old"
    );
}

/// Two stores on one PostgreSQL database, each with its own pool and its own remembered head:
/// what two coordinator processes are. Without the chain's advisory lock their appends read
/// the same head and collide on `seq` (audit writes fail) or fork the chain.
#[tokio::test]
async fn two_coordinators_sharing_postgres_append_to_one_chain_and_never_both_lease_a_host() {
    let fixture = Fixture::new().await;
    if !fixture.is_postgres() {
        // One SQLite file is one coordinator's; sharing is PostgreSQL's case.
        return;
    }
    let (a, b) = (fixture.open().await, fixture.open().await);
    let stores: [Arc<dyn Store>; 2] = [a.shared(), b.shared()];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..120 {
        let s = stores[i % 2].clone();
        tasks.spawn(async move { s.append_audit(&audit("exec", &format!("host/h{i}"))).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("append");
    }
    for s in &stores {
        let v = s.verify_audit().await.expect("verify");
        assert_eq!(v.broken, None, "each coordinator sees one intact chain");
        assert_eq!(v.count, 120);
    }
    // Each remembered only its own appends; the other's later ones are no gap for it.
    stores[0]
        .append_audit(&audit("exec", "host/after"))
        .await
        .expect("append after the other's");
    assert_eq!(stores[1].verify_audit().await.expect("verify").count, 121);

    // Both race to lease one host to a job of their own: exactly one wins.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in stores.iter().enumerate() {
        let s = s.clone();
        tasks.spawn(async move {
            let id = format!("race{i}");
            s.create_job(
                &job(&id, "running"),
                &[host(&id, "pending")],
                &["contested".to_string()],
                &audit("rollback.started", &format!("job/{id}")),
            )
            .await
        });
    }
    let mut won = 0;
    while let Some(done) = tasks.join_next().await {
        match done.expect("task") {
            Ok(()) => won += 1,
            Err(StoreError::Leased { holders }) => assert_eq!(holders[0].host_id, "contested"),
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!(won, 1, "one job leases the host");
    a.close().await;
    b.close().await;
}

/// A job's own events are read without the events about its hosts (a 10,000-host job stores
/// about 50,000 of those), in order and after a seq; a row stored before events had a host
/// (migration 0012, PostgreSQL 0004: NULL) is still read as possibly the job's own, so no
/// history line of an older job is lost. The last seq is read without reading the events.
#[tokio::test]
async fn a_jobs_own_events_are_read_without_its_hosts_and_older_rows_are_kept() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    store
        .create_job(
            &job("j", "running"),
            &[host("j", "pending")],
            &[],
            &audit("rollback.started", "job/j"),
        )
        .await
        .expect("job");
    assert_eq!(store.last_job_seq("j").await.expect("read"), None);
    let older = if fixture.is_postgres() {
        "INSERT INTO job_events (job_id, seq, at_ms, event) VALUES ('j', 1, 1, '\\x6f6c64'::bytea)"
    } else {
        "INSERT INTO job_events (job_id, seq, at_ms, event) VALUES ('j', 1, 1, X'6f6c64')"
    };
    fixture
        .raw()
        .await
        .exec(older)
        .await
        .expect("a row as an earlier coordinator stored it");
    let row = |seq: u64, host: &str| EventRow {
        seq,
        at_ms: 2,
        host_id: host.into(),
        event: format!("e{seq}").into_bytes(),
    };
    store
        .append_job_events(
            "j",
            "",
            vec![
                row(2, ""),
                row(3, "h1"),
                row(4, "h2"),
                row(5, ""),
                row(6, "h1"),
            ],
        )
        .await
        .expect("events");

    let seqs = |evs: Vec<(u64, Vec<u8>)>| evs.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    let own = store
        .job_events("j", 0, Events::JobsOwn)
        .await
        .expect("read");
    assert_eq!(seqs(own.clone()), [1, 2, 5]);
    assert_eq!(own[0].1, b"old", "the earlier row, whole");
    assert_eq!(own[2].1, b"e5");
    assert_eq!(
        seqs(
            store
                .job_events("j", 2, Events::JobsOwn)
                .await
                .expect("read")
        ),
        [5]
    );
    assert_eq!(
        seqs(store.job_events("j", 0, Events::All).await.expect("read")),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        seqs(store.job_events("j", 4, Events::All).await.expect("read")),
        [5, 6]
    );
    assert_eq!(store.last_job_seq("j").await.expect("read"), Some(6));
    assert_eq!(store.last_job_seq("other").await.expect("read"), None);
}

/// Heartbeats written together are applied together (one statement per few hundred hosts):
/// a host's time never goes back, a heartbeat without a state keeps the stored one, an older
/// one's state is still taken (as when each was its own statement), one for a host the store
/// does not know adds nothing, and every host of a batch larger than one statement's is
/// refreshed.
#[tokio::test]
async fn heartbeats_recorded_together_keep_each_hosts_latest_time_and_last_state() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    const N: i64 = 700;
    for i in 0..N {
        let mut agent = super::cluster_tests::agent(&format!("h{i}"), "");
        agent.last_seen_ms = 1_000;
        agent.state = b"initial".to_vec();
        store.agent_connected(&agent).await.expect("agent");
    }
    // Every third host hears only an older heartbeat, every other one of them with a state
    // (which is kept: a state is taken whatever its time, as one statement a heartbeat did);
    // the others a newer one with a state and an older one without, in whatever order the
    // tasks reach the writer.
    let mut sends: Vec<(String, i64, Option<Vec<u8>>)> = Vec::new();
    for i in 0..N {
        if i % 6 == 0 {
            sends.push((format!("h{i}"), 500, None));
        } else if i % 3 == 0 {
            sends.push((format!("h{i}"), 500, Some(b"late".to_vec())));
        } else {
            sends.push((
                format!("h{i}"),
                2_000 + i,
                Some(format!("s{i}").into_bytes()),
            ));
            sends.push((format!("h{i}"), 1_500, None));
        }
    }
    sends.push(("ghost".into(), 9_000, Some(b"ghost".to_vec())));
    let mut tasks = tokio::task::JoinSet::new();
    for (host, at, state) in sends {
        let s = store.clone();
        tasks.spawn(async move { s.agent_seen(&host, at, state.as_deref()).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("agent_seen");
    }
    let agents = store.list_agents().await.expect("agents");
    assert_eq!(
        agents.len(),
        N as usize,
        "no row for a host the store did not know"
    );
    for a in agents {
        let i: i64 = a.host_id[1..].parse().expect("host number");
        if i % 6 == 0 {
            assert_eq!(
                (a.last_seen_ms, a.state.as_slice()),
                (1_000, b"initial".as_slice()),
                "{}: an older heartbeat without a state changes nothing",
                a.host_id
            );
        } else if i % 3 == 0 {
            assert_eq!(
                (a.last_seen_ms, a.state.as_slice()),
                (1_000, b"late".as_slice()),
                "{}: an older heartbeat keeps the time and brings its state",
                a.host_id
            );
        } else {
            assert_eq!(
                (a.last_seen_ms, a.state),
                (2_000 + i, format!("s{i}").into_bytes()),
                "{}: the latest time and the state sent",
                a.host_id
            );
        }
    }
}

#[tokio::test]
async fn runs_read_together_are_those_stored_whatever_else_is_asked() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    // More than one statement's worth (500 a statement), each run's own procedure.
    const N: usize = 1_100;
    for i in 0..N {
        let row = RunRow {
            run_id: format!("r{i}"),
            job_id: String::new(),
            host_id: format!("h{}", i % 7),
            requested_by: "alice".into(),
            reason: "test".into(),
            procedure: format!("p{i}").into_bytes(),
            status: 0,
            created_at_ms: 1,
            finished_at_ms: None,
            result: None,
            phase: String::new(),
        };
        store.create_run(&row, "i1").await.expect("run");
    }
    assert!(
        store.get_runs(&[]).await.expect("none asked").is_empty(),
        "nothing asked, nothing read"
    );
    // Every other run, one of them twice, and runs the store does not have.
    let mut asked: Vec<String> = (0..N).step_by(2).map(|i| format!("r{i}")).collect();
    asked.push("r0".into());
    asked.extend((0..30).map(|i| format!("missing-{i}")));
    let mut read = store.get_runs(&asked).await.expect("runs");
    read.sort_by_key(|r| r.run_id[1..].parse::<usize>().expect("run number"));
    read.dedup_by(|a, b| a.run_id == b.run_id);
    assert_eq!(
        read.len(),
        N.div_ceil(2),
        "each stored run asked for, no other"
    );
    for (row, i) in read.iter().zip((0..N).step_by(2)) {
        assert_eq!(row.run_id, format!("r{i}"));
        assert_eq!(row.host_id, format!("h{}", i % 7));
        assert_eq!(
            row.procedure,
            format!("p{i}").into_bytes(),
            "{}'s own row",
            row.run_id
        );
    }
}

/// The narrow read `GetJob` makes of a job's runs is the full read's run, host, phase and
/// result, in the same order: the order runs were made, those made in the same millisecond in
/// the order they were stored. Another job's runs and exec runs are not read.
#[tokio::test]
async fn a_jobs_run_results_are_its_runs_in_order_with_their_results() {
    let fixture = Fixture::new().await;
    let store = fixture.open().await.shared();
    for id in ["j", "other"] {
        store
            .create_job(
                &job(id, "running"),
                &[host(id, "pending")],
                &[],
                &audit("rollback.started", &format!("job/{id}")),
            )
            .await
            .expect("job");
    }
    let run = |run_id: &str, job_id: &str, at: i64, phase: &str| RunRow {
        run_id: run_id.into(),
        job_id: job_id.into(),
        host_id: "h1".into(),
        requested_by: "alice".into(),
        reason: "test".into(),
        procedure: format!("procedure of {run_id}").into_bytes(),
        status: 0,
        created_at_ms: at,
        finished_at_ms: None,
        result: None,
        phase: phase.into(),
    };
    // Stored out of time order, and three in one millisecond (stored z, a, m).
    for r in [
        run("z", "j", 20, "app"),
        run("a", "j", 20, "app"),
        run("first", "j", 10, "database"),
        run("m", "j", 20, "verify"),
        run("theirs", "other", 15, "app"),
        run("exec", "", 15, ""),
    ] {
        store.create_run(&r, "i1").await.expect("run");
    }
    for id in ["a", "first"] {
        store
            .finish_run(
                id,
                "h1",
                1,
                30,
                format!("result of {id}").as_bytes(),
                &audit("run.finished", &format!("run/{id}")),
            )
            .await
            .expect("result");
    }

    let narrow = store.job_run_results("j").await.expect("read");
    let ids: Vec<&str> = narrow.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["first", "z", "a", "m"]);
    let full = store.job_runs("j").await.expect("read");
    assert_eq!(narrow.len(), full.len());
    for (n, f) in narrow.iter().zip(&full) {
        assert_eq!(
            (&n.run_id, &n.host_id, &n.phase, &n.result),
            (&f.run_id, &f.host_id, &f.phase, &f.result),
            "the full read's fields"
        );
    }
    assert_eq!(narrow[0].result.as_deref(), Some(&b"result of first"[..]));
    assert_eq!(narrow[1].result, None);
    assert_eq!(narrow[2].result.as_deref(), Some(&b"result of a"[..]));
    assert!(
        store
            .job_run_results("none")
            .await
            .expect("read")
            .is_empty(),
        "a job without runs (or unknown) has none"
    );
}
