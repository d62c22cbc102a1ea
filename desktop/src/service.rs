//! `errand-desktop service`: the daemon as a service of the user's service manager, started at
//! login and restarted after a crash.
//!
//! - [`ServiceSpec`] says what runs: this executable, `run --home <home>`, and where launchd
//!   writes its output. [`render_systemd_unit`] and [`render_launchd_plist`] turn it into the
//!   file's text; they do no I/O.
//! - `install` renders first (a path a unit file cannot hold is refused before anything
//!   happens), then checks that the service manager answers, and only then writes the file and
//!   starts the service. With `--print` it prints the file and does nothing else, for either
//!   platform on any machine.
//! - Linux: a systemd user unit, `systemctl --user daemon-reload` and `enable --now`. Without a
//!   working `systemctl --user` (no systemd, a container) nothing is written and the error says
//!   how else to keep the daemon running.
//! - macOS: a launchd agent in `~/Library/LaunchAgents`, loaded with `launchctl bootstrap`.
//! - `uninstall` stops the service and removes the file; nothing installed is not an error.
//!   `status` says whether the file exists and what the service manager says about it.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use errand_p2p::{
    api::{ApiError, exit},
    cli,
};
use serde::Serialize;

/// The systemd unit's name.
pub const UNIT_NAME: &str = "errand-desktop.service";

/// The launchd agent's label, and its plist's name without `.plist`.
pub const LAUNCHD_LABEL: &str = "org.errand.desktop";

/// Under launchd the daemon's stdout and stderr go to this file in the log directory (systemd
/// sends them to the journal instead).
pub const DAEMON_LOG: &str = "daemon.log";

/// After a crash, wait this long before starting again: a daemon that fails at once restarts
/// 1 in 5 s, under systemd's default limit of 5 starts in 10 s.
const RESTART_SEC: u32 = 5;

/// How long the service manager waits after SIGTERM before SIGKILL. The daemon gives running
/// tasks up to 12 s to stop and record `interrupted`, then flushes and closes its store; 30 s
/// leaves room on a slow disk. launchd's `ExitTimeOut` takes the same value.
const STOP_TIMEOUT_SEC: u32 = 30;

/// `errand-desktop service` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Install `errand-desktop run` for this home as your user's service, and start it.
    ///
    /// A systemd user unit on Linux, a launchd agent on macOS. It starts again at login and
    /// after a crash. Without a working `systemctl --user` nothing is written, and the error
    /// says how else to keep the daemon running.
    Install {
        /// Print the file that would be written, and do nothing else.
        #[arg(long)]
        print: bool,
        /// Which service manager's file: linux (systemd) or macos (launchd). Default: this
        /// machine's. Only --print works for the other one.
        #[arg(long, value_enum, value_name = "PLATFORM")]
        platform: Option<Platform>,
    },
    /// Stop the service and remove its file (fine when nothing is installed).
    Uninstall,
    /// Whether the service is installed, where its file is, and whether it runs.
    Status {
        /// Print JSON: {platform, manager, name, path, installed, active, enabled}.
        #[arg(long)]
        json: bool,
    },
}

/// A platform with a service manager this module writes files for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// systemd, as a user unit.
    Linux,
    /// launchd, as a user agent.
    Macos,
}

impl Platform {
    /// The platform this process runs on, if it is one of ours.
    pub fn current() -> Option<Platform> {
        match std::env::consts::OS {
            "linux" => Some(Platform::Linux),
            "macos" => Some(Platform::Macos),
            _ => None,
        }
    }

    fn manager(self) -> &'static str {
        match self {
            Platform::Linux => "systemd",
            Platform::Macos => "launchd",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Platform::Linux => "Linux",
            Platform::Macos => "macOS",
        }
    }
}

/// What the service runs: `<exe> run --home <home>`, with launchd's output in `log_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The absolute path of the `errand-desktop` executable.
    pub exe: PathBuf,
    /// The absolute path of the desktop's home.
    pub home: PathBuf,
    /// Where launchd writes the daemon's output (the home's `logs` directory).
    pub log_dir: PathBuf,
}

