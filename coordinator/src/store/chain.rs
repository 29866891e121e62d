//! The audit trail as a hash chain. Every record carries its place in the chain (`seq`, from
//! 1), the hash of the record before it (`prev_hash`; the first chains from `GENESIS`) and its
//! own `hash`: SHA-256 over `canonical`, where every field is length-prefixed, so two different
//! records never have the same encoding.
//!
//! This module is the chain's pure part, the same for both stores; the SQL that reads the head
//! and inserts a record (`append`, in `shared`) runs inside the transaction that makes the
//! change it records, and every transaction that appends is serialized with every other — on
//! SQLite it begins `IMMEDIATE` (the write lock), on PostgreSQL it first takes the store's
//! transaction-scoped advisory lock — even across connections and processes (several
//! coordinators on one PostgreSQL), so the chain never forks and a crash leaves it exactly as
//! the last commit left it. `Walk` checks the chain from genesis and names the first record
//! that was changed or removed. The store also remembers the newest record this process has seen committed
//! (`Seen`), which catches the one change a chain cannot show by itself while the coordinator
//! runs: records cut off its end.

use sha2::{Digest, Sha256};
use tracing::error;

use super::AuditEvent;

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// First field of every encoding: a hash of anything else never equals a record's.
const DOMAIN: &[u8] = b"fleet-rollback audit record v1";

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
    /// The row's id in the store.
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

    /// The record the next append chains from, given the stored head: the stored head, unless
    /// it is behind the newest record this process saw committed — then records were cut off
    /// the end, which is logged, and the chain goes on from the one seen so the gap stays
    /// visible. A head ahead of it is another coordinator's appends (several coordinators may
    /// share a PostgreSQL store) and is taken as it is.
    pub(super) fn chain_from(&self, stored: Option<Link>) -> Link {
        match (stored, self.get()) {
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
        }
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
