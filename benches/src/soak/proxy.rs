//! The proxy under soak: its config (rewritten during the run), the
//! `infermesh-proxy gateway` process with its JSON log in a file, and
//! reading what it says: log lines, `/metrics`, `/endpoints`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::identity::{Identities, MODEL_IDENTITY};

/// The listener the soak's clients connect to.
pub const LISTENER: &str = "soak";

/// The connection limits of the soak's listener: short, so that hostile
/// clients are cut within the run.
pub const LIMIT: Duration = Duration::from_secs(2);

/// The soak's config, version `n`: a listener on an ephemeral port with
/// short limits, a backend of the mock servers over mutual TLS, and a
/// route that retries POSTs (a chat completion may be sent again), with
/// room for every request in flight on a killed server to be retried. Odd
/// versions add a second route, so that each rewrite changes the config's
/// meaning and is applied, not skipped.
pub fn config(n: u32, backends: &[SocketAddr]) -> String {
    let limit = format!("{}s", LIMIT.as_secs());
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|b| json!({ "address": b.to_string() }))
        .collect();
    let mut documents = vec![
        json!({
            "kind": "Listener",
            "metadata": { "name": LISTENER },
            "spec": {
                "address": "127.0.0.1:0",
                "limits": {
                    "firstByteTimeout": limit,
                    "requestHeadersTimeout": limit,
                    "streamIdleTimeout": limit,
                },
            },
        }),
        json!({
            "kind": "Backend",
            "metadata": { "name": "models" },
            "spec": {
                "endpoints": endpoints,
                "tls": { "identity": MODEL_IDENTITY },
                // Ejected after a few failures in a row, and back soon
                // after, so that a restarted server serves again within
                // a short run.
                // Retries in flight per backend: the default 3 would
                // refuse most of the retries a killed server causes.
                "circuitBreaker": { "maxRetries": 64 },
                "outlierDetection": {
                    "consecutiveFailures": 3,
                    "baseEjectionTime": "1s",
                    "maxEjectionTime": "4s",
                },
            },
        }),
        json!({
            "kind": "Route",
            "metadata": { "name": "chat" },
            "spec": {
                "rules": [{
                    "backends": [{ "name": "models" }],
                    // A killed server fails every request in flight on
                    // it at once: the default budget (20 % of the
                    // requests in flight, at least 3) would leave some of
                    // them unretried.
                    "retry": {
                        "nonIdempotent": true,
                        "budget": { "percent": 50, "minRetryConcurrency": 32 },
                    },
                }],
            },
        }),
    ];
    if n % 2 == 1 {
        documents.push(json!({
            "kind": "Route",
            "metadata": { "name": "extra" },
            "spec": {
                "rules": [{
                    "matches": [{ "path": { "prefix": format!("/soak/{n}") } }],
                    "backends": [{ "name": "models" }],
                }],
            },
        }));
    }
    documents
        .into_iter()
        .map(|mut d| {
            d["apiVersion"] = json!(infermesh_api::API_VERSION);
            format!("---\n{d}\n")
        })
        .collect()
}

/// The `infermesh-proxy` binary: `configured`, or the one next to this
/// program (as `cargo build` leaves them).
pub fn binary(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    let binary = match configured {
        Some(b) => b.to_owned(),
        None => std::env::current_exe()?.with_file_name("infermesh-proxy"),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found (build it with cargo build -p infermesh-proxy, or give --proxy)",
        binary.display()
    );
    Ok(binary)
}

/// A running `infermesh-proxy gateway`; stopped when dropped.
pub struct Proxy {
    child: Child,
    exited: Option<ExitStatus>,
    /// The config file it watches.
    pub config: PathBuf,
    /// Its log (JSON lines, standard output and error).
    pub log: PathBuf,
    /// The listener the clients use.
    pub listener: SocketAddr,
    /// The admin server.
    pub admin: SocketAddr,
    /// The health and metrics server.
    pub health: SocketAddr,
}

