//! Network namespaces a test makes for itself ("pods" with their own
//! loopback, routes and iptables rules), and the processes it starts in
//! them. A namespace is deleted, after its processes are killed, when its
//! handle drops, also when the test fails.
//!
//! Making one needs root. A test that cannot make one calls [`skipped`],
//! which says so where a plain `cargo test` shows it, or fails the test
//! when `INFERMESH_REQUIRE_NETNS` is set (as `./test.sh` sets it as root), so that a
//! skip can never pass for a success in CI.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace of this test process.
pub struct Namespace {
    /// Its name, as `ip netns` knows it.
    pub name: String,
    processes: Vec<Child>,
}

impl Namespace {
    /// Makes `infermesh-<tag>-<pid>-<n>` with its loopback up, or says why
    /// it cannot.
    pub fn create(tag: &str) -> Result<Namespace, String> {
        // /proc/self belongs to the process's effective user.
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            return Err("not running as root, and `ip netns add` needs root".to_owned());
        }
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "infermesh-{tag}-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run `ip` (Debian package iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns add {name}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let namespace = Namespace {
            name,
            processes: Vec::new(),
        };
        namespace.run("ip", &["link", "set", "lo", "up"]);
        Ok(namespace)
    }

    /// `program args`, to be run inside.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        command
    }

    /// Runs `program args` inside.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args)
            .output()
            .expect("run `ip netns exec`")
    }

    /// Runs `program args` inside, asserting that it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "in {}: {program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `program args` inside, in the background, until the
    /// namespace drops.
    pub fn spawn(&mut self, program: &str, args: &[&str]) {
        let child = self
            .command(program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a process in the namespace");
        self.processes.push(child);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not delete network namespace {}: {e}", self.name),
        }
    }
}

/// Says that `test` is skipped and why, on the real stderr (the harness
/// captures `eprintln!` of passing tests, and a skip must show), or fails
/// it when `INFERMESH_REQUIRE_NETNS` is set.
pub fn skipped(test: &str, why: &str) {
    if std::env::var_os("INFERMESH_REQUIRE_NETNS").is_some() {
        panic!("{test}: INFERMESH_REQUIRE_NETNS is set, but {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
