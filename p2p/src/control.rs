//! The local control socket: a daemon serves its own home's CLI over a Unix socket that only
//! the home's owner can use. One JSON request per connection, one JSON reply. The transport
//! is typed: [`serve`] hands its handler the request already parsed (`api::Request`), and
//! [`call`] returns the reply as the response type the caller asked for.
//!
//! - [`socket_location`] picks the path: `control.sock` in the home, or, when the home's path is
//!   too long for a socket address, a file in a *private* directory: `$XDG_RUNTIME_DIR/errand`,
//!   else `errand-<uid>` in the temp dir. Never a shared directory, where another user could
//!   take the name first.
//! - [`serve`] creates that private directory with mode 0700 and checks it (ours, 0700, not a
//!   symlink) before binding; it refuses a directory someone else prepared. The socket file is
//!   removed when the serving task ends (abort, or the runtime shutting down after SIGTERM).
//! - The server answers only peers of the home owner's uid; [`call`] talks only to a server of
//!   its own uid (peer credentials), so a squatted socket is refused on both sides.

use std::{
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

/// The socket's file name inside a home.
const SOCKET_FILE: &str = "control.sock";
/// Unix socket paths must fit in `sun_path` (108 bytes on Linux, 104 on macOS); leave margin.
const MAX_SOCKET_PATH: usize = 100;
/// The private directory inside `$XDG_RUNTIME_DIR` (itself per user, 0700) for sockets of homes
/// whose path is too long.
const RUNTIME_SUBDIR: &str = "errand";
/// Prefix of the per-uid private directory in the temp dir when there is no `XDG_RUNTIME_DIR`;
/// the uid follows, so each user has their own and finds it again.
const TEMP_SUBDIR_PREFIX: &str = "errand-";
/// The only mode a private socket directory may have: its owner alone can list it, create names
/// in it or reach the socket through it.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Bytes of the home path's SHA-256 that name its socket in a private directory: 64 bits keep
/// the homes of one user apart while the path stays far below [`MAX_SOCKET_PATH`].
const SOCKET_NAME_HASH_BYTES: usize = 8;
/// Largest request or reply line. Replies carry a whole thread as JSON; 64 MiB matches the
/// sync frame cap.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// How long a client waits for the daemon to answer (a `send --wait` polls, so each call is
/// short).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply on the wire: `{"ok": <response>}` or `{"err": {code, message}}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Ok(T),
    Err { code: i32, message: String },
}

/// An error a handler returns: an exit code for the CLI and a message for the person.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The CLI exit code (DESIGN.md section 9).
    pub code: i32,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// A general error (exit 1).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
    /// With a specific exit code.
    pub fn with_code(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A private socket directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketDirError {
    /// Creating the directory failed (for another reason than that it exists).
    #[error("cannot create the private control socket directory {}", .dir.display())]
    Create {
        /// The directory.
        dir: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The directory cannot be inspected.
    #[error("cannot inspect the control socket directory {}", .dir.display())]
    Inspect {
        /// The directory.
        dir: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The name is a symbolic link (or another non-directory), which could lead anywhere.
    #[error(
        "the control socket directory {} is not a plain directory (a symbolic link or a file); \
         another user may have put it there to take over the socket: remove it, or use a \
         shorter --home so the socket lives in the home",
        .dir.display()
    )]
    NotADirectory {
        /// The directory.
        dir: PathBuf,
    },
    /// Another user owns the directory.
    #[error(
        "the control socket directory {} belongs to uid {owner}, not to you (uid {uid}); \
         another user may have created it to take over the socket: remove it (as root), set \
         XDG_RUNTIME_DIR to a private directory, or use a shorter --home",
        .dir.display()
    )]
    ForeignOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        uid: u32,
    },
    /// Others may use the directory.
    #[error(
        "the control socket directory {} has mode {mode:04o}, so other users may use it; it \
         must be 0700: remove it or `chmod 700` it",
        .dir.display()
    )]
    NotPrivate {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// For [`serve`], whose callers print an `io::Error`'s text only: the message carries the causes.
impl From<SocketDirError> for io::Error {
    fn from(e: SocketDirError) -> Self {
        let kind = match &e {
            SocketDirError::Create { source, .. } | SocketDirError::Inspect { source, .. } => {
                source.kind()
            }
            _ => io::ErrorKind::PermissionDenied,
        };
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        io::Error::new(kind, message)
    }
}

/// Why calling the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon answers on the socket.
    #[error("no daemon answers on {0}")]
    Unreachable(PathBuf),
    /// The daemon answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The exchange failed midway.
    #[error("control socket error: {0}")]
    Io(String),
}

