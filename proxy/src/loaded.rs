//! The configuration in force, as administrators see it: its files, their digest and
//! when they were loaded (`GET /admin/config`).

use std::path::PathBuf;

use serde_json::{Value, json};
use time::OffsetDateTime;

/// The configuration in force: its files, their digest, and when it was loaded.
#[derive(Debug, Clone)]
pub struct ConfigInfo {
    pub environment: &'static str,
    pub files: Vec<PathBuf>,
    /// SHA-256 over every file's path and contents, in order.
    pub digest: String,
    pub loaded_at: OffsetDateTime,
}

impl ConfigInfo {
    /// Reads the files of `config` now (just after they were loaded).
    pub fn of(config: &crate::config::Config) -> Self {
        let files = &config.config_files;
        let environment = match config.environment {
            crate::config::Environment::Int => "INT",
            crate::config::Environment::Prod => "PROD",
        };
        let mut all = Vec::new();
        for f in files {
            all.extend_from_slice(f.display().to_string().as_bytes());
            all.push(0);
            // Read as the loader read them: a regular file of bounded size (a file swapped
            // since for a pipe or a device must not hang or exhaust the reload).
            all.extend_from_slice(
                &certs::load::read_regular_file(f, crate::config::MAX_CONFIG_FILE)
                    .unwrap_or_default(),
            );
            all.push(0);
        }
        Self {
            environment,
            files: files.clone(),
            digest: certs::identity::sha256(&all).to_string(),
            loaded_at: OffsetDateTime::now_utc(),
        }
    }

    pub fn view(&self, node: &str) -> Value {
        json!({
            "environment": self.environment,
            "node": node,
            "files": self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "sha256": self.digest,
            "loaded_at": crate::pipeline::stamp::rfc3339_millis(self.loaded_at),
        })
    }
}
