//! Network namespaces for end-to-end tests that need a real network between processes.
//!
//! - [`Namespaces`] creates a set of namespaces for one test and deletes them on drop (also
//!   when the test panics).
//! - [`Namespaces::bridge`] and [`Namespaces::attach`] build a star: one namespace holds a
//!   bridge, every other namespace gets a veth port on it and one address in a shared /24,
//!   so any two of them can talk, and any one can be cut off or slowed down on its own link.
//! - [`have`] says whether a tool (`nft`, `tc`) can be run, so a test can skip what needs it.
//!
//! Everything here needs root; callers check [`crate::is_root`] first.

use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};

/// Runs `ip args…`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// True when `tool --version` (or `tool -V`) runs: the tool is installed and usable.
pub fn have(tool: &str) -> bool {
    ["--version", "-V"].iter().any(|flag| {
        Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Network namespaces named `er<pid><test><suffix>`, deleted on drop (processes inside must be
/// dropped first: declare this guard before them).
#[derive(Debug)]
pub struct Namespaces {
    /// `er<pid><test>`: the prefix of every namespace and interface name.
    pub tag: String,
    names: Vec<String>,
}

impl Namespaces {
    /// Creates one namespace per suffix, with loopback up. `test` is one letter that tells
    /// the tests of one run apart (interface names have 15 characters at most).
    pub fn create(test: char, suffixes: &[&str]) -> Result<Self> {
        let tag = format!("er{}{test}", std::process::id());
        let mut ns = Self {
            names: Vec::new(),
            tag,
        };
        for suffix in suffixes {
            let name = format!("{}{suffix}", ns.tag);
            // A namespace of this name can only be left over from a dead run with our pid.
            let _ = ip(&["netns", "del", &name]);
            ip(&["netns", "add", &name])?;
            ns.names.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// The namespace made for `suffix`.
    pub fn get(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.tag)
    }

    /// The name of the bridge [`Namespaces::bridge`] makes.
    pub fn bridge_name(&self) -> String {
        format!("{}br", self.tag)
    }

    /// The interface [`Namespaces::attach`] gives namespace `suffix` (its end of the veth).
    pub fn port(&self, suffix: &str) -> String {
        format!("{}{suffix}0", self.tag)
    }

    /// Makes a bridge (no STP, no forwarding delay) in namespace `hub`.
    pub fn bridge(&self, hub: &str) -> Result<()> {
        let (ns, br) = (self.get(hub), self.bridge_name());
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "name",
            &br,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &ns, "link", "set", &br, "up"])
    }

    /// Connects namespace `suffix` to the bridge in `hub` with a veth pair, and gives its end
    /// ([`Namespaces::port`]) the address `cidr` (such as `10.78.0.2/24`).
    pub fn attach(&self, hub: &str, suffix: &str, cidr: &str) -> Result<()> {
        let (hub_ns, ns) = (self.get(hub), self.get(suffix));
        let (inside, outside) = (self.port(suffix), format!("{}{suffix}1", self.tag));
        ip(&[
            "link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &outside,
            "netns", &hub_ns,
        ])?;
        ip(&["-n", &ns, "addr", "add", cidr, "dev", &inside])?;
        ip(&["-n", &ns, "link", "set", &inside, "up"])?;
        ip(&[
            "-n",
            &hub_ns,
            "link",
            "set",
            &outside,
            "master",
            &self.bridge_name(),
        ])?;
        ip(&["-n", &hub_ns, "link", "set", &outside, "up"])
    }

    /// A veth pair `<tag><link>0` in `a` ↔ `<tag><link>1` in `b`, a /30 address on each end.
    pub fn veth(&self, link: &str, (a, a_ip): (&str, &str), (b, b_ip): (&str, &str)) -> Result<()> {
        let (ea, eb) = (
            format!("{}{link}0", self.tag),
            format!("{}{link}1", self.tag),
        );
        let (a, b) = (self.get(a), self.get(b));
        ip(&[
            "link", "add", &ea, "netns", &a, "type", "veth", "peer", "name", &eb, "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&a, &ea, a_ip), (&b, &eb, b_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Runs `args…` inside namespace `suffix` and returns its output, whatever its exit code.
    pub fn output(&self, suffix: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.get(suffix)])
            .args(args)
            .output()
            .context("running ip netns exec")
    }

    /// Runs `args…` inside namespace `suffix`; fails with its stderr.
    pub fn exec(&self, suffix: &str, args: &[&str]) -> Result<()> {
        let out = self.output(suffix, args)?;
        ensure!(
            out.status.success(),
            "{args:?} in {suffix} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Sets IPv4 forwarding in namespace `suffix` (new namespaces may inherit the host's).
    pub fn forwarding(&self, suffix: &str, on: bool) -> Result<()> {
        let v = if on { "1" } else { "0" };
        self.exec(
            suffix,
            &[
                "sh",
                "-c",
                &format!("echo {v} > /proc/sys/net/ipv4/ip_forward"),
            ],
        )
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.names {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