/// Handles one request of type `Q` with a response of type `R`.
pub type Handler<Q, R> =
    Arc<dyn Fn(Q) -> Pin<Box<dyn Future<Output = Result<R, ApiError>> + Send>> + Send + Sync>;

/// Where a home's control socket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketLocation {
    /// `control.sock` inside the home.
    InHome(PathBuf),
    /// A socket in a private directory, because the home's path is too long.
    Private {
        /// The directory: mode 0700, owned by the user.
        dir: PathBuf,
        /// The socket inside it.
        path: PathBuf,
    },
}

impl SocketLocation {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        match self {
            Self::InHome(path) | Self::Private { path, .. } => path,
        }
    }
}

/// Where the control socket of `home` lives, given the environment: `$XDG_RUNTIME_DIR` when set,
/// else the temp dir (`$TMPDIR`), for homes whose path is too long.
pub fn socket_location(home: &Path) -> SocketLocation {
    socket_location_in(
        home,
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        &std::env::temp_dir(),
        effective_uid(),
    )
}

/// Where a home's control socket lives: see [`socket_location`].
pub fn socket_path(home: &Path) -> PathBuf {
    socket_location(home).path().to_owned()
}

fn socket_location_in(
    home: &Path,
    runtime_dir: Option<PathBuf>,
    temp_dir: &Path,
    uid: u32,
) -> SocketLocation {
    let inside = home.join(SOCKET_FILE);
    if inside.as_os_str().len() <= MAX_SOCKET_PATH {
        return SocketLocation::InHome(inside);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    let name = format!("{}.sock", hex::encode(&digest[..SOCKET_NAME_HASH_BYTES]));
    let candidates = runtime_dir
        .filter(|d| d.is_absolute())
        .map(|d| d.join(RUNTIME_SUBDIR))
        .into_iter()
        .chain([temp_dir.join(format!("{TEMP_SUBDIR_PREFIX}{uid}"))]);
    let mut last = None;
    for dir in candidates {
        let path = dir.join(&name);
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return SocketLocation::Private { dir, path };
        }
        last = Some(SocketLocation::Private { dir, path });
    }
    // Both too long: binding fails with an error naming the path.
    last.unwrap_or(SocketLocation::InHome(inside))
}

fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `dir` with mode 0700 if it is missing, then checks that it is a private directory of
/// ours, whoever created it.
fn ensure_private_dir(dir: &Path) -> Result<(), SocketDirError> {
    match std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
    {
        // The umask may have taken bits away; ours alone, the directory gets exactly 0700.
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .map_err(|source| SocketDirError::Create {
                dir: dir.to_owned(),
                source,
            })?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(SocketDirError::Create {
                dir: dir.to_owned(),
                source,
            });
        }
    }
    check_private_dir(dir)
}

