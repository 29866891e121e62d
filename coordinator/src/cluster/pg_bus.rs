//! The bus between coordinators sharing a PostgreSQL store: NOTIFY on one channel, LISTEN on
//! one dedicated connection per process. Notifications are transient — one sent while a
//! listener is reconnecting is gone — so after every reconnect the listener resynchronises
//! from the store (`Cluster::resync`): results stored meanwhile are handed over, and every
//! host held here is announced again so runs waiting for it are sent again.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Cluster;
use super::bus::{Bus, Envelope};

/// The one channel every coordinator of a store listens on.
pub const CHANNEL: &str = "fleet_rollback";

pub struct PgBus {
    pool: PgPool,
}

impl PgBus {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait::async_trait]
impl Bus for PgBus {
    fn shared(&self) -> bool {
        true
    }

    async fn publish(&self, envelope: Envelope) {
        let Some(payload) = envelope.encode() else {
            return warn!(message = ?envelope.msg, "bus message too large for a notification; dropped (receivers find its subject in the store)");
        };
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await
        {
            warn!(error = %e, "could not notify the other coordinators; they find it in the store");
        }
    }
}

/// Listens until `stop`, handing every message to `cluster`; reconnects (with a resync)
/// whenever the connection drops.
pub async fn listen(pool: PgPool, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut first = true;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot open the coordinators' notification connection; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            warn!(error = %e, "cannot LISTEN for the other coordinators; retrying");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                () = stop.cancelled() => return,
            }
        }
        if !first {
            info!("notification connection back; resynchronising from the store");
            cluster.resync().await;
        }
        first = false;
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                () = stop.cancelled() => return,
            };
            match next {
                Ok(Some(n)) => match Envelope::decode(n.payload()) {
                    Some(envelope) => cluster.receive(envelope).await,
                    None => debug!("ignoring a notification that is not a bus message"),
                },
                // The connection dropped: messages may have been lost meanwhile.
                Ok(None) => {
                    warn!("notification connection lost; reconnecting");
                    cluster.resync().await;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "notification connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}
