//! The peers infermesh is compared with, HAProxy and nginx: the config
//! each gets (round robin over the backends, keep-alive to them, a thread
//! or worker per core the proxies may use, or as many as `workers` says)
//! and starting them when they are installed. Also the static backend,
//! which is nginx too and shares its config's frame.

use std::net::SocketAddr;
use std::path::Path;

use super::spec::{StaticBackend, TargetKind};
use super::supervise::{self, Placement, Proxies, Started};

/// Starts HAProxy in front of the backends at `backends`, placed as
/// `placement` says.
pub(super) fn start_haproxy(
    backends: &[SocketAddr],
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Proxies> {
    anyhow::ensure!(
        supervise::installed("haproxy"),
        "haproxy is not installed (apt install haproxy)"
    );
    let port = supervise::free_port()?;
    let file = work.join("haproxy.cfg");
    std::fs::write(
        &file,
        haproxy_config(
            port,
            backends,
            placement.peer_workers(),
            placement.peer_connections(),
        ),
    )?;
    let mut command = placement.command("haproxy");
    command.args(["-db", "-f"]).arg(&file);
    let started = supervise::spawn(TargetKind::Haproxy.name(), "haproxy", port, command, work)?;
    Ok(Proxies {
        processes: vec![started],
        port,
    })
}

/// Starts nginx in front of the backends at `backends`, placed as
/// `placement` says, with its pid and temporary files in `work`.
pub(super) fn start_nginx(
    backends: &[SocketAddr],
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Proxies> {
    let name = TargetKind::Nginx.name();
    let port = supervise::free_port()?;
    let config = nginx_config(
        name,
        placement.peer_workers(),
        2 * placement.peer_connections(),
        work,
        &reverse_proxy_server(port, backends),
    );
    let started = spawn_nginx(name, port, &config, placement, work)?;
    Ok(Proxies {
        processes: vec![started],
        port,
    })
}

/// Starts the static backend: nginx with one worker, placed as
/// `placement` says (the load's CPUs), answering every request with 200
/// and a body of `answer.body_bytes` bytes; returns it and its address.
pub(super) fn start_static_backend(
    answer: &StaticBackend,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<(Started, SocketAddr)> {
    let name = "static-backend";
    let port = supervise::free_port()?;
    let config = nginx_config(
        name,
        1,
        placement.peer_connections(),
        work,
        &static_server(port, answer.body_bytes),
    );
    let started = spawn_nginx(name, port, &config, placement, work)
        .map_err(|e| anyhow::anyhow!("staticBackend: {e:#}"))?;
    Ok((started, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Writes `config` to `name.conf` in `work` and starts nginx on it (with
/// `work` as its prefix), placed as `placement` says, until it listens on
/// `port`.
fn spawn_nginx(
    name: &str,
    port: u16,
    config: &str,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Started> {
    anyhow::ensure!(
        supervise::installed("nginx"),
        "nginx is not installed (apt install nginx-light)"
    );
    let file = work.join(format!("{name}.conf"));
    std::fs::write(&file, config)?;
    let mut command = placement.command("nginx");
    command.arg("-c").arg(&file).arg("-p").arg(work);
    supervise::spawn(name, "nginx", port, command, work)
}

/// HAProxy's config: HTTP mode with keep-alive, listening on `port`,
/// `threads` threads, at most `connections` clients, round robin over
/// `backends`.
fn haproxy_config(
    port: u16,
    backends: &[SocketAddr],
    threads: usize,
    connections: usize,
) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server mock{i} {b}\n"))
        .collect();
    format!(
        "global\n    maxconn {connections}\n    nbthread {threads}\ndefaults\n    mode http\n    option http-keep-alive\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\nfrontend bench\n    bind 127.0.0.1:{port}\n    default_backend mock\nbackend mock\n    balance roundrobin\n{servers}"
    )
}

/// An nginx config around `http`, the inside of its `http` block: in the
/// foreground with `workers` workers of `connections` connections each
/// (clients and upstreams together), its pid and temporary files in
/// `work` under `name` (so that the nginx target and the static backend,
/// both running at once, keep apart), errors to its log, no access log.
fn nginx_config(name: &str, workers: usize, connections: usize, work: &Path, http: &str) -> String {
    format!(
        "daemon off;\nworker_processes {workers};\npid {work}/{name}.pid;\nerror_log stderr warn;\nevents {{ worker_connections {connections}; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {work}/{name}-body;\n    proxy_temp_path {work}/{name}-proxy;\n{http}}}\n",
        work = work.display(),
    )
}

/// The nginx target's `http` block inside: a reverse proxy on `port`,
/// unbuffered, with upstream keep-alive to `backends`.
fn reverse_proxy_server(port: u16, backends: &[SocketAddr]) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("        server {b};\n"))
        .collect();
    format!(
        "    upstream mock {{\n{servers}        keepalive 64;\n    }}\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://mock;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_buffering off;\n        }}\n    }}\n"
    )
}

/// The static backend's `http` block inside: on `port`, 200 with
/// `body_bytes` bytes of `x` to every request, and a connection kept for
/// as many requests as a run sends (nginx closes one after 1,000 by
/// default, which would make the proxies reconnect during the phases).
fn static_server(port: u16, body_bytes: usize) -> String {
    let body = "x".repeat(body_bytes);
    format!(
        "    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 1000000;\n        location / {{\n            default_type text/plain;\n            return 200 \"{body}\";\n        }}\n    }}\n"
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
        let config = haproxy_config(8080, &backends(), 2, 4096);
        assert!(config.contains("nbthread 2\n"));
        assert!(config.contains("bind 127.0.0.1:8080\n"));
        assert!(config.ends_with(
            "balance roundrobin\n    server mock0 127.0.0.1:9000\n    server mock1 127.0.0.1:9001\n"
        ));
    }

    #[test]
    fn nginx_keeps_its_files_in_the_work_directory() {
        let config = nginx_config(
            "nginx",
            2,
            8192,
            Path::new("work"),
            &reverse_proxy_server(8080, &backends()),
        );
        assert!(config.contains("worker_processes 2;\npid work/nginx.pid;\n"));
        assert!(config.contains("client_body_temp_path work/nginx-body;"));
        assert!(config.contains("proxy_temp_path work/nginx-proxy;"));
        assert!(config.contains(
            "        server 127.0.0.1:9000;\n        server 127.0.0.1:9001;\n        keepalive 64;"
        ));
        assert!(config.contains("listen 127.0.0.1:8080;"));
        assert!(config.ends_with("    }\n}\n"), "{config}");
    }

    #[test]
    fn the_static_backend_answers_its_body_from_one_worker_of_its_own() {
        let config = nginx_config(
            "static-backend",
            1,
            4096,
            Path::new("work"),
            &static_server(9000, 100),
        );
        assert!(config.contains("worker_processes 1;\npid work/static-backend.pid;\n"));
        assert!(config.contains("client_body_temp_path work/static-backend-body;"));
        assert!(config.contains("access_log off;"));
        assert!(config.contains("listen 127.0.0.1:9000;"));
        assert!(config.contains("keepalive_requests 1000000;"));
        assert!(config.contains("default_type text/plain;"));
        let body = format!("return 200 \"{}\";", "x".repeat(100));
        assert!(config.contains(&body), "{config}");
        assert!(static_server(9000, 0).contains("return 200 \"\";"));
    }

    #[test]
    fn workers_reach_haproxy_and_nginx() {
        let placement = |workers| Placement {
            cpus: None,
            workers,
            default_workers: 4,
            connections: 32,
        };
        for (workers, expected) in [(Some(1), 1), (None, 4)] {
            let threads = placement(workers).peer_workers();
            assert_eq!(threads, expected);
            assert!(
                haproxy_config(8080, &backends(), threads, 4096)
                    .contains(&format!("nbthread {expected}\n"))
            );
            assert!(
                nginx_config("nginx", threads, 8192, Path::new("work"), "")
                    .contains(&format!("worker_processes {expected};\n"))
            );
        }
    }

    #[test]
    fn peers_hold_as_many_connections_as_the_load_opens() {
        let placement = |connections| Placement {
            cpus: None,
            workers: Some(1),
            default_workers: 1,
            connections,
        };
        // A small load keeps the usual limits.
        assert_eq!(placement(32).peer_connections(), 4096);
        // Ten thousand streams are not refused by the harness's own limit.
        let streams = placement(10_000).peer_connections();
        assert!(streams > 10_000, "{streams}");
        assert!(
            haproxy_config(8080, &backends(), 1, streams).contains(&format!("maxconn {streams}\n"))
        );
        assert!(
            nginx_config("nginx", 1, 2 * streams, Path::new("work"), "")
                .contains(&format!("worker_connections {};", 2 * streams))
        );
    }
}
