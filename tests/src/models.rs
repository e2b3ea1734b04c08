//! The mock model servers of `infermesh-bench serve` as test backends:
//! they speak OpenAI-compatible and KServe v2 APIs as a scenario file
//! describes, and count on their `/metrics` the requests running and those
//! whose client went away before the answer was complete (cancellations).
//! The process is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `infermesh-bench serve --scenario`.
pub struct MockModels {
    child: Child,
    _dir: tempfile::TempDir,
    /// Where each server of the scenario listens, in the scenario's order.
    pub servers: Vec<SocketAddr>,
}

impl MockModels {
    /// Serves `scenario` (YAML; its servers should listen on
    /// `127.0.0.1:0`) and waits until every server listens.
    pub fn start(scenario: &str) -> MockModels {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("scenario.yaml");
        std::fs::write(&path, scenario).expect("write the scenario");
        let expected = scenario.matches("listen:").count();
        let mut child = Command::new(crate::binary("infermesh-bench"))
            .arg("serve")
            .arg("--scenario")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start infermesh-bench serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut models = MockModels {
            child,
            _dir: dir,
            servers: Vec::new(),
        };
        while models.servers.len() < expected {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the mock servers print where they listen");
            if let Some(address) = line
                .strip_prefix("mock model server listening on ")
                .and_then(|rest| rest.split_whitespace().next())
            {
                models
                    .servers
                    .push(address.parse().expect("a socket address"));
            }
        }
        models
    }

    /// The value of a metric of `model` on server `server`'s `/metrics`
    /// (0 when the model has no such series yet).
    pub async fn metric(&self, server: usize, name: &str, model: &str) -> f64 {
        let page = crate::client::metrics(self.servers[server]).await;
        crate::client::metric_value(&page, &format!("{name}{{model_name=\"{model}\"}}"))
            .unwrap_or(0.0)
    }

    /// Waits (at most 5 s) until server `server` has seen `count`
    /// requests of `model` cancelled by their client.
    pub async fn wait_for_cancellations(&self, server: usize, model: &str, count: f64) {
        for _ in 0..500 {
            if self
                .metric(server, "infermesh_mock_cancellations_total", model)
                .await
                >= count
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "model {model} never saw {count} cancellation(s): {}",
            crate::client::metrics(self.servers[server]).await
        );
    }
}

impl Drop for MockModels {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
