//! The parts of a PostgreSQL table's schema that travel besides its columns
//! ([`dbsync_protocol::message::PostgresSchema`]): the extensions and user types its columns use,
//! and the sequences that give its columns their values.
//!
//! The sender reads them from its catalog as data. The receiver writes every statement itself,
//! from names it quotes and types it checks ([`crate::catalog::check_type_name`]); no SQL text of
//! the sender's runs here. So a domain's CHECK constraints and other expressions do not travel.

use dbsync_protocol::message::{
    CheckDef, ColumnDefault, ColumnSequence, CommentDef, ForeignKeyDef, GeneratedColumn, IndexDef,
    IndexKey, PostgresSchema, TableSchema, UserType,
};

use crate::catalog::{check_type_name, quote_ident};
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

/// Most user types one table may bring (nested composites included).
const MAX_TYPES: usize = 200;

/// The table's oid, from its quoted name (bound as `$1`: [`crate::catalog::quote_table`]).
const TABLE_OID: &str = "to_regclass($1)";

/// `table` quoted as PostgreSQL reads it (schema-qualified when it has a dot).
fn pg_table(table: &str) -> Result<String> {
    crate::catalog::quote_table(crate::store::Engine::Postgres, table)
}

/// A type as the catalog tells it: what it is and what it uses.
#[derive(sqlx::FromRow)]
struct TypeRow {
    oid: i64,
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
        let table = &pg_table(table)?;
        // The parts are independent: each is read on a connection of its own, at once (about
        // twenty catalog statements took ~20 ms one after the other, for each table of a pull).
        let types = async {
            let rows = column_types(pool, table).await?;
            let order: Vec<i64> = rows.iter().map(|row| row.oid).collect();
            let mut read: std::collections::HashMap<i64, TypeRow> =
                rows.into_iter().map(|row| (row.oid, row)).collect();
            let mut out = PostgresSchema::default();
            let mut seen = std::collections::HashSet::new();
            for oid in order {
                self.collect_type(pool, oid, &mut read, &mut seen, &mut out)
                    .await?;
            }
            Ok::<_, Error>(out)
        };
        type SequenceRow = (
            String,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            bool,
            Option<i64>,
        );
        let sequences = sqlx::query_as::<_, SequenceRow>(sqlx::AssertSqlSafe(format!(
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
        .fetch_all(pool);
        let defaults = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d \
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
             WHERE d.adrelid = {TABLE_OID} AND a.attgenerated = '' ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool);
        let checks = sqlx::query_as::<_, (String, String, bool)>(sqlx::AssertSqlSafe(format!(
            "SELECT con.conname::text, pg_get_expr(con.conbin, con.conrelid), con.convalidated \
             FROM pg_constraint con WHERE con.conrelid = {TABLE_OID} AND con.contype = 'c' \
             ORDER BY con.conname"
        )))
        .bind(table)
        .fetch_all(pool);
        let generated = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d \
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
             WHERE d.adrelid = {TABLE_OID} AND a.attgenerated <> '' ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool);
        let collations = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT a.attname::text, co.collname::text FROM pg_attribute a \
             JOIN pg_collation co ON co.oid = a.attcollation \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = {TABLE_OID} AND a.attnum > 0 AND NOT a.attisdropped \
             AND a.attcollation <> t.typcollation ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool);
        let comments = sqlx::query_as::<_, (Option<String>, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT NULL::text, d.description FROM pg_description d \
             WHERE d.classoid = 'pg_class'::regclass AND d.objoid = {TABLE_OID} AND d.objsubid = 0 \
             UNION ALL \
             SELECT a.attname::text, d.description FROM pg_description d \
             JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid \
             WHERE d.classoid = 'pg_class'::regclass AND d.objoid = {TABLE_OID} AND d.objsubid > 0 \
             AND NOT a.attisdropped"
        )))
        .bind(table)
        .fetch_all(pool);
        type FkRow = (
            String,
            Vec<String>,
            String,
            Vec<String>,
            String,
            String,
            bool,
            bool,
            bool,
            bool,
        );
        let foreign_keys = sqlx::query_as::<_, FkRow>(sqlx::AssertSqlSafe(format!(
            "SELECT con.conname::text, \
             ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord) \
                   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord), \
             CASE WHEN rn.nspname = current_schema() THEN r.relname::text \
                  ELSE rn.nspname || '.' || r.relname END, \
             ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord) \
                   JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord), \
             con.confupdtype::text, con.confdeltype::text, con.confmatchtype = 'f', \
             con.condeferrable, con.condeferred, con.convalidated \
             FROM pg_constraint con JOIN pg_class r ON r.oid = con.confrelid \
             JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE con.conrelid = {TABLE_OID} AND con.contype = 'f' ORDER BY con.conname"
        )))
        .bind(table)
        .fetch_all(pool);
        let (
            mut out,
            sequences,
            defaults,
            indexes,
            checks,
            generated,
            collations,
            comments,
            foreign_keys,
        ) = tokio::try_join!(
            types,
            async { Ok(sequences.await?) },
            async { Ok(defaults.await?) },
            indexes(pool, table),
            async { Ok(checks.await?) },
            async { Ok(generated.await?) },
            async { Ok(collations.await?) },
            async { Ok(comments.await?) },
            async { Ok(foreign_keys.await?) },
        )?;
        out.sequences = sequences
            .into_iter()
            .map(
                |(
                    column,
                    identity,
                    data_type,
                    increment,
                    min_value,
                    max_value,
                    start,
                    cycle,
                    last,
                )| {
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
        out.defaults = defaults
            .into_iter()
            .map(|(column, expression)| ColumnDefault { column, expression })
            .collect();
        out.indexes = indexes;
        out.checks = checks
            .into_iter()
            .map(|(name, expression, validated)| CheckDef {
                name,
                expression,
                validated,
            })
            .collect();
        out.generated = generated
            .into_iter()
            .map(|(column, expression)| GeneratedColumn { column, expression })
            .collect();
        out.collations = collations;
        out.comments = comments
            .into_iter()
            .map(|(column, text)| CommentDef { column, text })
            .collect();
        out.foreign_keys = foreign_keys
            .into_iter()
            .map(
                |(
                    name,
                    columns,
                    references,
                    referenced_columns,
                    on_update,
                    on_delete,
                    match_full,
                    deferrable,
                    initially_deferred,
                    validated,
                )| ForeignKeyDef {
                    name,
                    columns,
                    references,
                    referenced_columns,
                    on_update,
                    on_delete,
                    match_full,
                    deferrable,
                    initially_deferred,
                    validated,
                },
            )
            .collect();
        Ok(Some(out))
    }

    /// Adds the type `oid` to `out` after the types it uses, or the extension that provides it.
    /// Each type's catalog row is read once.
    async fn collect_type(
        &self,
        pool: &sqlx::PgPool,
        oid: i64,
        read: &mut std::collections::HashMap<i64, TypeRow>,
        seen: &mut std::collections::HashSet<i64>,
        out: &mut PostgresSchema,
    ) -> Result<()> {
        /// A type to look at, or one whose uses are all in `out` (with its composite attributes).
        enum Visit {
            Enter(i64),
            Leave(Box<TypeRow>, Vec<(String, String)>),
        }
        let mut stack = vec![Visit::Enter(oid)];
        while let Some(visit) = stack.pop() {
            let oid = match visit {
                Visit::Leave(row, attributes) => {
                    if let Some(user_type) = user_type(pool, &row, attributes).await? {
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
                Visit::Enter(oid) => oid,
            };
            if !seen.insert(oid) {
                continue;
            }
            let row = match read.remove(&oid) {
                Some(row) => row,
                None => type_row(pool, oid).await?,
            };
            if let Some(extension) = &row.extension {
                if !out.extensions.contains(extension) {
                    out.extensions.push(extension.clone());
                }
                continue;
            }
            if row.builtin && row.category != "A" {
                continue;
            }
            let mut uses = Vec::new();
            if row.category == "A" {
                uses.extend(row.element);
            }
            uses.extend(row.base);
            uses.extend(row.subtype);
            let mut attributes = Vec::new();
            if let Some(relid) = row.relid {
                let rows: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT attname::text, format_type(atttypid, atttypmod), CAST(atttypid AS BIGINT) \
                     FROM pg_attribute WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped \
                     ORDER BY attnum",
                )
                .bind(relid)
                .fetch_all(pool)
                .await?;
                for (name, ty, oid) in rows {
                    attributes.push((name, ty));
                    uses.push(oid);
                }
            }
            stack.push(Visit::Leave(Box::new(row), attributes));
            stack.extend(uses.into_iter().rev().map(Visit::Enter));
        }
        Ok(())
    }
}

/// An index of the table as the catalog tells it.
#[derive(sqlx::FromRow)]
struct IndexRow {
    oid: i64,
    name: String,
    method: String,
    unique: bool,
    kind: Option<String>,
    key_count: i16,
    predicate: Option<String>,
    operators: Vec<String>,
}

/// One column of an index as the catalog tells it (keys first, then INCLUDE columns).
#[derive(sqlx::FromRow)]
struct IndexColumnRow {
    column: Option<String>,
    definition: String,
    opclass: Option<String>,
    collation: Option<String>,
    descending: bool,
    nulls_first: bool,
}

/// The secondary indexes of `table` (in the current schema), and the UNIQUE and EXCLUDE
/// constraints they back, with every key in full.
async fn indexes(pool: &sqlx::PgPool, table: &str) -> Result<Vec<IndexDef>> {
    let rows: Vec<IndexRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT CAST(i.indexrelid AS BIGINT) AS oid, ic.relname::text AS name, \
         am.amname::text AS method, i.indisunique AS unique, con.contype::text AS kind, \
         i.indnkeyatts AS key_count, pg_get_expr(i.indpred, i.indrelid) AS predicate, \
         ARRAY(SELECT o.oprname::text FROM unnest(con.conexclop) WITH ORDINALITY e(op, ord) \
               JOIN pg_operator o ON o.oid = e.op ORDER BY e.ord) AS operators \
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         JOIN pg_am am ON am.oid = ic.relam \
         LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid \
         WHERE i.indrelid = {TABLE_OID} AND NOT i.indisprimary \
         AND (con.contype IS NULL OR con.contype IN ('u', 'x')) ORDER BY ic.relname"
    )))
    .bind(table)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let columns: Vec<IndexColumnRow> = sqlx::query_as(
            "SELECT a.attname::text AS column, pg_get_indexdef(i.indexrelid, k.ord::int, true) AS definition, \
             (SELECT o.opcname::text FROM pg_opclass o WHERE o.oid = i.indclass[k.ord - 1] \
              AND NOT o.opcdefault) AS opclass, \
             (SELECT c.collname::text FROM pg_collation c WHERE c.oid = i.indcollation[k.ord - 1] \
              AND c.oid <> 100 AND c.oid IS DISTINCT FROM a.attcollation) AS collation, \
             COALESCE(i.indoption[k.ord - 1] & 1 = 1, false) AS descending, \
             COALESCE(i.indoption[k.ord - 1] & 2 = 2, false) AS nulls_first \
             FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum AND k.attnum > 0 \
             WHERE i.indexrelid = $1::oid ORDER BY k.ord",
        )
        .bind(row.oid)
        .fetch_all(pool)
        .await?;
        let key_count = usize::try_from(row.key_count)
            .unwrap_or(0)
            .min(columns.len());
        let (keys, include) = columns.split_at(key_count);
        let keys: Vec<IndexKey> = keys
            .iter()
            .map(|c| IndexKey {
                expression: c.column.is_none().then(|| c.definition.clone()),
                column: c.column.clone(),
                opclass: c.opclass.clone(),
                collation: c.collation.clone(),
                descending: c.descending,
                nulls_first: c.nulls_first,
            })
            .collect();
        let include: Vec<String> = include.iter().filter_map(|c| c.column.clone()).collect();
        let plain = keys.iter().all(|k| {
            k.expression.is_none()
                && k.opclass.is_none()
                && k.collation.is_none()
                && !k.descending
                && !k.nulls_first
        });
        let exclude = row.kind.as_deref() == Some("x");
        out.push(IndexDef {
            name: row.name,
            method: row.method,
            columns: if plain {
                keys.iter().filter_map(|k| k.column.clone()).collect()
            } else {
                Vec::new()
            },
            unique: row.unique,
            constraint: row.kind.as_deref() == Some("u"),
            keys: if plain { Vec::new() } else { keys },
            include,
            predicate: row.predicate,
            exclude: if exclude { row.operators } else { Vec::new() },
        });
    }
    Ok(out)
}

