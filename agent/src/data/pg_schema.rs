//! The parts of a PostgreSQL table's schema that travel besides its columns
//! ([`dbsync_protocol::message::PostgresSchema`]): the extensions and user types its columns use,
//! and the sequences that give its columns their values.
//!
//! The sender reads them from its catalog as data. The receiver writes every statement itself,
//! from names it quotes and types it checks ([`crate::catalog::check_type_name`]); no SQL text of
//! the sender's runs here. So a domain's CHECK constraints and other expressions do not travel.

use dbsync_protocol::message::{ColumnSequence, PostgresSchema, TableSchema, UserType};

use crate::catalog::{check_type_name, quote_ident};
use crate::error::{Error, Result};
use crate::store::{Engine, Pool, Store};

/// Most user types one table may bring (nested composites included).
const MAX_TYPES: usize = 200;

/// The table's oid in the current schema.
const TABLE_OID: &str = "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = current_schema() AND c.relname = $1)";

/// A type as the catalog tells it: what it is and what it uses.
#[derive(sqlx::FromRow)]
struct TypeRow {
    name: String,
    typtype: String,
    category: String,
    element: Option<i64>,
    base: Option<i64>,
    extension: Option<String>,
    builtin: bool,
    base_name: Option<String>,
    not_null: bool,
    relid: Option<i64>,
    subtype: Option<i64>,
    subtype_name: Option<String>,
}

