//! The catalog of the synced database: which tables exist, their columns, keys and foreign-key
//! parents, and the keyset query that reads them in key order. The agent's own `dbsync_*` tables,
//! the migration ledger and engine system tables are never listed.
//!
//! Identifiers are validated and always quoted, so mixed-case and reserved-word names work.

use std::collections::{BTreeMap, BTreeSet};

use dbsync_protocol::message::{ColumnInfo, KeyFilter, TableInfo, TableSchema};

use crate::error::{Error, Result};
use crate::store::{Engine, Store, on_pool};

/// Longest identifier accepted (PostgreSQL's limit; SQLite has none).
pub const MAX_IDENT_LEN: usize = 63;

/// Validates an identifier and returns it double-quoted (inner quotes doubled).
pub fn quote_ident(name: &str) -> Result<String> {
    if name.is_empty() || name.len() > MAX_IDENT_LEN || name.contains('\0') {
        return Err(Error::invalid(
            "identifier",
            format!("{name:?} is not a valid identifier (1-{MAX_IDENT_LEN} bytes, no NUL)"),
        ));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// A synced table's name as SQL on `engine`. On PostgreSQL a name with a dot is schema-qualified
/// (`sales.orders`: the table `orders` of schema `sales`, `"sales"."orders"`) and one without is a
/// table of the current schema; SQLite has no schemas, and the whole name is one identifier.
pub fn quote_table(engine: Engine, name: &str) -> Result<String> {
    match (engine, name.split_once('.')) {
        (Engine::Postgres, Some((schema, table))) => {
            Ok(format!("{}.{}", quote_ident(schema)?, quote_ident(table)?))
        }
        _ => quote_ident(name),
    }
}

/// How a statement's columns refer to the table [`quote_table`] names: by its own name, quoted,
/// without its schema (PostgreSQL does not take `"sales"."orders".id` in every place, and takes
/// `"orders".id` for a table named `"sales"."orders"` in FROM, INSERT and DELETE).
pub fn table_ref(engine: Engine, name: &str) -> Result<String> {
    match (engine, name.split_once('.')) {
        (Engine::Postgres, Some((_, table))) => quote_ident(table),
        _ => quote_ident(name),
    }
}

/// [`quote_table`] for a table described by an engine named as on the wire (`postgres`,
/// `sqlite`).
pub fn quote_table_on(engine: &str, name: &str) -> Result<String> {
    quote_table(
        if engine == "postgres" {
            Engine::Postgres
        } else {
            Engine::Sqlite
        },
        name,
    )
}

/// The schema of a PostgreSQL table name, when it is qualified (`sales` of `sales.orders`).
pub fn table_schema(name: &str) -> Option<&str> {
    name.split_once('.').map(|(schema, _)| schema)
}

/// Name prefixes of tables that belong to dbsync or to an engine, compared without regard to
/// ASCII case (SQLite resolves `DBSYNC_CONNECTIONS` to `dbsync_connections`; PostgreSQL keeps
/// them apart, and refusing both there costs nothing).
const INTERNAL_PREFIXES: &[&str] = &["dbsync_", "sqlite_", "pg_", "_sqlx_"];

/// The one rule for which names are never synced tables, on either engine and on either side:
/// dbsync's own tables (`dbsync_*`), the migration ledger (`_sqlx_migrations`) and the engines'
/// system tables (`sqlite_*`, `pg_*`), whatever their spelling. Such a table is never listed,
/// described or pulled by a sender, and never created or written by a receiver, whatever a peer
/// says. A name that is not a valid identifier (or holds U+0001) is internal too: it can be no
/// synced table.
pub fn is_internal_table(name: &str) -> bool {
    // A qualified name (`sales.orders`): each part is a name, neither part reserved, and the
    // schema none of the engine's (`information_schema`, `pg_*`).
    let parts: Vec<&str> = match name.split_once('.') {
        Some((schema, table)) => {
            if schema.eq_ignore_ascii_case("information_schema") || table.contains('.') {
                return true;
            }
            vec![schema, table]
        }
        None => vec![],
    };
    // U+0001 marks the receiver's checkpoints of a parallel pull's parts (`part_checkpoint`).
    if parts.iter().any(|part| quote_ident(part).is_err())
        || (parts.is_empty() && quote_ident(name).is_err())
        || name.contains('\u{1}')
    {
        return true;
    }
    std::iter::once(name).chain(parts).any(|part| {
        let lower = part.to_ascii_lowercase();
        INTERNAL_PREFIXES
            .iter()
            .any(|prefix| lower.starts_with(prefix))
    })
}

/// Refuses a name that [`is_internal_table`] reserves (`not_found`: to a peer, such a table does
/// not exist).
pub fn check_synced_table(name: &str) -> Result<()> {
    if is_internal_table(name) {
        return Err(Error::not_found("table", name));
    }
    Ok(())
}

/// Words that would turn a column's type into more than a type (a default, a constraint, a
/// generated expression) when written after the column's name.
const NOT_IN_A_TYPE: &[&str] = &[
    "always",
    "as",
    "check",
    "collate",
    "constraint",
    "default",
    "deferrable",
    "generated",
    "identity",
    "initially",
    "key",
    "not",
    "null",
    "on",
    "primary",
    "references",
    "stored",
    "unique",
    "using",
];

/// Checks that `native` (a column type as a peer described it) is only a type name: words
/// (bare or double-quoted, dotted for a schema), integer modifiers in parentheses, and array
/// brackets, as PostgreSQL's `format_type` and SQLite's declared types write them
/// (`character varying(20)[]`, `timestamp(3) with time zone`, `"My Type"`, `sales.mood`,
/// `UNSIGNED BIG INT`). Anything else is refused before it reaches a `CREATE TABLE`: a type is
/// written into DDL as given, so a peer's `TEXT); DROP TABLE ...` would otherwise run there.
pub fn check_type_name(native: &str) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::invalid(
            "column type",
            format!("{native:?} is not a type name ({why})"),
        ))
    };
    // A SQLite column may have no declared type at all.
    if native.is_empty() {
        return Ok(());
    }
    if native.len() > 200 {
        return refuse("longer than 200 bytes");
    }
    let mut chars = native.chars().peekable();
    let mut words = 0;
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '.' => {
                chars.next();
            }
            '"' => {
                chars.next();
                // Any character but NUL, `""` being a quote inside: PostgreSQL reads it the
                // same way, so nothing gets out of the name.
                let mut empty = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            empty = false;
                        }
                        Some('"') => break,
                        None | Some('\0') => return refuse("an unterminated quoted name"),
                        Some(_) => empty = false,
                    }
                }
                if empty {
                    return refuse("an empty quoted name");
                }
                words += 1;
            }
            '(' => {
                chars.next();
                let mut inside = String::new();
                loop {
                    match chars.next() {
                        Some(')') => break,
                        Some(c) if c.is_ascii_digit() || c == ',' || c == ' ' || c == '-' => {
                            inside.push(c);
                        }
                        _ => return refuse("type modifiers are integers"),
                    }
                }
                if inside
                    .split(',')
                    .any(|n| n.trim().trim_start_matches('-').is_empty())
                {
                    return refuse("type modifiers are integers");
                }
            }
            '[' => {
                chars.next();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some(c) if c.is_ascii_digit() => {}
                        _ => return refuse("array bounds are integers"),
                    }
                }
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '$' {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if NOT_IN_A_TYPE.contains(&word.to_ascii_lowercase().as_str()) {
                    return refuse(&format!("{word:?} is not part of a type"));
                }
                words += 1;
            }
            _ => return refuse(&format!("{c:?} is not part of a type")),
        }
    }
    if words == 0 {
        return refuse("no name");
    }
    Ok(())
}

