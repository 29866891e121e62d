//! The audit trail as a hash chain. Every record carries its place in the chain (`seq`, from
//! 1), the hash of the record before it (`prev_hash`; the first chains from `GENESIS`) and its
//! own `hash`: SHA-256 over `canonical`, where every field is length-prefixed, so two different
//! records never have the same encoding.
//!
//! `append` writes a record inside the transaction that makes the change it records: it reads
//! the chain head and inserts the next record in that one transaction, and every transaction
//! that appends begins `IMMEDIATE` (SQLite's write lock), so appends are serialized even across
//! connections and processes, and a crash leaves the chain exactly as the last commit left it.
//! `verify` walks the chain from genesis and names the first record that was changed or
//! removed. The store also remembers the newest record this process has seen committed
//! (`Seen`), which catches the one change a chain cannot show by itself while the coordinator
//! runs: records cut off its end.

use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use tracing::error;

use super::{AuditEvent, StoreError};

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// First field of every encoding: a hash of anything else never equals a record's.
const DOMAIN: &[u8] = b"fleet-rollback audit record v1";

/// Columns of a stored record, in the order `record` reads them.
const COLUMNS: &str = "id, seq, at_ms, actor, action, target, detail, job_id, prev_hash, hash";

/// A place in the chain: a record's seq and hash (seq 0 and `GENESIS` before the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: u64,
    pub hash: String,
}

impl Link {
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// SQLite's row id.
    pub id: i64,
    pub seq: u64,
    pub event: AuditEvent,
    /// The job the record is about ("" for none), derived from its target when written.
    pub job_id: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Which records `list` returns: all conditions hold; empty or zero ones are not applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records at or after this time (unix ms).
    pub since_ms: i64,
    /// The actor exactly, or the end of it after a `/` (`alice` matches
    /// `spiffe://fleet.example/operator/alice`, `web-1` matches `agent/web-1`).
    pub actor: String,
    pub job_id: String,
    /// At most this many, newest first.
    pub limit: u32,
}

/// What is wrong with the first broken record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Its fields do not hash to its stored hash.
    Changed,
    /// A seq is missing: a record was removed.
    Missing,
    /// Its `prev_hash` is not the hash of the record before it.
    Relinked,
    /// Its seq repeats or goes backwards.
    OutOfOrder,
    /// A row has no place in the chain.
    Unchained,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Changed => "changed",
            Problem::Missing => "missing",
            Problem::Relinked => "relinked",
            Problem::OutOfOrder => "out_of_order",
            Problem::Unchained => "unchained",
        }
    }
}

/// The first record that was changed or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Its place in the chain (0 for a row that has none).
    pub seq: u64,
    /// Its row id (0 when the record is gone).
    pub id: i64,
    pub problem: Problem,
    pub message: String,
}

/// The result of walking the chain from genesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Records found intact (up to the first broken one).
    pub count: u64,
    /// The last intact record.
    pub head: Link,
    pub broken: Option<Broken>,
}

/// The canonical encoding of a record: each field as its length (u64, big-endian) and its
/// bytes, in this order: a domain tag, seq, at_ms, actor, action, target, detail, job_id,
/// prev_hash.
pub fn canonical(seq: u64, event: &AuditEvent, job_id: &str, prev_hash: &str) -> Vec<u8> {
    let fields: [&[u8]; 9] = [
        DOMAIN,
        &seq.to_be_bytes(),
        &event.at_ms.to_be_bytes(),
        event.actor.as_bytes(),
        event.action.as_bytes(),
        event.target.as_bytes(),
        event.detail.as_bytes(),
        job_id.as_bytes(),
        prev_hash.as_bytes(),
    ];
    let mut out = Vec::with_capacity(fields.iter().map(|f| 8 + f.len()).sum());
    for field in fields {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// A record's hash: SHA-256 of its canonical encoding, in lowercase hex.
pub fn hash_of(seq: u64, event: &AuditEvent, job_id: &str, prev_hash: &str) -> String {
    hex::encode(Sha256::digest(canonical(seq, event, job_id, prev_hash)))
}

/// The newest record this process has seen committed: the stored head at open, then each
/// record it appends. If the table's head is ever behind it, records were cut off the end.
#[derive(Debug, Default)]
pub(super) struct Seen(std::sync::Mutex<Option<Link>>);

impl Seen {
    pub(super) fn new(head: Option<Link>) -> Self {
        Self(std::sync::Mutex::new(head))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Link>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn get(&self) -> Option<Link> {
        self.lock().clone()
    }

    /// After a commit: `link` is committed (appends commit in seq order, but their callers may
    /// report them in any order, so the newest wins).
    pub(super) fn advance(&self, link: &Link) {
        let mut seen = self.lock();
        if seen.as_ref().is_none_or(|s| s.seq < link.seq) {
            *seen = Some(link.clone());
        }
    }
}

async fn head(conn: &mut SqliteConnection) -> Result<Option<Link>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| Link {
        seq: u64::try_from(r.get::<i64, _>("seq")).unwrap_or(0),
        hash: r.get("hash"),
    }))
}

