//! End-to-end tests of the `dbsync` binary.

mod support;

mod admin_api;
mod browser;
mod cli;
mod hostile;
mod incremental;
mod kill;
mod parallel;
mod peer;
mod pull;
mod quic;
mod schedule;
mod schema;
mod serve;
mod share;
mod site;
mod strategies;
mod verify;
