//! End-to-end tests of the `dbsync` binary.

mod support;

mod cli;
