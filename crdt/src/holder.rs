//! Who holds a home. The store's lock says only *that* a process holds it, so the process that
//! takes the lock records itself in a small file next to the store, and a process that finds
//! the home locked reads it to say *which* one does.
//!
//! - [`set_command`] names what this process does (`errand-desktop status`), once, early.
//! - [`crate::Store::open`] writes the file once it holds the lock; dropping the store removes it.
//! - [`Holder::read`] reads it back, or `None` when no live process is recorded.

use std::{fmt, path::Path, sync::OnceLock};

/// The holder file's name inside a home.
pub const HOLDER_FILE: &str = "errand.holder";

/// Longest command recorded: a subcommand path, not a whole command line.
const MAX_COMMAND: usize = 200;

static COMMAND: OnceLock<String> = OnceLock::new();

/// Names what this process does (for example `errand-desktop run`) in the holder file of every
/// home it opens from now on. The first call wins. Name the command, not its arguments: a
/// pairing ticket in an argument is a secret, and other processes print this text.
pub fn set_command(command: impl Into<String>) {
    let _ = COMMAND.set(command.into());
}

/// The process that holds a home, as it recorded itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// What it does, as it named itself with [`set_command`] (else its executable's name).
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (pid {})", self.command, self.pid)
    }
}

impl Holder {
    /// The holder recorded in `home`, if the file is there, well formed, and (where the system
    /// tells) its process is alive.
    pub fn read(home: &Path) -> Option<Holder> {
        let text = std::fs::read_to_string(home.join(HOLDER_FILE)).ok()?;
        let (pid, command) = text.split_once('\n')?;
        let holder = Holder {
            pid: pid.trim().parse().ok()?,
            command: clean(command),
        };
        holder.is_alive().then_some(holder)
    }

    #[cfg(target_os = "linux")]
    fn is_alive(&self) -> bool {
        Path::new("/proc").join(self.pid.to_string()).exists()
    }

    #[cfg(not(target_os = "linux"))]
    fn is_alive(&self) -> bool {
        true
    }
}

/// One line of printable text, bounded.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_COMMAND)
        .collect::<String>()
        .trim()
        .to_owned()
}

fn this_command() -> String {
    COMMAND.get().cloned().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "an Errand process".to_owned())
    })
}

/// Records this process as the holder of `home`. Call only while holding its lock. Best
/// effort: the record is for messages, and the lock alone keeps the home safe.
pub(crate) fn record(home: &Path) {
    let path = home.join(HOLDER_FILE);
    let text = format!("{}\n{}\n", std::process::id(), clean(&this_command()));
    if let Err(e) = std::fs::write(&path, text) {
        tracing::debug!(error = %e, path = %path.display(), "could not record the home's holder");
    }
}

/// Removes the record if it names this process. Call before releasing the lock.
pub(crate) fn clear(home: &Path) {
    let ours = Holder::read(home).is_some_and(|h| h.pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(home.join(HOLDER_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_holder_reads_back_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path());
        let h = Holder::read(dir.path()).unwrap();
        assert_eq!(h.pid, std::process::id());
        assert!(!h.command.is_empty());
        clear(dir.path());
        assert_eq!(Holder::read(dir.path()), None);
    }

    #[test]
    fn a_malformed_or_dead_holder_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HOLDER_FILE), "not a pid\nx\n").unwrap();
        assert_eq!(Holder::read(dir.path()), None);
        // Above the kernel's pid limit (2^22), so never a live process.
        std::fs::write(dir.path().join(HOLDER_FILE), "4294967295\nx\n").unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(Holder::read(dir.path()), None);
    }

    #[test]
    fn the_command_is_one_printable_line() {
        assert_eq!(clean("errand\u{1b}[2J run\r"), "errand[2J run");
    }
}
