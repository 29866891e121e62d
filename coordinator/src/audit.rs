//! The Console's view of the audit trail: `ListAudit` (filtered, newest first, bounded by a
//! count and by the message size) and `VerifyAudit` (the hash chain walked from genesis). The
//! chain itself — encoding, appends, the walk — is `store::chain`.

use prost::Message;
use rollback_common::MAX_MESSAGE_BYTES;
use rollback_common::proto::{
    AuditRecord as AuditRecordProto, ListAuditRequest, ListAuditResponse, VerifyAuditResponse,
};
use tonic::Status;
use tracing::{info, warn};

use crate::store::{AuditFilter, AuditRecord, Store};

/// Records returned when the request sets no limit.
pub const DEFAULT_LIMIT: u32 = 100;
/// Records returned at most, whatever the request asks.
pub const MAX_LIMIT: u32 = 1000;

fn to_proto(r: AuditRecord) -> AuditRecordProto {
    AuditRecordProto {
        seq: r.seq,
        at_unix_ms: r.event.at_ms,
        actor: r.event.actor,
        action: r.event.action,
        target: r.event.target,
        detail: r.event.detail,
        job_id: r.job_id,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

/// `ListAudit`: the newest matching records, at most `MAX_LIMIT` and half the message limit.
pub async fn list(store: &dyn Store, req: ListAuditRequest) -> Result<ListAuditResponse, Status> {
    if req.since_unix_ms < 0 {
        return Err(Status::invalid_argument(
            "since must be a unix time in milliseconds (0 for all records)",
        ));
    }
    let limit = match req.limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
    let filter = AuditFilter {
        since_ms: req.since_unix_ms,
        actor: req.actor.trim().to_string(),
        job_id: req.job_id.trim().to_string(),
        // One more than shown tells whether there is more.
        limit: limit + 1,
    };
    let mut rows = store.list_audit(&filter).await?;
    let shown = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut more = rows.len() > shown;
    rows.truncate(shown);
    let mut records = Vec::with_capacity(rows.len());
    let mut size = 0;
    for r in rows {
        let record = to_proto(r);
        // Field tag and length prefix included, with room to spare.
        size += record.encoded_len() + 16;
        if size > MAX_MESSAGE_BYTES / 2 {
            more = true;
            break;
        }
        records.push(record);
    }
    Ok(ListAuditResponse { records, more })
}

/// `VerifyAudit`: walks the whole chain; a broken one is logged as well as answered.
pub async fn verify(store: &dyn Store) -> Result<VerifyAuditResponse, Status> {
    let verdict = store.verify_audit().await?;
    match &verdict.broken {
        Some(b) => warn!(
            seq = b.seq,
            row_id = b.id,
            problem = b.problem.as_str(),
            intact = verdict.count,
            "audit chain broken: {}",
            b.message
        ),
        None => info!(
            records = verdict.count,
            head_seq = verdict.head.seq,
            head_hash = %verdict.head.hash,
            "audit chain verified"
        ),
    }
    let broken = verdict.broken.as_ref();
    Ok(VerifyAuditResponse {
        ok: broken.is_none(),
        count: verdict.count,
        head_seq: verdict.head.seq,
        head_hash: verdict.head.hash.clone(),
        broken_seq: broken.map_or(0, |b| b.seq),
        broken_id: broken.map_or(0, |b| b.id),
        problem: broken.map_or("", |b| b.problem.as_str()).to_string(),
        message: broken.map_or(String::new(), |b| b.message.clone()),
    })
}