/// The stored head of the chain (None when it has no record).
pub(super) async fn stored_head(pool: &SqlitePool) -> Result<Option<Link>, StoreError> {
    let mut conn = pool.acquire().await.map_err(query("audit chain head"))?;
    head(&mut conn).await.map_err(query("audit chain head"))
}

/// The job a record is about, from its target: `job/ID` is that job, `run/ID` the run's job
/// ("" for an exec), anything else none.
async fn job_of(conn: &mut SqliteConnection, target: &str) -> Result<String, sqlx::Error> {
    if let Some(job) = target.strip_prefix("job/") {
        return Ok(job.to_string());
    }
    if let Some(run) = target.strip_prefix("run/") {
        let job: Option<String> = sqlx::query_scalar("SELECT job_id FROM runs WHERE run_id = ?1")
            .bind(run)
            .fetch_optional(&mut *conn)
            .await?;
        return Ok(job.unwrap_or_default());
    }
    Ok(String::new())
}

fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

fn db_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Appends `event` as the next record of the chain, in the caller's transaction (which must
/// have begun `IMMEDIATE`); returns its link, for `Seen::advance` once the caller committed.
/// Refuses a record without an actor. Any failure is `StoreError::Audit`: the caller's
/// transaction, and so the change the record is about, must not commit.
pub(super) async fn append(
    conn: &mut SqliteConnection,
    event: &AuditEvent,
    seen: &Seen,
) -> Result<Link, StoreError> {
    let refused = |reason: String| StoreError::Audit {
        action: event.action.clone(),
        target: event.target.clone(),
        reason,
    };
    if event.actor.trim().is_empty() {
        return Err(refused(
            "it names no actor; every record says who acted (an operator's identity, `agent/HOST` or `coordinator`)".into(),
        ));
    }
    if event.action.trim().is_empty() {
        return Err(refused("it names no action".into()));
    }
    let stored = head(conn).await.map_err(|e| refused(e.to_string()))?;
    let prev = match (stored, seen.get()) {
        (stored, Some(mine)) if stored.as_ref().is_none_or(|s| s.seq < mine.seq) => {
            error!(
                stored_head = stored.map_or(0, |s| s.seq),
                seen = mine.seq,
                "the audit table lost records this coordinator had seen committed; chaining on from the last one seen, so `rollbackctl audit verify` shows the gap"
            );
            mine
        }
        (Some(stored), _) => stored,
        (None, _) => Link::genesis(),
    };
    let seq = prev.seq + 1;
    let job_id = job_of(conn, &event.target)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let hash = hash_of(seq, event, &job_id, &prev.hash);
    sqlx::query(
        "INSERT INTO audit_events (at_ms, actor, action, target, detail, seq, prev_hash, hash, job_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(event.at_ms)
    .bind(&event.actor)
    .bind(&event.action)
    .bind(&event.target)
    .bind(&event.detail)
    .bind(db_seq(seq))
    .bind(&prev.hash)
    .bind(&hash)
    .bind(&job_id)
    .execute(&mut *conn)
    .await
    .map_err(|e| refused(e.to_string()))?;
    Ok(Link { seq, hash })
}

/// Chains the records written before the chain existed (migration 0006), in id order — once:
/// only while no record has a place in the chain yet. Returns how many it chained.
pub(super) async fn chain_unchained_history(pool: &SqlitePool) -> Result<u64, StoreError> {
    let what = "chaining the audit records written before the chain";
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(query(what))?;
    let started: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM audit_events WHERE seq IS NOT NULL)")
            .fetch_one(&mut *tx)
            .await
            .map_err(query(what))?;
    if started {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT id, at_ms, actor, action, target, detail FROM audit_events WHERE seq IS NULL ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(query(what))?;
    let mut prev = Link::genesis();
    for row in &rows {
        let event = AuditEvent {
            at_ms: row.get("at_ms"),
            actor: row.get("actor"),
            action: row.get("action"),
            target: row.get("target"),
            detail: row.get("detail"),
        };
        let seq = prev.seq + 1;
        let job_id = job_of(&mut tx, &event.target).await.map_err(query(what))?;
        let hash = hash_of(seq, &event, &job_id, &prev.hash);
        sqlx::query(
            "UPDATE audit_events SET seq = ?2, prev_hash = ?3, hash = ?4, job_id = ?5 WHERE id = ?1",
        )
        .bind(row.get::<i64, _>("id"))
        .bind(db_seq(seq))
        .bind(&prev.hash)
        .bind(&hash)
        .bind(&job_id)
        .execute(&mut *tx)
        .await
        .map_err(query(what))?;
        prev = Link { seq, hash };
    }
    tx.commit().await.map_err(query(what))?;
    Ok(prev.seq)
}

fn record(row: &SqliteRow) -> AuditRecord {
    AuditRecord {
        id: row.get("id"),
        // A negative seq can only be a hand edit: 0 is out of order wherever it appears.
        seq: u64::try_from(row.get::<i64, _>("seq")).unwrap_or(0),
        event: AuditEvent {
            at_ms: row.get("at_ms"),
            actor: row.get("actor"),
            action: row.get("action"),
            target: row.get("target"),
            detail: row.get("detail"),
        },
        job_id: row.get("job_id"),
        prev_hash: row.get("prev_hash"),
        hash: row.get("hash"),
    }
}

/// Records matching `filter`, newest first.
pub(super) async fn list(
    pool: &SqlitePool,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM audit_events
         WHERE seq IS NOT NULL AND at_ms >= ?1
           AND (?2 = '' OR actor = ?2 OR substr(actor, -(length(?2) + 1)) = '/' || ?2)
           AND (?3 = '' OR job_id = ?3)
         ORDER BY seq DESC LIMIT ?4"
    ))
    .bind(filter.since_ms)
    .bind(&filter.actor)
    .bind(&filter.job_id)
    .bind(i64::from(filter.limit))
    .fetch_all(pool)
    .await
    .map_err(query("list_audit"))?;
    Ok(rows.iter().map(record).collect())
}