/// The engine-neutral type of a PostgreSQL type name (`pg_type.typname`; a domain's base
/// type); arrays are `array<element>`. A type dbsync does not model (enums, ranges, `timetz`,
/// `inet`, `tsvector`, extension types, ...) is `text`: it travels in its text form
/// ([`pg_read_cast`]) and is cast back to its own type on a PostgreSQL receiver.
pub fn neutral_postgres_type(type_name: &str, element: Option<&str>) -> String {
    if let Some(element) = element {
        return format!("array<{}>", neutral_postgres_type(element, None));
    }
    match type_name {
        "bool" => "bool",
        "int2" | "int4" | "int8" => "int",
        "float4" | "float8" => "float",
        "numeric" | "money" => "numeric",
        "bytea" => "bytes",
        "uuid" => "uuid",
        "json" | "jsonb" => "json",
        "date" => "date",
        "time" => "time",
        "timestamp" => "timestamp",
        "timestamptz" => "timestamptz",
        "interval" => "interval",
        _ => "text",
    }
    .to_owned()
}

/// PostgreSQL types whose binary form is their UTF-8 text (read as text without a cast).
const TEXT_IN_BINARY: &[&str] = &["text", "character varying", "character", "bpchar", "citext"];

/// The cast a PostgreSQL sender selects a column through so its binary form is one dbsync
/// reads: `::text` (or `::text[]`) for every type whose neutral type is `text` but whose binary
/// form is not text, `::numeric` for `money` (its binary form is cents in an `int8`). `""` for
/// none. `native` is the sender's own `format_type` of the column.
pub fn pg_read_cast(native: &str, neutral: &str) -> &'static str {
    let array = native.ends_with("[]");
    let base = native.trim_end_matches("[]");
    let base = base.split('(').next().unwrap_or(base).trim();
    let base = base.rsplit('.').next().unwrap_or(base);
    match (neutral, array) {
        ("numeric", false) if base == "money" => "::numeric",
        ("array<numeric>", true) if base == "money" => "::numeric[]",
        ("text", false) if !TEXT_IN_BINARY.contains(&base) => "::text",
        ("array<text>", true) if !TEXT_IN_BINARY.contains(&base) => "::text[]",
        _ => "",
    }
}

/// The cast a key value of a PostgreSQL column read through [`pg_read_cast`] takes when it goes
/// back into a query (`$1::mood`): the value travels in its text form, compared as the column's
/// own type. Empty for a type dbsync models.
pub fn pg_key_cast(native: &str, neutral: &str) -> Result<String> {
    if pg_read_cast(native, neutral).is_empty() {
        return Ok(String::new());
    }
    check_type_name(native)?;
    Ok(format!("::{native}"))
}