/// What [`TypeRow`] is read from: `pg_type t` with its namespace `n` and range `r`.
const TYPE_ROW: &str = "SELECT CAST(t.oid AS BIGINT) AS oid, format_type(t.oid, NULL) AS name, \
     t.typtype::text AS typtype, t.typcategory::text AS category, \
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
     LEFT JOIN pg_range r ON r.rngtypid = t.oid";

/// The types of `table`'s columns, each once, in the order of the first column of each: one
/// statement, where a lookup a type cost ~0.5-1.5 ms each (most tables use only built-in types).
async fn column_types(pool: &sqlx::PgPool, table: &str) -> Result<Vec<TypeRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{TYPE_ROW} JOIN (SELECT a.atttypid, min(a.attnum) AS first FROM pg_attribute a \
         WHERE a.attrelid = {TABLE_OID} AND a.attnum > 0 AND NOT a.attisdropped \
         GROUP BY a.atttypid) c ON c.atttypid = t.oid ORDER BY c.first"
    )))
    .bind(table)
    .fetch_all(pool)
    .await?)
}

async fn type_row(pool: &sqlx::PgPool, oid: i64) -> Result<TypeRow> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{TYPE_ROW} WHERE t.oid = $1::oid"
    )))
    .bind(oid)
    .fetch_one(pool)
    .await?)
}