impl Store {
    /// What a receiver needs besides the columns of `table` (PostgreSQL only; `None` on SQLite).
    pub async fn postgres_schema(&self, table: &str) -> Result<Option<PostgresSchema>> {
        let Pool::Postgres(pool) = self.pool() else {
            return Ok(None);
        };
        let column_types: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(a.atttypid AS BIGINT) FROM pg_attribute a WHERE a.attrelid = {TABLE_OID} \
             AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool)
        .await?;
        let mut out = PostgresSchema::default();
        let mut seen = std::collections::HashSet::new();
        for oid in column_types {
            self.collect_type(pool, oid, &mut seen, &mut out).await?;
        }
        out.sequences = sqlx::query_as::<
            _,
            (
                String,
                String,
                String,
                i64,
                i64,
                i64,
                i64,
                bool,
                Option<i64>,
            ),
        >(sqlx::AssertSqlSafe(format!(
            "SELECT a.attname::text, a.attidentity::text, format_type(s.seqtypid, NULL), \
                 s.seqincrement, s.seqmin, s.seqmax, s.seqstart, s.seqcycle, \
                 pg_sequence_last_value(sc.oid) \
                 FROM pg_depend d \
                 JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S' \
                 JOIN pg_sequence s ON s.seqrelid = sc.oid \
                 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                 AND d.refobjid = {TABLE_OID} AND d.deptype IN ('a', 'i') ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(
            |(column, identity, data_type, increment, min_value, max_value, start, cycle, last)| {
                ColumnSequence {
                    column,
                    identity: match identity.as_str() {
                        "a" => Some("always".into()),
                        "d" => Some("by default".into()),
                        _ => None,
                    },
                    data_type,
                    increment,
                    min_value,
                    max_value,
                    start,
                    cycle,
                    last_value: last,
                }
            },
        )
        .collect();
        Ok(Some(out))
    }

    /// Adds the type `oid` to `out` after the types it uses, or the extension that provides it.
    async fn collect_type(
        &self,
        pool: &sqlx::PgPool,
        oid: i64,
        seen: &mut std::collections::HashSet<i64>,
        out: &mut PostgresSchema,
    ) -> Result<()> {
        let mut stack = vec![(oid, false)];
        while let Some((oid, expanded)) = stack.pop() {
            if expanded {
                let row = type_row(pool, oid).await?;
                if let Some(user_type) = user_type(pool, &row).await? {
                    if out.types.len() >= MAX_TYPES {
                        return Err(Error::invalid(
                            "table",
                            format!("its columns use more than {MAX_TYPES} user types"),
                        ));
                    }
                    out.types.push(user_type);
                }
                continue;
            }
            if !seen.insert(oid) {
                continue;
            }
            let row = type_row(pool, oid).await?;
            if let Some(extension) = &row.extension {
                if !out.extensions.contains(extension) {
                    out.extensions.push(extension.clone());
                }
                continue;
            }
            if row.builtin && row.category != "A" {
                continue;
            }
            stack.push((oid, true));
            let mut uses = Vec::new();
            if row.category == "A" {
                uses.extend(row.element);
            }
            uses.extend(row.base);
            uses.extend(row.subtype);
            if let Some(relid) = row.relid {
                let attributes: Vec<i64> = sqlx::query_scalar(
                    "SELECT CAST(atttypid AS BIGINT) FROM pg_attribute WHERE attrelid = $1::oid \
                     AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                )
                .bind(relid)
                .fetch_all(pool)
                .await?;
                uses.extend(attributes);
            }
            stack.extend(uses.into_iter().rev().map(|oid| (oid, false)));
        }
        Ok(())
    }
}

async fn type_row(pool: &sqlx::PgPool, oid: i64) -> Result<TypeRow> {
    Ok(sqlx::query_as(
        "SELECT format_type(t.oid, NULL) AS name, t.typtype::text AS typtype, \
         t.typcategory::text AS category, \
         CAST(NULLIF(t.typelem, 0) AS BIGINT) AS element, \
         CAST(NULLIF(t.typbasetype, 0) AS BIGINT) AS base, \
         (SELECT e.extname::text FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid \
          WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e' \
          AND d.refclassid = 'pg_extension'::regclass LIMIT 1) AS extension, \
         n.nspname IN ('pg_catalog', 'information_schema') AS builtin, \
         CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS base_name, \
         t.typnotnull AS not_null, \
         CASE WHEN t.typtype = 'c' THEN CAST(t.typrelid AS BIGINT) END AS relid, \
         CAST(r.rngsubtype AS BIGINT) AS subtype, format_type(r.rngsubtype, NULL) AS subtype_name \
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         LEFT JOIN pg_range r ON r.rngtypid = t.oid WHERE t.oid = $1::oid",
    )
    .bind(oid)
    .fetch_one(pool)
    .await?)
}

/// The definition of a user type, or `None` for one dbsync does not create (an array: its
/// element is created; a multirange: made with its range).
async fn user_type(pool: &sqlx::PgPool, row: &TypeRow) -> Result<Option<UserType>> {
    Ok(match row.typtype.as_str() {
        "e" => {
            let labels: Vec<String> = sqlx::query_scalar(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::regtype ORDER BY enumsortorder",
            )
            .bind(&row.name)
            .fetch_all(pool)
            .await?;
            Some(UserType::Enum {
                name: row.name.clone(),
                labels,
            })
        }
        "c" => {
            let attributes: Vec<(String, String)> = sqlx::query_as(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            )
            .bind(row.relid)
            .fetch_all(pool)
            .await?;
            Some(UserType::Composite {
                name: row.name.clone(),
                attributes,
            })
        }
        "r" => row.subtype_name.clone().map(|subtype| UserType::Range {
            name: row.name.clone(),
            subtype,
        }),
        "d" => row.base_name.clone().map(|base| UserType::Domain {
            name: row.name.clone(),
            base,
            not_null: row.not_null,
        }),
        _ => None,
    })
}

/// A string as an SQL literal.
fn literal(text: &str) -> Result<String> {
    if text.contains('\0') {
        return Err(Error::invalid("schema", "a label holds a NUL byte"));
    }
    Ok(format!("'{}'", text.replace('\'', "''")))
}

/// The statement that creates `user_type`, from its parts (names and types checked here).
pub fn create_type_sql(user_type: &UserType) -> Result<String> {
    check_type_name(user_type.name())?;
    Ok(match user_type {
        UserType::Enum { name, labels } => format!(
            "CREATE TYPE {name} AS ENUM ({})",
            labels
                .iter()
                .map(|l| literal(l))
                .collect::<Result<Vec<_>>>()?
                .join(", ")
        ),
        UserType::Composite { name, attributes } => {
            let mut parts = Vec::new();
            for (attribute, ty) in attributes {
                check_type_name(ty)?;
                parts.push(format!("{} {ty}", quote_ident(attribute)?));
            }
            format!("CREATE TYPE {name} AS ({})", parts.join(", "))
        }
        UserType::Range { name, subtype } => {
            check_type_name(subtype)?;
            format!("CREATE TYPE {name} AS RANGE (SUBTYPE = {subtype})")
        }
        UserType::Domain {
            name,
            base,
            not_null,
        } => {
            check_type_name(base)?;
            let not_null = if *not_null { " NOT NULL" } else { "" };
            format!("CREATE DOMAIN {name} AS {base}{not_null}")
        }
    })
}

/// The identity clause of a column whose values come from `sequence`, or `None` for a serial
/// column (its sequence and default are made after the table).
pub fn identity_clause(sequence: &ColumnSequence) -> Result<Option<String>> {
    let Some(kind) = &sequence.identity else {
        return Ok(None);
    };
    let kind = match kind.as_str() {
        "always" => "ALWAYS",
        "by default" => "BY DEFAULT",
        other => {
            return Err(Error::invalid(
                "schema",
                format!("{other:?} is not an identity kind"),
            ));
        }
    };
    Ok(Some(format!(
        " GENERATED {kind} AS IDENTITY ({})",
        sequence_options(sequence)
    )))
}

fn sequence_options(sequence: &ColumnSequence) -> String {
    format!(
        "INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} {}",
        sequence.increment,
        sequence.min_value,
        sequence.max_value,
        sequence.start,
        if sequence.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

impl Store {
    /// Before `schema.name` is created here: every extension it needs is installed (else an
    /// error naming the `CREATE EXTENSION` to run), and every user type it uses exists (created
    /// from its parts when missing).
    pub(crate) async fn prepare_postgres_types(&self, schema: &TableSchema) -> Result<()> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(());
        };
        for extension in &extras.extensions {
            let installed: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1)")
                    .bind(extension)
                    .fetch_one(pool)
                    .await?;
            if !installed {
                return Err(Error::MissingExtension {
                    table: schema.name.clone(),
                    extension: extension.clone(),
                });
            }
        }
        for user_type in &extras.types {
            let sql = create_type_sql(user_type)?;
            let exists: bool = sqlx::query_scalar("SELECT to_regtype($1) IS NOT NULL")
                .bind(user_type.name())
                .fetch_one(pool)
                .await?;
            if !exists {
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                tracing::info!(table = %schema.name, r#type = %user_type.name(), "created a type the table uses");
            }
        }
        Ok(())
    }

    /// After `schema.name` was created here: serial columns get their sequence (owned by the
    /// column) and its `nextval` default, as on the sender.
    pub(crate) async fn add_serial_sequences(&self, schema: &TableSchema) -> Result<()> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(());
        };
        let table = quote_ident(&schema.name)?;
        for sequence in extras.sequences.iter().filter(|s| s.identity.is_none()) {
            check_type_name(&sequence.data_type)?;
            let column = quote_ident(&sequence.column)?;
            let name = quote_ident(&format!("{}_{}_seq", schema.name, sequence.column))?;
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE SEQUENCE {name} AS {} {} OWNED BY {table}.{column}",
                sequence.data_type,
                sequence_options(sequence)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT nextval({}::regclass)",
                literal(&name)?
            )))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// After a pull of `schema.name` completed: each sequence that gives one of its columns
    /// values here is moved to at least the sender's last value, so the copy takes inserts at
    /// once. A column with no sequence here is left alone.
    pub async fn follow_sequences(&self, schema: &TableSchema) -> Result<()> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(());
        };
        if self.engine() != Engine::Postgres {
            return Ok(());
        }
        let table = quote_ident(&schema.name)?;
        for sequence in &extras.sequences {
            let Some(last) = sequence.last_value else {
                continue;
            };
            let moved: Option<i64> = sqlx::query_scalar(
                "SELECT setval(s, GREATEST($3, COALESCE(pg_sequence_last_value(s), $3))) \
                 FROM (SELECT CAST(pg_get_serial_sequence($1, $2) AS regclass) AS s) seq \
                 WHERE s IS NOT NULL",
            )
            .bind(&table)
            .bind(&sequence.column)
            .bind(last)
            .fetch_optional(pool)
            .await?;
            if let Some(value) = moved {
                tracing::debug!(table = %schema.name, column = %sequence.column, value, "sequence follows the sender");
            }
        }
        Ok(())
    }
}
