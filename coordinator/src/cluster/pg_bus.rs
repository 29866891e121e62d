//! The bus between coordinators sharing a PostgreSQL store: NOTIFY on one channel, LISTEN on
//! one dedicated connection per process. Notifications are transient — one sent while a
//! listener is reconnecting is gone — so after every reconnect the listener resynchronises
//! from the store (`Cluster::resync`): results stored meanwhile are handed over, and every
//! host held here is announced again so runs waiting for it are sent again. Both ways go in
//! batches, in order: many notifications to one statement, and what has been received
//! handled together (`Cluster::receive_all`). A batch that surely was not sent is tried again
//! (see `notify`); what is lost anyway, results above all, the cluster's clock finds in the
//! store (`Cluster::sweep_overdue`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Cluster;
use super::bus::{Bus, Envelope};

/// The one channel every coordinator of a store listens on.
pub const CHANNEL: &str = "fleet_rollback";

pub struct PgBus {
    queue: mpsc::Sender<Queued>,
}

/// What waits in the sender's queue.
enum Queued {
    /// A notification's payload.
    Message(String),
    /// Answered once everything queued before it is sent.
    Flush(oneshot::Sender<()>),
}

/// Messages waiting to be sent before `publish` waits for room.
const QUEUE: usize = 8192;
/// Notifications sent in one statement at most (each at most `MAX_PAYLOAD` bytes).
const BATCH: usize = 500;

impl PgBus {
    /// The bus, and its sender: a task that sends what `publish` queued, many notifications
    /// in one statement, in the order they were queued. A job across two coordinators
    /// publishes three messages a host (its run, two step events, its result): one statement
    /// each was 20,000 round trips for a 10,000-host job, and the job waited for them.
    pub fn start(pool: PgPool) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(send_queued(pool, waiting));
        Self { queue }
    }
}

/// Sends the queued notifications until every `PgBus` sending to it is gone. PostgreSQL
/// delivers one transaction's notifications in the order they were made and after the ones
/// committed before it, so a batch keeps the queue's order. Within one transaction it drops a
/// payload identical to one already sent: every message is safe to receive once instead of
/// twice (a delivery, a cancel, a wake-up; step events differ by step and output sequence).
async fn send_queued(pool: PgPool, mut waiting: mpsc::Receiver<Queued>) {
    let mut taken: Vec<Queued> = Vec::with_capacity(BATCH);
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    while waiting.recv_many(&mut taken, BATCH).await > 0 {
        for queued in taken.drain(..) {
            match queued {
                Queued::Message(payload) => batch.push(payload),
                Queued::Flush(done) => {
                    notify(&pool, &mut batch).await;
                    let _ = done.send(());
                }
            }
        }
        notify(&pool, &mut batch).await;
    }
}

/// The statement that sends a batch: one notification per payload, in the array's order.
const NOTIFY: &str =
    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i";
/// The first wait before a send that could not get a connection is tried again; it doubles
/// up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Sends `batch` in one statement and empties it. A statement that surely did not run is
/// tried again: while no connection can be had (a pool busy with a large job, a server
/// restarting), the batch waits, and everything queued behind it. When the server refused the
/// statement (its transaction notified nobody), a payload it cannot take may be the cause:
/// each is then sent on its own, and only one the server refuses is dropped. A statement that
/// failed on its way is not sent again, since it may have been delivered and a peer would
/// see its step events twice; a result it announced is found in the store by the peers'
/// sweep (`Cluster::sweep_overdue`).
async fn notify(pool: &PgPool, batch: &mut Vec<String>) {
    if batch.is_empty() {
        return;
    }
    match send(pool, batch).await {
        Ok(()) => {}
        Err(Unsent::Refused(e)) if batch.len() > 1 => {
            warn!(messages = batch.len(), error = %e, "the store refused a batch of notifications to the other coordinators; sending them one by one");
            for payload in batch.iter() {
                if let Err(e) = send(pool, std::slice::from_ref(payload)).await {
                    let start: String = payload.chars().take(120).collect();
                    warn!(error = %e, bytes = payload.len(), start = %start, "could not notify the other coordinators; this message is dropped (a result is found in the store by their next sweep)");
                }
            }
        }
        Err(e) => {
            warn!(messages = batch.len(), error = %e, "could not notify the other coordinators; these messages are dropped (results are found in the store by their next sweep)");
        }
    }
    batch.clear();
}