/// The definition of a user type (a composite's `attributes` read by the caller), or `None` for
/// one dbsync does not create (an array: its element is created; a multirange: made with its
/// range).
async fn user_type(
    pool: &sqlx::PgPool,
    row: &TypeRow,
    attributes: Vec<(String, String)>,
) -> Result<Option<UserType>> {
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
        "c" => Some(UserType::Composite {
            name: row.name.clone(),
            attributes,
        }),
        "r" => row.subtype_name.clone().map(|subtype| UserType::Range {
            name: row.name.clone(),
            subtype,
        }),
        "d" => match row.base_name.clone() {
            Some(base) => {
                let checks = sqlx::query_as::<_, (String, String, bool)>(
                    "SELECT conname::text, pg_get_expr(conbin, 0), convalidated FROM pg_constraint \
                     WHERE contypid = $1::regtype AND contype = 'c' ORDER BY conname",
                )
                .bind(&row.name)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|(name, expression, validated)| CheckDef {
                    name,
                    expression,
                    validated,
                })
                .collect();
                Some(UserType::Domain {
                    name: row.name.clone(),
                    base,
                    not_null: row.not_null,
                    checks,
                })
            }
            None => None,
        },
        _ => None,
    })
}

/// The schema a type name (as `format_type` prints it, and checked) is qualified with, as
/// written: `sales` of `sales.mood`, `"My Schema"` of `"My Schema"."x"`.
fn type_qualifier(name: &str) -> Option<&str> {
    let mut quoted = false;
    let mut last_dot = None;
    for (i, c) in name.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => last_dot = Some(i),
            _ => {}
        }
    }
    last_dot.map(|i| &name[..i])
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
            checks,
        } => {
            check_type_name(base)?;
            let not_null = if *not_null { " NOT NULL" } else { "" };
            let mut sql = format!("CREATE DOMAIN {name} AS {base}{not_null}");
            for check in checks {
                match check_clause(check) {
                    Ok(clause) => sql.push_str(&clause),
                    Err(refusal) => {
                        tracing::warn!(r#type = %name, constraint = %check.name, %refusal, "domain constraint not created");
                    }
                }
            }
            sql
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

/// The name PostgreSQL gives a serial column's sequence (`<table>_<column>_seq`, cut to 63
/// bytes), in the table's schema.
fn serial_sequence_name(table: &str, column: &str) -> Result<String> {
    let (schema, table) = match table.split_once('.') {
        Some((schema, table)) => (Some(schema), table),
        None => (None, table),
    };
    let mut name = format!("{table}_{column}_seq");
    while name.len() > crate::catalog::MAX_IDENT_LEN {
        name.pop();
    }
    let name = quote_ident(&name)?;
    Ok(match schema {
        Some(schema) => format!("{}.{name}", quote_ident(schema)?),
        None => name,
    })
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
        self.check_extensions(schema).await?;
        for user_type in &extras.types {
            let sql = create_type_sql(user_type)?;
            let exists: bool = sqlx::query_scalar("SELECT to_regtype($1) IS NOT NULL")
                .bind(user_type.name())
                .fetch_one(pool)
                .await?;
            if !exists {
                // A type of another schema (`sales.mood`) is made in that schema.
                if let Some(namespace) = type_qualifier(user_type.name()) {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "CREATE SCHEMA IF NOT EXISTS {namespace}"
                    )))
                    .execute(pool)
                    .await?;
                }
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                tracing::info!(table = %schema.name, r#type = %user_type.name(), "created a type the table uses");
            }
        }
        Ok(())
    }

    /// The collations of `schema`'s columns that exist here (a column whose collation does not
    /// is made with its type's default, and said so in the log).
    pub(crate) async fn known_collations(&self, schema: &TableSchema) -> Result<Vec<String>> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(Vec::new());
        };
        if extras.collations.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<String> = extras.collations.iter().map(|(_, c)| c.clone()).collect();
        let known: Vec<String> =
            sqlx::query_scalar("SELECT collname::text FROM pg_collation WHERE collname = ANY($1)")
                .bind(&wanted)
                .fetch_all(pool)
                .await?;
        for (column, collation) in &extras.collations {
            if !known.contains(collation) {
                tracing::warn!(table = %schema.name, %column, %collation, "collation not here; the column takes its type's default");
            }
        }
        Ok(known)
    }

    /// Every extension whose types `schema.name` uses is installed here; else an error naming
    /// the `CREATE EXTENSION` to run (PostgreSQL; nothing to check on SQLite).
    pub async fn check_extensions(&self, schema: &TableSchema) -> Result<()> {
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
        Ok(())
    }

    /// After `schema.name` was created here: serial columns get their sequence (owned by the
    /// column) and its `nextval` default, as on the sender.
    pub(crate) async fn add_serial_sequences(&self, schema: &TableSchema) -> Result<()> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(());
        };
        let table = pg_table(&schema.name)?;
        for sequence in extras.sequences.iter().filter(|s| s.identity.is_none()) {
            check_type_name(&sequence.data_type)?;
            let column = quote_ident(&sequence.column)?;
            let name = serial_sequence_name(&schema.name, &sequence.column)?;
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
    /// values here is moved to at least the sender's last value (within its own bounds), so the
    /// copy takes inserts at once. A column with no sequence here is left alone; a sequence that
    /// cannot be moved is reported, not an error (the rows are in).
    pub async fn follow_sequences(&self, schema: &TableSchema) -> Result<Vec<String>> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(Vec::new());
        };
        let table = pg_table(&schema.name)?;
        let mut skipped = Vec::new();
        for sequence in &extras.sequences {
            let Some(last) = sequence.last_value else {
                continue;
            };
            // The sender's value is its word: kept within this sequence's bounds.
            let moved: std::result::Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
                "SELECT setval(seq.s, LEAST(p.seqmax, GREATEST(p.seqmin, $3, \
                 COALESCE(pg_sequence_last_value(seq.s), $3)))) \
                 FROM (SELECT CAST(pg_get_serial_sequence($1, $2) AS regclass) AS s) seq \
                 JOIN pg_sequence p ON p.seqrelid = seq.s",
            )
            .bind(&table)
            .bind(&sequence.column)
            .bind(last)
            .fetch_optional(pool)
            .await;
            match moved {
                Ok(Some(value)) => {
                    tracing::debug!(table = %schema.name, column = %sequence.column, value, "sequence follows the sender");
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(table = %schema.name, column = %sequence.column, error = %err, "sequence not moved");
                    skipped.push(format!(
                        "sequence of {}.{} not moved to {last}: {err}",
                        schema.name, sequence.column
                    ));
                }
            }
        }
        Ok(skipped)
    }
}

