//! Starting `infermesh-proxy gateway` on ephemeral ports, talking to it
//! through its config file and signals, and reading its JSON log lines.
//! Every process started is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// A running `infermesh-proxy gateway`.
pub struct Gateway {
    child: Child,
    exited: Option<ExitStatus>,
    _dir: tempfile::TempDir,
    config: PathBuf,
    logs: Arc<Mutex<Vec<Value>>>,
    /// The admin server.
    pub admin: SocketAddr,
    /// The health and metrics server.
    pub health: SocketAddr,
}

impl Gateway {
    /// Starts a gateway serving `config` (listeners should bind
    /// `127.0.0.1:0`) and waits until it serves.
    pub fn start(config: &str) -> Gateway {
        Self::start_with_args(config, &[])
    }

    /// Starts a gateway with extra command-line arguments.
    pub fn start_with_args(config: &str, args: &[&str]) -> Gateway {
        Self::start_mode(&[], "gateway", config, args)
    }

    /// Starts a gateway that may hold at most `files` open file
    /// descriptors (`prlimit --nofile`, from util-linux).
    pub fn start_with_open_files(config: &str, files: u32) -> Gateway {
        let limit = format!("--nofile={files}:{files}");
        Self::start_mode(&["prlimit", &limit, "--"], "gateway", config, &[])
    }

    /// Starts `infermesh-proxy sidecar` with extra command-line arguments
    /// (the identity flags at least). `config` should redefine the
    /// `inbound` and `outbound` listeners on `127.0.0.1:0`, since several
    /// sidecars share this host's ports.
    pub fn start_sidecar(config: &str, args: &[&str]) -> Gateway {
        Self::start_mode(&[], "sidecar", config, args)
    }

    /// Starts `infermesh-proxy sidecar` inside network namespace
    /// `namespace` (`ip netns exec`), where it may keep its default ports.
    /// Its admin and health servers are reachable only from inside.
    pub fn start_sidecar_in_namespace(namespace: &str, config: &str, args: &[&str]) -> Gateway {
        Self::start_mode(&["ip", "netns", "exec", namespace], "sidecar", config, args)
    }

    /// Starts `infermesh-proxy <mode>` fed by a control plane (`args`
    /// give `--control-plane` and the rest), and waits until it serves
    /// the control plane's first config. A sidecar's capture listeners are
    /// on ephemeral ports: several share this host.
    pub fn start_from_control_plane(mode: &str, args: &[&str]) -> Gateway {
        Self::start_with(&[], mode, None, &with_ephemeral_capture(mode, args))
    }

    /// Starts `infermesh-proxy <mode>` fed by a control plane, and waits
    /// only for its health server: for proxies that are not to become
    /// ready.
    pub fn spawn_from_control_plane(mode: &str, args: &[&str]) -> Gateway {
        Self::spawn(&[], mode, None, &with_ephemeral_capture(mode, args))
    }

    /// Starts the proxy in `mode`, through the `wrapper` command if any
    /// (which must exec the proxy, so that killing it kills the proxy).
    fn start_mode(wrapper: &[&str], mode: &str, config: &str, args: &[&str]) -> Gateway {
        Self::start_with(wrapper, mode, Some(config), args)
    }

    fn start_with(wrapper: &[&str], mode: &str, config: Option<&str>, args: &[&str]) -> Gateway {
        let gateway = Self::spawn(wrapper, mode, config, args);
        let serving = if config.is_some() {
            "serving"
        } else {
            "serving the control plane's config"
        };
        gateway.wait_for_log(|l| l["message"] == serving, Duration::from_secs(30));
        gateway
    }

