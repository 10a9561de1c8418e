//! [`Secret`]: a string that never shows itself. Tokens and passwords travel in this type from
//! the moment they are read, so no `Debug`, `Display` or log field can print them: reaching the
//! text takes a call to [`Secret::expose`], which a reviewer can find.

use serde::{Deserialize, Serialize};

/// A secret string (a token or a password). `Debug` and `Display` print `[redacted]`; serde
/// reads and writes the plain string (it goes on the wire, inside TLS or a local pipe).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret's text, for the one place that must read it (hashing, comparing, sending).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_itself() {
        let secret = Secret::new("dbs_very_secret");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "dbs_very_secret");
        // On the wire it is the plain string.
        let bytes = rmp_serde::to_vec(&secret).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<String>(&bytes).unwrap(),
            "dbs_very_secret"
        );
    }
}
