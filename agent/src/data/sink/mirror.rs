//! What a pull keeps between batches besides its checkpoint key: the mirror's staging table of
//! keys seen (and the delete that ends a mirror pull), and the incremental cursor.

use super::*;
use crate::clock::to_micros;

impl Store {
    /// Ends a mirror pull of `schema.name`: deletes the local rows whose key the sender did not
    /// send, and drops the staging table of seen keys, in one transaction. Returns the rows
    /// deleted.
    pub async fn finish_mirror(&self, connection_id: Uuid, schema: &TableSchema) -> Result<i64> {
        let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
        let table_ref = crate::catalog::table_ref(self.engine(), &schema.name)?;
        let stage = quote_ident(&mirror_table(connection_id, &schema.name))?;
        let key_list: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Result<_>>()?;
        if key_list.is_empty() {
            return Err(Error::invalid(
                "strategy",
                format!("{:?} has no primary key to mirror by", schema.name),
            ));
        }
        let matches: Vec<String> = key_list
            .iter()
            .map(|k| format!("s.{k} = {table_ref}.{k}"))
            .collect();
        let delete = format!(
            "DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE {})",
            matches.join(" AND ")
        );
        // A mirror pull of an empty sender table applies no batch: the stage may not exist.
        let target = self.describe_table(&schema.name).await?;
        let stage_columns: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| {
                let ty = target
                    .columns
                    .iter()
                    .find(|c| &c.name == k)
                    .map(|c| c.native_type.clone())
                    .unwrap_or_default();
                Ok(format!("{} {ty}", quote_ident(k)?))
            })
            .collect::<Result<_>>()?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {stage} ({})",
            stage_columns.join(", ")
        );
        let drop = format!("DROP TABLE {stage}");
        let deleted = crate::store::on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(create))
                .execute(&mut *tx)
                .await?;
            let deleted = sqlx::query(sqlx::AssertSqlSafe(delete))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            deleted
        });
        Ok(deleted as i64)
    }

    /// Drops the staging table of a mirror pull that will not finish (or starts over).
    pub async fn reset_mirror(&self, connection_id: Uuid, table: &str) -> Result<()> {
        let sql = format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(&mirror_table(connection_id, table))?
        );
        crate::store::on_pool!(self, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
        });
        Ok(())
    }

    /// Records where an incremental pull of `table` stopped (the next one starts after it).
    pub async fn set_incremental_cursor(
        &self,
        connection_id: Uuid,
        table: &str,
        cursor: &serde_json::Value,
    ) -> Result<()> {
        let now = to_micros(chrono::Utc::now());
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_checkpoints (connection_id, table_name, incremental_cursor, rows_applied, updated_at) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (connection_id, table_name) DO UPDATE SET \
                 incremental_cursor = excluded.incremental_cursor, updated_at = excluded.updated_at",
            )
            .bind(connection_id)
            .bind(table)
            .bind(sqlx::types::Json(cursor))
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Forgets where an interrupted pull of a table stood (the next pull starts from the
    /// beginning, or from the incremental cursor, which is kept).
    pub async fn clear_checkpoint(&self, connection_id: Uuid, table: &str) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_checkpoints SET last_key = NULL, transfer_id = NULL, rows_applied = 0 \
                 WHERE connection_id = $1 AND table_name = $2",
            )
            .bind(connection_id)
            .bind(table)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

impl Store {
    /// The checkpoints of the parts of a parallel pull of `table` (see
    /// [`super::part_checkpoint`]), by name, in no order.
    pub async fn part_checkpoints(
        &self,
        connection_id: Uuid,
        table: &str,
    ) -> Result<Vec<(String, Checkpoint)>> {
        let prefix = super::part_checkpoint_prefix(table);
        let names: Vec<String> = crate::store::on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT table_name FROM dbsync_checkpoints WHERE connection_id = $1")
                .bind(connection_id)
                .fetch_all(pool)
                .await?
        });
        let mut parts = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
            if let Some(checkpoint) = self.checkpoint(connection_id, &name).await? {
                parts.push((name, checkpoint));
            }
        }
        Ok(parts)
    }

    /// Forgets every part checkpoint of `table` (a parallel pull that finished, or one that
    /// starts over).
    pub async fn clear_part_checkpoints(&self, connection_id: Uuid, table: &str) -> Result<()> {
        for (name, _) in self.part_checkpoints(connection_id, table).await? {
            crate::store::on_pool!(self, |pool| {
                sqlx::query(
                    "DELETE FROM dbsync_checkpoints WHERE connection_id = $1 AND table_name = $2",
                )
                .bind(connection_id)
                .bind(&name)
                .execute(pool)
                .await?;
            });
        }
        Ok(())
    }

    /// Points the checkpoint `name` at the receive transfer `transfer` (made when missing,
    /// its key kept when there).
    pub async fn set_checkpoint_transfer(
        &self,
        connection_id: Uuid,
        name: &str,
        transfer: Uuid,
    ) -> Result<()> {
        let now = to_micros(chrono::Utc::now());
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_checkpoints (connection_id, table_name, transfer_id, rows_applied, updated_at) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (connection_id, table_name) DO UPDATE SET \
                 transfer_id = excluded.transfer_id, updated_at = excluded.updated_at",
            )
            .bind(connection_id)
            .bind(name)
            .bind(transfer)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

/// The staging table of keys seen by a mirror pull of `table` under a connection. Its name
/// starts with `dbsync_`, so it is never offered to peers.
pub fn mirror_table(connection_id: Uuid, table: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{connection_id}\0{table}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("dbsync_mirror_{hex}")
}