impl Proxy {
    /// Starts `binary` on `config_text`, written to `work/gateway.yaml`,
    /// with the identity files of `ids`, and waits until it serves.
    pub async fn start(
        binary: &Path,
        work: &Path,
        config_text: &str,
        ids: &Identities,
    ) -> anyhow::Result<Proxy> {
        let config = work.join("gateway.yaml");
        std::fs::write(&config, config_text)?;
        let log = work.join("proxy.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .arg("gateway")
            .arg("--config")
            .arg(&config)
            .arg("--identity-cert")
            .arg(&ids.proxy.cert)
            .arg("--identity-key")
            .arg(&ids.proxy.key)
            .arg("--trust-bundle")
            .arg(&ids.bundle)
            .args([
                "--admin-address",
                "127.0.0.1:0",
                "--health-address",
                "127.0.0.1:0",
                "--shutdown-grace-period",
                "5s",
                "--log-format",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut proxy = Proxy {
            child,
            exited: None,
            config,
            log,
            listener: "0.0.0.0:0".parse().expect("address"),
            admin: "0.0.0.0:0".parse().expect("address"),
            health: "0.0.0.0:0".parse().expect("address"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = proxy.log_lines()?;
            if lines.iter().any(|l| l["message"] == "serving") {
                let address = |key: &str, value: &str| {
                    lines
                        .iter()
                        .rev()
                        .find(|l| l["message"] == "listening" && l[key] == value)
                        .and_then(|l| l["address"].as_str()?.parse().ok())
                        .with_context(|| format!("the proxy logged no address for {key} {value}"))
                };
                proxy.listener = address("listener", LISTENER)?;
                proxy.admin = address("server", "admin")?;
                proxy.health = address("server", "health")?;
                return Ok(proxy);
            }
            if let Some(status) = proxy.child.try_wait()? {
                anyhow::bail!(
                    "infermesh-proxy exited ({status}) before serving; its log:\n{}",
                    std::fs::read_to_string(&proxy.log).unwrap_or_default()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "infermesh-proxy did not serve within 30 s; see {}",
                proxy.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every JSON line of the log so far.
    pub fn log_lines(&self) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        LogReader::new(&self.log).read_new(|v| out.push(v))?;
        Ok(out)
    }

    /// Replaces the config file the way editors and `kubectl` do.
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        super::identity::write_atomically(&self.config, text.as_bytes())
    }

    /// `GET path` on the health server.
    pub async fn health_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        get(self.health, path).await
    }

    /// The `/metrics` page, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, text) = self.health_get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(Metrics::parse(&text))
    }

    /// The admin server's `/endpoints`.
    pub async fn endpoints(&self) -> anyhow::Result<Value> {
        let (status, text) = get(self.admin, "/endpoints").await?;
        anyhow::ensure!(status == 200, "/endpoints answered {status}");
        Ok(serde_json::from_str(&text)?)
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(status) = self.exited {
            return Ok(Some(status));
        }
        signal(self.pid(), Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(Some(status));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(None)
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(pid)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
    Ok(())
}

/// Reads the JSON lines a log file gained since the last read.
pub struct LogReader {
    path: PathBuf,
    offset: u64,
}

impl LogReader {
    /// A reader from the start of `path`.
    pub fn new(path: &Path) -> Self {
        LogReader {
            path: path.to_owned(),
            offset: 0,
        }
    }

    /// Calls `each` with every whole JSON line written since the last call
    /// (a line still being written is left for the next).
    pub fn read_new(&mut self, mut each: impl FnMut(Value)) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += n as u64;
            if let Ok(v) = serde_json::from_str(&line) {
                each(v);
            }
        }
        Ok(())
    }
}

/// `GET path` on a plain HTTP/1.1 server on `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path} on {addr} took over 10 s"))?
}

/// A `/metrics` page: every series and its value.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    /// Parses Prometheus text format 0.0.4 (what the proxy writes; label
    /// values without escaped quotes).
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter_map(|pair| {
                            let (k, v) = pair.split_once("=\"")?;
                            Some((k.trim().to_owned(), v.trim_end_matches('"').to_owned()))
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            };
            series.push((name, labels, value));
        }
        Metrics { series }
    }

    /// The sum of `name` over the series whose labels hold every
    /// `(label, value)` of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
            })
            .map(|(_, _, v)| v)
            // An empty sum of floats is -0, which would print as such.
            .fold(0.0, |sum, v| sum + v)
    }

    /// `name` summed by the value of `label`, series of value 0 left out.
    pub fn by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (n, labels, v) in &self.series {
            if n == name && *v != 0.0 {
                *out.entry(labels.get(label).cloned().unwrap_or_default())
                    .or_insert(0.0) += v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_of_the_config_is_valid_and_odd_ones_differ() {
        let backends = [
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
        ];
        let load = |n| {
            let text = config(n, &backends);
            infermesh_api::Config::load(&[infermesh_api::Source {
                name: "soak.yaml",
                text: &text,
            }])
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
        };
        let even = load(0);
        let listener = &even.listener(LISTENER).unwrap().spec;
        assert_eq!(listener.limits.stream_idle_timeout.get(), LIMIT);
        let rule = &even.route("chat").unwrap().spec.rules[0];
        assert!(rule.retry.non_idempotent);
        assert!(even.route("extra").is_none());
        assert!(load(1).route("extra").is_some());
        assert_ne!(config(1, &backends), config(3, &backends));
    }

    #[test]
    fn metrics_are_summed_by_labels() {
        let m = Metrics::parse(
            "# HELP x y\n\
             infermesh_downstream_connections_closed_total{listener=\"soak\",reason=\"first_byte_timeout\"} 3\n\
             infermesh_downstream_connections_closed_total{listener=\"soak\",reason=\"premature_resets\"} 2\n\
             infermesh_config_reloads_total{result=\"success\"} 7\n\
             process_open_fds 42\n",
        );
        assert_eq!(
            m.sum("infermesh_downstream_connections_closed_total", &[]),
            5.0
        );
        assert_eq!(
            m.sum("infermesh_config_reloads_total", &[("result", "success")]),
            7.0
        );
        assert_eq!(m.sum("process_open_fds", &[]), 42.0);
        assert_eq!(m.sum("infermesh_no_such_metric", &[]).to_string(), "0");
        assert_eq!(
            m.by("infermesh_downstream_connections_closed_total", "reason")["premature_resets"],
            2.0
        );
    }
}
