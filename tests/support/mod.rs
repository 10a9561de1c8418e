//! Support for tests of the binary: run `dbsync` against a state database on either engine.

#![allow(dead_code, unreachable_pub)]

#[path = "../../agent/tests/support/postgres.rs"]
mod postgres;

pub mod agents;
pub mod browser;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use postgres::{PgScratch, postgres_base_url};

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.status, 0, "dbsync failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not JSON ({err}): {}", self.stdout))
    }
}

/// A state database plus a working directory for the binary to run in.
pub struct Site {
    pub url: String,
    pub dir: tempfile::TempDir,
    scratch: Option<PgScratch>,
}

impl Site {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        Self {
            url,
            dir,
            scratch: None,
        }
    }

    /// A site on a scratch PostgreSQL database, or `None` when PostgreSQL tests are skipped.
    pub async fn postgres(test: &str) -> Option<Self> {
        let base = postgres_base_url(test)?;
        let scratch = PgScratch::create(&base).await;
        Some(Self {
            url: scratch.url.clone(),
            dir: tempfile::tempdir().unwrap(),
            scratch: Some(scratch),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("dbsync.key")
    }

    /// Runs `dbsync args...` with this site's database, feeding `stdin` when given.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.run_logged("warn", args, stdin)
    }

    /// Like [`Site::run`], with the log filter set to `log` (logs go to stderr).
    pub fn run_logged(&self, log: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dbsync"));
        command
            .env("DBSYNC_DATABASE_URL", &self.url)
            .env("DBSYNC_KEY_FILE", self.key_file());
        self.spawn(command, log, args, stdin)
    }

    /// Like [`Site::run`], with extra environment variables.
    pub fn run_with_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dbsync"));
        command
            .env("DBSYNC_DATABASE_URL", &self.url)
            .env("DBSYNC_KEY_FILE", self.key_file());
        for (name, value) in env {
            command.env(name, value);
        }
        self.spawn(command, "warn", args, stdin)
    }

    /// Runs `dbsync args...` with no database or key file in the environment (as from a
    /// configuration file).
    pub fn run_bare(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dbsync"));
        command
            .env_remove("DBSYNC_DATABASE_URL")
            .env_remove("DBSYNC_KEY_FILE");
        self.spawn(command, "warn", args, None)
    }

    fn spawn(&self, mut command: Command, log: &str, args: &[&str], stdin: Option<&str>) -> Output {
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("DBSYNC_CONFIG")
            .env_remove("DBSYNC_TOKEN")
            .env_remove("DBSYNC_TOKEN_ENCRYPTION_KEY")
            .env("DBSYNC_LOG", log)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn dbsync");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Drops the scratch database, if any.
    pub async fn cleanup(self) {
        if let Some(scratch) = &self.scratch {
            scratch.drop_database().await;
        }
    }
}

/// Runs `body` on a SQLite site and then on a PostgreSQL site (unless skipped outside CI).
macro_rules! on_both_engines {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&$crate::support::Site::sqlite());
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let test = concat!(module_path!(), "::", stringify!($name));
                    let Some(site) = $crate::support::Site::postgres(test).await else { return };
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::$name(&site)));
                    site.cleanup().await;
                    if let Err(panic) = outcome {
                        std::panic::resume_unwind(panic);
                    }
                }
            )+
        }
    };
}
pub(crate) use on_both_engines;
