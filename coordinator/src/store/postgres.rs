//! The PostgreSQL store: `database = "postgres://USER@HOST:PORT/DB"` in coordinator.toml.
//! Schema from the migrations embedded from `coordinator/migrations_pg`; its SQL is `shared`'s,
//! the same as SQLite's. Hot-path writes are group-committed by the `writer`, as on SQLite: one
//! transaction for everything queued, so a busy coordinator neither pays a commit and its
//! round trips per write nor holds a pool connection per waiting write. A transaction that
//! appends to the audit chain first takes
//! `pg_advisory_xact_lock(CHAIN_LOCK)`, so appends — and the lease checks and conditional
//! updates made with them — are serialized across every coordinator process sharing the
//! database, as SQLite's `BEGIN IMMEDIATE` serializes them on one file.
//!
//! The password never comes from the URL (`PgTarget::parse` refuses one) and is set on the
//! connect options on its own; nothing here logs or formats the options, and connection errors
//! are reduced to text with the password cut out (`connect_error`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use super::chain::{self, Seen};
use super::shared::{Write, pg_sql, query_err};
use super::writer::{Commit, Writer};
use super::{AuditEvent, StoreError};

/// The advisory lock every transaction that appends to the audit chain takes first
/// ("fleet-rb" in ASCII): one key for the whole database.
const CHAIN_LOCK: i64 = 0x666c_6565_742d_7262;

/// A database password: never printed (`Debug` shows `<redacted>`; there is no `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// A password as read from its file (one trailing newline dropped) or the environment.
    pub fn new(text: &str) -> Self {
        let text = text.strip_suffix('\n').unwrap_or(text);
        Self(text.strip_suffix('\r').unwrap_or(text).to_string())
    }

    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the PostgreSQL store is, from a `postgres://` URL without a password. `Display` is
/// `postgres://USER@HOST:PORT/DB`, what the log and errors show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// `sslmode=` as given (disable, allow, prefer, require, verify-ca, verify-full).
    pub sslmode: Option<String>,
    /// `sslrootcert=`: the CA file that verifies the server.
    pub sslrootcert: Option<PathBuf>,
}

/// Why a `database` URL is refused. No variant carries the URL or anything from its userinfo.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgUrlError {
    #[error(
        "the PostgreSQL URL contains a password; remove it from the URL and put it in the file named by `database_password_file` (mode 0600) or in the environment variable ROLLBACK_DATABASE_PASSWORD"
    )]
    Password,
    #[error(
        "the PostgreSQL URL is not a valid URL ({0}); write postgres://USER@HOST:PORT/DATABASE"
    )]
    Invalid(String),
    #[error("the PostgreSQL URL has no {0}; write postgres://USER@HOST:PORT/DATABASE")]
    Missing(&'static str),
    #[error(
        "the PostgreSQL URL has the parameter `{0}`, which the coordinator does not take (only sslmode and sslrootcert)"
    )]
    Parameter(String),
    #[error(
        "the PostgreSQL URL's sslmode `{0}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    SslMode(String),
}

impl PgTarget {
    /// Whether coordinator.toml's `database` names PostgreSQL rather than a SQLite file.
    pub fn is_url(database: &str) -> bool {
        database.starts_with("postgres://") || database.starts_with("postgresql://")
    }

