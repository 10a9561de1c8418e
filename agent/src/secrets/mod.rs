//! Secrets: connection tokens ([`token`]), argon2id password hashes ([`password`]), encryption at
//! rest of the tokens a receiver holds ([`vault`]), and values that never print ([`secret`]).

pub mod password;
pub mod secret;
pub mod token;
pub mod vault;
