//! Every live client connection, by certificate: identity, serial, issuer, peer address and a
//! token that closes it. A reloaded CRL closes the connections of the certificates it revokes
//! (`close_revoked`); the per-identity bound counts them. The lock is never held across
//! `.await`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use rollback_common::identity::{Identity, Serial};
use tokio_util::sync::CancellationToken;

/// The serials a CRL revokes, with the issuer it speaks for.
#[derive(Debug, Clone, Default)]
pub struct RevokedSet {
    issuer: Vec<u8>,
    serials: HashSet<Serial>,
}

impl RevokedSet {
    pub fn new(issuer: Vec<u8>, serials: impl IntoIterator<Item = Serial>) -> Self {
        Self {
            issuer,
            serials: serials.into_iter().collect(),
        }
    }

    pub fn contains(&self, issuer: &[u8], serial: &Serial) -> bool {
        self.issuer == issuer && self.serials.contains(serial)
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }
}

/// Who holds a connection.
#[derive(Debug, Clone)]
pub struct ConnOwner {
    pub identity: Identity,
    pub serial: Serial,
    pub issuer: Vec<u8>,
    pub peer: SocketAddr,
}

struct Entry {
    owner: ConnOwner,
    close: CancellationToken,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    per_identity: HashMap<Identity, usize>,
}

/// The registry of live connections.
pub struct LiveConns {
    inner: Mutex<Inner>,
    max_per_identity: usize,
}

/// A connection's place in the registry; dropping it (the connection ending) removes it.
pub struct Registered {
    id: u64,
    close: CancellationToken,
    live: Arc<LiveConns>,
}

impl Registered {
    /// Resolves once the connection must close (its certificate was revoked).
    pub fn token(&self) -> CancellationToken {
        self.close.clone()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut inner = self.live.lock();
        if let Some(entry) = inner.conns.remove(&self.id)
            && let Some(n) = inner.per_identity.get_mut(&entry.owner.identity)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_identity.remove(&entry.owner.identity);
            }
        }
    }
}

impl LiveConns {
    pub fn new(max_per_identity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_per_identity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters; carry on with them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live connections now (agents and operators).
    pub fn count(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn max_per_identity(&self) -> usize {
        self.max_per_identity
    }

    /// Registers a connection, or returns how many the identity already holds when that is
    /// the limit.
    pub fn register(self: &Arc<Self>, owner: ConnOwner) -> Result<Registered, usize> {
        let mut inner = self.lock();
        let held = inner
            .per_identity
            .get(&owner.identity)
            .copied()
            .unwrap_or(0);
        if held >= self.max_per_identity {
            return Err(held);
        }
        *inner
            .per_identity
            .entry(owner.identity.clone())
            .or_insert(0) += 1;
        inner.next_id += 1;
        let id = inner.next_id;
        let close = CancellationToken::new();
        inner.conns.insert(
            id,
            Entry {
                owner,
                close: close.clone(),
            },
        );
        Ok(Registered {
            id,
            close,
            live: self.clone(),
        })
    }

    /// Closes every connection whose certificate `revoked` names; returns who they were.
    pub fn close_revoked(&self, revoked: &RevokedSet) -> Vec<ConnOwner> {
        let inner = self.lock();
        inner
            .conns
            .values()
            .filter(|e| revoked.contains(&e.owner.issuer, &e.owner.serial))
            .map(|e| {
                e.close.cancel();
                e.owner.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::identity::Role;

    fn owner(name: &str, serial: u8) -> ConnOwner {
        ConnOwner {
            identity: Identity::new("fleet.test", Role::Agent, name).expect("id"),
            serial: Serial::from_be_bytes(&[serial]),
            issuer: b"ca".to_vec(),
            peer: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    #[test]
    fn bounds_each_identity_and_closes_only_revoked_serials() {
        let live = Arc::new(LiveConns::new(2));
        let a1 = live.register(owner("a", 1)).expect("first");
        let a2 = live.register(owner("a", 1)).expect("second");
        assert_eq!(live.register(owner("a", 1)).err(), Some(2));
        let b = live.register(owner("b", 2)).expect("other identity");
        drop(a2);
        let a3 = live.register(owner("a", 1)).expect("a slot was freed");

        let closed = live.close_revoked(&RevokedSet::new(
            b"ca".to_vec(),
            [Serial::from_be_bytes(&[1])],
        ));
        assert_eq!(closed.len(), 2);
        assert!(a1.token().is_cancelled() && a3.token().is_cancelled());
        assert!(!b.token().is_cancelled());
        // Another issuer's CRL says nothing about our certificates.
        let other = RevokedSet::new(b"other".to_vec(), [Serial::from_be_bytes(&[2])]);
        assert!(live.close_revoked(&other).is_empty());
        drop((a1, a3, b));
        let inner = live.lock();
        assert!(inner.conns.is_empty() && inner.per_identity.is_empty());
    }
}
