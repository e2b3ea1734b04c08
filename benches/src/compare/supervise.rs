//! The processes a comparison starts: spawning one with its output in a log
//! file and waiting until it listens, the mock model servers' process,
//! reading the CPU and memory of a target's processes, and stopping every
//! process (its children too) when its handle is dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::mock::Scenario;
use crate::process::{self, Usage};

/// The running proxy processes of a target and the loopback port where it
/// takes load.
pub(super) struct Proxies {
    /// Every proxy process of the target, the one that takes the load
    /// first (so it is stopped first).
    pub(super) processes: Vec<Started>,
    /// The port on 127.0.0.1 the target listens on.
    pub(super) port: u16,
}

/// A process this comparison started; killed when dropped.
pub(super) struct Started {
    child: Child,
    name: &'static str,
}

impl Started {
    /// The process ID.
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Started {
    /// Asks the process to stop (SIGTERM: nginx's master then stops its
    /// workers), then kills whatever of its tree is left, so no worker
    /// outlives the comparison.
    fn drop(&mut self) {
        let pid = self.child.id();
        let tree = process::descendants(pid);
        let _ = signal(pid, Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_)))
                && tree.iter().all(|p| !process::alive(*p))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in tree {
            let _ = signal(p, Signal::SIGKILL);
        }
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
}

/// Starts `command` (the `program` listening on `port`), logging to the
/// file `name`, and waits until it listens.
pub(super) fn spawn(
    name: &str,
    program: &'static str,
    port: u16,
    mut command: Command,
    work: &Path,
) -> anyhow::Result<Started> {
    let log = log_file(work, name)?;
    let mut child = command
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    wait_for_port(port, program, &mut child)?;
    Ok(Started {
        child,
        name: program,
    })
}

/// Starts the mock servers as their own process, so that they do not share
/// the generator's threads, and returns their addresses.
pub(super) fn start_mock(
    scenario: &Scenario,
    work: &Path,
) -> anyhow::Result<(Started, Vec<SocketAddr>)> {
    let file = work.join("backends.yaml");
    std::fs::write(
        &file,
        serde_saphyr::to_string(scenario).context("cannot write the mock scenario")?,
    )?;
    let exe = std::env::current_exe().context("cannot find infermesh-bench itself")?;
    let mut child = Command::new(exe)
        .args(["serve", "--scenario"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the mock model servers")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let started = Started {
        child,
        name: "mock",
    };
    let addrs = listening_addresses(stdout, scenario.servers.len())?;
    anyhow::ensure!(
        addrs.len() == scenario.servers.len(),
        "the {} exited before listening",
        started.name
    );
    Ok((started, addrs))
}

/// The addresses the mock servers print as they listen, read from their
/// standard output until `servers` are (or the output ends).
fn listening_addresses(stdout: ChildStdout, servers: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("mock model server listening on ") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            addrs.push(
                addr.parse()
                    .with_context(|| format!("unexpected line from the mock: {line}"))?,
            );
            if addrs.len() == servers {
                break;
            }
        }
    }
    Ok(addrs)
}

/// CPU seconds and memory of every process of `processes` (and their
/// children), added up; `None` without any, or when one cannot be read.
pub(super) fn usage(processes: &[Started]) -> Option<Usage> {
    let mut total: Option<Usage> = None;
    for started in processes {
        let usage = process::tree(started.pid()).ok()?;
        total = Some(match total {
            None => usage,
            Some(t) => Usage {
                cpu_seconds: t.cpu_seconds + usage.cpu_seconds,
                rss_bytes: t.rss_bytes + usage.rss_bytes,
                peak_rss_bytes: t.peak_rss_bytes + usage.peak_rss_bytes,
            },
        });
    }
    total
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits up to 10 s until something listens on 127.0.0.1:`port`; an error
/// if `child` (the `what`) exits first.
fn wait_for_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{what} exited ({status}) before listening; see its log in the work directory"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("{what} did not listen on 127.0.0.1:{port} within 10 s")
}

/// Whether `program` is a file in a directory of `PATH`.
pub(super) fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The log file `name.log` in `work`, created empty.
fn log_file(work: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(work.join(format!("{name}.log")))
        .with_context(|| format!("cannot create the {name} log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_started_process_stops_its_children_too() {
        let child = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let started = Started { child, name: "sh" };
        let pid = started.pid();
        let mut children = Vec::new();
        for _ in 0..100 {
            children = process::descendants(pid);
            if !children.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!children.is_empty(), "sh started its sleep");
        assert!(usage(std::slice::from_ref(&started)).is_some());
        drop(started);
        assert!(!process::alive(pid));
        // SIGKILL is delivered a moment after `kill` returns.
        for _ in 0..100 {
            if children.iter().all(|c| !process::alive(*c)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("children outlived their parent's handle: {children:?}");
    }

    #[test]
    fn no_process_no_usage() {
        assert_eq!(usage(&[]), None);
    }

    #[test]
    fn a_process_that_exits_before_listening_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let error = spawn("false", "false", port, Command::new("false"), dir.path())
            .err()
            .expect("false never listens");
        assert!(
            format!("{error:#}").starts_with("false exited"),
            "{error:#}"
        );
        assert!(dir.path().join("false.log").is_file());
    }
}