/// ` CONSTRAINT name CHECK (expression)` of `check`, once its expression passed
/// [`crate::pg_expr::check`]; the refusal says why not.
fn check_clause(check: &CheckDef) -> std::result::Result<String, String> {
    crate::pg_expr::check(&check.expression)?;
    let name = quote_ident(&check.name).map_err(|err| err.to_string())?;
    Ok(format!(" CONSTRAINT {name} CHECK ({})", check.expression))
}

/// The expression of a column default or generated column, once it passed
/// [`crate::pg_expr::check`].
pub fn checked_expression(expression: &str) -> std::result::Result<&str, String> {
    crate::pg_expr::check(expression).map(|()| expression)
}

/// The `ON UPDATE`/`ON DELETE` action a catalog letter stands for.
fn fk_action(letter: &str) -> Result<&'static str> {
    Ok(match letter {
        "a" => "NO ACTION",
        "r" => "RESTRICT",
        "c" => "CASCADE",
        "n" => "SET NULL",
        "d" => "SET DEFAULT",
        other => {
            return Err(Error::invalid(
                "schema",
                format!("{other:?} is not a foreign key action"),
            ));
        }
    })
}

/// Quoted, comma-separated names.
fn name_list(names: &[String]) -> Result<String> {
    if names.is_empty() {
        return Err(Error::invalid("schema", "an empty column list"));
    }
    Ok(names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Result<Vec<_>>>()?
        .join(", "))
}