impl ServiceSpec {
    /// The spec for this home: its `logs` directory, as the runner's.
    pub fn new(exe: PathBuf, home: PathBuf) -> Self {
        let log_dir = home.join(errand_desktop::runner::LOGS_DIR);
        Self { exe, home, log_dir }
    }

    /// The daemon's command line, every path as text.
    fn argv(&self) -> Result<Vec<String>, RenderError> {
        Ok(vec![
            path_text(&self.exe)?,
            "run".to_owned(),
            "--home".to_owned(),
            path_text(&self.home)?,
        ])
    }

    fn log_file(&self) -> Result<String, RenderError> {
        path_text(&self.log_dir.join(DAEMON_LOG))
    }
}

/// Why a spec cannot become a service file.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Unit files and plists are UTF-8 text.
    #[error(
        "the path {0:?} is not valid UTF-8, which a service file cannot hold; use a path that is"
    )]
    NotUtf8(PathBuf),
    /// A newline or other control character would break the file's syntax.
    #[error(
        "the path {0:?} contains a control character (such as a newline), which a service file \
         cannot hold; use a path without one"
    )]
    ControlCharacter(String),
    /// The service must not depend on the directory it was installed from.
    #[error("the path {0:?} is not absolute")]
    NotAbsolute(PathBuf),
    /// systemd refuses to run a program whose path has a quote or a backslash, however quoted.
    #[error(
        "systemd refuses to run a program whose path contains a quote or a backslash, as \
         {0:?} does; put errand-desktop in a directory without one and install from there"
    )]
    SystemdProgramPath(String),
}

fn path_text(path: &Path) -> Result<String, RenderError> {
    if !path.is_absolute() {
        return Err(RenderError::NotAbsolute(path.to_owned()));
    }
    let text = path
        .to_str()
        .ok_or_else(|| RenderError::NotUtf8(path.to_owned()))?;
    if text.chars().any(char::is_control) {
        return Err(RenderError::ControlCharacter(text.to_owned()));
    }
    Ok(text.to_owned())
}

/// The systemd user unit for `spec`.
pub fn render_systemd_unit(spec: &ServiceSpec) -> Result<String, RenderError> {
    let argv = spec.argv()?;
    let mut exec_start = systemd_program(&argv[0])?;
    for arg in &argv[1..] {
        exec_start.push(' ');
        exec_start.push_str(&systemd_word(arg));
    }
    Ok(format!(
        "\
# Written by `errand-desktop service install`; `errand-desktop service uninstall` removes it.
[Unit]
Description=Errand desktop daemon: syncs with your phone and runs its tasks

[Service]
Type=exec
ExecStart={exec_start}
Restart=on-failure
RestartSec={RESTART_SEC}
# Exit 5: another daemon holds this home; starting again would not help.
RestartPreventExitStatus=5
# The daemon stops its own tasks on SIGTERM, so they record `interrupted`; what is left
# when it exits (or at the timeout) gets SIGKILL.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_SEC}

[Install]
WantedBy=default.target
"
    ))
}

/// The program of a systemd command line. Specifiers (`%`) are expanded in it, variables
/// (`$`) are not, and systemd refuses a quote or a backslash in it even when escaped.
fn systemd_program(path: &str) -> Result<String, RenderError> {
    if path.contains(['"', '\'', '\\']) {
        return Err(RenderError::SystemdProgramPath(path.to_owned()));
    }
    Ok(systemd_quoted(path, false))
}

/// An argument of a systemd command line: `%` and `$` doubled (specifiers and variables are
/// expanded in arguments, even inside quotes), and double-quoted with `\` and `"` escaped when
/// it holds anything but plain path characters.
fn systemd_word(arg: &str) -> String {
    systemd_quoted(arg, true)
}

