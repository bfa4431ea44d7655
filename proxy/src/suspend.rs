//! Suspensions: administrators cut a consumer or a provider off at once when an incident
//! is suspected.
//!
//! Every request checks the current sets (one atomic load, no lock), so a suspension
//! applies to the next request on every connection, including keep-alive connections
//! that are already open. Changes are copy-on-write and written to a JSON file, so a
//! suspension survives a restart: an incident does not end because a pod was rescheduled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// The suspended consumers and providers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    pub consumers: BTreeSet<String>,
    pub providers: BTreeSet<String>,
}

/// Which kind of party an admin call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Consumer,
    Provider,
}

/// The live suspension sets, and where they are kept.
#[derive(Debug)]
pub struct SuspensionStore {
    current: ArcSwap<Suspended>,
    file: Option<PathBuf>,
    /// Serialises writers; readers never take it.
    write: Mutex<()>,
}

impl SuspensionStore {
    /// Loads the sets from `file` (absent file: nothing suspended).
    pub fn open(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let current = match &file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)?;
                serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("suspensions file {} is not valid: {e}", path.display())
                })?
            }
            _ => Suspended::default(),
        };
        Ok(Self {
            current: ArcSwap::from_pointee(current),
            file,
            write: Mutex::new(()),
        })
    }

    pub fn snapshot(&self) -> Arc<Suspended> {
        self.current.load_full()
    }

    /// The suspensions in force, for a decision taken at once (not held across awaits).
    pub fn current(&self) -> arc_swap::Guard<Arc<Suspended>> {
        self.current.load()
    }

    /// Suspends or resumes; returns whether anything changed. The new state is on disk
    /// before it takes effect, so a crash cannot silently lift a suspension.
    pub fn set(&self, party: Party, id: &str, suspended: bool) -> anyhow::Result<bool> {
        let _guard = self
            .write
            .lock()
            .map_err(|_| anyhow::anyhow!("suspension store poisoned"))?;
        let mut next = (*self.current.load_full()).clone();
        let set = match party {
            Party::Consumer => &mut next.consumers,
            Party::Provider => &mut next.providers,
        };
        let changed = if suspended {
            set.insert(id.to_owned())
        } else {
            set.remove(id)
        };
        if changed {
            if let Some(path) = &self.file {
                write_atomically(path, &serde_json::to_vec_pretty(&next)?)?;
            }
            self.current.store(Arc::new(next));
        }
        Ok(changed)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl policy::Suspensions for Suspended {
    fn consumer_suspended(&self, consumer: &str) -> bool {
        !self.consumers.is_empty() && self.consumers.contains(consumer)
    }

    fn provider_suspended(&self, provider: &str) -> bool {
        !self.providers.is_empty() && self.providers.contains(provider)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use policy::Suspensions;

    #[test]
    fn suspensions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s/suspensions.json");
        let store = SuspensionStore::open(Some(file.clone())).unwrap();
        assert!(store.set(Party::Consumer, "bxl", true).unwrap());
        assert!(!store.set(Party::Consumer, "bxl", true).unwrap());
        assert!(store.set(Party::Provider, "rrn", true).unwrap());
        assert!(store.snapshot().consumer_suspended("bxl"));
        let again = SuspensionStore::open(Some(file)).unwrap();
        assert!(again.snapshot().consumer_suspended("bxl"));
        assert!(again.snapshot().provider_suspended("rrn"));
        assert!(again.set(Party::Consumer, "bxl", false).unwrap());
        assert!(!again.snapshot().consumer_suspended("bxl"));
    }
}
