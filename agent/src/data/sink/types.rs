//! The column types a sink creates for a described column: the source's own on the same engine,
//! through the engine-neutral type across engines (see `docs/types.md`).

use dbsync_protocol::message::TableSchema;

use crate::error::{Error, Result};
use crate::store::Engine;

/// The column type to create on `target` for a column described by `schema`.
pub fn target_type(
    target: Engine,
    schema: &TableSchema,
    native: &str,
    neutral: &str,
) -> Result<String> {
    let same_engine = matches!(
        (target, schema.engine.as_str()),
        (Engine::Postgres, "postgres") | (Engine::Sqlite, "sqlite")
    );
    if same_engine {
        // Written into the `CREATE TABLE` as given: only a type name may pass.
        crate::catalog::check_type_name(native)?;
        return Ok(native.to_owned());
    }
    let (scalar, array) = match neutral
        .strip_prefix("array<")
        .and_then(|r| r.strip_suffix('>'))
    {
        Some(element) => (element, true),
        None => (neutral, false),
    };
    let mapped = match (target, scalar) {
        (_, unsupported) if unsupported.starts_with("unsupported:") => None,
        (Engine::Postgres, "bool") => Some("BOOLEAN"),
        (Engine::Postgres, "int") => Some("BIGINT"),
        (Engine::Postgres, "float") => Some("DOUBLE PRECISION"),
        (Engine::Postgres, "numeric") => Some("NUMERIC"),
        (Engine::Postgres, "text") => Some("TEXT"),
        (Engine::Postgres, "bytes") => Some("BYTEA"),
        (Engine::Postgres, "uuid") => Some("UUID"),
        (Engine::Postgres, "json") => Some("JSONB"),
        (Engine::Postgres, "date") => Some("DATE"),
        (Engine::Postgres, "time") => Some("TIME"),
        (Engine::Postgres, "timestamp") => Some("TIMESTAMP"),
        (Engine::Postgres, "timestamptz") => Some("TIMESTAMPTZ"),
        (Engine::Postgres, "interval") => Some("INTERVAL"),
        (Engine::Sqlite, _) if array => Some("TEXT"),
        (Engine::Sqlite, "bool") => Some("BOOLEAN"),
        (Engine::Sqlite, "int") => Some("INTEGER"),
        (Engine::Sqlite, "float") => Some("REAL"),
        (Engine::Sqlite, "bytes") => Some("BLOB"),
        (
            Engine::Sqlite,
            "numeric" | "text" | "uuid" | "json" | "date" | "time" | "timestamp" | "timestamptz"
            | "interval",
        ) => Some("TEXT"),
        _ => None,
    };
    let mapped = mapped.ok_or_else(|| {
        Error::invalid(
            "column type",
            format!("{native} ({neutral}) cannot be mapped to {target:?}"),
        )
    })?;
    Ok(if array && target == Engine::Postgres {
        format!("{mapped}[]")
    } else {
        mapped.to_owned()
    })
}
