//! Keeping tables in step: a pull's table loop ([`pull`]) and its passes over rows (`rows`),
//! the auto-sync scheduler ([`schedule`]), and registration with other sites and the status
//! changes pushed between them ([`registration`]).

pub mod parallel;
pub mod pull;
pub mod registration;
mod rows;
pub mod schedule;
pub mod share;
pub mod token_rotation;
pub mod verify;
mod whole;
