//! `ClusterStore` on PostgreSQL (`cluster_sql`'s one implementation): several coordinators
//! share the database, and every decision two of them could make at once (a name, a job's
//! lease) reads its row `FOR UPDATE`, so exactly one of them wins.

use sqlx::Row;

use super::StoreError;
use super::cluster_sql::{cluster_store, coordinator_row};
use super::postgres::PgStore;
use super::shared::query_err;

cluster_store!(PgStore, " FOR UPDATE", "BEGIN");
