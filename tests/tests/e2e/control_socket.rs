//! Where `errand-desktop run` puts its control socket, who may own it, and that it is gone after
//! SIGTERM.
//!
//! Every daemon here gets `TMPDIR` set to the test's own directory and no `XDG_RUNTIME_DIR`, so
//! the private socket directory of a long home is created where the test can inspect (and,
//! for the squatting cases, prepare) it without touching the real temp dir.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use errand_tests::{DEADLINE, bin, is_root, signal};

/// Longer than the 100 bytes a socket path may take, so the socket cannot live in the home.
const LONG_NAME: usize = 110;

/// The uid and gid of `nobody`, standing in for another user.
const OTHER_USER: u32 = 65534;

/// Set for the copy of this test binary that plays the squatter; names the socket to serve.
const SQUATTER_SOCKET_ENV: &str = "ERRAND_TEST_SQUATTER_SOCKET";

/// What the squatter prints once it listens.
const SQUATTER_READY: &str = "squatter listening";

/// The ticket the squatter hands out: a CLI that prints it talked to the wrong process.
const SQUATTER_TICKET: &str = "errand:SQUATTERS-OWN-TICKET";

/// A test's directory: `tmp/` stands in for the temp dir of every process it starts.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `TMPDIR` of the processes the test starts.
    fn tmp(&self) -> Result<PathBuf> {
        let tmp = self.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        Ok(tmp)
    }

    /// The private directory a daemon of ours creates in [`Root::tmp`].
    fn private_dir(&self) -> Result<PathBuf> {
        Ok(self
            .tmp()?
            .join(format!("errand-{}", our_uid(self.path())?)))
    }

    /// A desktop home whose path is too long for a socket path.
    fn long_home(&self) -> PathBuf {
        self.path().join("h".repeat(LONG_NAME)).join("desktop")
    }

    /// `errand-desktop --home <home> <args>` with this test's environment.
    fn command(&self, home: &Path, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(bin("errand-desktop"));
        cmd.arg("--home")
            .arg(home)
            .args(args)
            .env("TMPDIR", self.tmp()?)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("ERRAND_HOME")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    fn run(&self, home: &Path, args: &[&str]) -> Result<Output> {
        Ok(self.command(home, args)?.output()?)
    }

    /// Runs `errand-desktop run` on `home`, which must exit by itself within the deadline (a
    /// refusal); one still running then is killed and reported.
    fn run_refused(&self, home: &Path) -> Result<Output> {
        let mut child = self
            .command(
                home,
                &["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let end = Instant::now() + DEADLINE;
        while child.try_wait()?.is_none() {
            if Instant::now() > end {
                // Our own child, by its pid.
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "errand-desktop run started instead of refusing: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.wait_with_output()?)
    }

    /// Starts `errand-desktop run` on `home` and waits for its "running" line.
    fn start(&self, home: &Path) -> Result<Desktop> {
        let mut child = self
            .command(
                home,
                &["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let desktop = Desktop { child };
        wait_for_line(stdout, "running", "errand-desktop run")?;
        Ok(desktop)
    }
}

/// A running `errand-desktop run`, killed on drop.
struct Desktop {
    child: Child,
}

impl Desktop {
    /// SIGTERM, then waits for the exit.
    fn terminate(mut self) -> Result<std::process::ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < end, "the daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        // Our own child, by its pid; harmless once it has exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `stdout` in a thread until a line contains `marker`, within the deadline.
fn wait_for_line(
    stdout: impl std::io::Read + Send + 'static,
    marker: &str,
    what: &str,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => {
                // Keep draining so the pipe never fills.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Ok(());
            }
            Ok(_) => {}
            Err(_) => bail!("{what} did not print {marker:?}"),
        }
    }
}

/// Our effective uid: the owner of a directory we created.
fn our_uid(created_by_us: &Path) -> Result<u32> {
    Ok(std::fs::metadata(created_by_us)?.uid())
}

/// The sockets in `dir`.
fn sockets_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_socket() {
            found.push(entry.path());
        }
    }
    Ok(found)
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_long_home_puts_its_socket_in_a_private_directory_and_sigterm_removes_it() -> Result<()> {
    // Root cause: a home too long for a socket path put its socket straight into the shared temp
    // dir, where another user could create the name first, and SIGTERM left it behind.
    let root = Root::new()?;
    let home = root.long_home();
    let desktop = root.start(&home)?;

    let dir = root.private_dir()?;
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("no private directory {}", dir.display()))?;
    ensure!(
        meta.file_type().is_dir(),
        "{} is not a directory",
        dir.display()
    );
    ensure!(meta.uid() == our_uid(root.path())?, "owner {}", meta.uid());
    ensure!(
        meta.permissions().mode() & 0o7777 == 0o700,
        "mode {:o}",
        meta.permissions().mode()
    );
    let sockets = sockets_in(&dir)?;
    ensure!(sockets.len() == 1, "{sockets:?}");
    ensure!(
        sockets_in(&root.tmp()?)?.is_empty(),
        "a socket directly in the temp dir"
    );

    // The CLI finds the daemon there.
    let out = root.run(&home, &["status", "--json"])?;
    ensure!(out.status.success(), "status: {}", stderr_of(&out));

    let status = desktop.terminate()?;
    ensure!(status.success(), "exit after SIGTERM: {status}");
    ensure!(
        !sockets[0].exists(),
        "{} left behind after SIGTERM",
        sockets[0].display()
    );
    Ok(())
}

#[test]
fn a_socket_in_the_home_is_removed_after_sigterm() -> Result<()> {
    let root = Root::new()?;
    let home = root.path().join("desktop");
    let desktop = root.start(&home)?;
    let socket = home.join("control.sock");
    ensure!(
        std::fs::symlink_metadata(&socket)?.file_type().is_socket(),
        "no socket at {}",
        socket.display()
    );
    let status = desktop.terminate()?;
    ensure!(status.success(), "exit after SIGTERM: {status}");
    ensure!(!socket.exists(), "{} left behind", socket.display());
    Ok(())
}

#[test]
fn sigterm_as_soon_as_the_socket_appears_is_a_clean_exit() -> Result<()> {
    // Root cause: the SIGTERM handler was installed only once the daemon had printed that it
    // runs, after its control socket existed. A SIGTERM in between killed it the default way
    // (exit by signal 15) and left the socket behind; CI hit that window once.
    let root = Root::new()?;
    let home = root.path().join("desktop");
    let socket = home.join("control.sock");
    let child = root
        .command(
            &home,
            &["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
        )?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut desktop = Desktop { child };
    let end = Instant::now() + DEADLINE;
    while !socket.exists() {
        ensure!(Instant::now() < end, "no socket at {}", socket.display());
        if let Some(status) = desktop.child.try_wait()? {
            bail!("errand-desktop run exited before its socket appeared: {status}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = desktop.terminate()?;
    ensure!(status.success(), "exit after SIGTERM: {status}");
    ensure!(!socket.exists(), "{} left behind", socket.display());
    Ok(())
}

#[test]
fn a_squatted_socket_directory_is_refused_with_a_clear_error() -> Result<()> {
    // Root cause: the socket went wherever the temp dir said, so a directory (or name) another
    // user prepared there was used as if it were ours.
    let root = Root::new()?;
    let home = root.long_home();
    let dir = root.private_dir()?;
    let run = || root.run_refused(&home);

    // Open to everyone.
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let out = run()?;
    let err = stderr_of(&out);
    ensure!(!out.status.success(), "run started in a 0777 directory");
    ensure!(
        err.contains(&dir.display().to_string()) && err.contains("must be 0700"),
        "{err}"
    );
    ensure!(sockets_in(&dir)?.is_empty(), "a socket was created");
    std::fs::remove_dir(&dir)?;

    // A symbolic link to a directory elsewhere.
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere)?;
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::symlink(&elsewhere, &dir)?;
    let out = run()?;
    let err = stderr_of(&out);
    ensure!(!out.status.success(), "run followed a symlink");
    ensure!(err.contains("not a plain directory"), "{err}");
    ensure!(sockets_in(&elsewhere)?.is_empty(), "a socket was created");
    std::fs::remove_file(&dir)?;

    // Owned by another user, with the right mode.
    if !is_root() {
        eprintln!("skipped the other-owner case: it needs root to chown a directory");
        return Ok(());
    }
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(&dir, Some(OTHER_USER), Some(OTHER_USER))?;
    let out = run()?;
    let err = stderr_of(&out);
    ensure!(!out.status.success(), "run used another user's directory");
    ensure!(
        err.contains(&format!("belongs to uid {OTHER_USER}")),
        "{err}"
    );
    ensure!(sockets_in(&dir)?.is_empty(), "a socket was created");
    Ok(())
}

#[test]
fn the_cli_refuses_a_control_socket_served_by_another_user() -> Result<()> {
    // Root cause: the CLI sent its request to whatever answered on the socket path and printed
    // the reply, so a squatter's process could hand `pair --json` its own ticket.
    if !is_root() {
        eprintln!("skipped: it needs root to run a squatter as another user");
        return Ok(());
    }
    let root = Root::new()?;
    // The squatter (another user) must reach the socket's directory.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let home = root.path().join("desktop");
    let out = root.run(&home, &["status", "--json"])?;
    ensure!(
        out.status.success(),
        "creating the home: {}",
        stderr_of(&out)
    );
    // The home is held, as by a daemon, so the CLI goes to the control socket.
    let holder = errand_crdt::Store::open(&home)?;

    // Another user serves the home's socket path (the home lets them, for a moment).
    let socket = home.join("control.sock");
    let mode = std::fs::metadata(&home)?.permissions().mode();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777))?;
    let squatter_bin = root.path().join("squatter");
    // Through /proc/self/exe, which names this process's own file even after a build by
    // another test (`bin()`) replaced the one at its path: the end-to-end tests are one
    // binary, and `current_exe()` then named a file that was gone (CI failed on it).
    let me = Path::new("/proc/self/exe");
    if me.exists() {
        std::fs::copy(me, &squatter_bin)?;
    } else {
        std::fs::copy(std::env::current_exe()?, &squatter_bin)?;
    }
    std::fs::set_permissions(&squatter_bin, std::fs::Permissions::from_mode(0o755))?;
    // The test's name in this binary: its module path without the crate's name.
    let module = module_path!()
        .split_once("::")
        .map_or("", |(_, m)| m)
        .to_owned();
    let squatter_test = format!("{module}::squatter_answers_every_control_request");
    let mut squatter = Command::new(&squatter_bin)
        .args(["--exact", &squatter_test, "--nocapture", "--test-threads=1"])
        .env(SQUATTER_SOCKET_ENV, &socket)
        .uid(OTHER_USER)
        .gid(OTHER_USER)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let ready = wait_for_line(
        squatter.stdout.take().context("stdout")?,
        SQUATTER_READY,
        "the squatter",
    );
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(mode))?;
    let result = ready.and_then(|()| {
        ensure!(
            std::fs::symlink_metadata(&socket)?.uid() == OTHER_USER,
            "the squatter's socket is not where the CLI looks"
        );
        let out = root.run(&home, &["pair", "--json"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let err = stderr_of(&out);
        ensure!(
            !stdout.contains(SQUATTER_TICKET),
            "the CLI printed the squatter's ticket: {stdout}"
        );
        ensure!(!out.status.success(), "pair succeeded: {stdout}");
        ensure!(
            err.contains(&format!("served by uid {OTHER_USER}")),
            "{err}"
        );
        Ok(())
    });
    // Our own child, by its pid.
    let _ = squatter.kill();
    let _ = squatter.wait();
    drop(holder);
    result
}

/// Not a test by itself: the squatter of
/// `the_cli_refuses_a_control_socket_served_by_another_user`, run by that test as another user
/// from a copy of this binary. Without its environment variable it does nothing.
#[test]
fn squatter_answers_every_control_request() -> Result<()> {
    let Some(path) = std::env::var_os(SQUATTER_SOCKET_ENV) else {
        return Ok(());
    };
    let path = Path::new(OsStr::new(&path));
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    println!("{SQUATTER_READY}");
    std::io::stdout().flush()?;
    // A few requests at most; the test kills this process when it is done. A connection
    // that closes without a request (the CLI probes whether a daemon answers) must not end
    // the squatter, so errors on one connection are ignored.
    for stream in listener.incoming().take(16) {
        let Ok(mut stream) = stream else { continue };
        let mut request = String::new();
        if BufReader::new(&stream).read_line(&mut request).unwrap_or(0) == 0 {
            continue;
        }
        let reply = serde_json::json!({
            "ok": { "ticket": SQUATTER_TICKET, "expires_at": "2099-01-01T00:00:00Z" }
        });
        let _ = writeln!(stream, "{reply}");
    }
    Ok(())
}
