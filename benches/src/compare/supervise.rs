//! The processes a comparison starts: spawning one with its output in a log
//! file and waiting until it listens, on the CPUs its side is pinned to
//! (`Placement`), the mock model servers' process, pinning the generator's
//! own threads, reading the CPU and memory of a target's processes, and
//! stopping every process (its children too) when its handle is dropped.

use std::collections::HashSet;
use std::ffi::OsStr;
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

/// Where the processes of one side of a comparison run (the proxies, or
/// the backends) and how many workers the proxies get.
#[derive(Clone, Debug)]
pub(super) struct Placement {
    /// The CPUs its processes are started on, with `taskset -c`; `None`:
    /// wherever the scheduler puts them.
    pub(super) cpus: Option<Vec<usize>>,
    /// The workers the comparison's `workers` field asks of every proxy;
    /// `None`: each proxy's default.
    pub(super) workers: Option<usize>,
    /// HAProxy's threads and nginx's workers when `workers` is not given:
    /// a worker per CPU the proxies may use.
    pub(super) default_workers: usize,
    /// The connections the load keeps open at once, which the peers are
    /// sized for.
    pub(super) connections: usize,
}

impl Placement {
    /// A command running `program` on this side's CPUs: under `taskset -c`
    /// when pinned, which sets the affinity and then execs the program, so
    /// the process ID is the program's (for its CPU readings and its stop)
    /// and the processes it forks inherit the affinity.
    pub(super) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.cpus {
            None => Command::new(program),
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu_list(cpus)).arg(program);
                command
            }
        }
    }

    /// The threads or worker processes of HAProxy and nginx.
    pub(super) fn peer_workers(&self) -> usize {
        self.workers.unwrap_or(self.default_workers)
    }

    /// The client connections HAProxy and nginx are configured to hold
    /// (HAProxy's `maxconn`; nginx's `worker_connections` is twice this,
    /// as it counts its upstream connections too): the load's, with room
    /// to spare, and never under their usual 4096, so a load of thousands
    /// of long streams is not refused by a limit of the harness's making.
    pub(super) fn peer_connections(&self) -> usize {
        (self.connections + 64).max(4096)
    }
}

/// `cpus` as `taskset -c` and reports write them: `0,2,3`.
pub(super) fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Pins every thread of this process (the load generator's runtime among
/// them) to `cpus`. Affinity belongs to each thread, so each thread listed
/// in `/proc/self/task` is set; threads started later inherit it from the
/// thread that starts them, and the listing is read again until it shows
/// no thread left unpinned, in case one started meanwhile. Child processes
/// started afterwards inherit it too.
pub(super) fn pin_this_process(cpus: &[usize]) -> anyhow::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .with_context(|| format!("CPU {cpu} is beyond what this system can pin to"))?;
    }
    let mut pinned = HashSet::new();
    loop {
        let threads: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .context("cannot list this process's threads")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|tid| !pinned.contains(tid))
            .collect();
        if threads.is_empty() {
            return Ok(());
        }
        for tid in threads {
            match sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
                // A thread that ended between the listing and now.
                Err(nix::errno::Errno::ESRCH) => {}
                other => other.with_context(|| {
                    format!("cannot pin thread {tid} to CPUs {}", cpu_list(cpus))
                })?,
            }
            pinned.insert(tid);
        }
    }
}

/// The CPUs process (or thread) `pid` may run on, as the kernel lists them
/// (`Cpus_allowed_list` in its status: `0`, `0-1`, `0,2`); `None` when it
/// cannot be read.
pub(super) fn allowed_cpus(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
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

    /// The CPUs the process and each of its children may run on, in
    /// words: `pid 12 on CPUs 0; children 13 on 0, 14 on 0`.
    pub(super) fn cpus(&self) -> String {
        let on = |pid: u32| allowed_cpus(pid).unwrap_or_else(|| "?".to_owned());
        let pid = self.pid();
        let children: Vec<String> = process::descendants(pid)
            .into_iter()
            .map(|child| format!("{child} on {}", on(child)))
            .collect();
        let mut words = format!("pid {pid} on CPUs {}", on(pid));
        if !children.is_empty() {
            words.push_str(&format!("; children {}", children.join(", ")));
        }
        words
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
/// file `name`, and waits until it listens. When it was pinned, prints the
/// CPUs it and its children may run on, as the kernel has them, so a run
/// shows that pinning took.
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
    let started = Started {
        child,
        name: program,
    };
    if command.get_program() == OsStr::new("taskset") {
        eprintln!("{name}: {}", started.cpus());
    }
    Ok(started)
}

/// Starts the mock servers as their own process, so that they do not share
/// the generator's threads, placed as `placement` says, and returns their
/// addresses.
pub(super) fn start_mock(
    scenario: &Scenario,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<(Started, Vec<SocketAddr>)> {
    let file = work.join("backends.yaml");
    std::fs::write(
        &file,
        serde_saphyr::to_string(scenario).context("cannot write the mock scenario")?,
    )?;
    let exe = std::env::current_exe().context("cannot find infermesh-bench itself")?;
    let mut child = placement
        .command(exe)
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
    if placement.cpus.is_some() {
        eprintln!("mock: {}", started.cpus());
    }
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
    usage_of(&pids(processes))
}

/// The process IDs of `processes`, which can be read from another task
/// while the handles stay where they are.
pub(super) fn pids(processes: &[Started]) -> Vec<u32> {
    processes.iter().map(Started::pid).collect()
}

/// CPU seconds and memory of the processes `pids` (and their children),
/// added up; `None` without any, or when one cannot be read.
pub(super) fn usage_of(pids: &[u32]) -> Option<Usage> {
    let mut total: Option<Usage> = None;
    for &pid in pids {
        let usage = process::tree(pid).ok()?;
        *total.get_or_insert_default() += usage;
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
        // Exited first: whatever listens on the port then is not it.
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{what} exited ({status}) before listening; see its log in the work directory"
            );
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
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
    fn pinning_this_process_sets_every_thread() {
        // Pinned to the CPUs it may use already, so the other tests
        // running meanwhile keep theirs.
        let pid = std::process::id();
        let allowed = allowed_cpus(pid).unwrap();
        let mut cpus = Vec::new();
        for part in allowed.split(',') {
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            cpus.extend(first.parse::<usize>().unwrap()..=last.parse().unwrap());
        }
        pin_this_process(&cpus).unwrap();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let tid: u32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
            if let Some(on) = allowed_cpus(tid) {
                assert_eq!(on, allowed, "thread {tid}");
            }
        }
        assert_eq!(cpu_list(&[0, 2, 3]), "0,2,3");
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
