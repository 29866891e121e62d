//! The coordinators an agent may hold its session with, and the order it tries them in.
//!
//! `agent.toml` names one coordinator (`coordinator = URL`) or several (`coordinators =
//! [URL, ...]`). Each URL is `https://HOST[:PORT]`; a host name that resolves to several
//! addresses counts as several coordinators. Names are resolved again at the start of every
//! round of connection attempts (`Rotation::round`), so a change in DNS or /etc/hosts is seen
//! without a restart. Whatever address is dialled, the coordinator's certificate is verified
//! against the URL's host name (or `server_name`), never against the address it resolved to.
//!
//! A round lists every address once, starting after the one the agent last moved away from
//! (or at the one it stays with, after a certificate renewal); the first round starts at
//! address `first % n` (0 for an agent, `i mod n` for the simulator's agent `i`). The ordering
//! is a pure function of the resolved addresses (`order`), tested here with a resolver the
//! tests control.

use std::future::Future;
use std::net::SocketAddr;

/// The port of an `https://` URL without one.
const DEFAULT_PORT: u16 = 443;

/// One configured coordinator URL, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrl {
    /// The URL as written in agent.toml (for logs).
    pub url: String,
    /// The host without IPv6 brackets: what is resolved, and the TLS name by default.
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for CoordinatorUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Parses and validates `https://HOST[:PORT]`; the error says what is wrong with `url`.
pub fn parse_url(url: &str) -> Result<CoordinatorUrl, String> {
    if !url.starts_with("https://") {
        return Err(format!(
            "`{url}` must be an https:// URL (there is no plaintext mode)"
        ));
    }
    let uri = url
        .parse::<tonic::transport::Uri>()
        .map_err(|_| format!("`{url}` is not a valid URL"))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    // The port as written (http::Uri keeps digits it cannot use as a u16).
    let port = match authority.rsplit_once(':') {
        Some((_, p)) if !authority.ends_with(']') => p.parse::<u16>().ok().filter(|p| *p != 0),
        _ => Some(DEFAULT_PORT),
    };
    let host = uri.host().unwrap_or_default();
    match port {
        Some(port)
            if !host.is_empty()
                && !authority.contains('@')
                && !authority.ends_with(':')
                && matches!(uri.path(), "" | "/")
                && uri.query().is_none() =>
        {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            Ok(CoordinatorUrl {
                url: url.to_string(),
                host: host.to_string(),
                port,
            })
        }
        _ => Err(format!(
            "`{url}` must be https://HOST[:PORT] with a host, a port of 1-65535, and no credentials, path or query"
        )),
    }
}

/// Resolves a host name (or IP literal) and port to socket addresses.
pub trait Resolve {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send;
}

/// The system's resolver (getaddrinfo: /etc/hosts, DNS, per nsswitch.conf).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// One address to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Which configured URL it came from (index into the list).
    pub url_index: usize,
    /// That URL as written.
    pub url: String,
    /// The name the coordinator's certificate must carry: `server_name`, else the URL's host.
    pub tls_name: String,
    pub addr: SocketAddr,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.url, self.addr)
    }
}

/// Where the next round starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// At address `n % len` (the first round).
    Offset(usize),
    /// At this address (stay with it).
    At(usize, SocketAddr),
    /// At the address after this one (move away from it).
    After(usize, SocketAddr),
}

/// A URL that resolved to nothing in a round, and why.
#[derive(Debug)]
pub struct Unresolved {
    pub url: String,
    pub error: String,
}

/// Every address of one round, in the order to try them.
#[derive(Debug)]
pub struct Round {
    pub targets: Vec<Target>,
    pub unresolved: Vec<Unresolved>,
}

/// The configured coordinators and where the next round starts.
#[derive(Debug)]
pub struct Rotation {
    urls: Vec<CoordinatorUrl>,
    server_name: Option<String>,
    start: Start,
}

impl Rotation {
    /// `first`: the address the first round starts at (modulo the number of addresses).
    pub fn new(urls: Vec<CoordinatorUrl>, server_name: Option<String>, first: usize) -> Self {
        Self {
            urls,
            server_name,
            start: Start::Offset(first),
        }
    }

    pub fn urls(&self) -> &[CoordinatorUrl] {
        &self.urls
    }