/// The engine-neutral type of a SQLite declared column type, by SQLite's affinity rules with
/// the common date, time, boolean, UUID and JSON spellings recognised first.
pub fn neutral_sqlite_type(declared: &str) -> String {
    let upper = declared.to_ascii_uppercase();
    let has = |needle: &str| upper.contains(needle);
    let neutral = if upper.is_empty() || has("BLOB") {
        "bytes"
    } else if has("BOOL") {
        "bool"
    } else if has("TIMESTAMPTZ") || has("TIMESTAMP WITH TIME ZONE") {
        "timestamptz"
    } else if has("DATETIME") || has("TIMESTAMP") {
        "timestamp"
    } else if upper == "DATE" {
        "date"
    } else if upper == "TIME" {
        "time"
    } else if has("UUID") {
        "uuid"
    } else if has("JSON") {
        "json"
    } else if has("INT") {
        "int"
    } else if has("CHAR") || has("CLOB") || has("TEXT") {
        "text"
    } else if has("REAL") || has("FLOA") || has("DOUB") {
        "float"
    } else {
        "numeric"
    };
    neutral.to_owned()
}

/// Table names ordered parents first, so rows referencing a parent arrive after it. Self
/// references are ignored; tables in a reference cycle keep name order after the rest.
pub fn fk_order(tables: &[TableInfo]) -> Vec<String> {
    fk_levels(tables).into_iter().flatten().collect()
}

/// Table names in levels, parents first: no table of a level references another of the same
/// level or a later one, so the tables of one level may be pulled side by side once the levels
/// before it are in. Self references are ignored; each table in a reference cycle is a level
/// of its own after the rest, in name order.
pub fn fk_levels(tables: &[TableInfo]) -> Vec<Vec<String>> {
    let names: BTreeSet<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let mut parents: BTreeMap<&str, BTreeSet<&str>> = tables
        .iter()
        .map(|t| {
            let deps = t
                .depends_on
                .iter()
                .map(String::as_str)
                .filter(|p| *p != t.name && names.contains(p))
                .collect();
            (t.name.as_str(), deps)
        })
        .collect();
    let mut levels = Vec::new();
    loop {
        let ready: Vec<&str> = parents
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in &ready {
            parents.remove(name);
            for deps in parents.values_mut() {
                deps.remove(name);
            }
        }
        levels.push(ready.into_iter().map(str::to_owned).collect());
    }
    levels.extend(parents.keys().map(|name| vec![(*name).to_owned()]));
    levels
}

/// `SELECT <columns> FROM <table> [WHERE (<key>) > (<params>)] ORDER BY <key> LIMIT <param>`:
/// one keyset page in key order (never OFFSET). Parameters: the previous page's last key
/// (when `after` is true), then the limit.
pub fn keyset_query(
    table: &str,
    columns: &[String],
    key: &[String],
    after: bool,
) -> Result<String> {
    keyset_query_filtered(
        table,
        columns,
        Casts {
            engine: "sqlite",
            columns: &[],
            key: &[],
            key_array: None,
            literals: None,
        },
        key,
        KeyBounds {
            after,
            ..KeyBounds::default()
        },
        None,
    )
}

/// Which key bounds a keyset page's query takes, each a parameter tuple in this order: `after`
/// (`key > $`), `above` (`key > $`, a floor the sender sets, which a receiver's `after` cannot
/// lower), `at_most` (`key <= $`, a ceiling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyBounds {
    /// The previous page's last key.
    pub after: bool,
    /// A floor of the sender's own.
    pub above: bool,
    /// A ceiling.
    pub at_most: bool,
}

/// How a keyset query reads its columns and binds its keys, on which engine.
#[derive(Debug, Clone, Copy)]
pub struct Casts<'a> {
    /// The engine, as on the wire (`postgres`, `sqlite`): how the table's name reads.
    pub engine: &'a str,
    /// A cast per column read, or none.
    pub columns: &'a [&'a str],
    /// A cast per key value bound, or none.
    pub key: &'a [String],
    /// PostgreSQL, one key column: the SQL array type (`int8[]`) a filter's listed keys are
    /// bound as, one parameter for them all, rather than a tuple each (a list of thousands is
    /// then planned as one index scan in key order, not a join against a `VALUES` list).
    pub key_array: Option<&'a str>,
    /// PostgreSQL: every parameter written in place as this SQL literal, in order, the limit
    /// last (for a `COPY`, which takes no parameters). Only literals the agent wrote itself
    /// from values it checked (`source::copy_out::key_literal`), never a peer's text as is.
    pub literals: Option<&'a [String]>,
}

/// [`keyset_query`] within `bounds` and restricted by a key filter. Parameters: the bounds'
/// keys (see [`KeyBounds`]), then the filter's keys (a range's `from` then `to`, or every listed
/// key), then the limit.
/// `casts.columns` is empty or holds a cast per column (`""` for none, else as [`pg_read_cast`]
/// says): the column is selected as `"column"::text`, say; `casts.key` likewise a cast per key
/// value bound ([`pg_key_cast`]).
pub fn keyset_query_filtered(
    table: &str,
    columns: &[String],
    casts: Casts<'_>,
    key: &[String],
    bounds: KeyBounds,
    filter: Option<&KeyFilter>,
) -> Result<String> {
    let Casts {
        engine,
        columns: casts,
        key: key_casts,
        key_array,
        literals,
    } = casts;
    if key.is_empty() {
        return Err(Error::invalid(
            "table",
            format!("{table:?} has no primary key to page by"),
        ));
    }
    let table = quote_table_on(engine, table)?;
    let columns = select_list(columns, casts)?;
    let KeyConditions {
        conditions,
        order_by,
        next,
    } = key_conditions(
        &table,
        key,
        Params {
            casts: key_casts,
            array: key_array,
            literals,
        },
        bounds,
        filter,
    )?;
    let mut sql = format!("SELECT {columns} FROM {table}");
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    let limit = param(literals, next)?;
    sql.push_str(&format!(" ORDER BY {order_by} LIMIT {limit}"));
    Ok(sql)
}

