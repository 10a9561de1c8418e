//! Engine tests: every body runs on SQLite and on PostgreSQL.

mod support;

mod catalog;
mod connections;
mod migrations;
mod settings;
mod sink;
mod source;
mod transfers;
mod validate;
