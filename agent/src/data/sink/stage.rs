//! The stage of a whole-table pull (a table without a primary key, or the `replace` strategy):
//! the rows go into a table of dbsync's own as they come, and into the table itself only once
//! every one is here, in one transaction. So an interrupted pull never leaves the table empty or
//! half full, and a pull that is not finished changes nothing.

use super::*;

/// The stage of a whole-table pull of `table` under a connection. Its name starts with
/// `dbsync_`, so it is never offered to peers, listed or written by one.
pub fn stage_table(connection_id: Uuid, table: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{connection_id}\0{table}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("dbsync_stage_{hex}")
}

/// What moving a stage into its table did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swapped {
    /// Rows the table had and no longer has (`replace`).
    pub deleted: i64,
    /// Rows the stage put in (for a table with a key under `replace`: inserted or updated).
    pub inserted: i64,
}

impl Store {
    /// Makes an empty stage for a whole-table pull of `schema.name` (which exists here) with its
    /// `columns` as they are typed here; a stage left by an interrupted pull is dropped first
    /// (the sender's snapshot it came from is gone). Returns the stage's name.
    pub async fn open_stage(
        &self,
        connection_id: Uuid,
        schema: &TableSchema,
        columns: &[String],
    ) -> Result<String> {
        refuse_reserved(&schema.name)?;
        let name = stage_table(connection_id, &schema.name);
        let stage = quote_ident(&name)?;
        let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
        let list = column_list(columns)?;
        let (unlogged, empty) = match self.engine() {
            crate::store::Engine::Postgres => ("UNLOGGED ", "WITH NO DATA"),
            crate::store::Engine::Sqlite => ("", "WHERE 0"),
        };
        let drop = format!("DROP TABLE IF EXISTS {stage}");
        // The stage's columns are the table's own (types, domains), with no constraint: the
        // table's are met when the rows move in.
        let create = match self.engine() {
            crate::store::Engine::Postgres => {
                format!("CREATE {unlogged}TABLE {stage} AS SELECT {list} FROM {table} {empty}")
            }
            crate::store::Engine::Sqlite => {
                format!("CREATE TABLE {stage} AS SELECT {list} FROM {table} {empty}")
            }
        };
        crate::store::on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut *tx)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(create))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(name)
    }

    /// Moves the stage of `schema.name` into it, in one transaction, and drops the stage. With
    /// `replace` the table ends as the stage: unless it already is (then nothing is written), a
    /// table without a key has its rows replaced, and one with a key loses the rows whose key
    /// the stage lacks and takes the staged rows over its own. Without (`append`), the staged
    /// rows are added.
    pub async fn swap_stage(
        &self,
        connection_id: Uuid,
        schema: &TableSchema,
        columns: &[String],
        replace: bool,
    ) -> Result<Swapped> {
        refuse_reserved(&schema.name)?;
        let stage = quote_ident(&stage_table(connection_id, &schema.name))?;
        let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
        let list = column_list(columns)?;
        let overriding = match self.engine() {
            // The sender's values go in as they are, into `GENERATED ALWAYS` identity columns
            // too.
            crate::store::Engine::Postgres => " OVERRIDING SYSTEM VALUE",
            crate::store::Engine::Sqlite => "",
        };
        // A replace that would change nothing (the same rows, as many times each) writes
        // nothing: no row versions, no triggers, and the table's counts say so. Types without
        // equality (json, point) cannot be compared: those tables are replaced.
        if replace {
            let grouped =
                |from: &str| format!("SELECT {list}, COUNT(*) FROM {from} GROUP BY {list}");
            let differs = format!(
                "SELECT EXISTS ({} EXCEPT {}) OR EXISTS ({} EXCEPT {})",
                grouped(&stage),
                grouped(&table),
                grouped(&table),
                grouped(&stage)
            );
            let compared: std::result::Result<bool, sqlx::Error> =
                crate::store::on_pool!(self, |pool| {
                    sqlx::query_scalar(sqlx::AssertSqlSafe(differs))
                        .fetch_one(pool)
                        .await
                });
            if let Ok(false) = compared {
                self.drop_stage(connection_id, &schema.name).await?;
                return Ok(Swapped::default());
            }
        }
        // A table with a key is replaced row by row: the rows the sender no longer has go, the
        // others are updated in place. Deleting them all first would fire `ON DELETE CASCADE`
        // on other tables' rows that reference rows the sender still has.
        let keyed = replace && !schema.primary_key.is_empty();
        let (delete, insert) = if keyed {
            let table_ref = crate::catalog::table_ref(self.engine(), &schema.name)?;
            let keys: Vec<String> = schema
                .primary_key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Result<_>>()?;
            let matches: Vec<String> = keys
                .iter()
                .map(|k| format!("s.{k} = {table_ref}.{k}"))
                .collect();
            let updates: Vec<String> = columns
                .iter()
                .filter(|c| !schema.primary_key.contains(c))
                .map(|c| quote_ident(c).map(|q| format!("{q} = excluded.{q}")))
                .collect::<Result<_>>()?;
            let conflict = if updates.is_empty() {
                format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", "))
            } else {
                format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    keys.join(", "),
                    updates.join(", ")
                )
            };
            (
                format!(
                    "DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE {})",
                    matches.join(" AND ")
                ),
                // `WHERE true`: SQLite reads `ON CONFLICT` after a bare `FROM` as a join's.
                format!(
                    "INSERT INTO {table} ({list}){overriding} SELECT {list} FROM {stage} WHERE true{conflict}"
                ),
            )
        } else {
            (
                format!("DELETE FROM {table}"),
                format!("INSERT INTO {table} ({list}){overriding} SELECT {list} FROM {stage}"),
            )
        };
        let drop = format!("DROP TABLE {stage}");
        let mut swapped = Swapped::default();
        crate::store::on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            if replace {
                swapped.deleted = sqlx::query(sqlx::AssertSqlSafe(delete))
                    .execute(&mut *tx)
                    .await
                    .map_err(|err| refused_rows(&schema.name, err))?
                    .rows_affected() as i64;
            }
            swapped.inserted = sqlx::query(sqlx::AssertSqlSafe(insert))
                .execute(&mut *tx)
                .await
                .map_err(|err| refused_rows(&schema.name, err))?
                .rows_affected() as i64;
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(swapped)
    }

    /// Whether a whole-table pull of `table` under `connection_id` left its stage (it was
    /// interrupted; the next pull of the table drops it).
    pub async fn stage_exists(&self, connection_id: Uuid, table: &str) -> Result<bool> {
        let name = stage_table(connection_id, table);
        Ok(match self.pool() {
            Pool::Postgres(pool) => {
                sqlx::query_scalar("SELECT to_regclass(quote_ident($1)) IS NOT NULL")
                    .bind(&name)
                    .fetch_one(pool)
                    .await?
            }
            Pool::Sqlite(pool) => sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)",
            )
            .bind(&name)
            .fetch_one(pool)
            .await?,
        })
    }

    /// Drops the stage of a whole-table pull of `table` that did not finish, if there is one.
    pub async fn drop_stage(&self, connection_id: Uuid, table: &str) -> Result<()> {
        let stage = quote_ident(&stage_table(connection_id, table))?;
        crate::store::on_pool!(self, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {stage}")))
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}

/// Quoted, comma-separated column names.
fn column_list(columns: &[String]) -> Result<String> {
    if columns.is_empty() {
        return Err(Error::invalid("columns", "no column to pull"));
    }
    Ok(columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Result<Vec<_>>>()?
        .join(", "))
}

/// A staged row the table here refuses (a constraint of its own the sender's rows break) is the
/// operator's to resolve: say which table, and what the database said.
fn refused_rows(table: &str, err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::Database(db) => Error::invalid(
            "rows",
            format!(
                "the rows of {table:?} could not replace or join the rows here (nothing changed): {}",
                db.message()
            ),
        ),
        other => other.into(),
    }
}
