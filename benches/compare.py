#!/usr/bin/env python3
"""Side-by-side measurement of infermesh-proxy against a direct connection
and against HAProxy, on loopback, in one run.

Each round runs the same bounded loads against every target in turn
(A B C A B C ...), so drift of a noisy machine hits all of them alike:

  * max throughput: wrk, closed loop (--connections, --duration);
  * latency at a fixed rate: oha, open loop with latency correction
    (--rate, --duration), so a stall is not hidden by coordinated omission.

For the proxies it also reads, from /proc, the CPU time spent per request
during the fixed-rate run, and the resident memory idle and at its peak.
Medians over the rounds are printed as a Markdown table, with ratios to the
direct connection.

This is the first measurement of the gateway; the load-harness issue
replaces it with `infermesh-bench compare`.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = "/v1/models"


def wait_port(port, what, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port}")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def wrk(url, connections, duration):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        check=True, capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return rps, (int(errors.group(1)) if errors else 0), socket_errors.group(1) if socket_errors else ""


def oha(url, rate, connections, duration):
    out = subprocess.run(
        ["oha", "--no-tui", "--output-format", "json", "-q", str(rate), "-z", f"{duration}s",
         "-c", str(connections), "--latency-correction", url],
        check=True, capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    report = json.loads(out)
    pct = report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    # Requests still in flight when the run's time is up are not failures.
    errors = {k: n for k, n in report.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
    total = sum(codes.values()) + sum(errors.values())
    return {
        "p50": pct["p50"], "p99": pct["p99"], "p99.9": pct["p99.9"],
        "rps": report["summary"]["requestsPerSec"], "ok": ok, "total": total,
    }


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per load run")
    ap.add_argument("--rate", type=int, default=2000, help="requests/s of the fixed-rate run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    missing = [tool for tool in ("wrk", "oha", "haproxy") if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt install wrk haproxy; cargo install oha")

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "infermesh-proxy", "--bin", "infermesh-bench"],
                   cwd=ROOT, check=True)
    release = ROOT / "target" / "release"
    work = Path(tempfile.mkdtemp(prefix="infermesh-compare-"))
    ports = {"mock": 19000, "infermesh": 19080, "infermesh+log": 19082, "haproxy": 19081}
    gateway = (
        "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: {{ name: bench }}\n"
        "spec: {{ address: 127.0.0.1:{port} }}\n---\n"
        "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: mock }}\n"
        "spec: {{ endpoints: [{{ address: 127.0.0.1:{mock} }}] }}\n---\n"
        "apiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: {{ name: all }}\n"
        "spec: {{ rules: [{{ backends: [{{ name: mock }}] }}] }}\n"
    )
    haproxy_cfg = f"""global
    maxconn 4096
    nbthread {os.cpu_count()}
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bench
    bind 127.0.0.1:{ports['haproxy']}
    default_backend mock
backend mock
    server mock 127.0.0.1:{ports['mock']}
"""
    (work / "haproxy.cfg").write_text(haproxy_cfg)
    log = open(work / "processes.log", "w")
    procs = {}
    try:
        procs["mock"] = start([release / "infermesh-bench", "serve", "--listen", f"127.0.0.1:{ports['mock']}",
                               "--latency", "0ms", "--token-interval", "0ms"], log)
        for name, level in (("infermesh", "info,infermesh::access=off"), ("infermesh+log", "info")):
            cfg = work / f"{name}.yaml"
            cfg.write_text(gateway.format(port=ports[name], mock=ports["mock"]))
            admin, health = (19001, 19002) if name == "infermesh" else (19003, 19004)
            out = open(work / f"{name}.log", "w")
            procs[name] = start([release / "infermesh-proxy", "--log-level", level, "--log-format", "json", "gateway",
                                 "--config", cfg, "--admin-address", f"127.0.0.1:{admin}",
                                 "--health-address", f"127.0.0.1:{health}"], out)
        procs["haproxy"] = start(["haproxy", "-db", "-f", work / "haproxy.cfg"], log)
        for name, port in ports.items():
            wait_port(port, name)
        time.sleep(1)
        targets = ["direct", "infermesh", "infermesh+log", "haproxy"]
        url = {t: f"http://127.0.0.1:{ports['mock' if t == 'direct' else t]}{PAGE}" for t in targets}
        idle_rss = {t: memory_kib(procs[t].pid, "VmRSS") for t in targets if t != "direct"}
        # Warm up every path (connections, pools, caches); not measured.
        for t in targets:
            wrk(url[t], args.connections, 2)
        results = {t: [] for t in targets}
        for r in range(args.rounds):
            for t in targets:
                rps, non2xx, sock = wrk(url[t], args.connections, args.duration)
                pid = procs[t].pid if t != "direct" else None
                before = cpu_seconds(pid) if pid else None
                fixed = oha(url[t], args.rate, args.connections, args.duration)
                cpu_us = (cpu_seconds(pid) - before) / max(fixed["total"], 1) * 1e6 if pid else None
                results[t].append({"max_rps": rps, "wrk_non2xx": non2xx, "wrk_socket_errors": sock,
                                   "cpu_us_per_request": cpu_us, **fixed})
                print(f"round {r + 1} {t:>14}: {rps:9.0f} req/s max; at {args.rate}/s p50 {fixed['p50'] * 1e3:.3f} ms "
                      f"p99 {fixed['p99'] * 1e3:.3f} ms ok {fixed['ok']}/{fixed['total']}"
                      + (f"; proxy CPU {cpu_us:.1f} us/req" if cpu_us is not None else ""), flush=True)
        peak_rss = {t: memory_kib(procs[t].pid, "VmHWM") for t in targets if t != "direct"}
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    med = lambda t, k: statistics.median(x[k] for x in results[t])
    d = {k: med("direct", k) for k in ("max_rps", "p50", "p99", "p99.9")}
    print(f"\nMedians of {args.rounds} rounds; {args.duration}s per run; {args.connections} connections; "
          f"fixed rate {args.rate}/s; GET {PAGE} on the mock model server; {os.cpu_count()} cores shared by all.\n")
    print("| target | max req/s | vs direct | p50 ms | +p50 ms | p99 ms | +p99 ms | p99.9 ms | CPU µs/req | RSS idle MiB | RSS peak MiB | failed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for t in targets:
        row = {k: med(t, k) for k in ("max_rps", "p50", "p99", "p99.9")}
        failed = sum(x["total"] - x["ok"] + x["wrk_non2xx"] for x in results[t])
        cpu = med(t, "cpu_us_per_request") if t != "direct" else None
        summary[t] = {**row, "cpu_us_per_request": cpu, "failed": failed,
                      "rss_idle_kib": idle_rss.get(t), "rss_peak_kib": peak_rss.get(t)}
        fmt = lambda v, f: f.format(v) if v is not None else "—"
        print(f"| {t} | {row['max_rps']:.0f} | {row['max_rps'] / d['max_rps']:.2f} | {row['p50'] * 1e3:.3f} | "
              f"{(row['p50'] - d['p50']) * 1e3:+.3f} | {row['p99'] * 1e3:.3f} | {(row['p99'] - d['p99']) * 1e3:+.3f} | "
              f"{row['p99.9'] * 1e3:.3f} | {fmt(cpu, '{:.1f}')} | {fmt(idle_rss.get(t) and idle_rss[t] / 1024, '{:.1f}')} | "
              f"{fmt(peak_rss.get(t) and peak_rss[t] / 1024, '{:.1f}')} | {failed} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rounds": results,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