    /// Parses `postgres://USER@HOST[:PORT]/DB[?sslmode=..&sslrootcert=..]`; refuses a URL
    /// with a password (in the userinfo or as a parameter), without echoing any of it.
    pub fn parse(text: &str) -> Result<Self, PgUrlError> {
        // Errors from the parser name only the kind of problem, never the input.
        let url = url::Url::parse(text).map_err(|e| PgUrlError::Invalid(e.to_string()))?;
        if url.password().is_some() {
            return Err(PgUrlError::Password);
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut sslmode = None;
        let mut sslrootcert = None;
        for (key, value) in url.query_pairs() {
            match &*key {
                "sslmode" => {
                    PgSslMode::from_str(&value)
                        .map_err(|_| PgUrlError::SslMode(value.to_string()))?;
                    sslmode = Some(value.into_owned());
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(&*value)),
                "password" => return Err(PgUrlError::Password),
                other => return Err(PgUrlError::Parameter(other.to_string())),
            }
        }
        let user = decode(url.username());
        if user.is_empty() {
            return Err(PgUrlError::Missing("user"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(PgUrlError::Missing("host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let database = decode(url.path().trim_start_matches('/'));
        if database.is_empty() {
            return Err(PgUrlError::Missing("database name"));
        }
        Ok(Self {
            user,
            host,
            port: url.port().unwrap_or(5432),
            database,
            sslmode,
            sslrootcert,
        })
    }

    /// The connect options, with the password set on its own (never through a URL).
    fn connect_options(&self, password: Option<&Password>) -> PgConnectOptions {
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database(&self.database)
            .application_name("rollback-coordinator");
        if let Some(password) = password {
            options = options.password(password.expose());
        }
        if let Some(mode) = self
            .sslmode
            .as_deref()
            .and_then(|m| PgSslMode::from_str(m).ok())
        {
            options = options.ssl_mode(mode);
        }
        if let Some(ca) = &self.sslrootcert {
            options = options.ssl_root_cert(ca);
        }
        options
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "postgres://{}@{host}:{}/{}",
            self.user, self.port, self.database
        )
    }
}

/// A connection failure as text with `password` cut out wherever it appears (sqlx does not put
/// it in its errors; this holds even if a server or driver echoed it).
fn connect_error(target: &PgTarget, password: Option<&Password>, e: &sqlx::Error) -> StoreError {
    let mut reason = e.to_string();
    if let Some(p) = password.map(Password::expose).filter(|p| !p.is_empty()) {
        reason = reason.replace(p, "<redacted>");
    }
    StoreError::Connect {
        database: target.to_string(),
        reason,
    }
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    /// The cluster clock's own connections (`cluster_sql`): lease renewals never wait behind
    /// the main pool's work.
    pub(super) clock: PgPool,
    /// Hot-path writes, group-committed.
    writer: Writer,
    /// The newest audit record this process has seen committed (other coordinators may have
    /// appended after it: `Seen::chain_from` takes a head ahead of it as it is).
    seen: Arc<Seen>,
}

impl PgStore {
    /// Connects, applies pending migrations (sqlx's migrator locks the database while it
    /// does, so coordinators starting together migrate once) and reads the chain's head.
    pub async fn open(target: &PgTarget, password: Option<&Password>) -> Result<Self, StoreError> {
        let shown = target.to_string();
        let connect = |connections: u32| async move {
            PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(15))
                .connect_with(target.connect_options(password))
                .await
                .map_err(|e| connect_error(target, password, &e))
        };
        let pool = connect(16).await?;
        let clock = connect(2).await?;
        sqlx::migrate!("./migrations_pg")
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: shown.clone(),
                source,
            })?;
        // As SQLite does: rows without a place in the chain are chained once, while no record
        // has one (only rows planted with the triggers dropped can be such rows here).
        let what = "chaining the audit records written before the chain";
        let mut tx = begin_audited(&pool, what).await?;
        let chained = pg_sql::chain_unchained_history(&mut tx).await?;
        tx.commit().await.map_err(query_err(what))?;
        let head = pg_sql::stored_head(&pool).await?;
        // The head in the log is an anchor outside the store: `audit verify` reports it too.
        tracing::info!(
            store = %shown,
            head_seq = head.as_ref().map_or(0, |h| h.seq),
            head_hash = head.as_ref().map_or(chain::GENESIS, |h| h.hash.as_str()),
            chained_history = chained,
            "audit chain opened"
        );
        let seen = Arc::new(Seen::new(head));
        let store = Self {
            writer: Writer::start(Arc::new(Batches {
                pool: pool.clone(),
                seen: seen.clone(),
            })),
            pool,
            clock,
            seen,
        };
        Ok(store)
    }

    /// Begins a transaction that appends to the audit chain.
    async fn begin_audited(
        &self,
        what: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        begin_audited(&self.pool, what).await
    }

    /// Appends `audit` in `tx`, commits, then remembers the new head.
    async fn commit_audited(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        audit: &AuditEvent,
        what: &'static str,
    ) -> Result<(), StoreError> {
        let link = pg_sql::append(&mut tx, audit, &self.seen).await?;
        tx.commit().await.map_err(query_err(what))?;
        self.seen.advance(&link);
        Ok(())
    }

    /// One write, group-committed; returns once it is committed.
    async fn write(&self, write: Write) -> Result<u64, StoreError> {
        self.writer.write(write).await
    }

    pub async fn close(&self) {
        self.clock.close().await;
        self.pool.close().await;
    }
}

super::shared::store_impl!(PgStore, pg_sql);

/// Begins a transaction that appends to the audit chain: the chain's advisory lock is held
/// until it commits or rolls back.
async fn begin_audited(
    pool: &PgPool,
    what: &'static str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await.map_err(query_err(what))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHAIN_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(query_err(what))?;
    Ok(tx)
}

/// The group commit's transactions: one that appends to the chain (under its advisory lock)
/// when any write of the batch may.
struct Batches {
    pool: PgPool,
    seen: Arc<Seen>,
}

#[async_trait::async_trait]
impl Commit for Batches {
    async fn commit(&self, writes: &[Write]) -> Result<Vec<u64>, StoreError> {
        let mut tx = if writes.iter().any(Write::appends) {
            begin_audited(&self.pool, "begin").await?
        } else {
            self.pool.begin().await.map_err(query_err("begin"))?
        };
        let (counts, appended) = pg_sql::apply_all(&mut tx, &self.seen, writes).await?;
        tx.commit().await.map_err(query_err("commit"))?;
        if let Some(link) = appended {
            self.seen.advance(&link);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_parsed_and_shown_without_anything_secret() {
        let t = PgTarget::parse(
            "postgres://fleet@db.example:6543/rollback?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        )
        .expect("parses");
        assert_eq!(t.to_string(), "postgres://fleet@db.example:6543/rollback");
        assert_eq!(t.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(t.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        let t = PgTarget::parse("postgresql://fleet@127.0.0.1/rb").expect("parses");
        assert_eq!(t.to_string(), "postgres://fleet@127.0.0.1:5432/rb");
    }

    #[test]
    fn a_url_with_a_password_is_refused_without_echoing_it() {
        for url in [
            "postgres://fleet:s3cret-Pw@db:5432/rollback",
            "postgres://fleet@db:5432/rollback?password=s3cret-Pw",
            "postgres://fleet:s3cret-Pw@db:notaport/rollback",
        ] {
            let err = PgTarget::parse(url).expect_err(url).to_string();
            assert!(!err.contains("s3cret-Pw"), "{err}");
            assert!(!format!("{:?}", PgTarget::parse(url)).contains("s3cret-Pw"));
        }
        let err = PgTarget::parse("postgres://fleet:s3cret-Pw@db:5432/rollback")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("database_password_file"), "{err}");
        assert!(err.contains("ROLLBACK_DATABASE_PASSWORD"), "{err}");
        assert_eq!(format!("{:?}", Password::new("s3cret-Pw\n")), "<redacted>");
    }

    #[test]
    fn a_url_missing_a_part_or_with_other_parameters_is_refused() {
        for (url, want) in [
            ("postgres://db:5432/rollback", "no user"),
            ("postgres://fleet@db:5432/", "no database name"),
            (
                "postgres://fleet@db/rb?sslmode=sometimes",
                "sslmode `sometimes`",
            ),
            ("postgres://fleet@db/rb?options=-c", "parameter `options`"),
        ] {
            let err = PgTarget::parse(url).expect_err(url).to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
    }
}
