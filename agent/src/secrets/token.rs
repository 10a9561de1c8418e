//! Connection tokens.
//!
//! Format: `dbs_` + 43 random base62 characters (256 bits) + 6 base62 characters of CRC32 over
//! everything before them. The checksum lets a malformed token be refused without a database
//! lookup and lets secret scanners recognise leaked tokens. The sender stores only the SHA-256
//! of a token and a short display prefix.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every connection token starts with this.
pub const TOKEN_PREFIX: &str = "dbs_";
/// Every admin API token starts with this.
pub const ADMIN_TOKEN_PREFIX: &str = "dbsa_";
/// Random base62 characters after the prefix (62^43 > 2^256).
const RANDOM_LEN: usize = 43;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
const CHECKSUM_LEN: usize = 6;
/// Total length of a well-formed connection token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// Random characters kept for display after the prefix.
const DISPLAY_RANDOM_LEN: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A connection token in clear. Shown to the operator once; never logged (its `Debug` is redacted).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}…)", self.display_prefix())
    }
}

/// Why a string is not a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedToken {
    /// Wrong length or prefix, or characters outside base62.
    #[error("not a dbsync token (expected a dbs_ or dbsa_ prefix and 49 base62 characters)")]
    Shape,
    /// The checksum does not match: a typo or a truncated copy.
    #[error("token checksum mismatch (mistyped or truncated)")]
    Checksum,
}

impl Token {
    /// A new random connection token.
    pub fn generate() -> Self {
        Self::generate_with(TOKEN_PREFIX)
    }

    /// A new random admin API token.
    pub fn generate_admin() -> Self {
        Self::generate_with(ADMIN_TOKEN_PREFIX)
    }

    fn generate_with(prefix: &str) -> Self {
        let random: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(RANDOM_LEN)
            .map(char::from)
            .collect();
        let body = format!("{prefix}{random}");
        let checksum = checksum(&body);
        Self(body + &checksum)
    }

    /// Checks a connection token's shape and checksum, touching no database.
    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        Self::parse_with(text, TOKEN_PREFIX)
    }

    /// Checks an admin token's shape and checksum, touching no database.
    pub fn parse_admin(text: &str) -> Result<Self, MalformedToken> {
        Self::parse_with(text, ADMIN_TOKEN_PREFIX)
    }

    fn parse_with(text: &str, prefix: &str) -> Result<Self, MalformedToken> {
        let text = text.trim();
        let len = prefix.len() + RANDOM_LEN + CHECKSUM_LEN;
        if text.len() != len
            || !text.starts_with(prefix)
            || !text[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(MalformedToken::Shape);
        }
        let (body, sum) = text.split_at(len - CHECKSUM_LEN);
        if checksum(body).as_bytes().ct_eq(sum.as_bytes()).into() {
            Ok(Self(text.to_owned()))
        } else {
            Err(MalformedToken::Checksum)
        }
    }

    /// The token in clear: for showing once, sending as a bearer credential, or encrypting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token: what the sender stores and looks tokens up by.
    pub fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }

    /// The first characters, safe to display so operators can tell tokens apart.
    pub fn display_prefix(&self) -> String {
        let prefix_len = self.0.find('_').map_or(0, |i| i + 1);
        self.0[..prefix_len + DISPLAY_RANDOM_LEN].to_owned()
    }
}

/// Constant-time comparison of two token hashes.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

fn checksum(body: &str) -> String {
    let mut value = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert_eq!(Token::parse(a.expose()).unwrap(), a);
        assert!(a.expose().starts_with("dbs_"));
    }

    #[test]
    fn one_changed_character_breaks_the_checksum() {
        let token = Token::generate();
        let mut chars: Vec<char> = token.expose().chars().collect();
        chars[10] = if chars[10] == 'a' { 'b' } else { 'a' };
        let broken: String = chars.into_iter().collect();
        assert_eq!(Token::parse(&broken), Err(MalformedToken::Checksum));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let token = Token::generate();
        assert_eq!(Token::parse(""), Err(MalformedToken::Shape));
        assert_eq!(
            Token::parse(&token.expose()[1..]),
            Err(MalformedToken::Shape)
        );
        let other_prefix = token.expose().replacen("dbs_", "ghp_", 1);
        assert_eq!(Token::parse(&other_prefix), Err(MalformedToken::Shape));
        let with_symbol = format!("{}!", &token.expose()[..TOKEN_LEN - 1]);
        assert_eq!(Token::parse(&with_symbol), Err(MalformedToken::Shape));
    }

    #[test]
    fn debug_hides_the_secret_part() {
        let token = Token::generate();
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.expose()[TOKEN_PREFIX.len() + DISPLAY_RANDOM_LEN..]));
    }

    #[test]
    fn admin_and_connection_tokens_do_not_mix() {
        let admin = Token::generate_admin();
        assert!(admin.expose().starts_with("dbsa_"));
        assert_eq!(Token::parse_admin(admin.expose()).unwrap(), admin);
        assert!(Token::parse(admin.expose()).is_err());
        assert!(Token::parse_admin(Token::generate().expose()).is_err());
        assert_eq!(admin.display_prefix().len(), "dbsa_".len() + 6);
    }
}
