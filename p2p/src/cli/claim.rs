//! A daemon's claim on its home, taken before anything else the daemon does.
//!
//! `errand-desktop run &` followed at once by `errand-desktop pair` used to race: `pair` found
//! no daemon answering yet, opened the home itself to serve the pairing in the foreground, and
//! the daemon gave up waiting for the home. Now a daemon first takes an exclusive lock on
//! [`CLAIM_FILE`] and keeps it for its whole life; a command that finds the claim taken waits
//! for the daemon's control socket instead of opening the home itself.
//!
//! - A command only looks at the claim with a shared lock that it drops at once, so looking
//!   never blocks anyone for long; a daemon taking the claim tries again for [`CLAIM_RETRY`]
//!   before deciding that another daemon holds it.
//! - The lock is the operating system's (`flock`): a daemon that dies releases it with no
//!   clean-up. The file stays in the home; only its lock means anything.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{self, Write as _},
    path::Path,
    time::{Duration, Instant},
};

/// The claim file's name inside a home.
pub const CLAIM_FILE: &str = "errand.daemon";

/// How long a daemon keeps trying for a claim that looks taken: far longer than a command's
/// look at it (microseconds), far shorter than a person notices.
const CLAIM_RETRY: Duration = Duration::from_millis(300);

/// A daemon's claim on a home, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DaemonClaim {
    _file: File,
}

impl DaemonClaim {
    /// Takes the claim on `home` (creating the home if needed), `Ok(None)` when another daemon
    /// holds it.
    pub fn take(home: &Path) -> io::Result<Option<Self>> {
        make_home(home)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(home.join(CLAIM_FILE))?;
        let deadline = Instant::now() + CLAIM_RETRY;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        // For messages only: which process claims the home.
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Some(Self { _file: file }))
    }
}

/// True while a daemon holds the claim on `home` (a daemon starting, running, or waiting for
/// another process to let go of the home).
pub fn claimed(home: &Path) -> bool {
    let Ok(file) = File::open(home.join(CLAIM_FILE)) else {
        return false;
    };
    match file.try_lock_shared() {
        // Dropping the file releases the look at once.
        Ok(()) => false,
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

/// The process id the claim file names, for messages.
pub fn claimant(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join(CLAIM_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Creates the home, private to its owner, as the store would.
fn make_home(home: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(home)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_seen_until_it_is_dropped_and_a_second_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        assert!(!claimed(&home), "no claim file yet");
        let claim = DaemonClaim::take(&home).unwrap().expect("first claim");
        assert!(claimed(&home));
        assert_eq!(claimant(&home), Some(std::process::id()));
        // Another open file description, as another daemon process would have.
        assert!(DaemonClaim::take(&home).unwrap().is_none());
        // Looking did not take it: the holder still holds it, and a look after a look works.
        assert!(claimed(&home));
        drop(claim);
        assert!(!claimed(&home));
        assert!(DaemonClaim::take(&home).unwrap().is_some());
    }
}
