//! Human tables and `--json` output.

use chrono::{DateTime, Utc};
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A two-column "field: value" table.
pub(crate) fn print_fields(rows: &[(&str, String)]) {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (field, value) in rows {
        table.add_row(vec![(*field).to_owned(), value.clone()]);
    }
    println!("{table}");
}

/// A table with a header row; prints `empty` instead when there are no rows.
pub(crate) fn print_rows(header: &[&str], rows: Vec<Vec<String>>, empty: &str) {
    if rows.is_empty() {
        println!("{empty}");
        return;
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    println!("{table}");
}

/// A timestamp for humans, or "-".
pub(crate) fn time(value: Option<DateTime<Utc>>) -> String {
    value.map_or_else(
        || "-".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// "used / max" or "used / unlimited".
pub(crate) fn usage(used: i64, max: Option<i64>) -> String {
    match max {
        Some(max) => format!("{used} / {max}"),
        None => format!("{used} / unlimited"),
    }
}

/// A list for humans, or "-" (or `empty` when given).
pub(crate) fn list(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_owned()
    } else {
        items.join(", ")
    }
}

/// An optional value for humans, or "-".
pub(crate) fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Bytes with a binary unit.
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line on stderr (or a JSON object with a stable code under `--json`).
pub(crate) fn print_error(err: &anyhow::Error, json: bool) {
    let code = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<dbsync_agent::Error>())
        .map_or("error", dbsync_agent::Error::code);
    let message = err
        .chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    if json {
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        eprintln!("{body}");
    } else {
        eprintln!("error: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn usage_with_and_without_limit() {
        assert_eq!(usage(3, Some(10)), "3 / 10");
        assert_eq!(usage(3, None), "3 / unlimited");
    }
}