/// Walks the chain from genesis, in seq order, checking each record against the one before.
#[derive(Debug)]
pub struct Walk {
    prev: Link,
    count: u64,
    /// The newest record this process saw committed.
    seen: Option<Link>,
}

impl Walk {
    pub fn new(seen: Option<Link>) -> Self {
        Self {
            prev: Link::genesis(),
            count: 0,
            seen,
        }
    }

    /// Checks the next record; the first problem found is the answer.
    pub fn next(&mut self, r: &AuditRecord) -> Result<(), Broken> {
        let expected = self.prev.seq + 1;
        let broken = |seq: u64, id: i64, problem: Problem, message: String| {
            Err(Broken {
                seq,
                id,
                problem,
                message,
            })
        };
        if r.seq < expected {
            return broken(
                r.seq,
                r.id,
                Problem::OutOfOrder,
                format!(
                    "record {} (row id {}) is out of order: it comes after record {}; it was inserted or rewritten_tail outside the coordinator",
                    r.seq, r.id, self.prev.seq
                ),
            );
        }
        if r.seq > expected {
            let message = if self.prev.seq == 0 {
                format!(
                    "record {expected} is missing (seq gap: the chain starts at record {})",
                    r.seq
                )
            } else {
                format!(
                    "record {expected} is missing (seq gap: record {} is followed by record {})",
                    self.prev.seq, r.seq
                )
            };
            return broken(expected, 0, Problem::Missing, message);
        }
        if hash_of(r.seq, &r.event, &r.job_id, &r.prev_hash) != r.hash {
            return broken(
                r.seq,
                r.id,
                Problem::Changed,
                format!(
                    "hash mismatch: record {} was changed (row id {}: `{}` on {} by {})",
                    r.seq, r.id, r.event.action, r.event.target, r.event.actor
                ),
            );
        }
        if r.prev_hash != self.prev.hash {
            let message = if r.seq == 1 {
                "record 1's prev_hash is not the genesis value: the start of the chain was replaced"
                    .to_string()
            } else {
                format!(
                    "record {}'s prev_hash does not match record {}: record {} was replaced, or record {} was re-linked",
                    r.seq, self.prev.seq, self.prev.seq, r.seq
                )
            };
            return broken(r.seq, r.id, Problem::Relinked, message);
        }
        if let Some(seen) = &self.seen
            && seen.seq == r.seq
            && seen.hash != r.hash
        {
            return broken(
                r.seq,
                r.id,
                Problem::Changed,
                format!(
                    "record {} was changed: its hash is not the one this coordinator committed (the chain was recomputed up to it)",
                    r.seq
                ),
            );
        }
        self.prev = Link {
            seq: r.seq,
            hash: r.hash.clone(),
        };
        self.count += 1;
        Ok(())
    }

