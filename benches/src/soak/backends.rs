//! The soak's model servers: mock servers over mutual TLS, each on a tokio
//! runtime of its own, so that killing one ends its listener and every
//! connection it holds at once, as a crashed server would, and restarting
//! it binds the same port again.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

use crate::mock::{MockServer, ServerSpec};

/// One mock model server that can be killed and started again.
pub struct Backend {
    spec: ServerSpec,
    runtime: Option<tokio::runtime::Runtime>,
    name: String,
}

impl Backend {
    /// Starts `spec`; its `listen` port 0 is replaced by the port bound,
    /// which restarts reuse.
    pub async fn start(name: &str, spec: ServerSpec) -> anyhow::Result<Backend> {
        let mut backend = Backend {
            spec,
            runtime: None,
            name: name.to_owned(),
        };
        let addr = backend.launch().await?;
        backend.spec.listen = addr;
        Ok(backend)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.spec.listen
    }

    /// Whether it is running.
    pub fn running(&self) -> bool {
        self.runtime.is_some()
    }

    /// Kills it: its runtime stops at once, dropping the listener and
    /// every connection (the peers see them close, mid-request or not).
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Starts it again on the same address. The port was just freed; if
    /// something else took it meanwhile, binding is tried for 2 s.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match self.launch().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn launch(&mut self) -> anyhow::Result<SocketAddr> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("soak-{}", self.name))
            .enable_all()
            .build()
            .context("cannot start a runtime for a mock server")?;
        let spec = self.spec.clone();
        // Bound inside its own runtime, so that the socket belongs to it.
        let bound = runtime
            .spawn(async move {
                let server = MockServer::bind(&spec, 0).await?;
                let addr = server.local_addr();
                tokio::spawn(server.serve());
                anyhow::Ok(addr)
            })
            .await;
        match bound {
            Ok(Ok(addr)) => {
                self.runtime = Some(runtime);
                Ok(addr)
            }
            Ok(Err(e)) => {
                runtime.shutdown_background();
                Err(e)
            }
            Err(e) => {
                runtime.shutdown_background();
                Err(anyhow::anyhow!("the mock server's start panicked: {e}"))
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context forbids.
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::ModelSpec;

    async fn models(addr: SocketAddr) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_killed_backend_closes_its_connections_and_restarts_on_its_port() {
        let spec = ServerSpec {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            models: vec![ModelSpec::simple(
                "m",
                Duration::from_millis(1).into(),
                Duration::from_millis(1).into(),
                4,
            )],
        };
        let mut backend = Backend::start("t", spec).await.unwrap();
        let addr = backend.addr();
        assert!(models(addr).await.unwrap().contains("\"m\""));
        // An open connection, idle between requests.
        let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend.kill();
        assert!(!backend.running());
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf))
            .await
            .expect("the connection closes when its server is killed");
        assert!(matches!(read, Ok(0) | Err(_)));
        assert!(models(addr).await.is_err(), "nothing listens");
        backend.restart().await.unwrap();
        assert_eq!(backend.addr(), addr);
        assert!(models(addr).await.unwrap().contains("\"m\""));
    }
}