/// One key of an index as written: a column or a checked expression, then its collation,
/// operator class and order.
fn index_key_sql(key: &IndexKey) -> Result<String> {
    let mut sql = match (&key.column, &key.expression) {
        (Some(column), None) => quote_ident(column)?,
        (None, Some(expression)) => {
            crate::pg_expr::check(expression).map_err(|refusal| {
                Error::invalid("schema", format!("an index expression holds {refusal}"))
            })?;
            format!("({expression})")
        }
        _ => {
            return Err(Error::invalid(
                "schema",
                "an index key is a column or an expression",
            ));
        }
    };
    if let Some(collation) = &key.collation {
        sql.push_str(&format!(" COLLATE {}", quote_ident(collation)?));
    }
    if let Some(opclass) = &key.opclass {
        sql.push_str(&format!(" {}", quote_ident(opclass)?));
    }
    if key.descending {
        sql.push_str(" DESC");
    }
    if key.nulls_first != key.descending {
        sql.push_str(if key.nulls_first {
            " NULLS FIRST"
        } else {
            " NULLS LAST"
        });
    }
    Ok(sql)
}

/// The statement that makes `index` on `table`, from its parts (names quoted, expressions
/// checked, operators checked).
pub fn index_sql(table: &str, index: &IndexDef) -> Result<String> {
    const METHODS: &[&str] = &["btree", "hash", "gin", "gist", "brin", "spgist"];
    if !METHODS.contains(&index.method.as_str()) {
        return Err(Error::invalid(
            "schema",
            format!("{:?} is not an index method dbsync creates", index.method),
        ));
    }
    let keys: Vec<IndexKey> = if index.keys.is_empty() {
        index
            .columns
            .iter()
            .map(|c| IndexKey {
                column: Some(c.clone()),
                ..IndexKey::default()
            })
            .collect()
    } else {
        index.keys.clone()
    };
    if keys.is_empty() {
        return Err(Error::invalid("schema", "an index without a key"));
    }
    let mut parts = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let mut part = index_key_sql(key)?;
        if !index.exclude.is_empty() {
            let op = index.exclude.get(i).ok_or_else(|| {
                Error::invalid(
                    "schema",
                    "an exclusion constraint without an operator per key",
                )
            })?;
            crate::pg_expr::check_operator(op).map_err(|r| Error::invalid("schema", r))?;
            part.push_str(&format!(" WITH {op}"));
        }
        parts.push(part);
    }
    let parts = parts.join(", ");
    let include = if index.include.is_empty() {
        String::new()
    } else {
        format!(" INCLUDE ({})", name_list(&index.include)?)
    };
    let predicate = match &index.predicate {
        Some(predicate) => {
            crate::pg_expr::check(predicate).map_err(|refusal| {
                Error::invalid("schema", format!("an index predicate holds {refusal}"))
            })?;
            format!(" WHERE ({predicate})")
        }
        None => String::new(),
    };
    let name = quote_ident(&index.name)?;
    let table = pg_table(table)?;
    let method = &index.method;
    Ok(if !index.exclude.is_empty() {
        format!(
            "ALTER TABLE {table} ADD CONSTRAINT {name} EXCLUDE USING {method} ({parts}){include}{predicate}"
        )
    } else if index.constraint && index.keys.is_empty() && index.predicate.is_none() {
        format!("ALTER TABLE {table} ADD CONSTRAINT {name} UNIQUE ({parts}){include}")
    } else {
        let unique = if index.unique { "UNIQUE " } else { "" };
        format!(
            "CREATE {unique}INDEX {name} ON {table} USING {method} ({parts}){include}{predicate}"
        )
    })
}

