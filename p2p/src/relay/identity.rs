//! The relay's keypair file: read it, or create it once with owner-only permissions.

use std::{
    io::{self, Write as _},
    path::Path,
};

use libp2p::identity::Keypair;
use tracing::{info, warn};

use super::error::IdentityError;

/// Reads the protobuf-encoded keypair at `path`, or creates a new ed25519 one there.
///
/// A new file is created with mode 0600 (its directory with 0700) and never overwrites an
/// existing file, so two relays started at once end up with the same identity.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, IdentityError> {
    match std::fs::read(path) {
        Ok(bytes) => decode_identity(path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_identity(path),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn decode_identity(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let keypair =
        Keypair::from_protobuf_encoding(bytes).map_err(|source| IdentityError::Decode {
            path: path.to_owned(),
            source,
        })?;
    warn_if_readable_by_others(path);
    Ok(keypair)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), "identity file is accessible to other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn create_identity(path: &Path) -> Result<Keypair, IdentityError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|source| IdentityError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(IdentityError::Encode)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(file) => file,
        // Another process created it between our read and our create: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path).map_err(|source| IdentityError::Read {
                path: path.to_owned(),
                source,
            })?;
            return decode_identity(path, &bytes);
        }
        Err(source) => {
            return Err(IdentityError::Write {
                path: path.to_owned(),
                source,
            });
        }
    };
    if let Err(source) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
        // Leave no half-written key behind to fail the next start.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(IdentityError::Write {
            path: path.to_owned(),
            source,
        });
    }
    let peer_id = keypair.public().to_peer_id();
    info!(path = %path.display(), %peer_id, "created relay identity");
    Ok(keypair)
}