/// PostgreSQL types whose hash function tells apart exactly the values a copy must keep apart
/// (and equal values alike): a column of one of these (or an array of one) is hashed as it is in
/// a range hash; any other is hashed in its text form.
const HASHED_AS_IS: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "oid",
    "boolean",
    "real",
    "double precision",
    "numeric",
    "text",
    "character varying",
    "character",
    "bytea",
    "uuid",
    "date",
    "timestamp without time zone",
    "timestamp with time zone",
    "jsonb",
];

/// A PostgreSQL type name without its modifiers: `timestamp(3) with time zone` →
/// `timestamp with time zone`.
fn without_modifiers(native: &str) -> String {
    let mut out = String::with_capacity(native.len());
    let mut depth = 0usize;
    for c in native.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How column `name` of PostgreSQL type `native` goes into a row hash: as it is, text under the
/// `C` collation (byte for byte whatever the column's collation), or in its text form.
fn pg_hash_operand(name: &str, native: &str) -> Result<String> {
    let column = quote_ident(name)?;
    let base = without_modifiers(native);
    let element = base.trim_end_matches("[]");
    Ok(if !HASHED_AS_IS.contains(&element) {
        format!("{column}::text COLLATE \"C\"")
    } else if matches!(element, "text" | "character varying" | "character") {
        format!("{column} COLLATE \"C\"")
    } else {
        column
    })
}

/// What a range hash query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashShape {
    /// One row: the range's row count and the XOR of its rows' hashes. No limit parameter.
    Summary,
    /// Each row's key columns (read as [`keyset_query_filtered`] reads them) then its hash, in
    /// key order, up to the limit parameter.
    Rows,
    /// The key of the row the last parameter's number of rows into the range (an `OFFSET`
    /// parameter), if the range holds that many: where a range of that many rows ends.
    End,
    /// The key of the range's last row, if it has one. No limit parameter.
    Last,
    /// Protocol 8: per non-empty bucket (the key's hash masked by the parameter after the
    /// bounds' keys), its number, row count and the XOR of its rows' hashes, in bucket order.
    Buckets,
    /// Protocol 8: as `Rows`, only the rows whose bucket (the key's hash masked by the first
    /// parameter after the bounds' keys) is set in the second (a `bytea` bitmap, bucket `b`
    /// being bit `b % 8` of byte `b / 8`); then the limit.
    BucketRows,
    /// Protocol 9: one row, the range's row count and the XOR of its keys' bucket hashes (as
    /// `Buckets` hashes a key). No limit parameter.
    KeysSummary,
    /// Protocol 9: as `Rows`, only the rows written by a transaction at or after the mark
    /// (`true`) or only the others (`false`): the first parameter after the bounds' keys is
    /// the mark's 32-bit transaction number, then the limit.
    Written(bool),
    /// Protocol 9: each listed row's key and hash in key order, a one-column key's values as
    /// one array parameter of this type; with a mark (the second parameter) only the rows
    /// written at or after it (`Some(true)`) or only the others (`Some(false)`). No bounds,
    /// no limit.
    Listed(&'static str, Option<bool>),
}

/// A row written by a transaction at or after parameter `n` (a 32-bit transaction number):
/// `age` measures both from the same point, so the comparison holds across wraparound for
/// any transaction within 2^31 of it; a frozen row is infinitely old.
fn written_since(n: usize, written: bool) -> String {
    let op = if written { "<=" } else { ">" };
    format!("age(xmin) {op} age(${n}::int8::text::xid)")
}

/// A key range of a PostgreSQL table hashed in the database (protocol 5, see
/// `dbsync_protocol::message::RangeHash::PgRecord`). `columns` are `(name, native type)` in the
/// order hashed; `key_reads` a read cast per key column ([`pg_read_cast`]), `key_casts` a cast
/// per key value bound ([`pg_key_cast`]). Parameters: the bounds' keys, then the limit or
/// offset (not for a summary).
pub fn pg_range_hash_query(
    table: &str,
    columns: &[(&str, &str)],
    key: &[String],
    key_reads: &[&str],
    key_casts: &[String],
    bounds: KeyBounds,
    shape: HashShape,
) -> Result<String> {
    if key.is_empty() {
        return Err(Error::invalid(
            "table",
            format!("{table:?} has no primary key to hash by"),
        ));
    }
    let table = quote_table_on("postgres", table)?;
    let operands = columns
        .iter()
        .map(|(name, native)| pg_hash_operand(name, native))
        .collect::<Result<Vec<_>>>()?
        .join(", ");
    let hash = format!("hash_record_extended(ROW({operands}), 0)");
    let key_native = |name: &str| {
        columns
            .iter()
            .find(|(c, _)| *c == name)
            .map_or(String::new(), |(_, native)| without_modifiers(native))
    };
    // A key's hash for its bucket: one integer column hashed as an integer (a third of the
    // cost of hashing it as a record), anything else as a record of its columns.
    let key_hash = match key {
        [one] if matches!(key_native(one).as_str(), "bigint" | "integer" | "smallint") => {
            format!("hashint8extended({}::int8, 0)", quote_ident(one)?)
        }
        _ => {
            let operands = key
                .iter()
                .map(|name| pg_hash_operand(name, &key_native(name)))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            format!("hash_record_extended(ROW({operands}), 0)")
        }
    };
    let bucket = |mask: usize| format!("({key_hash} & ${mask}::int8)::int4");
    let keys = select_list(key, key_reads)?;
    let KeyConditions {
        conditions,
        order_by,
        next,
    } = key_conditions(
        &table,
        key,
        Params {
            casts: key_casts,
            array: None,
            literals: None,
        },
        bounds,
        None,
    )?;
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    Ok(match shape {
        HashShape::Summary => {
            format!("SELECT count(*)::int8, coalesce(bit_xor({hash}), 0) FROM {table}{filter}")
        }
        HashShape::Rows => {
            format!("SELECT {keys}, {hash} FROM {table}{filter} ORDER BY {order_by} LIMIT ${next}")
        }
        HashShape::End => {
            format!("SELECT {keys} FROM {table}{filter} ORDER BY {order_by} OFFSET ${next} LIMIT 1")
        }
        HashShape::Buckets => {
            let bucket = bucket(next);
            // Each row's bucket and hash first (`OFFSET 0` keeps them apart), so what is grouped
            // is 12 bytes a row, not the row.
            format!(
                "SELECT bucket, count(*)::int8, bit_xor(hash) FROM (SELECT {bucket} AS bucket, \
                 {hash} AS hash FROM {table}{filter} OFFSET 0) AS hashed GROUP BY 1 ORDER BY 1"
            )
        }
        HashShape::BucketRows => {
            let chosen = format!("get_bit(${}::bytea, {}) = 1", next + 1, bucket(next));
            let filter = if conditions.is_empty() {
                format!(" WHERE {chosen}")
            } else {
                format!("{filter} AND {chosen}")
            };
            format!(
                "SELECT {keys}, {hash} FROM {table}{filter} ORDER BY {order_by} LIMIT ${}",
                next + 2
            )
        }
        HashShape::KeysSummary => {
            format!("SELECT count(*)::int8, coalesce(bit_xor({key_hash}), 0) FROM {table}{filter}")
        }
        HashShape::Written(written) => {
            let since = written_since(next, written);
            let filter = if conditions.is_empty() {
                format!(" WHERE {since}")
            } else {
                format!("{filter} AND {since}")
            };
            format!(
                "SELECT {keys}, {hash} FROM {table}{filter} ORDER BY {order_by} LIMIT ${}",
                next + 1
            )
        }
        HashShape::Listed(array, written) => {
            let [one] = key else {
                return Err(Error::invalid(
                    "key",
                    "listed keys are hashed for a one-column key only",
                ));
            };
            check_type_name(array.trim_end_matches("[]"))?;
            let mut filter = format!(" WHERE {} = ANY($1::{array})", quote_ident(one)?);
            if let Some(written) = written {
                filter.push_str(" AND ");
                filter.push_str(&written_since(2, written));
            }
            format!("SELECT {keys}, {hash} FROM {table}{filter} ORDER BY {order_by}")
        }
        HashShape::Last => {
            let descending = key
                .iter()
                .map(|c| Ok(format!("{} DESC", quote_ident(c)?)))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            format!("SELECT {keys} FROM {table}{filter} ORDER BY {descending} LIMIT 1")
        }
    })
}

/// `columns`, quoted, each with its cast (`casts[i]`, none when absent), comma-separated.
fn select_list(columns: &[String], casts: &[&str]) -> Result<String> {
    Ok(columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(format!(
                "{}{}",
                quote_ident(c)?,
                casts.get(i).unwrap_or(&"")
            ))
        })
        .collect::<Result<Vec<_>>>()?
        .join(", "))
}

