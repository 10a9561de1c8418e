//! End-to-end tests of the `dbsync` binary.

mod support;

mod admin_api;
mod cli;
mod peer;
mod pull;
mod serve;
mod strategies;