    /// Resolves every URL now and orders the addresses for this round. A URL that does not
    /// resolve contributes nothing (listed in `unresolved`); an address listed twice under
    /// one TLS name is tried once.
    pub async fn round(&self, resolver: &impl Resolve) -> Round {
        let mut all = Vec::new();
        let mut unresolved = Vec::new();
        for (url_index, u) in self.urls.iter().enumerate() {
            match resolver.resolve(&u.host, u.port).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let tls_name = self.server_name.clone().unwrap_or_else(|| u.host.clone());
                    all.extend(addrs.into_iter().map(|addr| Target {
                        url_index,
                        url: u.url.clone(),
                        tls_name: tls_name.clone(),
                        addr,
                    }));
                }
                Ok(_) => unresolved.push(Unresolved {
                    url: u.url.clone(),
                    error: "the name has no address".into(),
                }),
                Err(e) => unresolved.push(Unresolved {
                    url: u.url.clone(),
                    error: e.to_string(),
                }),
            }
        }
        Round {
            targets: order(all, &self.start),
            unresolved,
        }
    }

    /// The next round starts after `t` (its session ended or could not be established).
    pub fn move_from(&mut self, t: &Target) {
        self.start = Start::After(t.url_index, t.addr);
    }

    /// The next round starts at `t` (nothing failed: the agent redials it first).
    pub fn stay_at(&mut self, t: &Target) {
        self.start = Start::At(t.url_index, t.addr);
    }
}