/// A keyset query's `WHERE` conditions, its `ORDER BY` list and its next parameter number.
struct KeyConditions {
    conditions: Vec<String>,
    order_by: String,
    next: usize,
}

/// How [`key_conditions`] writes the key values it compares with.
#[derive(Debug, Clone, Copy)]
struct Params<'a> {
    /// A cast per key column ([`pg_key_cast`]), or none.
    casts: &'a [String],
    /// Listed keys as one array parameter of this type (one key column only).
    array: Option<&'a str>,
    /// Every parameter in place as a literal ([`Casts::literals`]).
    literals: Option<&'a [String]>,
}

/// Parameter `i` (from 1): `$i`, or its literal.
fn param(literals: Option<&[String]>, i: usize) -> Result<String> {
    match literals {
        None => Ok(format!("${i}")),
        Some(literals) => literals.get(i - 1).cloned().ok_or_else(|| {
            Error::invalid("key", format!("no literal for parameter {i} of a page"))
        }),
    }
}

/// The conditions of [`keyset_query_filtered`] on `table` (already quoted), with parameters as
/// `params` says.
fn key_conditions(
    table: &str,
    key: &[String],
    params: Params<'_>,
    bounds: KeyBounds,
    filter: Option<&KeyFilter>,
) -> Result<KeyConditions> {
    let Params {
        casts: key_casts,
        array: key_array,
        literals,
    } = params;
    let key_list = key
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Result<Vec<_>>>()?;
    let order = key_list.join(", ");
    let lhs = if key.len() == 1 {
        key_list[0].clone()
    } else {
        format!("({order})")
    };
    let mut next = 1;
    let mut tuple = || -> Result<String> {
        let params = (next..next + key.len())
            .zip(0..)
            .map(|(i, k)| {
                Ok(format!(
                    "{}{}",
                    param(literals, i)?,
                    key_casts.get(k).map_or("", String::as_str)
                ))
            })
            .collect::<Result<Vec<String>>>()?;
        next += key.len();
        Ok(if params.len() == 1 {
            params[0].clone()
        } else {
            format!("({})", params.join(", "))
        })
    };
    let mut conditions = Vec::new();
    if bounds.after {
        conditions.push(format!("{lhs} > {}", tuple()?));
    }
    if bounds.above {
        conditions.push(format!("{lhs} > {}", tuple()?));
    }
    if bounds.at_most {
        conditions.push(format!("{lhs} <= {}", tuple()?));
    }
    match filter {
        None => {}
        Some(KeyFilter::Range { from, to }) => {
            if from.is_some() {
                conditions.push(format!("{lhs} >= {}", tuple()?));
            }
            if to.is_some() {
                conditions.push(format!("{lhs} <= {}", tuple()?));
            }
        }
        Some(KeyFilter::Keys(keys)) => {
            if keys.is_empty() {
                conditions.push("1 = 0".to_owned());
            } else if let (Some(array), [_]) = (key_array, key) {
                check_type_name(array.trim_end_matches("[]"))?;
                let list = param(literals, next)?;
                conditions.push(format!("{lhs} = ANY({list}::{array})"));
                next += 1;
            } else {
                let tuples: Vec<String> = keys
                    .iter()
                    .map(|_| {
                        let t = tuple()?;
                        Ok(if t.starts_with('(') {
                            t
                        } else {
                            format!("({t})")
                        })
                    })
                    .collect::<Result<_>>()?;
                conditions.push(format!("({order}) IN (VALUES {})", tuples.join(", ")));
            }
        }
    }
    // Qualified: a bare name in ORDER BY would mean the output column, which a cast read in
    // its text form (`"ip"::text AS ip`) orders differently from the key.
    let order_by = key_list
        .iter()
        .map(|k| format!("{table}.{k}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(KeyConditions {
        conditions,
        order_by,
        next,
    })
}