fn systemd_quoted(word: &str, escape_dollar: bool) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@=%$".contains(c));
    let mut out = String::with_capacity(word.len() + 2);
    if !plain {
        out.push('"');
    }
    for c in word.chars() {
        match c {
            '%' => out.push_str("%%"),
            '$' if escape_dollar => out.push_str("$$"),
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    if !plain {
        out.push('"');
    }
    out
}

/// The launchd agent's plist for `spec`.
pub fn render_launchd_plist(spec: &ServiceSpec) -> Result<String, RenderError> {
    let mut args = String::new();
    for a in spec.argv()? {
        let _ = writeln!(args, "\t\t<string>{}</string>", xml_escape(&a));
    }
    let log = xml_escape(&spec.log_file()?);
    Ok(format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by `errand-desktop service install`; `errand-desktop service uninstall` removes it. -->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>{LAUNCHD_LABEL}</string>
	<key>ProgramArguments</key>
	<array>
{args}	</array>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ExitTimeOut</key>
	<integer>{STOP_TIMEOUT_SEC}</integer>
	<key>StandardOutPath</key>
	<string>{log}</string>
	<key>StandardErrorPath</key>
	<string>{log}</string>
</dict>
</plist>
"#
    ))
}

/// Text for an XML element or attribute.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A word for a POSIX shell, for the commands the messages suggest.
fn shell_word(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@=%".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs a `service` subcommand for `home`.
pub fn run(home: &Path, command: ServiceCommand) -> Result<(), ApiError> {
    let failed = |e: anyhow::Error| ApiError::new(format!("{e:#}"));
    match command {
        ServiceCommand::Install { print, platform } => {
            let current = Platform::current();
            let Some(platform) = platform.or(current) else {
                return Err(unsupported());
            };
            let spec = spec(home).map_err(failed)?;
            let text = match platform {
                Platform::Linux => render_systemd_unit(&spec),
                Platform::Macos => render_launchd_plist(&spec),
            }
            .map_err(|e| failed(e.into()))?;
            if print {
                print!("{text}");
                return Ok(());
            }
            if Some(platform) != current {
                return Err(ApiError::with_code(
                    exit::USAGE,
                    format!(
                        "this machine does not run {}, so `install --platform {}` cannot \
                         install there; add --print to see the file it would write",
                        platform.name(),
                        platform.name().to_lowercase()
                    ),
                ));
            }
            match platform {
                Platform::Linux => install_systemd(&spec, &text),
                Platform::Macos => install_launchd(&spec, &text),
            }
            .map_err(failed)
        }
        ServiceCommand::Uninstall => match Platform::current() {
            Some(Platform::Linux) => uninstall_systemd().map_err(failed),
            Some(Platform::Macos) => uninstall_launchd().map_err(failed),
            None => Err(unsupported()),
        },
        ServiceCommand::Status { json } => {
            let status = match Platform::current() {
                Some(Platform::Linux) => status_systemd(),
                Some(Platform::Macos) => status_launchd(),
                None => return Err(unsupported()),
            }
            .map_err(failed)?;
            if json {
                cli::print_json(&status);
            } else {
                status.print();
            }
            Ok(())
        }
    }
}

fn unsupported() -> ApiError {
    ApiError::new(format!(
        "`errand-desktop service` knows systemd (Linux) and launchd (macOS), not {}; run \
         `errand-desktop run` from this system's own service manager instead",
        std::env::consts::OS
    ))
}

/// The spec for this executable and `home`, both absolute.
fn spec(home: &Path) -> Result<ServiceSpec> {
    let exe = std::env::current_exe().context("while finding this executable's path")?;
    if !exe.exists() {
        bail!(
            "this executable's file {} no longer exists (rebuilt or moved since it started?); \
             run the command again",
            exe.display()
        );
    }
    let home = std::path::absolute(home)
        .with_context(|| format!("while making the home {} absolute", home.display()))?;
    Ok(ServiceSpec::new(exe, home))
}

/// The user's home directory, from `HOME`.
fn user_home() -> Result<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => bail!("HOME is not set, so the service file's place is unknown; set HOME"),
    }
}

/// Where systemd looks for this user's units: `$XDG_CONFIG_HOME/systemd/user`, with
/// `~/.config` when XDG_CONFIG_HOME is unset or not absolute (as systemd does).
fn systemd_unit_path() -> Result<PathBuf> {
    let config = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => user_home()?.join(".config"),
    };
    Ok(config.join("systemd").join("user").join(UNIT_NAME))
}

