//! Keeping tables in step from the receiving side: a pull's table loop ([`pull`]) and its
//! passes over rows ([`rows`]).

pub mod pull;
mod rows;