#[derive(sqlx::FromRow)]
struct ColumnRow {
    name: String,
    native_type: String,
    type_name: String,
    element_type: Option<String>,
    nullable: bool,
    key_position: i64,
}

impl Store {
    /// Tables offered for sync (before any connection's allow/exclude lists), by name.
    pub async fn list_tables(&self) -> Result<Vec<TableInfo>> {
        let rows: Vec<(String, i64, i64)> = match self.engine() {
            Engine::Postgres => on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT CASE WHEN n.nspname = current_schema() THEN c.relname::text \
                     ELSE n.nspname || '.' || c.relname END, \
                     CAST(GREATEST(c.reltuples, -1) AS BIGINT), \
                     CAST(pg_total_relation_size(c.oid) AS BIGINT) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                     AND n.nspname NOT LIKE 'pg\\_%' \
                     AND strpos(c.relname, '.') = 0 AND strpos(n.nspname, '.') = 0 \
                     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                                     AND d.objid = c.oid AND d.deptype = 'e') \
                     ORDER BY n.nspname <> current_schema(), 1",
                )
                .fetch_all(pool)
                .await?
            }),
            Engine::Sqlite => on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT name, 0, 0 FROM sqlite_master WHERE type = 'table' ORDER BY name",
                )
                .fetch_all(pool)
                .await?
            }),
        };
        let mut tables = Vec::new();
        for (name, estimated_rows, bytes) in rows {
            if is_internal_table(&name) {
                continue;
            }
            let estimated_rows = match self.engine() {
                // Never analyzed (`reltuples` is -1 until then): the planner's guess from the
                // table's size, so a progress bar has a total from the start.
                Engine::Postgres if estimated_rows < 0 => self.planner_rows(&name).await?,
                Engine::Postgres => estimated_rows,
                Engine::Sqlite => self.count_rows(&name).await?,
            };
            let schema = self.describe_table(&name).await?;
            tables.push(TableInfo {
                depends_on: self.fk_parents(&name).await?,
                name,
                estimated_rows: u64::try_from(estimated_rows).unwrap_or(0),
                bytes: u64::try_from(bytes).unwrap_or(0),
                primary_key: schema.primary_key,
            });
        }
        Ok(tables)
    }

    /// About how many rows `table` holds, for progress: PostgreSQL's statistics (or its planner's
    /// guess before the first ANALYZE); `None` on SQLite, where only a full count would say.
    pub async fn row_estimate(&self, table: &str) -> Result<Option<u64>> {
        if self.engine() != Engine::Postgres {
            return Ok(None);
        }
        let quoted = quote_table(Engine::Postgres, table)?;
        let tuples: Option<i64> = on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT CAST(reltuples AS BIGINT) FROM pg_class WHERE oid = to_regclass($1)",
            )
            .bind(&quoted)
            .fetch_optional(pool)
            .await?
        });
        let rows = match tuples {
            Some(rows) if rows >= 0 => rows,
            Some(_) => self.planner_rows(table).await?,
            None => return Ok(None),
        };
        Ok(u64::try_from(rows).ok())
    }

    /// How many rows PostgreSQL's planner expects `table` to hold (from its size on disk).
    async fn planner_rows(&self, table: &str) -> Result<i64> {
        let sql = format!(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM {}",
            quote_table(Engine::Postgres, table)?
        );
        let plan: serde_json::Value = on_pool!(self, |pool| {
            sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(sqlx::AssertSqlSafe(sql))
                .fetch_one(pool)
                .await?
                .0
        });
        Ok(plan
            .pointer("/0/Plan/Plan Rows")
            .and_then(serde_json::Value::as_f64)
            .map_or(0, |rows| rows as i64))
    }

    async fn count_rows(&self, table: &str) -> Result<i64> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            quote_table(self.engine(), table)?
        ));
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await?))
    }

    /// Tables `table` references through foreign keys.
    pub async fn fk_parents(&self, table: &str) -> Result<Vec<String>> {
        let parents: Vec<String> = match self.engine() {
            Engine::Postgres => on_pool!(self, |pool| {
                sqlx::query_scalar(
                    "SELECT DISTINCT CASE WHEN n.nspname = current_schema() THEN parent.relname::text \
                     ELSE n.nspname || '.' || parent.relname END FROM pg_constraint con \
                     JOIN pg_class parent ON parent.oid = con.confrelid \
                     JOIN pg_namespace n ON n.oid = parent.relnamespace \
                     WHERE con.contype = 'f' AND con.conrelid = to_regclass($1) \
                     ORDER BY 1",
                )
                .bind(quote_table(Engine::Postgres, table)?)
                .fetch_all(pool)
                .await?
            }),
            Engine::Sqlite => on_pool!(self, |pool| {
                sqlx::query_scalar(
                    "SELECT DISTINCT \"table\" FROM pragma_foreign_key_list($1) ORDER BY 1",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }),
        };
        Ok(parents)
    }

    /// Columns and primary key of a table; `not_found` when it does not exist or is internal.
    pub async fn describe_table(&self, table: &str) -> Result<TableSchema> {
        check_synced_table(table)?;
        if self.engine() == Engine::Sqlite {
            // SQLite resolves names without regard to case (`USERS` is `users`): only the name
            // exactly as stored is a table here, so lists of allowed and excluded tables, which
            // compare exact names, mean what they say.
            let stored: Option<String> = on_pool!(self, |pool| {
                sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name = $1 COLLATE BINARY",
                )
                .bind(table)
                .fetch_optional(pool)
                .await?
            });
            if stored.as_deref() != Some(table) {
                return Err(Error::not_found("table", table));
            }
        }
        let rows: Vec<ColumnRow> = match self.engine() {
            Engine::Postgres => on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS native_type, \
                     b.typname::text AS type_name, \
                     CASE WHEN b.typcategory = 'A' THEN et.typname::text END AS element_type, \
                     NOT a.attnotnull AS nullable, \
                     CAST(COALESCE(array_position(pk.conkey, a.attnum), 0) AS BIGINT) AS key_position \
                     FROM pg_attribute a \
                     JOIN pg_class c ON c.oid = a.attrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_type t ON t.oid = a.atttypid \
                     JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                     LEFT JOIN pg_type et ON et.oid = b.typelem \
                     LEFT JOIN pg_constraint pk ON pk.conrelid = c.oid AND pk.contype = 'p' \
                     WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p') \
                     AND NOT c.relispartition \
                     AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum",
                )
                .bind(quote_table(Engine::Postgres, table)?)
                .fetch_all(pool)
                .await?
            }),
            Engine::Sqlite => on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT name, type AS native_type, type AS type_name, NULL AS element_type, \
                     (\"notnull\" = 0 AND pk = 0) AS nullable, CAST(pk AS BIGINT) AS key_position \
                     FROM pragma_table_info($1) ORDER BY cid",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }),
        };
        if rows.is_empty() {
            return Err(Error::not_found("table", table));
        }
        let mut key: Vec<(i64, String)> = rows
            .iter()
            .filter(|r| r.key_position > 0)
            .map(|r| (r.key_position, r.name.clone()))
            .collect();
        key.sort();
        let engine = self.engine();
        let columns = rows
            .into_iter()
            .map(|r| ColumnInfo {
                neutral_type: match engine {
                    Engine::Postgres => {
                        neutral_postgres_type(&r.type_name, r.element_type.as_deref())
                    }
                    Engine::Sqlite => neutral_sqlite_type(&r.type_name),
                },
                name: r.name,
                native_type: r.native_type,
                nullable: r.nullable,
            })
            .collect();
        Ok(TableSchema {
            name: table.to_owned(),
            engine: self.engine_name().to_owned(),
            columns,
            primary_key: key.into_iter().map(|(_, name)| name).collect(),
            postgres: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_type_names_reach_ddl() {
        for ok in [
            "integer",
            "character varying(20)[]",
            "timestamp(3) with time zone",
            "numeric(10, 2)",
            "\"My Type\"",
            "sales.mood",
            "\"char\"",
            "UNSIGNED BIG INT",
            "bit varying(5)",
            "interval year to month",
            "int[][]",
            "text[3]",
            "\"Mood \"\"quoted\"\"\"",
            "\"Pair-Type\"[]",
            "public.\"größe; DROP\"",
        ] {
            assert!(check_type_name(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "TEXT); DROP TABLE users; --",
            "int DEFAULT pg_sleep(10)",
            "integer CHECK (x > 0)",
            "int GENERATED ALWAYS AS (1) STORED",
            "text COLLATE \"C\"",
            "int NOT NULL",
            "int REFERENCES users",
            "int(a)",
            "\"\"",
            " ",
            "text -- comment",
            "int;",
            "text'",
            "\"unterminated",
            "\"a\"\" b\"\"",
            "\"x\" ; DROP TABLE t",
            "\"x\0y\"",
        ] {
            assert!(check_type_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn internal_names_are_refused_in_any_spelling() {
        for name in [
            "dbsync_connections",
            "DBSYNC_ADMIN_TOKENS",
            "DbSync_Settings",
            "_SQLX_MIGRATIONS",
            "_sqlx_migrations",
            "SQLITE_MASTER",
            "sqlite_sequence",
            "Pg_Authid",
            "",
            "a\0b",
        ] {
            assert!(is_internal_table(name), "{name:?}");
            assert!(check_synced_table(name).is_err(), "{name:?}");
        }
        for name in [
            "users",
            "USERS",
            "dbsync",
            "my_dbsync_table",
            "Order",
            "select",
        ] {
            assert!(!is_internal_table(name), "{name:?}");
        }
    }

    #[test]
    fn identifiers_are_quoted_and_validated() {
        assert_eq!(quote_ident("select").unwrap(), "\"select\"");
        assert_eq!(quote_ident("Order Items").unwrap(), "\"Order Items\"");
        assert_eq!(quote_ident("a\"b").unwrap(), "\"a\"\"b\"");
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a\0b").is_err());
        assert!(quote_ident(&"x".repeat(64)).is_err());
    }

    #[test]
    fn keyset_queries_never_use_offset() {
        let columns = vec!["id".to_owned(), "Name".to_owned()];
        assert_eq!(
            keyset_query("users", &columns, &["id".into()], false).unwrap(),
            "SELECT \"id\", \"Name\" FROM \"users\" ORDER BY \"users\".\"id\" LIMIT $1"
        );
        assert_eq!(
            keyset_query("users", &columns, &["id".into()], true).unwrap(),
            "SELECT \"id\", \"Name\" FROM \"users\" WHERE \"id\" > $1 ORDER BY \"users\".\"id\" LIMIT $2"
        );
        let composite = keyset_query("order", &columns, &["a".into(), "b".into()], true).unwrap();
        assert_eq!(
            composite,
            "SELECT \"id\", \"Name\" FROM \"order\" WHERE (\"a\", \"b\") > ($1, $2) ORDER BY \"order\".\"a\", \"order\".\"b\" LIMIT $3"
        );
        assert!(!composite.contains("OFFSET"));
        assert!(keyset_query("logs", &columns, &[], false).is_err());
    }

    #[test]
    fn fk_order_puts_parents_first() {
        let table = |name: &str, deps: &[&str]| TableInfo {
            name: name.into(),
            estimated_rows: 0,
            bytes: 0,
            primary_key: vec![],
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        };
        let tables = [
            table("order_items", &["orders", "products"]),
            table("orders", &["users"]),
            table("users", &["users"]),
            table("products", &[]),
            table("a_cycle", &["b_cycle"]),
            table("b_cycle", &["a_cycle"]),
        ];
        let order = fk_order(&tables);
        let position = |name: &str| order.iter().position(|n| n == name).unwrap();
        assert!(position("users") < position("orders"));
        assert!(position("orders") < position("order_items"));
        assert!(position("products") < position("order_items"));
        assert_eq!(&order[order.len() - 2..], ["a_cycle", "b_cycle"]);
        let levels = fk_levels(&tables);
        assert_eq!(
            levels,
            [
                vec!["products", "users"],
                vec!["orders"],
                vec!["order_items"],
                vec!["a_cycle"],
                vec!["b_cycle"],
            ]
        );
    }

    #[test]
    fn type_mapping() {
        assert_eq!(neutral_postgres_type("int8", None), "int");
        assert_eq!(neutral_postgres_type("_int4", Some("int4")), "array<int>");
        assert_eq!(neutral_postgres_type("jsonb", None), "json");
        assert_eq!(neutral_postgres_type("tsvector", None), "text");
        assert_eq!(pg_read_cast("tsvector", "text"), "::text");
        assert_eq!(pg_read_cast("public.mood[]", "array<text>"), "::text[]");
        assert_eq!(pg_read_cast("character varying(20)", "text"), "");
        assert_eq!(pg_read_cast("money", "numeric"), "::numeric");
        assert_eq!(pg_read_cast("numeric(10,2)", "numeric"), "");
        assert_eq!(pg_read_cast("integer", "int"), "");
        assert_eq!(neutral_sqlite_type("INTEGER"), "int");
        assert_eq!(neutral_sqlite_type("VARCHAR(20)"), "text");
        assert_eq!(neutral_sqlite_type("DATETIME"), "timestamp");
        assert_eq!(neutral_sqlite_type(""), "bytes");
        assert_eq!(neutral_sqlite_type("DECIMAL(12,2)"), "numeric");
        assert_eq!(neutral_sqlite_type("BOOLEAN"), "bool");
    }
}