fn launchd_plist_path() -> Result<PathBuf> {
    Ok(user_home()?
        .join("Library")
        .join("LaunchAgents")
        .join(format!("{LAUNCHD_LABEL}.plist")))
}

/// What a service manager's command did.
#[derive(Debug)]
struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Its first line of complaint, for a message.
    fn reason(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        text.lines()
            .find(|l| !l.trim().is_empty())
            .map_or_else(|| "no message".to_owned(), |l| l.trim().to_owned())
    }
}

/// Runs `program args` to the end, its output captured. `Err` when it cannot be started
/// (not on PATH).
fn tool(program: &str, args: &[&str]) -> std::io::Result<Ran> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()?;
    Ok(Ran {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `systemctl --user args`, failing with a sentence that names the command.
fn systemctl(args: &[&str]) -> Result<Ran> {
    let shown = format!("systemctl --user {}", args.join(" "));
    let mut full = vec!["--user"];
    full.extend_from_slice(args);
    let ran = tool("systemctl", &full).with_context(|| format!("while running `{shown}`"))?;
    if !ran.success {
        bail!("`{shown}` failed: {}", ran.reason());
    }
    Ok(ran)
}

/// Whether this user's systemd manager answers: `Err` says why not.
fn systemd_user_manager() -> Result<(), String> {
    match tool("systemctl", &["--user", "show-environment"]) {
        Ok(ran) if ran.success => Ok(()),
        Ok(ran) => Err(format!(
            "`systemctl --user show-environment` failed: {}",
            ran.reason()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("there is no `systemctl` on PATH".to_owned())
        }
        Err(e) => Err(format!("`systemctl` could not be started: {e}")),
    }
}

fn install_systemd(spec: &ServiceSpec, unit: &str) -> Result<()> {
    let path = systemd_unit_path()?;
    if let Err(why) = systemd_user_manager() {
        let command = spec
            .argv()?
            .iter()
            .map(|a| shell_word(a))
            .collect::<Vec<_>>()
            .join(" ");
        // cron reads `%` in a command as a newline unless escaped.
        let cron = command.replace('%', r"\%");
        bail!(
            "systemd's user manager is not available here ({why}), so nothing was installed \
             and {} was not written.\n\
             Keep the daemon running another way, with the command\n\
             \x20 {command}\n\
             - from your init system or supervisor (runit, s6, OpenRC, supervisord, a \
             container's entrypoint);\n\
             - at boot from cron: `crontab -e` and add the line\n\
             \x20 @reboot {cron}\n\
             - or in a terminal multiplexer: tmux new -d -s errand {command}\n\
             `errand-desktop service install --print --platform linux` prints the unit for a \
             machine that runs systemd.",
            path.display(),
        );
    }
    let previous = std::fs::read_to_string(&path).ok();
    write_file(&path, unit)?;
    if let Err(e) = start_systemd(previous.as_deref(), unit) {
        // Leave the machine as it was: the old unit back, or none.
        let undo = match &previous {
            Some(old) => write_file(&path, old),
            None => std::fs::remove_file(&path).map_err(anyhow::Error::from),
        };
        let _ = systemctl(&["daemon-reload"]);
        let left = match undo {
            Ok(()) if previous.is_some() => "the previous unit file is back".to_owned(),
            Ok(()) => format!("{} was removed again", path.display()),
            Err(u) => format!("{} could not be undone: {u:#}", path.display()),
        };
        return Err(e.context(format!("the service was not installed ({left})")));
    }
    println!("wrote {}", path.display());
    println!("ran systemctl --user daemon-reload");
    if previous.as_deref().is_some_and(|old| old != unit) {
        println!("ran systemctl --user try-restart {UNIT_NAME} (the unit changed)");
    }
    println!("ran systemctl --user enable --now {UNIT_NAME}");
    println!(
        "errand-desktop now runs for the home {}, and starts again when you log in and after \
         a crash.",
        spec.home.display()
    );
    println!("logs:    journalctl --user -u errand-desktop -f");
    println!("status:  errand-desktop service status");
    println!(
        "To start it at boot, before you log in, and keep it after you log out: \
         loginctl enable-linger $USER"
    );
    println!(
        "The service has systemd's environment, not your shell's: name executors by absolute \
         path in the config, or set PATH with `systemctl --user set-environment`."
    );
    Ok(())
}

/// Loads the unit and starts it; restarts it when it ran with an older unit.
fn start_systemd(previous: Option<&str>, unit: &str) -> Result<()> {
    systemctl(&["daemon-reload"])?;
    if previous.is_some_and(|old| old != unit) {
        systemctl(&["try-restart", UNIT_NAME])?;
    }
    systemctl(&["enable", "--now", UNIT_NAME])?;
    Ok(())
}

/// Writes `text` to `path` through a temporary file beside it, so that a reader never sees
/// half a file.
fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("while creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("while writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("while writing {}", path.display()))
}

fn uninstall_systemd() -> Result<()> {
    let path = systemd_unit_path()?;
    if !path.exists() {
        println!(
            "errand-desktop is not installed as a service: {} does not exist",
            path.display()
        );
        return Ok(());
    }
    let manager = systemd_user_manager();
    match &manager {
        Ok(()) => match systemctl(&["disable", "--now", UNIT_NAME]) {
            Ok(_) => println!("ran systemctl --user disable --now {UNIT_NAME}"),
            Err(e) => eprintln!("warning: {e:#}; removing the unit file anyway"),
        },
        Err(why) => println!("systemd's user manager is not available ({why}): nothing to stop"),
    }
    std::fs::remove_file(&path).with_context(|| format!("while removing {}", path.display()))?;
    println!("removed {}", path.display());
    if manager.is_ok() {
        systemctl(&["daemon-reload"])?;
        println!("ran systemctl --user daemon-reload");
    }
    Ok(())
}

/// What `service status` reports.
#[derive(Debug, Serialize)]
struct Status {
    platform: Platform,
    manager: &'static str,
    /// The unit's name or the agent's label.
    name: &'static str,
    path: PathBuf,
    installed: bool,
    /// The manager's word for it (`active`, `failed`, `running`, `not loaded`, …), or `None`
    /// when the manager could not be asked.
    active: Option<String>,
    /// systemd's `is-enabled` word; `None` on macOS (an agent in LaunchAgents loads at login)
    /// or when systemd could not be asked.
    enabled: Option<String>,
    /// Why the manager could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
}

impl Status {
    fn print(&self) {
        let state = if self.installed {
            "installed"
        } else {
            "not installed"
        };
        println!("service:  {} ({} user service)", self.name, self.manager);
        println!("file:     {} ({state})", self.path.display());
        if let Some(why) = &self.unavailable {
            println!("{}:  not available: {why}", self.manager);
        }
        if let Some(active) = &self.active {
            println!("active:   {active}");
        }
        if let Some(enabled) = &self.enabled {
            println!("enabled:  {enabled}");
        }
        if self.installed {
            match self.platform {
                Platform::Linux => println!("logs:     journalctl --user -u errand-desktop"),
                Platform::Macos => {
                    println!("logs:     the StandardOutPath in {}", self.path.display())
                }
            }
        }
    }
}

fn status_systemd() -> Result<Status> {
    let path = systemd_unit_path()?;
    let mut status = Status {
        platform: Platform::Linux,
        manager: Platform::Linux.manager(),
        name: UNIT_NAME,
        installed: path.exists(),
        path,
        active: None,
        enabled: None,
        unavailable: None,
    };
    match systemd_user_manager() {
        Ok(()) => {
            // Both exit non-zero for "inactive" and "disabled"; their stdout is the answer.
            let word = |verb: &str| {
                tool("systemctl", &["--user", verb, UNIT_NAME])
                    .ok()
                    .map(|r| r.stdout.trim().to_owned())
                    .filter(|w| !w.is_empty())
            };
            status.active = word("is-active");
            status.enabled = word("is-enabled");
        }
        Err(why) => status.unavailable = Some(why),
    }
    Ok(status)
}

/// `gui/<uid>`: the launchd domain of this user's login session.
fn launchd_domain() -> String {
    format!("gui/{}", nix::unistd::getuid().as_raw())
}

fn install_launchd(spec: &ServiceSpec, plist: &str) -> Result<()> {
    let path = launchd_plist_path()?;
    let domain = launchd_domain();
    // launchd opens the log file but does not create its directory.
    std::fs::create_dir_all(&spec.log_dir)
        .with_context(|| format!("while creating {}", spec.log_dir.display()))?;
    let loaded = tool(
        "launchctl",
        &["print", &format!("{domain}/{LAUNCHD_LABEL}")],
    )
    .is_ok_and(|r| r.success);
    write_file(&path, plist)?;
    println!("wrote {}", path.display());
    if loaded {
        // bootstrap refuses a label that is loaded; unload the old agent first.
        match tool(
            "launchctl",
            &["bootout", &format!("{domain}/{LAUNCHD_LABEL}")],
        ) {
            Ok(r) if r.success => println!("ran launchctl bootout {domain}/{LAUNCHD_LABEL}"),
            Ok(r) => eprintln!("warning: launchctl bootout failed: {}", r.reason()),
            Err(e) => eprintln!("warning: launchctl bootout could not run: {e}"),
        }
    }
    let path_text = path.to_string_lossy();
    let bootstrap = tool("launchctl", &["bootstrap", &domain, &path_text]);
    let failure = match bootstrap {
        Ok(r) if r.success => None,
        Ok(r) => Some(r.reason()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = failure {
        bail!(
            "wrote {} but `launchctl bootstrap {domain} {}` failed: {why}. launchd loads it at \
             your next login; to start it now, try `launchctl load -w {}`, or \
             `errand-desktop service uninstall` to remove it",
            path.display(),
            shell_word(&path_text),
            shell_word(&path_text),
        );
    }
    println!(
        "ran launchctl bootstrap {domain} {}",
        shell_word(&path_text)
    );
    println!(
        "errand-desktop now runs for the home {}, and starts again when you log in and after \
         a crash.",
        spec.home.display()
    );
    println!("logs:    {}", spec.log_dir.join(DAEMON_LOG).display());
    println!("status:  errand-desktop service status");
    println!(
        "The agent has launchd's environment, not your shell's: name executors by absolute \
         path in the config."
    );
    Ok(())
}

fn uninstall_launchd() -> Result<()> {
    let path = launchd_plist_path()?;
    let target = format!("{}/{LAUNCHD_LABEL}", launchd_domain());
    let loaded = tool("launchctl", &["print", &target]).is_ok_and(|r| r.success);
    if loaded {
        match tool("launchctl", &["bootout", &target]) {
            Ok(r) if r.success => println!("ran launchctl bootout {target}"),
            Ok(r) => eprintln!("warning: launchctl bootout {target} failed: {}", r.reason()),
            Err(e) => eprintln!("warning: launchctl could not run: {e}"),
        }
    }
    if !path.exists() {
        if !loaded {
            println!(
                "errand-desktop is not installed as a service: {} does not exist",
                path.display()
            );
        }
        return Ok(());
    }
    std::fs::remove_file(&path).with_context(|| format!("while removing {}", path.display()))?;
    println!("removed {}", path.display());
    Ok(())
}

fn status_launchd() -> Result<Status> {
    let path = launchd_plist_path()?;
    let target = format!("{}/{LAUNCHD_LABEL}", launchd_domain());
    let mut status = Status {
        platform: Platform::Macos,
        manager: Platform::Macos.manager(),
        name: LAUNCHD_LABEL,
        installed: path.exists(),
        path,
        active: None,
        enabled: None,
        unavailable: None,
    };
    match tool("launchctl", &["print", &target]) {
        // `launchctl print` shows `state = running` (or `not running`) for a loaded agent.
        Ok(r) if r.success => {
            let state = r
                .stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix("state = "))
                .unwrap_or("loaded");
            status.active = Some(state.trim().to_owned());
        }
        Ok(_) => status.active = Some("not loaded".to_owned()),
        Err(e) => status.unavailable = Some(format!("`launchctl` could not run: {e}")),
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_at(exe: &str, home: &str) -> ServiceSpec {
        ServiceSpec::new(PathBuf::from(exe), PathBuf::from(home))
    }

    /// The `key=value` lines of `section` in a unit, in order.
    fn section<'a>(unit: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
        let header = format!("[{name}]");
        unit.lines()
            .skip_while(|l| *l != header)
            .skip(1)
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once('=').unwrap_or((l, "")))
            .collect()
    }

    #[test]
    fn the_unit_runs_the_daemon_with_its_home_and_restarts_it_after_a_failure() {
        let spec = spec_at(
            "/usr/local/bin/errand-desktop",
            "/home/ada/.local/share/errand",
        );
        let unit = render_systemd_unit(&spec).unwrap();
        assert_eq!(
            section(&unit, "Unit"),
            [(
                "Description",
                "Errand desktop daemon: syncs with your phone and runs its tasks"
            )]
        );
        assert_eq!(
            section(&unit, "Service"),
            [
                ("Type", "exec"),
                (
                    "ExecStart",
                    "/usr/local/bin/errand-desktop run --home /home/ada/.local/share/errand"
                ),
                ("Restart", "on-failure"),
                ("RestartSec", "5"),
                ("RestartPreventExitStatus", "5"),
                ("KillSignal", "SIGTERM"),
                ("KillMode", "mixed"),
                ("TimeoutStopSec", "30"),
            ]
        );
        assert_eq!(section(&unit, "Install"), [("WantedBy", "default.target")]);
    }

    #[test]
    fn a_path_with_a_space_and_a_percent_is_quoted_and_escaped_for_systemd() {
        let spec = spec_at("/opt/my apps/errand-desktop", "/home/ada/100% errand");
        let unit = render_systemd_unit(&spec).unwrap();
        let exec = section(&unit, "Service")
            .into_iter()
            .find(|(k, _)| *k == "ExecStart")
            .map(|(_, v)| v);
        assert_eq!(
            exec,
            Some(r#""/opt/my apps/errand-desktop" run --home "/home/ada/100%% errand""#)
        );
    }

    #[test]
    fn the_program_path_escapes_specifiers_but_not_dollars_and_refuses_quotes() {
        assert_eq!(systemd_program("/opt/a b/x").unwrap(), r#""/opt/a b/x""#);
        assert_eq!(systemd_program("/opt/100%/x").unwrap(), "/opt/100%%/x");
        // systemd does not expand variables in the program path, so `$` stays single.
        assert_eq!(systemd_program("/opt/$x/y").unwrap(), "/opt/$x/y");
        for bad in [r#"/opt/"q"/x"#, "/opt/it's/x", r"/opt/a\b/x"] {
            let err = systemd_program(bad).unwrap_err();
            assert!(matches!(err, RenderError::SystemdProgramPath(_)), "{bad}");
            assert!(err.to_string().contains("quote or a backslash"), "{err}");
        }
    }

    #[test]
    fn systemd_words_escape_specifiers_variables_backslashes_and_quotes() {
        assert_eq!(systemd_word("/plain/path-1.2_x"), "/plain/path-1.2_x");
        assert_eq!(systemd_word("/a%b"), "/a%%b");
        assert_eq!(systemd_word("/a$HOME"), "/a$$HOME");
        assert_eq!(systemd_word(r"/a\b"), r#""/a\\b""#);
        assert_eq!(systemd_word(r#"/a"b"#), r#""/a\"b""#);
        assert_eq!(systemd_word("/a'b"), r#""/a'b""#);
        assert_eq!(systemd_word("/a\tb"), "\"/a\tb\"");
        assert_eq!(systemd_word("/é"), "\"/é\"");
        assert_eq!(systemd_word(""), r#""""#);
    }

    /// The `<key>` → value pairs of the plist's top-level dict, values as their XML text.
    fn plist_value<'a>(plist: &'a str, key: &str) -> &'a str {
        let start = plist
            .find(&format!("\t<key>{key}</key>\n"))
            .unwrap_or_else(|| panic!("no key {key} in\n{plist}"));
        let rest = &plist[start..];
        let rest = &rest[rest.find('\n').unwrap() + 1..];
        let end = rest
            .find("\n\t<key>")
            .or_else(|| rest.find("\n</dict>"))
            .unwrap();
        rest[..end].trim()
    }

    #[test]
    fn the_plist_runs_the_daemon_at_load_and_again_after_a_crash() {
        let spec = spec_at("/Applications/Errand/errand-desktop", "/Users/ada/errand");
        let plist = render_launchd_plist(&spec).unwrap();
        assert!(plist.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
        assert!(plist.contains("<plist version=\"1.0\">\n<dict>\n"));
        assert!(plist.ends_with("</dict>\n</plist>\n"));
        assert_eq!(
            plist_value(&plist, "Label"),
            "<string>org.errand.desktop</string>"
        );
        assert_eq!(
            plist_value(&plist, "ProgramArguments"),
            "<array>\n\
             \t\t<string>/Applications/Errand/errand-desktop</string>\n\
             \t\t<string>run</string>\n\
             \t\t<string>--home</string>\n\
             \t\t<string>/Users/ada/errand</string>\n\
             \t</array>"
        );
        assert_eq!(plist_value(&plist, "RunAtLoad"), "<true/>");
        assert_eq!(
            plist_value(&plist, "KeepAlive"),
            "<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>"
        );
        assert_eq!(plist_value(&plist, "ExitTimeOut"), "<integer>30</integer>");
        assert_eq!(
            plist_value(&plist, "StandardOutPath"),
            "<string>/Users/ada/errand/logs/daemon.log</string>"
        );
        assert_eq!(
            plist_value(&plist, "StandardErrorPath"),
            "<string>/Users/ada/errand/logs/daemon.log</string>"
        );
    }

    #[test]
    fn plist_strings_are_xml_escaped_and_keep_spaces_and_percents() {
        let spec = spec_at("/Users/a b/100% <&>/errand-desktop", "/Users/a b/\"q\" 'h'");
        let plist = render_launchd_plist(&spec).unwrap();
        let args = plist_value(&plist, "ProgramArguments");
        assert!(
            args.contains("<string>/Users/a b/100% &lt;&amp;&gt;/errand-desktop</string>"),
            "{args}"
        );
        assert!(
            args.contains("<string>/Users/a b/&quot;q&quot; &apos;h&apos;</string>"),
            "{args}"
        );
        assert_eq!(
            plist_value(&plist, "StandardOutPath"),
            "<string>/Users/a b/&quot;q&quot; &apos;h&apos;/logs/daemon.log</string>"
        );
    }

    #[test]
    fn a_path_a_service_file_cannot_hold_is_refused_in_words() {
        let newline = spec_at("/usr/bin/errand-desktop", "/home/ada/two\nlines");
        let err = render_systemd_unit(&newline).unwrap_err();
        assert!(matches!(err, RenderError::ControlCharacter(_)));
        assert!(err.to_string().contains("control character"), "{err}");
        assert!(render_launchd_plist(&newline).is_err());

        let relative = spec_at("errand-desktop", "/home/ada");
        assert!(matches!(
            render_systemd_unit(&relative),
            Err(RenderError::NotAbsolute(_))
        ));

        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt as _;
            let bad = std::ffi::OsStr::from_bytes(b"/home/\xff");
            let spec = ServiceSpec::new(PathBuf::from("/usr/bin/errand-desktop"), bad.into());
            assert!(matches!(
                render_systemd_unit(&spec),
                Err(RenderError::NotUtf8(_))
            ));
        }
    }

    #[test]
    fn shell_words_survive_single_quotes() {
        assert_eq!(shell_word("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(shell_word("/a b"), "'/a b'");
        assert_eq!(shell_word("/it's"), r"'/it'\''s'");
        assert_eq!(shell_word("/a$b"), "'/a$b'");
    }
}
