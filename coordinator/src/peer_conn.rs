//! One accepted, verified client connection as tonic serves it: the TLS stream, the verified
//! peer (`PeerInfo`, tonic's `ConnectInfo`, which authorization reads), and its place in the
//! live registry. Once the registry's token fires (the certificate was revoked) every read and
//! write fails, so hyper drops the connection and the TCP connection closes at once — whatever
//! streams it carried (an agent's Session, an operator's WatchJob) end with it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rollback_common::identity::Identity;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::Connected;

use crate::live_conns::Registered;

/// What tonic puts in every request's extensions for this connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    pub local_addr: Option<SocketAddr>,
    /// The verified client chain, leaf first.
    pub certs: Arc<Vec<CertificateDer<'static>>>,
    /// The identity in the leaf (already checked to be exactly one usable SPIFFE URI).
    pub identity: Identity,
}

impl PeerInfo {
    /// The client's own certificate (DER).
    pub fn leaf(&self) -> Option<&[u8]> {
        self.certs.first().map(|c| c.as_ref())
    }
}

/// A served client connection.
pub struct PeerConn {
    tls: TlsStream<TcpStream>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    info: PeerInfo,
    _registered: Registered,
}

impl PeerConn {
    pub fn new(tls: TlsStream<TcpStream>, info: PeerInfo, registered: Registered) -> Self {
        Self {
            tls,
            closed: Box::pin(registered.token().cancelled_owned()),
            info,
            _registered: registered,
        }
    }

    /// Whether the connection must close now; registers the waker otherwise.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.closed.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "connection of {} closed by the coordinator: its certificate was revoked",
                    self.info.identity
                ),
            )
        })
    }
}

impl Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_closed(cx).is_some() {
            // Nothing more is said to a revoked peer; dropping closes the socket.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tls).poll_shutdown(cx)
    }
}