    fn spawn(wrapper: &[&str], mode: &str, config: Option<&str>, args: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("gateway.yaml");
        if let Some(config) = config {
            std::fs::write(&path, config).expect("write the config");
        }
        let proxy = crate::binary("infermesh-proxy");
        let mut command = match wrapper.split_first() {
            None => Command::new(&proxy),
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&proxy);
                command
            }
        };
        let mut child = command
            .args(["--log-format", "json", "--log-level", "info"])
            .arg(mode)
            .args(config.map(|_| "--config"))
            .args(config.map(|_| &path))
            .args([
                "--admin-address",
                "127.0.0.1:0",
                "--health-address",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start infermesh-proxy");
        let logs = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("piped stdout"), logs.clone());
        collect(child.stderr.take().expect("piped stderr"), logs.clone());
        let mut gateway = Gateway {
            child,
            exited: None,
            _dir: dir,
            config: path,
            logs,
            admin: "0.0.0.0:0".parse().expect("address"),
            health: "0.0.0.0:0".parse().expect("address"),
        };
        gateway.admin = gateway.server_address("admin");
        gateway.health = gateway.server_address("health");
        gateway
    }

    fn server_address(&self, server: &str) -> SocketAddr {
        let line = self.wait_for_log(
            |l| l["message"] == "listening" && l["server"] == server,
            Duration::from_secs(5),
        );
        parse_address(&line)
    }

    /// The address listener `name` is bound to (its latest binding).
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.wait_for_log(
            |l| l["message"] == "listening" && l["listener"] == name,
            Duration::from_secs(10),
        );
        let logs = self.logs.lock().expect("log lock");
        let line = logs
            .iter()
            .rev()
            .find(|l| l["message"] == "listening" && l["listener"] == name)
            .expect("found above");
        parse_address(line)
    }

    /// `http://<listener address><path>`.
    pub fn url(&self, listener: &str, path: &str) -> String {
        format!("http://{}{path}", self.listener(listener))
    }

    /// Replaces the config file the way editors and `kubectl` do: write a
    /// new file, then rename it over the old one.
    pub fn write_config(&self, text: &str) {
        let tmp = self.config.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).expect("write the new config");
        std::fs::rename(&tmp, &self.config).expect("replace the config");
    }

    /// The config file's path.
    pub fn config_path(&self) -> &PathBuf {
        &self.config
    }

    /// Kills the proxy at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user and system, in clock ticks) each of the proxy's
    /// threads has used so far, by thread id, with the thread's name
    /// (`/proc/PID/task/TID/stat`).
    pub fn thread_cpu_ticks(&self) -> Vec<(u32, String, u64)> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut threads = Vec::new();
        for task in std::fs::read_dir(&tasks).expect("read the proxy's threads") {
            let task = task.expect("a thread entry");
            // A thread that ended since the listing has no stat left.
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let tid = task
                .file_name()
                .to_string_lossy()
                .parse()
                .expect("a thread id");
            // `TID (NAME) STATE ...`: the name may hold spaces, not `)`s
            // after it; utime and stime are fields 14 and 15.
            let (start, rest) = stat.rsplit_once(')').expect("a stat line");
            let name = start.split_once('(').expect("a stat line").1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = fields[11].parse::<u64>().expect("utime")
                + fields[12].parse::<u64>().expect("stime");
            threads.push((tid, name, ticks));
        }
        threads
    }

    /// Sends `signal` to the gateway.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        kill(Pid::from_raw(pid), signal).expect("signal the gateway");
    }

    /// Every log line so far, parsed (lines that are not JSON are kept as
    /// `{"raw": line}`).
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Log lines matching `predicate`.
    pub fn logs_matching(&self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs().into_iter().filter(|l| predicate(l)).collect()
    }

    /// Waits for a log line matching `predicate`, panicking with the log
    /// after `timeout`.
    pub fn wait_for_log(&self, predicate: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        blocking(|| {
            loop {
                if let Some(line) = self
                    .logs
                    .lock()
                    .expect("log lock")
                    .iter()
                    .find(|l| predicate(l))
                {
                    return line.clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "no matching log line within {timeout:?}; log:\n{}",
                    self.dump()
                );
                // The binary prints why it stopped before it exits.
                let stopped = self.logs.lock().expect("log lock").iter().any(|l| {
                    l["raw"]
                        .as_str()
                        .is_some_and(|raw| raw.starts_with("infermesh-proxy: "))
                });
                assert!(!stopped, "the proxy stopped; log:\n{}", self.dump());
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// Counts log lines matching `predicate`, waiting until there are at
    /// least `n` (or panicking after `timeout`).
    pub fn wait_for_logs(
        &self,
        n: usize,
        predicate: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        blocking(|| {
            loop {
                let found = self.logs_matching(&predicate);
                if found.len() >= n {
                    return found;
                }
                assert!(
                    Instant::now() < deadline,
                    "fewer than {n} matching log lines within {timeout:?}; log:\n{}",
                    self.dump()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// The log as text, for failure messages.
    pub fn dump(&self) -> String {
        self.logs().iter().map(|l| format!("{l}\n")).collect()
    }

    /// Waits for the process to exit, panicking after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = blocking(|| {
            loop {
                if let Some(status) = self.child.try_wait().expect("poll the gateway") {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not exit within {timeout:?}; log:\n{}",
                    self.dump()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        self.exited = Some(status);
        status
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a waiting loop without stalling the tokio worker it is called on
/// (tests run mock backends on the same runtime).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn parse_address(line: &Value) -> SocketAddr {
    line["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("log line without an address: {line}"))
}

/// `args`, and for a sidecar its capture listeners on ephemeral ports.
fn with_ephemeral_capture<'a>(mode: &str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    if mode == "sidecar" {
        all.extend([
            "--inbound-address",
            "127.0.0.1:0",
            "--outbound-address",
            "127.0.0.1:0",
        ]);
    }
    all
}

fn collect(stream: impl std::io::Read + Send + 'static, logs: Arc<Mutex<Vec<Value>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let value =
                serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
            logs.lock().expect("log lock").push(value);
        }
    });
}

/// Builds a config from documents, adding `apiVersion` to each.
pub fn config(documents: &[&str]) -> String {
    documents
        .iter()
        .map(|d| format!("---\napiVersion: infermesh.io/v1alpha1\n{}\n", d.trim()))
        .collect()
}

/// A `Listener` document named `name` on an ephemeral loopback port.
pub fn listener(name: &str, protocol: &str) -> String {
    format!(
        "kind: Listener\nmetadata: {{ name: {name} }}\nspec: {{ address: 127.0.0.1:0, protocol: {protocol} }}"
    )
}

/// A `Backend` document with the given endpoints.
pub fn backend(name: &str, protocol: &str, endpoints: &[SocketAddr]) -> String {
    backend_with(name, protocol, endpoints, "")
}

/// A `Backend` document with the given endpoints; `extra` is more YAML
/// under `spec`.
pub fn backend_with(name: &str, protocol: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{ address: \"{e}\" }}"))
        .collect();
    format!(
        "kind: Backend\nmetadata: {{ name: {name} }}\nspec:\n  protocol: {protocol}\n  endpoints: [{}]\n{}",
        endpoints.join(", "),
        indent(extra, 2)
    )
}

/// A `Route` named `r` with one rule per `(path prefix, backend)`.
pub fn route_by_prefix(rules: &[(&str, &str)]) -> String {
    let rules: String = rules
        .iter()
        .map(|(prefix, backend)| {
            format!("\n    - matches: [{{ path: {{ prefix: {prefix} }} }}]\n      backends: [{{ name: {backend} }}]")
        })
        .collect();
    format!("kind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:{rules}")
}

/// A `Route` named `r` sending every request to `backend`; `extra` is
/// more YAML under its one rule.
pub fn route_with(backend: &str, extra: &str) -> String {
    format!(
        "kind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - backends: [{{ name: {backend} }}]\n{}",
        indent(extra, 6)
    )
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(by)))
        .collect::<Vec<_>>()
        .join("\n")
}
