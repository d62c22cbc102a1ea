//! Pieces both CLIs share: the home, logging, network flags, running a request either on this
//! process's own peer or through the daemon that holds the home, and printing.
//!
//! - A one-shot command uses the daemon when one answers on the home's control socket, else
//!   opens the home itself for the moment it needs ([`open`]).
//! - A daemon claims its home before anything else ([`claim`]); a command that finds the claim
//!   taken waits for that daemon to answer instead of opening the home itself.
//! - While a one-shot command holds the home, other commands wait for it up to [`LOCK_WAIT`],
//!   then name it; a daemon waits for as long as it runs, saying what it waits for.
//! - [`Opened::call`] runs one typed request there; [`show`] runs one and prints its response,
//!   as JSON with `--json`, else as text ([`print`]). Both CLIs print through it.
//! - Human output passes text from the thread through [`printable`]; `--json` prints it exactly.

pub mod claim;
mod print;
pub mod routine;
mod transfer;

pub use claim::DaemonClaim;
pub use print::{Show, print_json, print_text, printable, show, task_line};
pub use routine::RoutineCommand;
pub use transfer::{export, import};

use std::{path::PathBuf, time::Duration};

use errand_core::DeviceKind;
use errand_crdt::StoreError;
use libp2p::Multiaddr;

use crate::{
    api::{self, Call, Request, exit},
    control::{self, ApiError, ControlError},
    peer::{Peer, PeerConfig, PeerError},
};

/// Network flags shared by the daemons.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Address to listen on (repeatable). Default: all interfaces, TCP, a random port.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Turn LAN discovery (mDNS) off.
    #[arg(long)]
    pub no_mdns: bool,
    /// A relay to stay reachable through, e.g. /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW…
    /// (repeatable; remembered in the home). Phones also learn it from the pairing ticket.
    #[arg(long = "relay", value_name = "MULTIADDR")]
    pub relays: Vec<Multiaddr>,
    /// Reach peers only through relay circuits: no direct dials, no mDNS, no hole punching.
    /// For testing the relayed path.
    #[arg(long)]
    pub relay_only: bool,
}

impl NetArgs {
    /// The listen addresses, with the default filled in.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        if self.listen.is_empty() {
            // A literal that always parses.
            vec!["/ip4/0.0.0.0/tcp/0".parse().unwrap_or(Multiaddr::empty())]
        } else {
            self.listen.clone()
        }
    }
}

/// The home directory: `--home`, else `ERRAND_HOME` (clap reads it), else the platform's data
/// directory plus `errand/<kind>`.
pub fn home_dir(flag: Option<PathBuf>, kind: &str) -> PathBuf {
    let home = flag.unwrap_or_else(|| {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("errand")
            .join(kind)
    });
    // Made absolute: a task runs in its own folder, and the paths the desktop hands it
    // (`$ERRAND_OUT`, `$ERRAND_ATTACHMENTS`) must hold from there (`--home ./desk` gave
    // tasks a relative `$ERRAND_OUT` they could not write to).
    std::path::absolute(&home).unwrap_or(home)
}

