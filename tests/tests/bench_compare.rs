//! `infermesh-bench compare` end to end: it starts the mock servers and
//! every target (the real infermesh-proxy, HAProxy and nginx), loads each
//! in turn, and reports a row per target.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// The tests of this file count the proxies a comparison leaves running:
/// one at a time, so that one's proxies are not taken for the other's.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Running processes (not zombies) whose command is one a comparison starts.
fn started_by_compare() -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashSet::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(')'))
            else {
                return false;
            };
            !rest.trim_start().starts_with('Z')
                && ["nginx", "haproxy", "infermesh-proxy"]
                    .iter()
                    .any(|n| name.starts_with(n))
        })
        .collect()
}

/// Runs `infermesh-bench compare` on `scenario` with `args` after it.
fn compare(scenario: &Path, args: &[&OsStr]) -> Output {
    Command::new(infermesh_tests::binary("infermesh-bench"))
        .arg("compare")
        .arg(scenario)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn compare_measures_every_target_side_by_side() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("compare.yaml");
    std::fs::write(
        &scenario,
        "rounds: 1\ntargets: [direct, infermesh, haproxy, nginx]\nbackends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\nload:\n  template: openai-chat\n  rate: 200\n  connections: 4\n  duration: 500ms\n  warmup: 200ms\n",
    )
    .unwrap();
    let before = started_by_compare();
    let json = dir.path().join("result.json");
    let svg = dir.path().join("result.svg");
    let work = dir.path().join("work");
    let out = compare(
        &scenario,
        &[
            "--json".as_ref(),
            json.as_ref(),
            "--svg".as_ref(),
            svg.as_ref(),
            "--work".as_ref(),
            work.as_ref(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed:\n{stdout}\n{stderr}");
    for target in ["direct", "infermesh", "haproxy", "nginx"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {target} |")))
            .unwrap_or_else(|| panic!("no row for {target} (HAProxy and nginx come from apt: `apt install haproxy nginx-light`, or run ./test.sh, which installs them):\n{stdout}\n{stderr}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[cells.len() - 2],
            "0",
            "{target} had failed requests: {row}"
        );
        if target != "direct" {
            assert_ne!(
                cells[column(&stdout, "proxy CPU µs/req at rate")],
                "—",
                "{target} has its proxy CPU per request: {row}"
            );
        }
    }
    let left: Vec<u32> = started_by_compare().difference(&before).copied().collect();
    assert!(
        left.is_empty(),
        "compare left processes running (nginx workers included): {left:?}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["summary"].as_array().unwrap().len(), 4);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("infermesh") && chart.contains("nginx"));
}

#[test]
fn compare_measures_two_proxy_builds_side_by_side() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // The build to compare with: the same binary under another name, given
    // relative to the directory compare runs in.
    std::os::unix::fs::symlink(
        infermesh_tests::binary("infermesh-proxy"),
        dir.path().join("infermesh-proxy-before"),
    )
    .unwrap();
    let scenario = dir.path().join("ab.yaml");
    let comparison = |infermesh: &str| {
        format!(
            "rounds: 1\ntargets: [infermesh, infermesh-baseline]\nbackends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{{ name: mock-llm }}]\nload:\n  template: openai-chat\n  rate: 200\n  maxThroughput: false\n  connections: 4\n  duration: 500ms\n  warmup: 200ms\ninfermesh: {infermesh}\n"
        )
    };
    let compare = || {
        Command::new(infermesh_tests::binary("infermesh-bench"))
            .current_dir(dir.path())
            .arg("compare")
            .arg(&scenario)
            .arg("--json")
            .arg("result.json")
            .arg("--work")
            .arg("work")
            .output()
            .unwrap()
    };

    std::fs::write(&scenario, comparison("{}")).unwrap();
    let out = compare();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("infermesh.baselineBinary is missing"),
        "a baseline without its binary is refused, naming the field:\n{stderr}"
    );

    std::fs::write(
        &scenario,
        comparison("{ baselineBinary: infermesh-proxy-before }"),
    )
    .unwrap();
    let before = started_by_compare();
    let out = compare();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed:\n{stdout}\n{stderr}");
    for target in ["infermesh", "infermesh-baseline"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {target} |")))
            .unwrap_or_else(|| panic!("no row for {target}:\n{stdout}\n{stderr}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[cells.len() - 2],
            "0",
            "{target} had failed requests: {row}"
        );
        assert_ne!(
            cells[column(&stdout, "proxy CPU µs/req at rate")],
            "—",
            "{target} has its proxy CPU per request: {row}"
        );
    }
    let left: Vec<u32> = started_by_compare().difference(&before).copied().collect();
    assert!(left.is_empty(), "compare left proxies running: {left:?}");
    let work = dir.path().join("work");
    let config = |name: &str| {
        let text = std::fs::read_to_string(work.join(name)).unwrap();
        // The listener's port (the first address) is the only difference.
        let (head, tail) = text.split_once("127.0.0.1:").unwrap();
        head.to_owned() + tail.trim_start_matches(|c: char| c.is_ascii_digit())
    };
    assert_eq!(
        config("infermesh-baseline.yaml"),
        config("infermesh.yaml"),
        "the baseline runs the infermesh config"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap())
            .unwrap();
    let targets: Vec<&str> = report["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["infermesh", "infermesh-baseline"]);
}

/// The index of the column headed `name` in the report's Markdown table,
/// as its rows split on `|`.
fn column(report: &str, name: &str) -> usize {
    let header = report
        .lines()
        .find(|l| l.starts_with("| target |"))
        .unwrap_or_else(|| panic!("no table in the report:\n{report}"));
    header
        .split('|')
        .map(str::trim)
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name:?} in {header}"))
}

#[test]
fn a_pinned_comparison_against_a_static_backend_measures_cpu_and_memory_of_each_proxy() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // A CPU this process may run on (the first of its allowed list), for
    // both sides: the run is then possible on any machine.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let cpu: usize = allowed
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let scenario = dir.path().join("pinned.yaml");
    // CPU time is read in ticks of 10 ms: the window's requests must take
    // a proxy several (2,000 at ~30 µs each is 6 for nginx), or a proxy
    // that was busy reads 0.
    std::fs::write(
        &scenario,
        format!(
            "rounds: 1\ntargets: [direct, infermesh, nginx]\nstaticBackend: {{ bodyBytes: 100 }}\npinning: {{ proxy: [{cpu}], load: [{cpu}] }}\nworkers: 1\nload:\n  rate: 2000\n  connections: 4\n  duration: 1s\n  warmup: 200ms\n"
        ),
    )
    .unwrap();
    let before = started_by_compare();
    let work = dir.path().join("work");
    let out = compare(&scenario, &["--work".as_ref(), work.as_ref()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("static nginx backend answering 100 bytes"),
        "{stdout}"
    );
    for target in ["infermesh", "nginx"] {
        assert!(
            stderr.contains(&format!("{target}: pid ")),
            "{target} not reported:\n{stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("{target}: pid ")))
            .unwrap();
        assert!(
            line.contains(&format!("on CPUs {cpu}")),
            "{target} not pinned: {line}"
        );
    }
    let column = |name: &str| column(&stdout, name);
    for target in ["direct", "infermesh", "nginx"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {target} |")))
            .unwrap_or_else(|| panic!("no row for {target}:\n{stdout}\n{stderr}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[column("failed")], "0", "{row}");
        assert_eq!(cells[column("backend req/req")], "—", "{row}");
        let kernel = cells[column("of which kernel µs/req")];
        if target == "direct" {
            assert_eq!(kernel, "—", "{row}");
        } else {
            // Part of the CPU time: none of it, in a short run, or some.
            let total: f64 = cells[column("proxy CPU µs/req saturated")]
                .parse()
                .unwrap_or(f64::NAN);
            assert!(
                kernel
                    .parse::<f64>()
                    .is_ok_and(|k| (0.0..=total).contains(&k)),
                "{target} kernel share: {row}"
            );
        }
        if target != "direct" {
            // The proxy's own memory is part of its resident memory.
            let idle: f64 = cells[column("proxy RSS idle MiB")]
                .parse()
                .unwrap_or(f64::NAN);
            let anonymous: f64 = cells[column("of which anonymous MiB")]
                .parse()
                .unwrap_or(f64::NAN);
            assert!(anonymous <= idle, "{target} anonymous memory: {row}");
        }
        for measured in [
            "proxy CPU µs/req saturated",
            "proxy CPU µs/req at rate",
            "proxy RSS idle MiB",
            "of which anonymous MiB",
            "proxy RSS after load MiB",
            "proxy RSS saturated MiB",
        ] {
            let cell = cells[column(measured)];
            if target == "direct" {
                assert_eq!(cell, "—", "{measured}: {row}");
            } else {
                assert!(
                    cell.parse::<f64>().is_ok_and(|v| v > 0.0),
                    "{target} {measured}: {row}"
                );
            }
        }
    }
    let nginx = std::fs::read_to_string(work.join("nginx.conf")).unwrap();
    assert!(nginx.contains("worker_processes 1;"), "{nginx}");
    let left: Vec<u32> = started_by_compare().difference(&before).copied().collect();
    assert!(left.is_empty(), "compare left processes running: {left:?}");
}
