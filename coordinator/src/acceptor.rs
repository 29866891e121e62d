//! The coordinator's own TLS acceptor, feeding tonic verified connections. The accept loop
//! only accepts: each handshake runs in a task of its own under `tls_handshake_timeout_secs`,
//! at most `max_handshakes_in_flight` at once (a connection beyond that is closed at once), so a
//! slow or silent client never holds up anyone else. A refused handshake is logged with the
//! peer address and the reason (`refusal`). After the handshake the leaf must carry exactly one
//! usable identity and the identity may hold at most `max_connections_per_identity` live
//! connections; the connection is registered in `live_conns` before it is checked against the
//! CRL in force, and served as a `PeerConn`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollback_common::identity::{Identity, cert_serial};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::live_conns::{ConnOwner, LiveConns};
use crate::peer_conn::{PeerConn, PeerInfo};
use crate::refusal::Refusal;
use crate::revocation::TlsState;

/// Accepted connections waiting for tonic to take them.
const READY_QUEUE: usize = 128;
/// At most one "too many handshakes" line per this interval (with the count dropped).
const BUSY_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How connections are accepted.
#[derive(Clone)]
pub struct Acceptor {
    pub tls: Arc<TlsState>,
    pub live: Arc<LiveConns>,
    pub handshake_timeout: Duration,
    pub max_in_flight: usize,
}

impl Acceptor {
    /// Accepts on `listener` until `cancel` (or until tonic stops taking connections) and
    /// yields verified connections for `serve_with_incoming_shutdown`.
    pub fn incoming(
        self,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> ReceiverStream<Result<PeerConn, io::Error>> {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(self.accept_loop(listener, tx, cancel));
        ReceiverStream::new(rx)
    }

    async fn accept_loop(
        self,
        listener: TcpListener,
        tx: mpsc::Sender<Result<PeerConn, io::Error>>,
        cancel: CancellationToken,
    ) {
        let in_flight = Arc::new(Semaphore::new(self.max_in_flight));
        let mut busy_dropped = 0u64;
        let mut busy_said: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: back off a little rather than spin.
                    warn!(error = %e, "accepting a connection failed; retrying shortly (check `ulimit -n`)");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                drop(tcp);
                busy_dropped += 1;
                if busy_said.is_none_or(|t| t.elapsed() >= BUSY_LOG_INTERVAL) {
                    warn!(
                        peer = %peer,
                        dropped = busy_dropped,
                        limit = self.max_in_flight,
                        "too many TLS handshakes in flight (max_handshakes_in_flight); closed new connections at once"
                    );
                    busy_said = Some(Instant::now());
                    busy_dropped = 0;
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = this.handshake(tcp, peer, permit).await {
                    // Fails only when the server stopped taking connections: the
                    // connection is dropped (closed) then.
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    }

    /// The TLS handshake and the checks after it; `None` when the client is refused (logged).
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<PeerConn> {
        let local_addr = tcp.local_addr().ok();
        let acceptor = TlsAcceptor::from(self.tls.server_config());
        let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = Refusal::of_handshake(&e);
                warn!(peer = %peer, reason = %reason, error = %e, "tls handshake refused");
                return None;
            }
            Err(_) => {
                warn!(
                    peer = %peer,
                    reason = %Refusal::HandshakeTimeout,
                    timeout_secs = self.handshake_timeout.as_secs(),
                    "tls handshake refused"
                );
                return None;
            }
        };
        drop(permit);
        let certs: Vec<_> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let Some(leaf) = certs.first() else {
            warn!(peer = %peer, reason = %Refusal::NoCertificate, "tls handshake refused");
            return None;
        };
        let identity = match Identity::from_cert_der(leaf) {
            Ok(identity) => identity,
            Err(e) => {
                warn!(
                    peer = %peer,
                    reason = %Refusal::of_identity(&e),
                    error = %e,
                    "tls handshake refused: connection closed after the handshake"
                );
                return None;
            }
        };
        let facts = match cert_serial(leaf) {
            Ok(facts) => facts,
            Err(e) => {
                warn!(peer = %peer, identity = %identity, reason = %Refusal::MalformedCertificate, error = %e, "tls handshake refused: connection closed after the handshake");
                return None;
            }
        };
        let owner = ConnOwner {
            identity: identity.clone(),
            serial: facts.serial.clone(),
            issuer: facts.issuer.clone(),
            peer,
        };
        let registered = match self.live.register(owner) {
            Ok(r) => r,
            Err(held) => {
                warn!(
                    peer = %peer,
                    identity = %identity,
                    reason = %Refusal::TooManyConnections,
                    held,
                    limit = self.live.max_per_identity(),
                    "tls handshake refused: connection closed after the handshake"
                );
                return None;
            }
        };
        // A CRL swapped in while this handshake ran: registered first, so either this check
        // sees the new CRL or the reload's scan sees this connection.
        if self.tls.is_revoked(&facts.issuer, &facts.serial) {
            warn!(
                peer = %peer,
                identity = %identity,
                reason = %Refusal::Revoked,
                serial = %facts.serial,
                "tls handshake refused: connection closed after the handshake"
            );
            return None;
        }
        let info = PeerInfo {
            remote_addr: peer,
            local_addr,
            certs: Arc::new(certs),
            identity,
        };
        Some(PeerConn::new(tls, info, registered))
    }
}