/// Why a batch was not sent.
#[derive(Debug, thiserror::Error)]
enum Unsent {
    /// The server refused the statement: nothing of it was delivered.
    #[error("refused: {0}")]
    Refused(sqlx::Error),
    /// The statement failed on its way (it may have been delivered), or the pool is closed.
    #[error("{0}")]
    Failed(sqlx::Error),
}

/// Sends `payloads` in one statement, waiting (and trying again) for as long as no connection
/// can be had.
async fn send(pool: &PgPool, payloads: &[String]) -> Result<(), Unsent> {
    let mut wait = RETRY_FIRST;
    let mut tries = 0u32;
    loop {
        let unreachable = match pool.acquire().await {
            Ok(mut conn) => {
                return match sqlx::query(NOTIFY)
                    .bind(CHANNEL)
                    .bind(payloads)
                    .execute(&mut *conn)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e @ sqlx::Error::Database(_)) => Err(Unsent::Refused(e)),
                    Err(e) => Err(Unsent::Failed(e)),
                };
            }
            Err(e @ sqlx::Error::PoolClosed) => return Err(Unsent::Failed(e)),
            Err(e) => e,
        };
        tries += 1;
        if tries == 1 || tries.is_multiple_of(10) {
            warn!(messages = payloads.len(), tries, error = %unreachable, "cannot reach the store to notify the other coordinators; trying again");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
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
        if self.queue.send(Queued::Message(payload)).await.is_err() {
            warn!(
                "the notification sender has stopped; the other coordinators find it in the store"
            );
        }
    }

    async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).await.is_ok() {
            let _ = sent.await;
        }
    }
}