/// The statement that adds `key` to `table` as `NOT VALID` (validated after, when it was on the
/// sender).
pub fn foreign_key_sql(table: &str, key: &ForeignKeyDef) -> Result<String> {
    if crate::catalog::is_internal_table(&key.references) {
        return Err(Error::invalid(
            "schema",
            format!("{:?} is reserved and never referenced", key.references),
        ));
    }
    if key.columns.len() != key.referenced_columns.len() {
        return Err(Error::invalid(
            "schema",
            format!("foreign key {:?} has unequal column lists", key.name),
        ));
    }
    Ok(format!(
        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}){} ON UPDATE {} ON DELETE {}{}{} NOT VALID",
        pg_table(table)?,
        quote_ident(&key.name)?,
        name_list(&key.columns)?,
        pg_table(&key.references)?,
        name_list(&key.referenced_columns)?,
        if key.match_full { " MATCH FULL" } else { "" },
        fk_action(&key.on_update)?,
        fk_action(&key.on_delete)?,
        if key.deferrable { " DEFERRABLE" } else { "" },
        if key.initially_deferred {
            " INITIALLY DEFERRED"
        } else {
            ""
        },
    ))
}

/// Reports a part of a table's schema that was not made here: logged, and kept for the pull's
/// warnings.
fn not_made(skipped: &mut Vec<String>, what: String, why: &str) {
    tracing::warn!(part = %what, %why, "schema part not made");
    skipped.push(format!("{what}: {why}"));
}

/// Whether `table` here has a constraint, or its schema a relation (an index), named `name`.
async fn has_relation_or_constraint(pool: &sqlx::PgPool, table: &str, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conrelid = to_regclass($1) \
           AND con.conname = $2) \
         OR EXISTS (SELECT 1 FROM pg_class i JOIN pg_class t ON t.relnamespace = i.relnamespace \
           WHERE t.oid = to_regclass($1) AND i.relname = $2)",
    )
    .bind(pg_table(table)?)
    .bind(name)
    .fetch_one(pool)
    .await?)
}

impl Store {
    /// After the rows of a table dbsync created are in: its column defaults, CHECK constraints
    /// (validated when the sender's were), secondary indexes, UNIQUE and EXCLUDE constraints and
    /// comments, each unless one of that name is here. What cannot be made (an expression that
    /// calls a function dbsync does not run from a peer, rows that break a UNIQUE the sender's
    /// rows kept) is reported and skipped, as is a generated column made as a plain one.
    pub async fn complete_schema(&self, schema: &TableSchema) -> Result<Vec<String>> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(Vec::new());
        };
        let mut skipped = Vec::new();
        let table = pg_table(&schema.name)?;
        let run = |sql: String| async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(drop)
                .map_err(|err| match err {
                    sqlx::Error::Database(db) => db.message().to_owned(),
                    other => other.to_string(),
                })
        };
        // Defaults: a serial column's came with its sequence; an identity column has none.
        let generated_here = self.generated_columns(&schema.name).await?;
        for default in &extras.defaults {
            if extras.sequences.iter().any(|s| s.column == default.column)
                || generated_here.contains(&default.column)
            {
                continue;
            }
            let made = match checked_expression(&default.expression) {
                Ok(expression) => {
                    run(format!(
                        "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT {expression}",
                        quote_ident(&default.column)?
                    ))
                    .await
                }
                Err(refusal) => Err(format!("it holds {refusal}")),
            };
            if let Err(why) = made {
                not_made(
                    &mut skipped,
                    format!(
                        "default of {}.{} ({})",
                        schema.name, default.column, default.expression
                    ),
                    &why,
                );
            }
        }
        for generated in &extras.generated {
            if !generated_here.contains(&generated.column) {
                skipped.push(format!(
                    "generated column {}.{} ({}) is a plain column here, its values copied",
                    schema.name, generated.column, generated.expression
                ));
            }
        }
        for check in &extras.checks {
            if has_relation_or_constraint(pool, &schema.name, &check.name).await? {
                continue;
            }
            let made = match check_clause(check) {
                Ok(clause) => {
                    let added = run(format!("ALTER TABLE {table} ADD{clause} NOT VALID")).await;
                    match added {
                        Ok(()) if check.validated => {
                            run(format!(
                                "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
                                quote_ident(&check.name)?
                            ))
                            .await
                        }
                        other => other,
                    }
                }
                Err(refusal) => Err(format!("it holds {refusal}")),
            };
            if let Err(why) = made {
                not_made(
                    &mut skipped,
                    format!(
                        "check constraint {} of {} ({})",
                        check.name, schema.name, check.expression
                    ),
                    &why,
                );
            }
        }
        for index in &extras.indexes {
            if has_relation_or_constraint(pool, &schema.name, &index.name).await? {
                continue;
            }
            let made = match index_sql(&schema.name, index) {
                Ok(sql) => run(sql).await,
                Err(err) => Err(err.to_string()),
            };
            if let Err(why) = made {
                not_made(
                    &mut skipped,
                    format!("index {} of {}", index.name, schema.name),
                    &why,
                );
            }
        }
        for comment in &extras.comments {
            let target = match &comment.column {
                None => format!("TABLE {table}"),
                Some(column) => format!("COLUMN {table}.{}", quote_ident(column)?),
            };
            let made = match literal(&comment.text) {
                Ok(text) => run(format!("COMMENT ON {target} IS {text}")).await,
                Err(err) => Err(err.to_string()),
            };
            if let Err(why) = made {
                skipped.push(format!("comment on {target}: {why}"));
            }
        }
        Ok(skipped)
    }

    /// The generated columns of `table` here (PostgreSQL; none on SQLite, whose catalog does
    /// not list them as columns).
    pub async fn generated_columns(&self, table: &str) -> Result<Vec<String>> {
        let Pool::Postgres(pool) = self.pool() else {
            return Ok(Vec::new());
        };
        let table = pg_table(table)?;
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = {TABLE_OID} \
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> '' ORDER BY a.attnum"
        )))
        .bind(table)
        .fetch_all(pool)
        .await?)
    }

    /// After every table of a pull is in: the foreign keys of `schema.name`, each unless one of
    /// that name is here, added `NOT VALID` and then validated when the sender's was. A key
    /// whose table is not here, or whose rows do not hold, is reported and skipped.
    pub async fn add_foreign_keys(&self, schema: &TableSchema) -> Result<Vec<String>> {
        let (Pool::Postgres(pool), Some(extras)) = (self.pool(), &schema.postgres) else {
            return Ok(Vec::new());
        };
        let mut skipped = Vec::new();
        for key in &extras.foreign_keys {
            if has_relation_or_constraint(pool, &schema.name, &key.name).await? {
                continue;
            }
            let sql = foreign_key_sql(&schema.name, key)?;
            let added = async {
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                if key.validated {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                        pg_table(&schema.name)?,
                        quote_ident(&key.name)?
                    )))
                    .execute(pool)
                    .await?;
                }
                Ok::<_, Error>(())
            }
            .await;
            if let Err(err) = added {
                tracing::warn!(table = %schema.name, key = %key.name, error = %err, "foreign key not added or not validated");
                skipped.push(format!("foreign key {}: {err}", key.name));
            }
        }
        Ok(skipped)
    }
}

