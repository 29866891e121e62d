//! `ClusterStore` for both stores, written once: `cluster_store!(Store, LOCK, BEGIN)`
//! implements it for a store type with a `pool`. The SQL is in the dialect both
//! databases take (`$N` parameters, `CASE` for the larger of two values); what differs is how a
//! decision two coordinators could make at once is serialized: `BEGIN` opens the transaction
//! (SQLite: `BEGIN IMMEDIATE`, the write lock at once) and `LOCK` ends the row read that
//! decides (PostgreSQL: ` FOR UPDATE`, the row locked until commit). A name's row is made to
//! exist before it is read, so even its first registration is decided on a locked row.
//!
//! The cluster's clock (`leases::tick`: heartbeat, lease renewals, takeovers) runs on the
//! store's `clock` pool, which nothing else uses: on PostgreSQL a coordinator whose main
//! pool is saturated by a large job still renews its leases in time (before, a 10,000-host
//! job lost its lease to the other coordinator this way).

macro_rules! cluster_store {
    ($store:ty, $lock:literal, $begin:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::cluster::ClusterStore for $store {
            async fn register_coordinator(
                &self,
                me: &$crate::store::cluster::CoordinatorRow,
                lease_ms: i64,
            ) -> Result<Result<(), $crate::store::cluster::CoordinatorRow>, StoreError> {
                let what = "register_coordinator";
                let mut tx = self.pool.begin_with($begin).await.map_err(query_err(what))?;
                sqlx::query(
                    "INSERT INTO coordinators (name, instance, address, version, started_at_ms, heartbeat_ms)
                     VALUES ($1, '', '', '', 0, 0) ON CONFLICT (name) DO NOTHING",
                )
                .bind(&me.name)
                .execute(&mut *tx)
                .await
                .map_err(query_err(what))?;
                let row = sqlx::query(concat!("SELECT * FROM coordinators WHERE name = $1", $lock))
                    .bind(&me.name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(query_err(what))?;
                let other = coordinator_row(&row);
                if !other.instance.is_empty()
                    && other.instance != me.instance
                    && other.alive(me.started_at_ms, lease_ms)
                {
                    return Ok(Err(other));
                }
                sqlx::query(
                    "UPDATE coordinators SET instance = $2, address = $3, version = $4,
                         started_at_ms = $5, heartbeat_ms = $6 WHERE name = $1",
                )
                .bind(&me.name)
                .bind(&me.instance)
                .bind(&me.address)
                .bind(&me.version)
                .bind(me.started_at_ms)
                .bind(me.heartbeat_ms)
                .execute(&mut *tx)
                .await
                .map_err(query_err(what))?;
                tx.commit().await.map_err(query_err(what))?;
                Ok(Ok(()))
            }

            async fn coordinator_heartbeat(
                &self,
                me: &$crate::store::cluster::Owner,
                now_ms: i64,
            ) -> Result<bool, StoreError> {
                let n = sqlx::query(
                    "UPDATE coordinators SET heartbeat_ms = $3 WHERE name = $1 AND instance = $2",
                )
                .bind(&me.name)
                .bind(&me.instance)
                .bind(now_ms)
                .execute(&self.clock)
                .await
                .map_err(query_err("coordinator_heartbeat"))?
                .rows_affected();
                Ok(n == 1)
            }

            async fn list_coordinators(
                &self,
            ) -> Result<Vec<$crate::store::cluster::CoordinatorRow>, StoreError> {
                let rows =
                    sqlx::query("SELECT * FROM coordinators WHERE instance <> '' ORDER BY name")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(query_err("list_coordinators"))?;
                Ok(rows.iter().map(coordinator_row).collect())
            }

            async fn release_agents_of_dead(
                &self,
                now_ms: i64,
                lease_ms: i64,
            ) -> Result<u64, StoreError> {
                let n = sqlx::query(
                    "UPDATE agents SET online = 0 WHERE online = 1 AND coordinator IN
                         (SELECT name FROM coordinators WHERE heartbeat_ms < $1)",
                )
                .bind(now_ms - lease_ms)
                .execute(&self.clock)
                .await
                .map_err(query_err("release_agents_of_dead"))?
                .rows_affected();
                Ok(n)
            }

            async fn mark_disconnected_held_by(&self, name: &str) -> Result<u64, StoreError> {
                // '' is an agent recorded before coordinators had names: its holder is gone.
                let n = sqlx::query(
                    "UPDATE agents SET online = 0 WHERE online = 1 AND (coordinator = $1 OR coordinator = '')",
                )
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(query_err("mark_disconnected_held_by"))?
                .rows_affected();
                Ok(n)
            }

            async fn agent_released(
                &self,
                host_id: &str,
                last_seen_ms: i64,
                name: &str,
            ) -> Result<bool, StoreError> {
                let n = sqlx::query(
                    "UPDATE agents SET online = 0,
                         last_seen_ms = CASE WHEN last_seen_ms > $2 THEN last_seen_ms ELSE $2 END
                     WHERE host_id = $1 AND coordinator = $3",
                )
                .bind(host_id)
                .bind(last_seen_ms)
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(query_err("agent_released"))?
                .rows_affected();
                Ok(n == 1)
            }

            async fn agent_holder(
                &self,
                host_id: &str,
                not: &str,
                now_ms: i64,
                lease_ms: i64,
            ) -> Result<Option<String>, StoreError> {
                let row = sqlx::query(
                    "SELECT a.coordinator FROM agents a JOIN coordinators c ON c.name = a.coordinator
                     WHERE a.host_id = $1 AND a.online = 1 AND a.coordinator <> $2 AND c.heartbeat_ms >= $3",
                )
                .bind(host_id)
                .bind(not)
                .bind(now_ms - lease_ms)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_err("agent_holder"))?;
                Ok(row.map(|r| r.get("coordinator")))
            }

            async fn claim_job(
                &self,
                job_id: &str,
                me: &$crate::store::cluster::Owner,
                now_ms: i64,
                lease_ms: i64,
            ) -> Result<$crate::store::cluster::Claim, StoreError> {
                use $crate::store::cluster::Claim;
                let mut tx = self
                    .clock
                    .begin_with($begin)
                    .await
                    .map_err(query_err("claim_job"))?;
                let Some(row) = sqlx::query(concat!(
                    "SELECT owner, owner_instance, owner_until_ms, state FROM jobs WHERE job_id = $1",
                    $lock
                ))
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_err("claim_job"))?
                else {
                    return Ok(Claim::Missing);
                };
                let owner: String = row.get("owner");
                let instance: String = row.get("owner_instance");
                let until: i64 = row.get("owner_until_ms");
                let state: String = row.get("state");
                let free = instance == me.instance
                    || owner == me.name
                    || owner.is_empty()
                    || state != "running"
                    || until < now_ms;
                if !free {
                    return Ok(Claim::HeldBy {
                        owner,
                        until_ms: until,
                    });
                }
                sqlx::query(
                    "UPDATE jobs SET owner = $2, owner_instance = $3, owner_until_ms = $4 WHERE job_id = $1",
                )
                .bind(job_id)
                .bind(&me.name)
                .bind(&me.instance)
                .bind(now_ms + lease_ms)
                .execute(&mut *tx)
                .await
                .map_err(query_err("claim_job"))?;
                tx.commit().await.map_err(query_err("claim_job"))?;
                Ok(Claim::Claimed { previous: owner })
            }

            async fn renew_jobs(
                &self,
                me: &$crate::store::cluster::Owner,
                job_ids: &[String],
                until_ms: i64,
            ) -> Result<Vec<String>, StoreError> {
                // A coordinator drives a handful of jobs: one statement each.
                let mut renewed = Vec::with_capacity(job_ids.len());
                for job_id in job_ids {
                    let n = sqlx::query(
                        "UPDATE jobs SET owner_until_ms = $3 WHERE owner_instance = $1 AND job_id = $2",
                    )
                    .bind(&me.instance)
                    .bind(job_id)
                    .bind(until_ms)
                    .execute(&self.clock)
                    .await
                    .map_err(query_err("renew_jobs"))?
                    .rows_affected();
                    if n == 1 {
                        renewed.push(job_id.clone());
                    }
                }
                Ok(renewed)
            }

            async fn release_job(
                &self,
                job_id: &str,
                me: &$crate::store::cluster::Owner,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE jobs SET owner_until_ms = 0 WHERE job_id = $1 AND owner_instance = $2",
                )
                .bind(job_id)
                .bind(&me.instance)
                .execute(&self.pool)
                .await
                .map_err(query_err("release_job"))?;
                Ok(())
            }

            async fn orphaned_jobs(
                &self,
                now_ms: i64,
                lease_ms: i64,
            ) -> Result<Vec<$crate::store::cluster::Orphan>, StoreError> {
                let rows = sqlx::query(
                    "SELECT job_id, owner FROM jobs
                     WHERE state = 'running' AND owner_until_ms < $1
                       AND (owner <> '' OR created_at_ms < $2)
                     ORDER BY created_at_ms",
                )
                .bind(now_ms)
                .bind(now_ms - lease_ms)
                .fetch_all(&self.clock)
                .await
                .map_err(query_err("orphaned_jobs"))?;
                Ok(rows
                    .iter()
                    .map(|r| $crate::store::cluster::Orphan {
                        job_id: r.get("job_id"),
                        owner: r.get("owner"),
                    })
                    .collect())
            }

            async fn job_owner(&self, job_id: &str) -> Result<Option<(String, i64)>, StoreError> {
                let row = sqlx::query("SELECT owner, owner_until_ms FROM jobs WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(query_err("job_owner"))?;
                Ok(row.map(|r| (r.get("owner"), r.get("owner_until_ms"))))
            }
        }
    };
}

pub(super) use cluster_store;

use sqlx::Row;

use super::cluster::CoordinatorRow;

/// A `coordinators` row of either database.
pub(super) fn coordinator_row<R: Row>(row: &R) -> CoordinatorRow
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    CoordinatorRow {
        name: row.get("name"),
        instance: row.get("instance"),
        address: row.get("address"),
        version: row.get("version"),
        started_at_ms: row.get("started_at_ms"),
        heartbeat_ms: row.get("heartbeat_ms"),
    }
}
