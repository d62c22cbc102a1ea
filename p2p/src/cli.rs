//! Pieces both CLIs share: the home, logging, network flags, running a request either on this
//! process's own peer or through the daemon that holds the home, and printing.
//!
//! - A one-shot command uses the daemon when one answers on the home's control socket, else
//!   opens the home itself for the moment it needs ([`open`]).
//! - While another process holds the home without answering (a one-shot command, a daemon still
//!   starting), commands and daemons wait for it up to [`LOCK_WAIT`], then name the holder.
//! - Human output passes text from the thread through [`printable`]; `--json` prints it exactly.

use std::{path::PathBuf, time::Duration};

use errand_core::DeviceKind;
use errand_crdt::StoreError;
use libp2p::Multiaddr;

use crate::{
    api::{self, Request, exit},
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
    /// Applies the relay flags to a peer before it starts.
    pub fn apply(&self, peer: &Peer) {
        peer.set_relays(self.relays.clone(), self.relay_only);
    }

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
    flag.unwrap_or_else(|| {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("errand")
            .join(kind)
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default: `default` for our crates).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,errand={default},errand_p2p={default},errand_desktop={default},errand_mobile={default}")));
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

/// Either this process holds the home, or a daemon does.
#[derive(Debug)]
pub enum Opened {
    /// We opened the home.
    Local(Peer),
    /// A daemon holds it; talk to it at this home.
    Daemon(PathBuf),
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
    open_with(PeerConfig {
        home,
        kind,
        name: None,
        listen: Vec::new(),
        mdns: false,
    })
    .await
}

/// Opens the home with `config` (for a command that goes online itself when no daemon runs),
/// or finds the daemon that holds it. While another process holds the home without answering
/// on its control socket (another one-shot command, or a daemon still starting), waits up to
/// [`LOCK_WAIT`] for either to change.
pub async fn open_with(config: PeerConfig) -> Result<Opened, ApiError> {
    let home = config.home.clone();
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        if let Some(peer) = try_open(&config)? {
            return Ok(Opened::Local(peer));
        }
        if daemon_answers(&home).await {
            return Ok(Opened::Daemon(home));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(locked(&home));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Opens the home for a daemon (`errand-desktop run`, `errand-phone daemon`). A one-shot
/// command that holds the home is waited for, up to [`LOCK_WAIT`]; another daemon is not.
pub async fn open_daemon(config: PeerConfig) -> Result<Peer, ApiError> {
    let home = config.home.clone();
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut waiting = false;
    loop {
        if let Some(peer) = try_open(&config)? {
            return Ok(peer);
        }
        if daemon_answers(&home).await {
            return Err(ApiError::with_code(
                exit::LOCKED,
                format!(
                    "a daemon already runs for {}: {}; stop it first, or use another --home",
                    home.display(),
                    holder_text(&home)
                ),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::with_code(
                exit::LOCKED,
                format!(
                    "cannot start: the home {} is still held by {} after waiting {} s; stop \
                     that process (or let it finish) and start again, or use another --home",
                    home.display(),
                    holder_text(&home),
                    LOCK_WAIT.as_secs()
                ),
            ));
        }
        if !waiting {
            waiting = true;
            tracing::info!(
                home = %home.display(),
                holder = %holder_text(&home),
                "the home is held by another process; waiting for it"
            );
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

/// Runs a request locally or through the daemon.
pub async fn execute(opened: &Opened, req: Request) -> Result<serde_json::Value, ApiError> {
    match opened {
        Opened::Local(peer) => api::handle(peer, req).await,
        Opened::Daemon(home) => {
            let value = serde_json::to_value(&req).map_err(|e| ApiError::new(e.to_string()))?;
            control::call(home, &value, control::CALL_TIMEOUT)
                .await
                .map_err(|e| daemon_error(home, e))
        }
    }
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
        std::sync::Arc::new(move |value| {
            let p = p.clone();
            Box::pin(async move {
                let req: Request = serde_json::from_value(value).map_err(|e| {
                    ApiError::with_code(exit::USAGE, format!("unknown request: {e}"))
                })?;
                api::handle(&p, req).await
            })
        }),
    )
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Parses a duration like `30s` or `10m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s or 10m"))
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    // A closed pipe (`… --json | head`) is not an error worth a panic.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    );
}

/// Human text for a status value.
pub fn print_status(v: &serde_json::Value) {
    let s = |k: &str| printable(v.get(k).and_then(|x| x.as_str()).unwrap_or("-"), false);
    println!("peer id:   {}", s("peer_id"));
    println!("name:      {}", s("name"));
    println!("thread:    {}", s("thread_id"));
    println!(
        "running:   {}",
        if v.get("running").and_then(|x| x.as_bool()).unwrap_or(false) {
            "yes"
        } else {
            "no (no daemon holds this home)"
        }
    );
    for a in v
        .get("listen_addrs")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        println!("listening: {}", a.as_str().unwrap_or(""));
    }
    let peers = v
        .get("peers")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default();
    if peers.is_empty() {
        println!("peers:     none trusted yet");
    }
    for p in peers {
        let g = |k: &str| printable(p.get(k).and_then(|x| x.as_str()).unwrap_or("-"), false);
        let connected = p
            .get("connected")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        println!(
            "peer:      {} {} ({}) {}{} last sync {}",
            g("id"),
            g("name"),
            g("kind"),
            if connected {
                g("path")
            } else {
                "offline".into()
            },
            if p.get("in_sync").and_then(|x| x.as_bool()).unwrap_or(false) {
                ", in sync"
            } else {
                ""
            },
            g("last_sync_at"),
        );
    }
}

/// Human text for a task value: one line, its instruction's first line.
pub fn print_task(t: &serde_json::Value) {
    let g = |k: &str| t.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let reqs: Vec<String> = t
        .get("requests")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(|s| printable(&s.replace('_', " "), false)))
        .collect();
    println!(
        "{}  {:<17} {}{}",
        printable(g("id"), false),
        printable(g("status"), false),
        printable(g("instruction").lines().next().unwrap_or(""), false),
        if reqs.is_empty() {
            String::new()
        } else {
            format!("  [{}]", reqs.join(", "))
        }
    );
}

/// Text from the thread (instructions, task output, device names) made safe for a terminal:
/// escape sequences (CSI, OSC and the other ESC forms, and their 8-bit C1 twins) and every other
/// control character are dropped, and so are the bidirectional overrides that reorder what a
/// reader sees. With `multiline`, newline and tab stay. JSON output never goes through this:
/// serde escapes control characters, and a script gets the exact text.
pub fn printable(text: &str, multiline: bool) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(end) = escape_end(&chars, i) {
            i = end;
            continue;
        }
        let keep = match c {
            '\n' | '\t' => multiline,
            c if c.is_control() => false,
            c => !is_bidi_control(c),
        };
        if keep {
            out.push(c);
        }
        i += 1;
    }
    out
}

/// If an escape sequence starts at `i`, the index just past it. An unterminated string
/// sequence (OSC and kin) counts as its introducer only, so the text after it stays visible.
fn escape_end(chars: &[char], i: usize) -> Option<usize> {
    const ESC: char = '\u{1b}';
    const BEL: char = '\u{7}';
    let (kind, body) = match (chars[i], chars.get(i + 1).copied()) {
        (ESC, Some('[')) | ('\u{9b}', _) => {
            (Escape::Csi, if chars[i] == ESC { i + 2 } else { i + 1 })
        }
        (ESC, Some(']' | 'P' | 'X' | '^' | '_')) => (Escape::String, i + 2),
        ('\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}', _) => (Escape::String, i + 1),
        (ESC, Some(c)) if (' '..='/').contains(&c) || ('0'..='~').contains(&c) => {
            (Escape::Short, i + 1)
        }
        _ => return None,
    };
    match kind {
        // Parameters and intermediates, then one final byte.
        Escape::Csi => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                j += 1;
                if ('@'..='~').contains(&c) {
                    return Some(j);
                }
                if !(' '..='?').contains(&c) {
                    // Not a CSI byte: the sequence ends before it.
                    return Some(j - 1);
                }
            }
            Some(j)
        }
        // Up to BEL, ESC \ or 8-bit ST.
        Escape::String => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                match c {
                    BEL | '\u{9c}' => return Some(j + 1),
                    ESC if chars.get(j + 1) == Some(&'\\') => return Some(j + 2),
                    _ => j += 1,
                }
            }
            Some(body)
        }
        // Intermediates, then one final byte.
        Escape::Short => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                j += 1;
                if !(' '..='/').contains(&c) {
                    return Some(j);
                }
            }
            Some(j)
        }
    }
}

#[derive(Clone, Copy)]
enum Escape {
    Csi,
    String,
    Short,
}

/// Unicode's bidirectional formatting characters (embeddings, overrides, isolates, marks).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Prints a task's output (or any multi-line text from the thread) as [`printable`] text.
pub fn print_text(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(printable(text, true).as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_and_controls_are_dropped() {
        let cases = [
            ("\u{1b}[31mred\u{1b}[0m", "red"),
            ("\u{1b}[?1049h\u{1b}[2J\u{1b}[Hclear", "clear"),
            ("a\u{1b}]0;title\u{7}b", "ab"),
            (
                "a\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\b",
                "alinkb",
            ),
            ("a\u{1b}Pdcs\u{1b}\\b", "ab"),
            ("a\u{1b}(Bb\u{1b}7c\u{1b}Md", "abcd"),
            ("a\u{9b}31mb\u{9d}0;t\u{9c}c", "abc"),
            ("bell\u{7} back\u{8}space\r", "bell backspace"),
            ("a\u{202e}cba\u{2066}d\u{200f}", "acbad"),
            (
                "unterminated \u{1b}]0;still shown",
                "unterminated 0;still shown",
            ),
            ("trailing \u{1b}", "trailing "),
            ("ünïcödé ✓", "ünïcödé ✓"),
        ];
        for (input, want) in cases {
            assert_eq!(printable(input, false), want, "{input:?}");
        }
    }

    #[test]
    fn newline_and_tab_stay_only_in_multi_line_text() {
        assert_eq!(printable("a\tb\r\nc\n", true), "a\tb\nc\n");
        assert_eq!(printable("a\tb\r\nc\n", false), "abc");
    }
}
