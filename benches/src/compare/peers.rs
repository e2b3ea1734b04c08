//! The peers infermesh is compared with, HAProxy and nginx: the config
//! each gets (round robin over the mock servers, keep-alive to them, one
//! thread or worker per core) and starting them when they are installed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use super::spec::TargetKind;
use super::supervise::{self, Proxies};

/// Starts HAProxy in front of the mock servers at `backends`.
pub(super) fn start_haproxy(backends: &[SocketAddr], work: &Path) -> anyhow::Result<Proxies> {
    anyhow::ensure!(
        supervise::installed("haproxy"),
        "haproxy is not installed (apt install haproxy)"
    );
    let port = supervise::free_port()?;
    let file = work.join("haproxy.cfg");
    std::fs::write(&file, haproxy_config(port, backends, cores()))?;
    let mut command = Command::new("haproxy");
    command.args(["-db", "-f"]).arg(&file);
    let started = supervise::spawn(TargetKind::Haproxy.name(), "haproxy", port, command, work)?;
    Ok(Proxies {
        processes: vec![started],
        port,
    })
}

/// Starts nginx in front of the mock servers at `backends`, with its
/// pid and temporary files in `work`.
pub(super) fn start_nginx(backends: &[SocketAddr], work: &Path) -> anyhow::Result<Proxies> {
    anyhow::ensure!(
        supervise::installed("nginx"),
        "nginx is not installed (apt install nginx-light)"
    );
    let port = supervise::free_port()?;
    let file = work.join("nginx.conf");
    std::fs::write(&file, nginx_config(port, backends, cores(), work))?;
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&file).arg("-p").arg(work);
    let started = supervise::spawn(TargetKind::Nginx.name(), "nginx", port, command, work)?;
    Ok(Proxies {
        processes: vec![started],
        port,
    })
}

/// The cores of this machine: HAProxy's threads, nginx's workers.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// HAProxy's config: HTTP mode with keep-alive, listening on `port`,
/// `threads` threads, round robin over `backends`.
fn haproxy_config(port: u16, backends: &[SocketAddr], threads: usize) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server mock{i} {b}\n"))
        .collect();
    format!(
        "global\n    maxconn 4096\n    nbthread {threads}\ndefaults\n    mode http\n    option http-keep-alive\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\nfrontend bench\n    bind 127.0.0.1:{port}\n    default_backend mock\nbackend mock\n    balance roundrobin\n{servers}"
    )
}

/// nginx's config: a reverse proxy on `port` with `workers` workers,
/// unbuffered, with upstream keep-alive to `backends`; its pid and
/// temporary files in `work`, no access log.
fn nginx_config(port: u16, backends: &[SocketAddr], workers: usize, work: &Path) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("        server {b};\n"))
        .collect();
    format!(
        "daemon off;\nworker_processes {workers};\npid {work}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {work}/body;\n    proxy_temp_path {work}/proxy;\n    upstream mock {{\n{servers}        keepalive 64;\n    }}\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://mock;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_buffering off;\n        }}\n    }}\n}}\n",
        work = work.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> [SocketAddr; 2] {
        [
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
        ]
    }

    #[test]
    fn haproxy_balances_over_every_mock_server() {
        let config = haproxy_config(8080, &backends(), 2);
        assert!(config.contains("nbthread 2\n"));
        assert!(config.contains("bind 127.0.0.1:8080\n"));
        assert!(config.ends_with(
            "balance roundrobin\n    server mock0 127.0.0.1:9000\n    server mock1 127.0.0.1:9001\n"
        ));
    }

    #[test]
    fn nginx_keeps_its_files_in_the_work_directory() {
        let config = nginx_config(8080, &backends(), 2, Path::new("work"));
        assert!(config.contains("worker_processes 2;\npid work/nginx.pid;\n"));
        assert!(config.contains("client_body_temp_path work/body;"));
        assert!(config.contains("proxy_temp_path work/proxy;"));
        assert!(config.contains(
            "        server 127.0.0.1:9000;\n        server 127.0.0.1:9001;\n        keepalive 64;"
        ));
        assert!(config.contains("listen 127.0.0.1:8080;"));
    }
}
