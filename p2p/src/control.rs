//! The local control socket: a daemon serves its own home's CLI over a Unix socket that only
//! the home's owner can use. One JSON request per connection, one JSON reply.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

/// The socket's file name inside a home.
const SOCKET_FILE: &str = "control.sock";
/// Unix socket paths must fit in `sun_path` (108 bytes on Linux, 104 on macOS); leave margin.
const MAX_SOCKET_PATH: usize = 100;
/// Largest request or reply line. Replies carry a whole thread as JSON; 64 MiB matches the
/// sync frame cap.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// How long a client waits for the daemon to answer (a `send --wait` polls, so each call is
/// short).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(serde_json::Value),
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

/// Handles one request.
pub type Handler = Arc<
    dyn Fn(
            serde_json::Value,
        ) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, ApiError>> + Send>>
        + Send
        + Sync,
>;

/// Where a home's control socket lives: inside the home, or under the runtime directory when
/// the home's path is too long for a socket path.
pub fn socket_path(home: &Path) -> PathBuf {
    let inside = home.join(SOCKET_FILE);
    if inside.as_os_str().len() <= MAX_SOCKET_PATH {
        return inside;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("errand-{}.sock", hex::encode(&digest[..8])))
}

#[cfg(unix)]
fn owner_uid(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.uid())
}

/// Serves the control socket of `home` until the returned task is aborted.
pub fn serve(home: &Path, handler: Handler) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(home);
    // We hold the home's store lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let owner = owner_uid(home);
    Ok(tokio::spawn(async move {
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

async fn serve_one(stream: UnixStream, handler: Handler) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_LINE as u64);
    use tokio::io::AsyncReadExt;
    rd.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<serde_json::Value>(&line) {
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

/// Sends one request to the daemon of `home`.
pub async fn call(
    home: &Path,
    request: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let path = socket_path(home);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|_| ControlError::Unreachable(path.clone()))?;
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
        match serde_json::from_str::<Reply>(&line).map_err(|e| ControlError::Io(e.to_string()))? {
            Reply::Ok(v) => Ok(v),
            Reply::Err { code, message } => Err(ControlError::Api(ApiError { code, message })),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Io(format!("the daemon did not answer within {timeout:?}")))?
}