/// Checks, without following a symlink, that `dir` is a directory owned by our effective uid
/// with mode 0700.
fn check_private_dir(dir: &Path) -> Result<(), SocketDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| SocketDirError::Inspect {
        dir: dir.to_owned(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(SocketDirError::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    let uid = effective_uid();
    if meta.uid() != uid {
        return Err(SocketDirError::ForeignOwner {
            dir: dir.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != PRIVATE_DIR_MODE {
        return Err(SocketDirError::NotPrivate {
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn owner_uid(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.uid())
}

/// Removes the socket file when the serving task ends, unless the name meanwhile points at
/// another file (a daemon started after this one let go of the home).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket this daemon bound.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn bound(path: PathBuf) -> Self {
        let id = file_id(&path);
        Self { path, id }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves the control socket of `home` until the returned task is aborted (or the runtime shuts
/// down); the socket file is removed then. Fails with the text of a [`SocketDirError`] when the
/// private socket directory is not ours alone.
pub fn serve<Q, R>(home: &Path, handler: Handler<Q, R>) -> io::Result<tokio::task::JoinHandle<()>>
where
    Q: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    let location = socket_location(home);
    if let SocketLocation::Private { dir, .. } = &location {
        ensure_private_dir(dir)?;
    }
    let path = location.path().to_owned();
    // We hold the home's store lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let socket = SocketFile::bound(path.clone());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = owner_uid(home);
    Ok(tokio::spawn(async move {
        // Dropped with this task: removes the socket file.
        let _socket = socket;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Only the home's owner may talk to its daemon.
            let uid = stream.peer_cred().ok().map(|c| c.uid());
            if owner.is_none() || uid != owner {
                tracing::warn!(?uid, "refused a control connection from another user");
                continue;
            }
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = serve_one(stream, handler).await;
            });
        }
    }))
}

async fn serve_one<Q, R>(stream: UnixStream, handler: Handler<Q, R>) -> std::io::Result<()>
where
    Q: DeserializeOwned,
    R: Serialize,
{
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_LINE as u64);
    use tokio::io::AsyncReadExt;
    rd.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Q>(&line) {
        Ok(req) => match handler(req).await {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Err {
                code: e.code,
                message: e.message,
            },
        },
        Err(e) => Reply::Err {
            code: 2,
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

/// Sends one request to the daemon of `home` and reads its reply as `R`.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    home: &Path,
    request: &Q,
    timeout: Duration,
) -> Result<R, ControlError> {
    let location = socket_location(home);
    let path = location.path().to_owned();
    if let SocketLocation::Private { dir, .. } = &location {
        match check_private_dir(dir) {
            Ok(()) => {}
            Err(SocketDirError::Inspect { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Err(ControlError::Unreachable(path));
            }
            Err(e) => return Err(ControlError::Io(e.to_string())),
        }
    }
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|_| ControlError::Unreachable(path.clone()))?;
    check_server_uid(&stream, &path)?;
    let exchange = async {
        let mut req = serde_json::to_vec(request).map_err(|e| ControlError::Io(e.to_string()))?;
        req.push(b'\n');
        stream
            .write_all(&req)
            .await
            .map_err(|e| ControlError::Io(e.to_string()))?;
        let mut line = String::new();
        use tokio::io::AsyncReadExt;
        let mut rd = BufReader::new(stream).take(MAX_LINE as u64);
        rd.read_line(&mut line)
            .await
            .map_err(|e| ControlError::Io(e.to_string()))?;
        if line.is_empty() {
            return Err(ControlError::Unreachable(path.clone()));
        }
        match serde_json::from_str::<Reply<R>>(&line)
            .map_err(|e| ControlError::Io(e.to_string()))?
        {
            Reply::Ok(v) => Ok(v),
            Reply::Err { code, message } => Err(ControlError::Api(ApiError { code, message })),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Io(format!("the daemon did not answer within {timeout:?}")))?
}

/// Refuses a server that does not run as our own uid: whoever answers on the socket gets our
/// requests and writes the CLI's output (a pairing ticket, a task's result).
fn check_server_uid(stream: &UnixStream, path: &Path) -> Result<(), ControlError> {
    let uid = effective_uid();
    let server = stream.peer_cred().map_err(|e| {
        ControlError::Io(format!(
            "cannot learn who serves the control socket {}: {e}",
            path.display()
        ))
    })?;
    if server.uid() != uid {
        return Err(ControlError::Io(format!(
            "the control socket {} is served by uid {}, not by you (uid {uid}); another user \
             may have taken its name, so nothing was sent: stop that process or remove the \
             socket, then start the daemon again",
            path.display(),
            server.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_home_keeps_its_socket_inside() {
        let home = Path::new("/home/me/.local/share/errand/desktop");
        let location = socket_location_in(home, None, Path::new("/tmp"), 1000);
        assert_eq!(location, SocketLocation::InHome(home.join(SOCKET_FILE)));
    }

    #[test]
    fn a_long_home_gets_a_socket_in_a_private_directory_never_directly_in_a_shared_one() {
        // Root cause of the regression: a long home put its socket straight into the temp dir,
        // where any user could create the name first.
        let home = PathBuf::from(format!("/home/me/{}", "x".repeat(120)));
        let tmp = Path::new("/tmp");
        let SocketLocation::Private { dir, path } = socket_location_in(&home, None, tmp, 1000)
        else {
            panic!("expected a private location");
        };
        assert_eq!(dir, tmp.join("errand-1000"));
        assert_eq!(path.parent(), Some(dir.as_path()));
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH);

        let runtime = PathBuf::from("/run/user/1000");
        let location = socket_location_in(&home, Some(runtime.clone()), tmp, 1000);
        let SocketLocation::Private { dir, .. } = location else {
            panic!("expected a private location");
        };
        assert_eq!(dir, runtime.join(RUNTIME_SUBDIR));

        // Two homes, two sockets.
        let other = PathBuf::from(format!("/home/me/{}", "y".repeat(120)));
        assert_ne!(
            socket_location_in(&home, None, tmp, 1000),
            socket_location_in(&other, None, tmp, 1000)
        );
    }

    #[test]
    fn a_private_directory_is_created_0700_and_a_loose_or_linked_one_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errand-test");
        ensure_private_dir(&dir).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, PRIVATE_DIR_MODE);
        assert_eq!(meta.uid(), effective_uid());
        // Again: it exists and is fine.
        ensure_private_dir(&dir).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err();
        assert!(
            matches!(err, SocketDirError::NotPrivate { mode: 0o777, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("must be 0700"), "{err}");

        let link = root.path().join("errand-link");
        std::fs::create_dir(root.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.path().join("elsewhere"), &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err();
        assert!(
            matches!(err, SocketDirError::NotADirectory { .. }),
            "{err:?}"
        );
    }
}
