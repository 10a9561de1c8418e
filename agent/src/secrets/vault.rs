//! Encryption at rest of the tokens this site holds as a receiver.
//!
//! XChaCha20-Poly1305 with a 32-byte key from config or from a key file the agent creates with
//! mode 0600. The stored value is `version (1) || nonce (24) || ciphertext`, and the connection id
//! is the associated data, so a ciphertext copied onto another row does not decrypt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use uuid::Uuid;

use crate::error::{Error, Result};

const FORMAT_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// Parses a 64-hex-character key.
pub(crate) fn parse_key(text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text.trim())
        .map_err(|_| Error::Config("token_encryption_key must be 64 hex characters".into()))?;
    bytes
        .try_into()
        .map_err(|_| Error::Config("token_encryption_key must be 64 hex characters".into()))
}

/// Where the key comes from, loaded on first use.
#[derive(Debug)]
pub struct Vault {
    source: KeySource,
    key: OnceLock<[u8; 32]>,
}

#[derive(Debug)]
enum KeySource {
    Configured,
    File(PathBuf),
}

impl Vault {
    /// A vault with a configured key (64 hex characters).
    pub fn with_key(hex_key: &str) -> Result<Self> {
        let key = parse_key(hex_key)?;
        Ok(Self {
            source: KeySource::Configured,
            key: OnceLock::from(key),
        })
    }

    /// A vault whose key lives in `path`; the file is created (0600) on first encryption.
    pub fn with_key_file(path: impl Into<PathBuf>) -> Self {
        Self {
            source: KeySource::File(path.into()),
            key: OnceLock::new(),
        }
    }

    /// From config: the configured key, else the key file.
    pub fn from_config(config: &crate::Config) -> Result<Self> {
        match &config.token_encryption_key {
            Some(key) => Self::with_key(key.expose()),
            None => Ok(Self::with_key_file(config.key_file())),
        }
    }

    fn key(&self, create: bool) -> Result<&[u8; 32]> {
        if let Some(key) = self.key.get() {
            return Ok(key);
        }
        let KeySource::File(path) = &self.source else {
            unreachable!("a configured key is set at construction");
        };
        let key = load_or_create_key_file(path, create)?;
        Ok(self.key.get_or_init(|| key))
    }

    /// Encrypts `plaintext` bound to `connection_id`.
    pub fn seal(&self, connection_id: Uuid, plaintext: &str) -> Result<Vec<u8>> {
        let cipher = XChaCha20Poly1305::new(Key::from_slice(self.key(true)?));
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: connection_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Decrypt)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts what [`Vault::seal`] produced for the same connection.
    pub fn open(&self, connection_id: Uuid, sealed: &[u8]) -> Result<String> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != FORMAT_VERSION {
            return Err(Error::Decrypt);
        }
        let cipher = XChaCha20Poly1305::new(Key::from_slice(self.key(false)?));
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&sealed[1..1 + NONCE_LEN]),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: connection_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Decrypt)?;
        String::from_utf8(plain).map_err(|_| Error::Decrypt)
    }
}

fn load_or_create_key_file(path: &Path, create: bool) -> Result<[u8; 32]> {
    let io_err = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_permissions(path)?;
            parse_key(&text).map_err(|_| {
                Error::Config(format!(
                    "{}: key file must hold 64 hex characters",
                    path.display()
                ))
            })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && create => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io_err)?;
            file.write_all(hex::encode(key).as_bytes())
                .map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            tracing::info!(path = %path.display(), "created token encryption key file");
            Ok(key)
        }
        Err(err) => Err(io_err(err)),
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{}: key file is readable by others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_with_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dbsync.key");
        let vault = Vault::with_key_file(&path);
        let id = Uuid::new_v4();
        let sealed = vault.seal(id, "dbs_secret").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"dbs_secret"));
        assert_eq!(vault.open(id, &sealed).unwrap(), "dbs_secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second vault on the same file reads the same key.
        assert_eq!(
            Vault::with_key_file(&path).open(id, &sealed).unwrap(),
            "dbs_secret"
        );
    }

    #[test]
    fn wrong_row_or_key_does_not_decrypt() {
        let vault = Vault::with_key(&"11".repeat(32)).unwrap();
        let id = Uuid::new_v4();
        let sealed = vault.seal(id, "dbs_secret").unwrap();
        assert!(matches!(
            vault.open(Uuid::new_v4(), &sealed),
            Err(Error::Decrypt)
        ));
        let other = Vault::with_key(&"22".repeat(32)).unwrap();
        assert!(matches!(other.open(id, &sealed), Err(Error::Decrypt)));
    }

    #[test]
    fn missing_key_file_is_not_created_for_decryption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.key");
        let vault = Vault::with_key_file(&path);
        assert!(vault.open(Uuid::new_v4(), &[1; 40]).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn bad_configured_key_is_refused() {
        assert!(Vault::with_key("abc").is_err());
    }
}