    /// The verdict once every record was checked (or `broken` was found).
    pub fn verdict(self, broken: Option<Broken>) -> Verdict {
        let broken = broken.or_else(|| {
            self.seen
                .as_ref()
                .filter(|seen| seen.seq > self.prev.seq)
                .map(|seen| Broken {
                    seq: self.prev.seq + 1,
                    id: 0,
                    problem: Problem::Missing,
                    message: format!(
                        "record {} is missing: the chain ends at record {} but this coordinator saw records up to {} committed (records were cut off the end)",
                        self.prev.seq + 1,
                        self.prev.seq,
                        seen.seq
                    ),
                })
        });
        Verdict {
            count: self.count,
            head: self.prev,
            broken,
        }
    }
}

/// Walks the whole chain from genesis; then any row outside the chain is reported.
pub(super) async fn verify(pool: &SqlitePool, seen: &Seen) -> Result<Verdict, StoreError> {
    // Read before the walk's snapshot: everything `seen` holds is committed, so in it.
    let mut walk = Walk::new(seen.get());
    let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE seq IS NOT NULL ORDER BY seq");
    let mut rows = sqlx::query(&sql).fetch(pool);
    while let Some(row) = rows.try_next().await.map_err(query("verify_audit"))? {
        if let Err(broken) = walk.next(&record(&row)) {
            return Ok(walk.verdict(Some(broken)));
        }
    }
    drop(rows);
    let unchained: Option<i64> =
        sqlx::query_scalar("SELECT id FROM audit_events WHERE seq IS NULL ORDER BY id LIMIT 1")
            .fetch_optional(pool)
            .await
            .map_err(query("verify_audit"))?;
    let broken = unchained.map(|id| Broken {
        seq: 0,
        id,
        problem: Problem::Unchained,
        message: format!(
            "row id {id} of the audit table is not in the chain (it has no seq): it was written outside the coordinator"
        ),
    });
    Ok(walk.verdict(broken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(actor: &str, action: &str, target: &str, detail: &str) -> AuditEvent {
        AuditEvent {
            at_ms: 1_700_000_000_000,
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn moving_a_boundary_between_fields_changes_the_hash() {
        let a = event("ab", "c", "job/1", "x");
        let b = event("a", "bc", "job/1", "x");
        assert_ne!(hash_of(1, &a, "", GENESIS), hash_of(1, &b, "", GENESIS));
        // detail | job_id | prev_hash boundaries.
        let d = event("op", "act", "t", "detail1");
        let e = event("op", "act", "t", "detail");
        assert_ne!(
            hash_of(1, &d, "", GENESIS),
            hash_of(1, &e, "1", GENESIS),
            "detail and job_id"
        );
        assert_ne!(
            hash_of(1, &d, "j", "abc"),
            hash_of(1, &d, "ja", "bc"),
            "job_id and prev_hash"
        );
        // Every numeric field counts.
        assert_ne!(hash_of(1, &d, "", GENESIS), hash_of(2, &d, "", GENESIS));
        let mut later = d.clone();
        later.at_ms += 1;
        assert_ne!(hash_of(1, &d, "", GENESIS), hash_of(1, &later, "", GENESIS));
        // A stable, documented value: the encoding is part of the stored data.
        assert_eq!(hash_of(1, &d, "", GENESIS).len(), 64);
        assert_eq!(
            hash_of(1, &d, "", GENESIS),
            hex::encode(Sha256::digest(canonical(1, &d, "", GENESIS)))
        );
    }

    /// Splits `text` into the six string fields at the five cut points.
    fn split(text: &str, cuts: &[usize; 5]) -> (AuditEvent, String, String) {
        let mut cuts = cuts.map(|c| c % (text.len() + 1));
        cuts.sort_unstable();
        let part = |i: usize| {
            let from = if i == 0 { 0 } else { cuts[i - 1] };
            let to = if i == 5 { text.len() } else { cuts[i] };
            text[from..to].to_string()
        };
        (
            AuditEvent {
                at_ms: 7,
                actor: part(0),
                action: part(1),
                target: part(2),
                detail: part(3),
            },
            part(4),
            part(5),
        )
    }

    proptest! {
        /// The same bytes split differently into fields never encode (so never hash) the same.
        #[test]
        fn two_different_field_splits_never_encode_the_same(
            text in "[a-z/=]{0,24}",
            a in proptest::array::uniform5(0usize..25),
            b in proptest::array::uniform5(0usize..25),
        ) {
            let (ea, ja, pa) = split(&text, &a);
            let (eb, jb, pb) = split(&text, &b);
            let same = (&ea, &ja, &pa) == (&eb, &jb, &pb);
            prop_assert_eq!(canonical(3, &ea, &ja, &pa) == canonical(3, &eb, &jb, &pb), same);
            prop_assert_eq!(hash_of(3, &ea, &ja, &pa) == hash_of(3, &eb, &jb, &pb), same);
        }
    }

    /// A valid chain of `n` records.
    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = Link::genesis();
        (1..=n)
            .map(|seq| {
                let e = event(
                    "coordinator",
                    "rollback.finished",
                    &format!("job/j{seq}"),
                    "ok",
                );
                let job_id = format!("j{seq}");
                let hash = hash_of(seq, &e, &job_id, &prev.hash);
                let r = AuditRecord {
                    id: i64::try_from(seq).expect("small"),
                    seq,
                    event: e,
                    job_id,
                    prev_hash: prev.hash.clone(),
                    hash: hash.clone(),
                };
                prev = Link { seq, hash };
                r
            })
            .collect()
    }

    fn walk(records: &[AuditRecord], seen: Option<Link>) -> Verdict {
        let mut w = Walk::new(seen);
        for r in records {
            if let Err(b) = w.next(r) {
                return w.verdict(Some(b));
            }
        }
        w.verdict(None)
    }

    fn problem(v: &Verdict) -> (u64, Problem) {
        let b = v.broken.as_ref().expect("broken");
        (b.seq, b.problem)
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let records = chain(5);
        let v = walk(
            &records,
            Some(Link {
                seq: 5,
                hash: records[4].hash.clone(),
            }),
        );
        assert_eq!(v.broken, None);
        assert_eq!((v.count, v.head.seq), (5, 5));
        assert_eq!(walk(&[], None).broken, None, "an empty chain is intact");
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_broken_record() {
        let mut changed = chain(5);
        changed[2].event.detail = "nothing happened".into();
        let v = walk(&changed, None);
        assert_eq!(problem(&v), (3, Problem::Changed));
        assert!(
            v.broken
                .expect("broken")
                .message
                .starts_with("hash mismatch: record 3 was changed")
        );
        assert_eq!(v.count, 2);

        let mut removed = chain(5);
        removed.remove(2);
        let v = walk(&removed, None);
        assert_eq!(problem(&v), (3, Problem::Missing));
        assert!(
            v.broken
                .expect("broken")
                .message
                .contains("record 3 is missing (seq gap")
        );

        // Record 3 rewritten with a recomputed hash: record 4 no longer links to it.
        let mut rewritten = chain(5);
        rewritten[2].event.detail = "nothing happened".into();
        rewritten[2].hash = hash_of(
            3,
            &rewritten[2].event,
            &rewritten[2].job_id,
            &rewritten[2].prev_hash,
        );
        let v = walk(&rewritten, None);
        assert_eq!(problem(&v), (4, Problem::Relinked));
        assert!(
            v.broken
                .expect("broken")
                .message
                .contains("record 4's prev_hash does not match record 3")
        );

        // The last record removed and the one before it rewritten with a recomputed hash: a
        // consistent chain, which only the head the store remembers can tell from the real
        // one — and it does, whichever of the two it remembers.
        let original = chain(5);
        let mut rewritten_tail: Vec<AuditRecord> = chain(4);
        rewritten_tail[3].event.detail = "other".into();
        let mut prev = rewritten_tail[2].hash.clone();
        for r in &mut rewritten_tail[3..] {
            r.prev_hash = prev.clone();
            r.hash = hash_of(r.seq, &r.event, &r.job_id, &r.prev_hash);
            prev = r.hash.clone();
        }
        let seen = Some(Link {
            seq: 5,
            hash: original[4].hash.clone(),
        });
        assert_eq!(
            problem(&walk(&rewritten_tail, seen)),
            (5, Problem::Missing),
            "tail cut"
        );
        let seen4 = Some(Link {
            seq: 4,
            hash: original[3].hash.clone(),
        });
        assert_eq!(
            problem(&walk(&rewritten_tail, seen4)),
            (4, Problem::Changed),
            "head rewritten"
        );

        let mut repeated = chain(3);
        repeated.insert(2, repeated[1].clone());
        assert_eq!(problem(&walk(&repeated, None)), (2, Problem::OutOfOrder));

        let mut first = chain(2);
        first[0].prev_hash = "f".repeat(64);
        first[0].hash = hash_of(1, &first[0].event, &first[0].job_id, &first[0].prev_hash);
        assert_eq!(problem(&walk(&first, None)), (1, Problem::Relinked));
    }
}