impl Store {
    /// Remembers that `table`, created here by a pull of `connection_id`, still needs its
    /// indexes and foreign keys.
    pub async fn mark_schema_pending(&self, connection_id: uuid::Uuid, table: &str) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_schema_pending (connection_id, table_name) VALUES ($1, $2) \
                 ON CONFLICT (connection_id, table_name) DO NOTHING",
            )
            .bind(connection_id)
            .bind(table)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Whether `table` still needs its indexes and foreign keys.
    pub async fn schema_pending(&self, connection_id: uuid::Uuid, table: &str) -> Result<bool> {
        Ok(crate::store::on_pool!(self, |pool| {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM dbsync_schema_pending WHERE connection_id = $1 AND table_name = $2",
            )
            .bind(connection_id)
            .bind(table)
            .fetch_one(pool)
            .await?
        }) > 0)
    }

    /// `table` has its indexes and foreign keys.
    pub async fn clear_schema_pending(&self, connection_id: uuid::Uuid, table: &str) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "DELETE FROM dbsync_schema_pending WHERE connection_id = $1 AND table_name = $2",
            )
            .bind(connection_id)
            .bind(table)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_made_in_its_schema() {
        assert_eq!(type_qualifier("sales.mood"), Some("sales"));
        assert_eq!(
            type_qualifier("\"My.Schema\".\"a.b\""),
            Some("\"My.Schema\"")
        );
        assert_eq!(type_qualifier("mood"), None);
        assert_eq!(type_qualifier("\"a.b\""), None);
        assert_eq!(
            serial_sequence_name("sales.orders", "id").unwrap(),
            "\"sales\".\"orders_id_seq\""
        );
        assert_eq!(serial_sequence_name("t", "a.b").unwrap(), "\"t_a.b_seq\"");
        assert_eq!(
            serial_sequence_name(&"x".repeat(60), "id").unwrap(),
            format!("\"{}_id\"", "x".repeat(60))
        );
    }

    #[test]
    fn types_are_built_from_checked_parts() {
        let mood = UserType::Enum {
            name: "mood".into(),
            labels: vec!["it's".into(), "ok".into()],
        };
        assert_eq!(
            create_type_sql(&mood).unwrap(),
            "CREATE TYPE mood AS ENUM ('it''s', 'ok')"
        );
        let evil_name = UserType::Enum {
            name: "x AS ENUM ('a'); DROP TABLE users; CREATE TYPE y".into(),
            labels: vec![],
        };
        assert!(create_type_sql(&evil_name).is_err());
        let evil_attribute = UserType::Composite {
            name: "pair".into(),
            attributes: vec![("a".into(), "int) ; DROP TABLE users; --".into())],
        };
        assert!(create_type_sql(&evil_attribute).is_err());
        let evil_base = UserType::Domain {
            name: "year".into(),
            base: "integer CHECK (pg_sleep(1) IS NULL)".into(),
            not_null: false,
            checks: vec![],
        };
        assert!(create_type_sql(&evil_base).is_err());
        // A domain's checks: the one that calls what no peer may have run is left out.
        let year = UserType::Domain {
            name: "year".into(),
            base: "integer".into(),
            not_null: false,
            checks: vec![
                CheckDef {
                    name: "year_check".into(),
                    expression: "((VALUE >= 1900) AND (VALUE <= 2200))".into(),
                    validated: true,
                },
                CheckDef {
                    name: "evil".into(),
                    expression: "(pg_sleep((VALUE)::double precision) IS NULL)".into(),
                    validated: true,
                },
            ],
        };
        assert_eq!(
            create_type_sql(&year).unwrap(),
            "CREATE DOMAIN year AS integer CONSTRAINT \"year_check\" CHECK (((VALUE >= 1900) AND (VALUE <= 2200)))"
        );
        let sequence = ColumnSequence {
            column: "id".into(),
            identity: Some("always; DROP".into()),
            data_type: "bigint".into(),
            increment: 1,
            min_value: 1,
            max_value: i64::MAX,
            start: 1,
            cycle: false,
            last_value: None,
        };
        assert!(identity_clause(&sequence).is_err());
    }

    #[test]
    fn index_and_foreign_key_statements_are_built_from_parts() {
        let index = IndexDef {
            name: "by email".into(),
            method: "btree".into(),
            columns: vec!["email".into()],
            unique: true,
            constraint: false,
            keys: vec![],
            include: vec![],
            predicate: None,
            exclude: vec![],
        };
        assert_eq!(
            index_sql("users", &index).unwrap(),
            "CREATE UNIQUE INDEX \"by email\" ON \"users\" USING btree (\"email\")"
        );
        let bad = IndexDef {
            method: "btree; DROP TABLE users".into(),
            ..index.clone()
        };
        assert!(index_sql("users", &bad).is_err());
        // Keys in full: an expression, a collation, an operator class, an order; INCLUDE
        // columns and a predicate.
        let full = IndexDef {
            name: "recent".into(),
            columns: vec![],
            keys: vec![
                IndexKey {
                    expression: Some("lower((email)::text)".into()),
                    opclass: Some("text_pattern_ops".into()),
                    ..IndexKey::default()
                },
                IndexKey {
                    column: Some("created".into()),
                    descending: true,
                    nulls_first: false,
                    ..IndexKey::default()
                },
                IndexKey {
                    column: Some("name".into()),
                    collation: Some("C".into()),
                    ..IndexKey::default()
                },
            ],
            include: vec!["id".into()],
            predicate: Some("(deleted_at IS NULL)".into()),
            ..index.clone()
        };
        assert_eq!(
            index_sql("users", &full).unwrap(),
            "CREATE UNIQUE INDEX \"recent\" ON \"users\" USING btree ((lower((email)::text)) \"text_pattern_ops\", \
             \"created\" DESC NULLS LAST, \"name\" COLLATE \"C\") INCLUDE (\"id\") WHERE ((deleted_at IS NULL))"
        );
        for evil in [
            IndexDef {
                predicate: Some("(pg_sleep(1) IS NULL)".into()),
                ..full.clone()
            },
            IndexDef {
                keys: vec![IndexKey {
                    expression: Some("x)); DROP TABLE users; --".into()),
                    ..IndexKey::default()
                }],
                ..full.clone()
            },
            IndexDef {
                method: "gist".into(),
                exclude: vec!["&& ; DROP".into()],
                ..full.clone()
            },
        ] {
            assert!(index_sql("users", &evil).is_err(), "{evil:?}");
        }
        let exclusion = IndexDef {
            name: "no_overlap".into(),
            method: "gist".into(),
            columns: vec!["room".into(), "during".into()],
            unique: false,
            constraint: false,
            keys: vec![],
            include: vec![],
            predicate: None,
            exclude: vec!["=".into(), "&&".into()],
        };
        assert_eq!(
            index_sql("booking", &exclusion).unwrap(),
            "ALTER TABLE \"booking\" ADD CONSTRAINT \"no_overlap\" EXCLUDE USING gist (\"room\" WITH =, \"during\" WITH &&)"
        );
        let key = ForeignKeyDef {
            name: "fk".into(),
            columns: vec!["user_id".into()],
            references: "users".into(),
            referenced_columns: vec!["id".into()],
            on_update: "a".into(),
            on_delete: "c".into(),
            match_full: false,
            deferrable: true,
            initially_deferred: true,
            validated: true,
        };
        assert!(foreign_key_sql("orders", &key).unwrap().ends_with(
            "ON UPDATE NO ACTION ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED NOT VALID"
        ));
        let reserved = ForeignKeyDef {
            references: "dbsync_connections".into(),
            ..key.clone()
        };
        assert!(foreign_key_sql("orders", &reserved).is_err());
        let odd = ForeignKeyDef {
            on_delete: "x".into(),
            ..key
        };
        assert!(foreign_key_sql("orders", &odd).is_err());
    }
}
