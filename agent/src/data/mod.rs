//! The synced data: which tables there are and how they are read by key ([`catalog`],
//! [`key_filter`]), rows read a keyset page at a time ([`source`]), and rows written with their
//! checkpoint ([`sink`], with PostgreSQL's binary `COPY` in `pg_copy` and SQLite's raw handle in
//! `sqlite_raw`).

pub(crate) mod batch;
pub mod catalog;
pub mod key_filter;
pub(crate) mod pg_copy;
pub mod pg_expr;
pub mod pg_schema;
pub mod row_hash;
pub mod sink;
pub mod source;
pub(crate) mod sqlite_raw;