/// Listens until `stop`, handing every message to `cluster`; reconnects (with a resync)
/// whenever the connection drops.
pub async fn listen(pool: PgPool, cluster: Arc<Cluster>, stop: CancellationToken) {
    // Received here, handled by `handle_received` in batches of what has arrived meanwhile,
    // in order: the store reads a batch needs are made together (`Cluster::receive_all`).
    let (received, queue) = mpsc::channel(QUEUE);
    tokio::spawn(handle_received(cluster.clone(), queue));
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
                    Some(envelope) => {
                        if received.send(envelope).await.is_err() {
                            return warn!(
                                "the handler of the other coordinators' messages has stopped"
                            );
                        }
                    }
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

/// Hands the received messages to `cluster`, as many at a time as have arrived (up to
/// `BATCH`), until the listener is gone.
async fn handle_received(cluster: Arc<Cluster>, mut queue: mpsc::Receiver<Envelope>) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        cluster.receive_all(std::mem::take(&mut batch)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::cluster::bus::Message;
    use crate::store::Opened;
    use crate::store::backend_tests::Fixture;

    fn numbered(from: &str, i: usize) -> Envelope {
        Envelope {
            from: from.into(),
            msg: Message::JobEvents {
                job_id: format!("{from}-{i}"),
            },
        }
    }

    /// Queued messages are sent many to a statement: every one arrives, and those of one
    /// sender in the order it queued them, whatever other senders queue meanwhile; a flush
    /// returns once they are all sent (the pool is closed right after it).
    #[tokio::test]
    async fn queued_messages_all_arrive_and_each_senders_in_order() {
        let fixture = Fixture::new().await;
        if !fixture.is_postgres() {
            // The bus is the shared store's: one SQLite file has one coordinator.
            return;
        }
        let (mut listener, pool, _stores) = listener_and_pool(&fixture).await;
        let bus = Arc::new(PgBus::start(pool.clone()));
        // Four senders, 1,200 messages each (more than the queue's batch), all at once.
        const EACH: usize = 1_200;
        let mut tasks = tokio::task::JoinSet::new();
        for sender in ["a", "b", "c", "d"] {
            let bus = bus.clone();
            tasks.spawn(async move {
                for i in 0..EACH {
                    bus.publish(numbered(sender, i)).await;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("sender");
        }
        // Everything queued is sent once a flush returns: the bus's connections may close.
        bus.flush().await;
        pool.close().await;
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..4 * EACH {
            let n = tokio::time::timeout(Duration::from_secs(30), listener.recv())
                .await
                .expect("every message arrives within 30 s")
                .expect("notification");
            let Some(Envelope {
                from,
                msg: Message::JobEvents { job_id },
            }) = Envelope::decode(n.payload())
            else {
                panic!("not a message this test sent: {}", n.payload());
            };
            let expected = next.entry(from.clone()).or_insert(0);
            assert_eq!(job_id, format!("{from}-{expected}"), "in {from}'s order");
            *expected += 1;
        }
        assert!(next.values().all(|n| *n == EACH), "all of each: {next:?}");
    }

    /// The payloads that arrive on `listener`, up to `n`, each within 30 s.
    async fn received(listener: &mut PgListener, n: usize) -> Vec<String> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            let note = tokio::time::timeout(Duration::from_secs(30), listener.recv())
                .await
                .unwrap_or_else(|_| panic!("a message within 30 s; so far {got:?}"))
                .expect("notification");
            got.push(note.payload().to_string());
        }
        got
    }

    /// A listener and a pool for the bus, from two stores' pools, as two processes have
    /// (the stores, returned, keep them open).
    async fn listener_and_pool(fixture: &Fixture) -> (PgListener, PgPool, [Opened; 2]) {
        let (theirs, ours) = (fixture.open().await, fixture.open().await);
        let (Some(listening), Some(pool)) = (theirs.pg_pool(), ours.pg_pool()) else {
            panic!("a PostgreSQL store has a pool");
        };
        let mut listener = PgListener::connect_with(&listening)
            .await
            .expect("listener");
        listener.listen(CHANNEL).await.expect("listen");
        (listener, pool, [theirs, ours])
    }

    /// As `listener_and_pool`, with a pool of one connection for the bus (a wait for it gives
    /// up after `WAIT`): a process whose pool is all in use.
    async fn listener_and_small_pool(fixture: &Fixture) -> (PgListener, PgPool, [Opened; 2]) {
        let (listener, pool, stores) = listener_and_pool(fixture).await;
        let small = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(WAIT)
            .connect_lazy_with((*pool.connect_options()).clone());
        (listener, small, stores)
    }

    /// How long a wait for the small pool's connection lasts.
    const WAIT: Duration = Duration::from_secs(1);

    /// The small pool's one connection, however long connecting takes (each wait for it is
    /// `WAIT`; a loaded machine may take longer to log in).
    async fn the_connection(small: &PgPool) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
        for _ in 0..30 {
            match small.acquire().await {
                Ok(conn) => return conn,
                Err(sqlx::Error::PoolTimedOut) => continue,
                Err(e) => panic!("connecting: {e}"),
            }
        }
        panic!("no connection in 30 tries")
    }

    /// While the pool has no connection to give, the queue waits and is sent once it has one:
    /// nothing is dropped, nothing reordered.
    #[tokio::test]
    async fn messages_wait_for_a_connection_rather_than_being_dropped() {
        let fixture = Fixture::new().await;
        if !fixture.is_postgres() {
            return;
        }
        let (mut listener, small, _stores) = listener_and_small_pool(&fixture).await;
        let bus = PgBus::start(small.clone());
        let held = the_connection(&small).await;
        for i in 0..3 {
            bus.publish(numbered("a", i)).await;
        }
        // Meanwhile the sender's waits for the connection give up, at least twice.
        tokio::time::sleep(WAIT * 3).await;
        drop(held);
        bus.publish(numbered("a", 3)).await;
        bus.flush().await;
        let expected: Vec<String> = (0..4)
            .map(|i| numbered("a", i).encode().expect("small"))
            .collect();
        assert_eq!(received(&mut listener, 4).await, expected);
    }

    /// A payload the server refuses (a NUL byte is not text) costs only itself: the rest of
    /// its batch is sent one by one, in order.
    #[tokio::test]
    async fn a_payload_the_server_refuses_costs_only_itself() {
        let fixture = Fixture::new().await;
        if !fixture.is_postgres() {
            return;
        }
        let (mut listener, small, _stores) = listener_and_small_pool(&fixture).await;
        drop(the_connection(&small).await);
        let bus = PgBus::start(small);
        // Queued without a pause (this test's runtime has one thread): one batch.
        for payload in ["first", "not\0text", "second", "third"] {
            bus.queue
                .send(Queued::Message(payload.to_string()))
                .await
                .expect("the sender runs");
        }
        bus.flush().await;
        assert_eq!(
            received(&mut listener, 3).await,
            ["first", "second", "third"]
        );
    }
}