/// Drops repeated (address, TLS name) pairs (first kept) and rotates the list to start where `start` says.
/// An address no longer resolved is looked for by position: the round starts at the first
/// address of its URL or of a later one (else at the beginning).
fn order(mut all: Vec<Target>, start: &Start) -> Vec<Target> {
    let mut seen = std::collections::HashSet::new();
    all.retain(|t| seen.insert((t.addr, t.tls_name.clone())));
    if all.is_empty() {
        return all;
    }
    let find = |url_index: usize, addr: SocketAddr| {
        all.iter()
            .position(|t| t.url_index == url_index && t.addr == addr)
    };
    let fallback = |url_index: usize| {
        all.iter()
            .position(|t| t.url_index >= url_index)
            .unwrap_or(0)
    };
    let at = match *start {
        Start::Offset(n) => n % all.len(),
        Start::At(u, a) => find(u, a).unwrap_or_else(|| fallback(u)),
        Start::After(u, a) => find(u, a).map_or_else(|| fallback(u), |p| (p + 1) % all.len()),
    };
    all.rotate_left(at);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A resolver whose answers the test sets (and changes between rounds).
    #[derive(Default)]
    struct Table(Mutex<HashMap<String, Vec<SocketAddr>>>);

    impl Table {
        fn set(&self, host: &str, addrs: &[&str]) {
            self.0.lock().expect("lock").insert(
                host.to_string(),
                addrs.iter().map(|a| a.parse().expect("addr")).collect(),
            );
        }
    }

    impl Resolve for Table {
        async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            let found = self.0.lock().expect("lock").get(host).cloned();
            found
                .map(|v| {
                    v.into_iter()
                        .map(|mut a| {
                            a.set_port(port);
                            a
                        })
                        .collect()
                })
                .ok_or_else(|| std::io::Error::other(format!("{host}: no such name")))
        }
    }

    fn urls(list: &[&str]) -> Vec<CoordinatorUrl> {
        list.iter().map(|u| parse_url(u).expect("url")).collect()
    }

    fn addrs(r: &Round) -> Vec<String> {
        r.targets.iter().map(|t| t.addr.to_string()).collect()
    }

    #[tokio::test]
    async fn one_name_with_two_addresses_is_two_coordinators_verified_by_name() {
        let table = Table::default();
        table.set("coord.fleet.test", &["127.0.0.1:0", "[::1]:0"]);
        let mut rot = Rotation::new(urls(&["https://coord.fleet.test:7443"]), None, 0);
        let round = rot.round(&table).await;
        assert_eq!(addrs(&round), ["127.0.0.1:7443", "[::1]:7443"]);
        for t in &round.targets {
            assert_eq!(t.tls_name, "coord.fleet.test", "the name, not the address");
            assert_eq!(t.url, "https://coord.fleet.test:7443");
        }
        // The first one fails: the next round starts at the second, then wraps.
        rot.move_from(&round.targets[0]);
        assert_eq!(
            addrs(&rot.round(&table).await),
            ["[::1]:7443", "127.0.0.1:7443"]
        );
        rot.move_from(&round.targets[1]);
        assert_eq!(
            addrs(&rot.round(&table).await),
            ["127.0.0.1:7443", "[::1]:7443"]
        );
        // Resolved again at every round: a third address appears in the next one.
        table.set(
            "coord.fleet.test",
            &["127.0.0.1:0", "[::1]:0", "10.0.0.3:0"],
        );
        rot.move_from(&round.targets[0]);
        assert_eq!(
            addrs(&rot.round(&table).await),
            ["[::1]:7443", "10.0.0.3:7443", "127.0.0.1:7443"]
        );
    }

    #[tokio::test]
    async fn several_urls_round_robin_and_server_name_applies_to_each() {
        let table = Table::default();
        table.set("a.test", &["10.0.0.1:0"]);
        table.set("b.test", &["10.0.0.2:0", "10.0.0.3:0"]);
        table.set("10.0.0.4", &["10.0.0.4:0"]);
        let list = urls(&["https://a.test:1", "https://b.test:2", "https://10.0.0.4:3"]);
        let mut rot = Rotation::new(list.clone(), None, 0);
        let round = rot.round(&table).await;
        assert_eq!(
            addrs(&round),
            ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:2", "10.0.0.4:3"]
        );
        let names: Vec<_> = round.targets.iter().map(|t| t.tls_name.as_str()).collect();
        assert_eq!(names, ["a.test", "b.test", "b.test", "10.0.0.4"]);
        rot.stay_at(&round.targets[2]);
        assert_eq!(
            addrs(&rot.round(&table).await)[0],
            "10.0.0.3:2",
            "a renewal redials the same address first"
        );
        rot.move_from(&round.targets[3]);
        assert_eq!(addrs(&rot.round(&table).await)[0], "10.0.0.1:1", "wraps");

        let named = Rotation::new(list, Some("coord.fleet.test".into()), 0);
        assert!(
            named
                .round(&table)
                .await
                .targets
                .iter()
                .all(|t| t.tls_name == "coord.fleet.test")
        );
    }

    #[tokio::test]
    async fn first_round_starts_at_the_offset_and_vanished_addresses_fall_back_by_url() {
        let table = Table::default();
        table.set("a.test", &["10.0.0.1:0"]);
        table.set("b.test", &["10.0.0.2:0"]);
        let list = urls(&["https://a.test:1", "https://b.test:1"]);
        for (first, expect) in [(0, "10.0.0.1:1"), (1, "10.0.0.2:1"), (2, "10.0.0.1:1")] {
            let rot = Rotation::new(list.clone(), None, first);
            assert_eq!(addrs(&rot.round(&table).await)[0], expect, "first {first}");
        }
        // a.test moved to another address while the agent was away from it: the round
        // after a.test's old address starts with a.test's new one.
        let mut rot = Rotation::new(list, None, 0);
        let old = rot.round(&table).await.targets[0].clone();
        table.set("a.test", &["10.0.0.9:0"]);
        rot.move_from(&old);
        assert_eq!(
            addrs(&rot.round(&table).await),
            ["10.0.0.9:1", "10.0.0.2:1"]
        );
    }

    #[tokio::test]
    async fn an_unresolvable_name_is_reported_and_the_others_are_tried() {
        let table = Table::default();
        table.set("b.test", &["10.0.0.2:0", "10.0.0.2:0"]);
        table.set("c.test", &["10.0.0.2:0"]);
        let rot = Rotation::new(
            urls(&["https://a.test", "https://b.test", "https://c.test"]),
            None,
            0,
        );
        let round = rot.round(&table).await;
        assert_eq!(
            addrs(&round),
            ["10.0.0.2:443", "10.0.0.2:443"],
            "b.test's address once, and again under c.test's name"
        );
        assert_eq!(round.targets[0].tls_name, "b.test");
        assert_eq!(round.targets[1].tls_name, "c.test");
        assert_eq!(round.unresolved.len(), 1);
        assert_eq!(round.unresolved[0].url, "https://a.test");
        assert!(round.unresolved[0].error.contains("a.test"));
    }

    #[test]
    fn urls_are_validated() {
        let u = parse_url("https://[::1]:7443").expect("v6");
        assert_eq!((u.host.as_str(), u.port), ("::1", 7443));
        assert_eq!(parse_url("https://c.test/").expect("slash").port, 443);
        for bad in [
            "http://c.test:1",
            "https://",
            "https://:1",
            "https://c.test:0",
            "https://c.test:99999",
            "https://u:p@c.test",
            "https://c.test/x",
            "https://c.test?q",
            "https://c.test:",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }
}
