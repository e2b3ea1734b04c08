//! A mesh on loopback: `infermesh-control-plane serve` with a CA, a join
//! tokens file and a config directory of its own, the credentials of the
//! proxies it feeds, and the flags that start a proxy on it. Every
//! process started is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The trust domain of the tests' meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A mesh's files: the CA, the tokens file, the config directory, the
/// proxies' credentials.
pub struct MeshFiles {
    dir: tempfile::TempDir,
}

impl MeshFiles {
    /// A CA (`ca init`), an empty config directory, and `documents` written
    /// to `mesh.yaml` in it.
    pub fn new(documents: &str) -> MeshFiles {
        let dir = tempfile::tempdir().expect("a temporary directory");
        crate::identity::ca_init(&dir.path().join("ca"));
        std::fs::create_dir(dir.path().join("config")).expect("the config directory");
        let files = MeshFiles { dir };
        files.write("mesh.yaml", documents);
        files
    }

    /// The directory holding everything.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The trust bundle proxies trust.
    pub fn bundle(&self) -> PathBuf {
        self.path().join("ca").join("root-cert.pem")
    }

    /// Replaces `file` of the config directory as editors and `kubectl`
    /// do: a new file renamed over the old one.
    pub fn write(&self, file: &str, text: &str) {
        let path = self.path().join("config").join(file);
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write the new file");
        std::fs::rename(&tmp, &path).expect("replace the file");
    }

    /// A join token for `namespace`/`service_account` (`token create`),
    /// valid for `ttl`, in a credential file of its own.
    pub fn credential(&self, namespace: &str, service_account: &str, ttl: &str) -> PathBuf {
        let out = self
            .path()
            .join(format!("{namespace}-{service_account}.token"));
        let output = Command::new(crate::binary("infermesh-control-plane"))
            .args(["token", "create", "--tokens"])
            .arg(self.path().join("tokens.yaml"))
            .args([
                "--namespace",
                namespace,
                "--service-account",
                service_account,
            ])
            .args(["--ttl", ttl, "--force", "--out"])
            .arg(&out)
            .output()
            .expect("run token create");
        assert!(
            output.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        out
    }

    /// A credential file holding a well-formed join token that this
    /// mesh never issued: the certificate service refuses it.
    pub fn unknown_credential(&self) -> PathBuf {
        let path = self.path().join("unknown.token");
        std::fs::write(
            &path,
            "imjt_0000000000000000_00000000000000000000000000000000\n",
        )
        .expect("write the token");
        path
    }

    /// The flags that start a proxy of this mesh as `node`, with
    /// `credential`, attached to the control planes at `addresses`.
    pub fn proxy_args(
        &self,
        addresses: &[SocketAddr],
        node: &str,
        credential: &Path,
        labels: &[&str],
    ) -> Vec<String> {
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut args = vec![
            "--control-plane".to_owned(),
            addresses.join(","),
            "--credential".to_owned(),
            credential.display().to_string(),
            "--trust-bundle".to_owned(),
            self.bundle().display().to_string(),
            "--node".to_owned(),
            node.to_owned(),
        ];
        for label in labels {
            args.push("--label".to_owned());
            args.push((*label).to_owned());
        }
        args
    }
}

/// A running `infermesh-control-plane serve`.
pub struct ControlPlane {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// The gRPC port (certificates and config push).
    pub grpc: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The injection webhook's port, when started with
    /// `--injector-listen`.
    pub injector: Option<SocketAddr>,
}

impl ControlPlane {
    /// Serves `files` on ephemeral ports (`listen` to pick the gRPC
    /// address instead), with `args` added.
    pub fn start(files: &MeshFiles, listen: Option<SocketAddr>, args: &[&str]) -> ControlPlane {
        let listen = listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut command = Command::new(crate::binary("infermesh-control-plane"));
        command
            .arg("serve")
            .arg("--ca")
            .arg(files.path().join("ca"))
            .arg("--tokens")
            .arg(files.path().join("tokens.yaml"))
            .arg("--config-dir")
            .arg(files.path().join("config"))
            .args(["--listen", &listen, "--admin", "127.0.0.1:0"]);
        Self::run(command, args)
    }

    /// Serves `files`' CA on ephemeral ports with `--kubernetes`, the API
    /// server being the one `kubeconfig` names (a fake one:
    /// [`crate::kube_api`]), with `args` added. It starts once the API
    /// server's objects make a valid config.
    pub fn start_kubernetes(files: &MeshFiles, kubeconfig: &Path, args: &[&str]) -> ControlPlane {
        let mut command = Command::new(crate::binary("infermesh-control-plane"));
        command
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .arg("serve")
            .arg("--kubernetes")
            .arg("--ca")
            .arg(files.path().join("ca"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
        Self::run(command, args)
    }

    fn run(mut command: Command, args: &[&str]) -> ControlPlane {
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start infermesh-control-plane");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let stderr = child.stderr.take().expect("piped");
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                collected.lock().expect("log lock").push(line);
            }
        });
        let mut address = |kind: &str| -> SocketAddr {
            let line = lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("the control plane did not start: {:#?}", logs.lock()));
            line.strip_prefix("infermesh-control-plane listening on ")
                .and_then(|rest| rest.strip_suffix(&format!(" ({kind})")))
                .unwrap_or_else(|| panic!("unexpected line: {line}"))
                .parse()
                .expect("an address")
        };
        let grpc = address("grpc");
        let admin = address("admin");
        let injector = args
            .contains(&"--injector-listen")
            .then(|| address("injector"));
        ControlPlane {
            child,
            logs,
            grpc,
            admin,
            injector,
        }
    }

    /// Sends `signal` (SIGSTOP freezes it: its connections stay open and
    /// silent, as a hung process's do).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal");
    }

    /// Waits at most `timeout` for it to exit by itself; its exit status,
    /// or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the control plane") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Waits for a log line containing `text`, panicking with the log
    /// after `timeout`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(text)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?} within {timeout:?}; log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The proxies streaming from it (`/debug/proxies`).
    pub async fn proxies(&self) -> Vec<Value> {
        let reply = crate::client::get(
            &crate::client::http1(),
            &format!("http://{}/debug/proxies", self.admin),
        )
        .await;
        reply.json()["proxies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `n` proxies are connected and every one has
    /// acknowledged the version its view has now; returns them.
    pub async fn wait_synced(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let proxies = self.proxies().await;
            let synced = proxies.len() == n
                && proxies
                    .iter()
                    .all(|p| p["state"] == "synced" && p["acked_version"] == p["desired_version"]);
            if synced {
                return proxies;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} proxies not in sync within {timeout:?}: {proxies:#?}\nlog:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its metrics text.
    pub async fn metrics(&self) -> String {
        crate::client::metrics(self.admin).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The documents of a one-model mesh for a gateway the control plane
/// feeds: Backend `model` (namespace `models`) at `model`, Listener
/// `public` on an ephemeral port, and Route `edge` on it sending to the
/// backend, its rule's other fields `rule_extra` (YAML flow mapping
/// entries, e.g. `timeouts: { responseHeaders: 30s }`; empty for none).
pub fn gateway_mesh(model: SocketAddr, rule_extra: &str) -> String {
    let extra = if rule_extra.is_empty() {
        String::new()
    } else {
        format!(", {rule_extra}")
    };
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: model, namespace: models }}
spec: {{ endpoints: [{{ address: \"{model}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: public }}
spec: {{ address: \"127.0.0.1:0\" }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: edge }}
spec:
  listeners: [public]
  rules: [{{ backends: [{{ name: model.models }}]{extra} }}]
"
    )
}
