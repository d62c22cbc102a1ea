//! `errand-desktop service` as a person runs it: the real binary, a temporary home and config
//! directory, and a fake `systemctl` on PATH. The real `systemctl` is never called; the
//! printed unit is checked by `systemd-analyze verify` where that exists.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BIN: &str = env!("CARGO_BIN_EXE_errand-desktop");

/// A scratch directory with a home, a config directory and a PATH of fake tools.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("errand home")
    }

    fn user_home(&self) -> PathBuf {
        self.dir.path().join("user")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn bin(&self) -> PathBuf {
        let bin = self.dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        bin
    }

    fn unit_path(&self) -> PathBuf {
        self.config()
            .join("systemd")
            .join("user")
            .join("errand-desktop.service")
    }

    fn systemctl_log(&self) -> PathBuf {
        self.dir.path().join("systemctl.log")
    }

    /// Puts a `systemctl` on the scratch PATH that logs its arguments, one call a line, and
    /// runs `body` (a shell snippet; `$1` is `--user`, `$2` the verb).
    fn fake_systemctl(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.bin().join("systemctl");
        let script = format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\n{body}\n",
            self.systemctl_log().display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn systemctl_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.systemctl_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Runs `errand-desktop --home <home> args` with only the scratch PATH, HOME and
    /// XDG_CONFIG_HOME in its environment.
    fn run(&self, args: &[&str]) -> Output {
        run_bin(Path::new(BIN), &self.home(), args, self)
    }
}

fn run_bin(bin: &Path, home: &Path, args: &[&str], scratch: &Scratch) -> Output {
    Command::new(bin)
        .env_clear()
        .env("PATH", scratch.bin())
        .env("HOME", scratch.user_home())
        .env("XDG_CONFIG_HOME", scratch.config())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The binary's path as the running process sees it (`/proc/self/exe` resolves links).
fn exe() -> String {
    std::fs::canonicalize(BIN)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn print_for_linux_shows_a_unit_that_runs_this_binary_with_the_home() {
    let s = Scratch::new();
    let out = s.run(&["service", "install", "--print", "--platform", "linux"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unit = text(&out.stdout);
    let home = s.home();
    let exec = format!(
        "ExecStart={} run --home \"{}\"",
        exe(),
        home.to_str().unwrap()
    );
    for line in [
        "[Service]",
        exec.as_str(),
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        "[Install]",
        "WantedBy=default.target",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "no line {line:?} in\n{unit}"
        );
    }
    assert!(unit.lines().any(|l| l.starts_with("Description=")));
    assert!(!s.config().exists(), "--print wrote something");
    assert!(s.systemctl_calls().is_empty());
}

#[test]
fn print_for_macos_shows_a_launchd_agent_with_the_home_and_its_log() {
    let s = Scratch::new();
    let out = s.run(&["service", "install", "--print", "--platform", "macos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plist = text(&out.stdout);
    let home = s.home().to_str().unwrap().to_owned();
    let args = format!(
        "<array>\n\t\t<string>{}</string>\n\t\t<string>run</string>\n\t\t<string>--home</string>\n\t\t<string>{home}</string>\n\t</array>",
        exe()
    );
    for part in [
        "<key>Label</key>\n\t<string>org.errand.desktop</string>",
        args.as_str(),
        "<key>RunAtLoad</key>\n\t<true/>",
        "<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>",
        &format!("<key>StandardOutPath</key>\n\t<string>{home}/logs/daemon.log</string>"),
        &format!("<key>StandardErrorPath</key>\n\t<string>{home}/logs/daemon.log</string>"),
    ] {
        assert!(plist.contains(part), "no {part:?} in\n{plist}");
    }
    assert!(!s.user_home().exists(), "--print wrote something");
}

/// `systemd-analyze verify` on the printed unit, for a copy of the binary in a directory whose
/// name has a space, `%` and `$`: verify checks that ExecStart's program exists, so it fails
/// unless systemd reads the quoting back to the real path. (systemd refuses a quote or a
/// backslash in a program's path, so those are only in the home, an argument.)
#[test]
fn the_printed_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = find_on_path("systemd-analyze") else {
        println!("skipped: systemd-analyze is not on PATH");
        return;
    };
    let s = Scratch::new();
    // Beside the binary, so that a hard link does instead of a copy.
    let mut odd = tempfile::Builder::new();
    odd.prefix("odd dir 100%h ${HOME} $x ");
    let odd = odd
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .or_else(|_| odd.tempdir())
        .unwrap();
    let bin = odd.path().join("errand-desktop");
    if std::fs::hard_link(BIN, &bin).is_err() {
        std::fs::copy(BIN, &bin).unwrap();
    }
    let home = odd.path().join("home \"q\" 'h' \\b 50% ${HOME} $x");
    let out = run_bin(
        &bin,
        &home,
        &["service", "install", "--print", "--platform", "linux"],
        &s,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);

    match verify(&analyze, &printed) {
        Verdict::Accepted(mode) => println!("systemd-analyze verify ({mode}) accepts the unit"),
        Verdict::Complaints(lines) => panic!(
            "systemd-analyze verify complains about the unit:\n{}\n\nthe unit:\n{printed}",
            lines.join("\n")
        ),
        Verdict::Environment(why) => {
            println!("skipped: systemd-analyze verify cannot run here: {why}");
            return;
        }
    }

    // The check has teeth: the same unit with a program that does not exist is refused.
    let missing = printed.replacen("/errand-desktop\" run", "/no-such-program\" run", 1);
    assert_ne!(missing, printed);
    assert!(
        matches!(verify(&analyze, &missing), Verdict::Complaints(_)),
        "systemd-analyze verify accepted a unit whose program does not exist"
    );
}

/// What `systemd-analyze verify` made of a unit.
enum Verdict {
    /// No word about the unit, in this mode (`--user` or `system`).
    Accepted(&'static str),
    /// Its messages about the unit, a warning included.
    Complaints(Vec<String>),
    /// It failed in every mode without a word about the unit: the environment, not the unit.
    Environment(String),
}

/// Writes `unit` as `errand-desktop.service` in a temporary directory and runs
/// `systemd-analyze verify --user` on it, then without `--user` if that cannot run here.
/// Messages about the machine's own units are not ours to fix, so only those that name our
/// unit count.
fn verify(analyze: &Path, unit: &str) -> Verdict {
    let scratch = tempfile::tempdir().unwrap();
    let units = scratch.path().join("units");
    let runtime = scratch.path().join("runtime");
    std::fs::create_dir(&units).unwrap();
    std::fs::create_dir(&runtime).unwrap();
    let path = units.join("errand-desktop.service");
    std::fs::write(&path, unit).unwrap();
    let mut failures = Vec::new();
    for mode in ["--user", "system"] {
        let mut cmd = Command::new(analyze);
        cmd.arg("verify");
        if mode == "--user" {
            // The user manager wants a private runtime directory, which a CI container lacks.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
            cmd.arg("--user")
                .env("XDG_RUNTIME_DIR", &runtime)
                .env("XDG_CONFIG_HOME", scratch.path().join("config"));
        }
        let out = cmd.arg(&path).output().unwrap();
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        let ours: Vec<String> = all
            .lines()
            .filter(|l| l.contains("errand-desktop.service") || l.contains(units.to_str().unwrap()))
            .map(str::to_owned)
            .collect();
        if !ours.is_empty() {
            return Verdict::Complaints(ours);
        }
        if out.status.success() {
            return Verdict::Accepted(mode);
        }
        failures.push(format!("{mode}: {}", all.trim().replace('\n', " / ")));
    }
    Verdict::Environment(failures.join("; "))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(target_os = "linux")]
#[test]
fn install_without_a_working_systemd_writes_nothing_and_says_what_to_do() {
    // No systemctl at all, then one that fails as in a container without systemd.
    for fake in [
        None,
        Some("echo 'Failed to connect to bus: No medium found' >&2\nexit 1"),
    ] {
        let s = Scratch::new();
        if let Some(body) = fake {
            s.fake_systemctl(body);
        }
        let out = s.run(&["service", "install"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("systemd's user manager is not available"),
            "{err}"
        );
        assert!(err.contains("nothing was installed"), "{err}");
        assert!(err.contains("@reboot"), "{err}");
        assert!(err.contains("tmux"), "{err}");
        assert!(err.contains("install --print"), "{err}");
        match fake {
            None => assert!(err.contains("no `systemctl` on PATH"), "{err}"),
            Some(_) => {
                assert!(err.contains("No medium found"), "{err}");
                assert_eq!(s.systemctl_calls(), ["--user show-environment"]);
            }
        }
        assert!(!s.unit_path().exists());
        assert!(!s.config().exists(), "install wrote under the config dir");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn install_writes_the_unit_and_enables_it_and_uninstall_removes_it() {
    let s = Scratch::new();
    s.fake_systemctl(
        "case \"$2\" in is-active) echo active ;; is-enabled) echo enabled ;; esac\nexit 0",
    );

    let out = s.run(&["service", "install"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unit = std::fs::read_to_string(s.unit_path()).unwrap();
    let exec = format!("ExecStart={} run --home \"{}\"", exe(), s.home().display());
    assert!(unit.lines().any(|l| l == exec), "no {exec:?} in\n{unit}");
    assert_eq!(
        s.systemctl_calls(),
        [
            "--user show-environment",
            "--user daemon-reload",
            "--user enable --now errand-desktop.service",
        ]
    );
    assert!(
        stdout.contains("journalctl --user -u errand-desktop"),
        "{stdout}"
    );
    assert!(stdout.contains("loginctl enable-linger"), "{stdout}");

    let out = s.run(&["service", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["platform"], "linux");
    assert_eq!(status["manager"], "systemd");
    assert_eq!(status["installed"], true);
    assert_eq!(status["path"], s.unit_path().to_str().unwrap());
    assert_eq!(status["active"], "active");
    assert_eq!(status["enabled"], "enabled");

    std::fs::remove_file(s.systemctl_log()).unwrap();
    let out = s.run(&["service", "uninstall"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!s.unit_path().exists());
    assert_eq!(
        s.systemctl_calls(),
        [
            "--user show-environment",
            "--user disable --now errand-desktop.service",
            "--user daemon-reload",
        ]
    );

    let out = s.run(&["service", "uninstall"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("not installed"),
        "{}",
        text(&out.stdout)
    );

    let out = s.run(&["service", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["installed"], false);
}

#[cfg(target_os = "linux")]
#[test]
fn install_that_cannot_enable_the_unit_leaves_no_unit_behind() {
    let s = Scratch::new();
    s.fake_systemctl(
        "if [ \"$2\" = enable ]; then echo 'Failed to enable unit: Access denied' >&2; exit 1; fi\nexit 0",
    );
    let out = s.run(&["service", "install"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("was not installed"), "{err}");
    assert!(err.contains("Access denied"), "{err}");
    assert!(!s.unit_path().exists());
    assert_eq!(
        s.systemctl_calls().last().map(String::as_str),
        Some("--user daemon-reload")
    );
}

#[cfg(target_os = "linux")]
#[test]
fn install_for_another_platform_is_refused_in_words() {
    let s = Scratch::new();
    s.fake_systemctl("exit 0");
    let out = s.run(&["service", "install", "--platform", "macos"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not run macOS"), "{err}");
    assert!(err.contains("--print"), "{err}");
    assert!(s.systemctl_calls().is_empty());
    assert!(!s.user_home().exists());
}