/// Logs to stderr, filtered by `RUST_LOG` (default: `default` for our crates, and warnings of
/// the libraries, or only their errors when `default` is `error`: the demo's story is not
/// interrupted by a connection closing at its end).
pub fn init_logging(default: &str) {
    let others = if default == "error" { "error" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{others},errand={default},errand_p2p={default},errand_desktop={default},errand_mobile={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// How long a command waits for a home that another process holds without answering on its
/// control socket. A one-shot command holds it for well under a second (open, answer, close),
/// and a daemon serves its control socket within a second or two of taking it; 10 s covers
/// both on a slow, busy machine, and is still short enough to sit through.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How often a waiting command looks at the home again: short next to a one-shot's hold.
const LOCK_POLL: Duration = Duration::from_millis(25);

/// How long a command waits for a daemon that has claimed the home to answer: a daemon opens
/// its thread, starts its network and serves its socket within seconds, unless it is itself
/// waiting for another process to let go of the home.
pub const DAEMON_START_WAIT: Duration = Duration::from_secs(30);

/// A wait shorter than this goes unmentioned.
const SAY_AFTER: Duration = Duration::from_secs(1);

/// How often a daemon waiting for the home says again what it waits for.
const REMIND_EVERY: Duration = Duration::from_secs(30);

/// Either this process holds the home, or a daemon does.
#[derive(Debug)]
pub enum Opened {
    /// We opened the home.
    Local(Peer),
    /// A daemon holds it; talk to it at this home.
    Daemon(PathBuf),
}

/// Parses this process's arguments as `C` (exiting with clap's message and code on a bad
/// one), and names the process after `bin` and its subcommands (see [`name_process`]).
pub fn parse<C: clap::Parser>(bin: &str) -> C {
    let matches = C::command().get_matches();
    let parsed = C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    name_process(bin, &matches);
    parsed
}

/// Names this process in the holder record of the homes it opens, as `bin` and its
/// subcommands (`errand-desktop devices revoke`), never their arguments: a pairing ticket in
/// an argument is a secret.
pub fn name_process(bin: &str, matches: &clap::ArgMatches) {
    let mut command = bin.to_owned();
    let mut m = matches;
    while let Some((name, sub)) = m.subcommand() {
        command.push(' ');
        command.push_str(name);
        m = sub;
    }
    errand_crdt::holder::set_command(command);
}

/// Opens the home for a one-shot command (no network), or finds the daemon that holds it.
pub async fn open(home: PathBuf, kind: DeviceKind) -> Result<Opened, ApiError> {
    open_with(PeerConfig::local(home, kind)).await
}

/// Opens the home with `config` (for a command that goes online itself when no daemon runs),
/// or finds the daemon that holds it. While a daemon claims the home ([`claim`]) but does not
/// answer yet, waits up to [`DAEMON_START_WAIT`] for it; while another process holds the home
/// without answering on its control socket (another one-shot command), up to [`LOCK_WAIT`].
pub async fn open_with(config: PeerConfig) -> Result<Opened, ApiError> {
    let home = config.home.clone();
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        if daemon_answers(&home).await {
            return Ok(Opened::Daemon(home));
        }
        let starting = claim::claimed(&home);
        if !starting && let Some(peer) = try_open(&config)? {
            return Ok(Opened::Local(peer));
        }
        let waited = started.elapsed();
        if starting {
            if waited >= DAEMON_START_WAIT {
                return Err(not_started(&home));
            }
            if !said && waited >= SAY_AFTER {
                said = true;
                eprintln!(
                    "waiting for the daemon starting for {} to answer…",
                    home.display()
                );
            }
        } else if waited >= LOCK_WAIT {
            return Err(locked(&home));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Opens the home for a daemon (`errand-desktop run`, `errand-phone daemon`), after claiming
/// it ([`claim`]) so that commands started meanwhile wait for this daemon. Another daemon is
/// refused. A process that holds the home (a one-shot command, or `pair` serving a pairing in
/// the foreground) is waited for as long as it runs, saying so; one that cannot be named, up
/// to [`LOCK_WAIT`].
pub async fn open_daemon(config: PeerConfig) -> Result<(Peer, DaemonClaim), ApiError> {
    let home = config.home.clone();
    // Taking the claim may retry for a moment (see [`DaemonClaim::take`]): off the runtime.
    let taken = {
        let home = home.clone();
        tokio::task::spawn_blocking(move || DaemonClaim::take(&home))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    let claim = match taken {
        Ok(Some(claim)) => claim,
        Ok(None) => {
            let by = claim::claimant(&home).map_or_else(String::new, |p| format!(" (pid {p})"));
            return Err(ApiError::with_code(
                exit::LOCKED,
                format!(
                    "a daemon already runs for {}{by}; stop it first, or use another --home",
                    home.display()
                ),
            ));
        }
        Err(e) => {
            return Err(ApiError::new(format!(
                "cannot claim the home {}: {e}",
                home.display()
            )));
        }
    };
    // Since when no live holder is recorded (a holder removes its record just before it lets
    // go of the home, so a missing record alone does not mean a stuck process).
    let mut unnamed_since = tokio::time::Instant::now();
    let mut said = None;
    let mut last_said = unnamed_since;
    loop {
        if let Some(peer) = try_open(&config)? {
            if said.is_some() {
                tracing::info!(home = %home.display(), "the home is free; starting");
            }
            return Ok((peer, claim));
        }
        let holder = errand_crdt::holder::Holder::read(&home);
        let now = tokio::time::Instant::now();
        if holder.is_some() {
            unnamed_since = now;
        } else if now.duration_since(unnamed_since) >= LOCK_WAIT {
            return Err(ApiError::with_code(
                exit::LOCKED,
                format!(
                    "cannot start: the home {} is still held by another process after waiting \
                     {} s; stop that process (or let it finish) and start again, or use \
                     another --home",
                    home.display(),
                    LOCK_WAIT.as_secs()
                ),
            ));
        }
        // Said when a holder is named or changes, and again every half minute.
        let text = holder.map(|h| h.to_string());
        let news = text.is_some() && said.as_ref() != Some(&text);
        if news
            || (said.is_none() && text.is_none())
            || now.duration_since(last_said) >= REMIND_EVERY
        {
            last_said = now;
            tracing::info!(
                home = %home.display(),
                holder = text.as_deref().unwrap_or("another process"),
                "the home is held by another process; starting as soon as it lets go"
            );
            said = Some(text);
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Opens the home, `None` while another process holds it.
fn try_open(config: &PeerConfig) -> Result<Option<Peer>, ApiError> {
    match Peer::open(config.clone()) {
        Ok(p) => Ok(Some(p)),
        Err(PeerError::Store(StoreError::Locked(_))) => Ok(None),
        Err(e) => Err(ApiError::new(e.to_string())),
    }
}

/// True if a daemon accepts connections on the home's control socket.
async fn daemon_answers(home: &std::path::Path) -> bool {
    tokio::net::UnixStream::connect(control::socket_path(home))
        .await
        .is_ok()
}

/// Who holds the home, for a message.
fn holder_text(home: &std::path::Path) -> String {
    errand_crdt::holder::Holder::read(home)
        .map_or_else(|| "another process".to_owned(), |h| h.to_string())
}

/// A daemon claimed the home but has not answered within [`DAEMON_START_WAIT`] (exit 5).
fn not_started(home: &std::path::Path) -> ApiError {
    let by = claim::claimant(home).map_or_else(String::new, |p| format!(" (pid {p})"));
    let waiting_for = match errand_crdt::holder::Holder::read(home) {
        Some(h) if h.pid != claim::claimant(home).unwrap_or(0) => {
            format!("; it is waiting for {h} to let go of the home")
        }
        _ => String::new(),
    };
    ApiError::with_code(
        exit::LOCKED,
        format!(
            "the daemon for {}{by} has not answered on {} after {} s{waiting_for}; try again \
             in a moment",
            home.display(),
            control::socket_path(home).display(),
            DAEMON_START_WAIT.as_secs()
        ),
    )
}

/// The home is held by a process that does not answer on the control socket (exit 5).
fn locked(home: &std::path::Path) -> ApiError {
    ApiError::with_code(
        exit::LOCKED,
        format!(
            "the home {} is locked by {}, which does not answer on {}; stop that process or \
             use another --home",
            home.display(),
            holder_text(home),
            control::socket_path(home).display()
        ),
    )
}

impl Opened {
    /// Runs a request on this process's peer, or through the daemon.
    pub async fn call<C: Call>(&self, call: C) -> Result<C::Response, ApiError> {
        self.call_within(call, control::CALL_TIMEOUT).await
    }

    /// Like [`Self::call`], waiting up to `timeout` for a daemon's answer (a download).
    pub async fn call_within<C: Call>(
        &self,
        call: C,
        timeout: std::time::Duration,
    ) -> Result<C::Response, ApiError> {
        match self {
            Opened::Local(peer) => call.run(peer).await,
            Opened::Daemon(home) => {
                let req: Request = call.into();
                control::call(home, &req, timeout)
                    .await
                    .map_err(|e| daemon_error(home, e))
            }
        }
    }

    /// Lets go of the home: shuts this process's peer down (a daemon's goes on).
    pub async fn close(self) {
        if let Opened::Local(peer) = self {
            peer.shutdown().await;
        }
    }
}

/// A one-shot command: opens the home with `config` but no network (or finds its daemon),
/// runs `f`, and lets go of the home again.
pub async fn one_shot(
    config: PeerConfig,
    f: impl AsyncFnOnce(&Opened) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    init_logging("warn");
    let opened = open_with(config).await?;
    let out = f(&opened).await;
    opened.close().await;
    out
}

/// Maps a control failure to the CLI's error, with exit 5 when the daemon does not answer.
pub fn daemon_error(home: &std::path::Path, e: ControlError) -> ApiError {
    match e {
        ControlError::Api(e) => e,
        ControlError::Unreachable(_) => locked(home),
        ControlError::Io(m) => ApiError::with_code(exit::LOCKED, m),
    }
}

/// Prints a result (JSON or text) and returns the exit code; errors go to stderr.
pub fn finish(result: Result<(), ApiError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            std::process::ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}

/// Serves the control socket for a running daemon's peer.
pub fn serve_control(peer: &Peer) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let p = peer.clone();
    control::serve(
        peer.home(),
        std::sync::Arc::new(move |req: Request| {
            let p = p.clone();
            Box::pin(async move { api::handle(&p, req).await })
        }),
    )
}

/// Ctrl-C or SIGTERM, listened for from the moment it is made.
///
/// Make it before the daemon says it is running: a handler installed later leaves a window in
/// which SIGTERM kills the process the default way, and its control socket is left behind.
#[derive(Debug)]
pub struct Shutdown {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Shutdown {
    /// Installs the handlers now. Where that fails, waits for Ctrl-C only.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signals = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops");
                    None
                }
            };
            Self { signals }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves at the first Ctrl-C or SIGTERM since [`Shutdown::listen`].
    pub async fn wait(self) {
        #[cfg(unix)]
        if let Some((mut int, mut term)) = self.signals {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The command forms, each as a person types it after `bin`, that `C` does not parse, with
/// clap's reason: what a CLI's test of its README forms asserts is empty.
pub fn forms_that_fail<C: clap::Parser>(bin: &str, forms: &[&[&str]]) -> Vec<String> {
    forms
        .iter()
        .filter_map(|form| {
            let argv = std::iter::once(bin).chain(form.iter().copied());
            C::try_parse_from(argv)
                .err()
                .map(|e| format!("{bin} {}: {e}", form.join(" ")))
        })
        .collect()
}

/// Parses a size in bytes: a number, or one with a unit such as `64KiB`, `10MiB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 65536, 64KiB, 10MiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration like `30s` or `10m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s or 10m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_home_is_made_absolute() {
        let home = home_dir(Some(PathBuf::from("desk")), "desktop");
        assert!(home.is_absolute(), "{}", home.display());
        assert_eq!(home, std::env::current_dir().unwrap().join("desk"));
        let given = std::env::temp_dir().join("errand-home");
        assert_eq!(home_dir(Some(given.clone()), "phone"), given);
    }
}
