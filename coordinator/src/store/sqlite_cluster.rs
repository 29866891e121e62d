//! `ClusterStore` on SQLite (`cluster_sql`'s one implementation): one SQLite file serves one
//! coordinator, so this is its own row (`rollbackctl coordinators`) and leases a restarted
//! process of the same name takes back at once. Decisions open with `BEGIN IMMEDIATE`.

use sqlx::Row;

use super::StoreError;
use super::cluster_sql::{cluster_store, coordinator_row};
use super::shared::query_err;
use super::sqlite::SqliteStore;

cluster_store!(SqliteStore, "", "BEGIN IMMEDIATE");
