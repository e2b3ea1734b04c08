//! `infermesh-bench soak`, short: the real infermesh-proxy (built next to
//! infermesh-bench, as `cargo test --workspace` or `cargo build -p
//! infermesh-proxy` leaves it) under steady load through config reloads,
//! certificate rotations, backend restarts and hostile clients.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn proxy_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_infermesh-bench"));
    let proxy = bench.with_file_name("infermesh-proxy");
    assert!(
        proxy.is_file(),
        "{} is not built; run `cargo build -p infermesh-proxy` (or `cargo test --workspace`, which builds it)",
        proxy.display()
    );
    proxy
}

#[test]
fn a_short_soak_fails_no_well_behaved_request_and_every_event_takes() {
    let work = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_infermesh-bench"))
        .args([
            "soak",
            "--duration",
            "8s",
            "--rate",
            "50",
            "--json",
            "--quiet",
        ])
        .arg("--proxy")
        .arg(proxy_binary())
        .arg("--work")
        .arg(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let log = std::fs::read_to_string(work.path().join("proxy.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON report ({e}); stdout:\n{stdout}\nstderr:\n{stderr}\nproxy log, last lines first:\n{tail}")
    });
    let context = || format!("report:\n{stdout}\nstderr:\n{stderr}");
    assert!(output.status.success(), "the soak failed; {}", context());
    assert_eq!(report["passed"], true, "{}", context());

    let well = &report["wellBehaved"];
    assert!(well["sent"].as_u64().unwrap() > 500, "{}", context());
    assert_eq!(well["failed"], 0, "{}", context());

    let events = &report["events"];
    let rewrites = events["configRewrites"].as_u64().unwrap();
    assert!(rewrites >= 4, "{}", context());
    assert_eq!(
        events["reloadsApplied"].as_u64(),
        Some(rewrites),
        "{}",
        context()
    );
    assert_eq!(events["reloadsRefused"], 0, "{}", context());
    assert_eq!(events["certificateRotations"], 3, "{}", context());
    assert!(
        events["identityReloadsApplied"].as_u64().unwrap() >= 1,
        "{}",
        context()
    );
    assert_eq!(
        events["certificateExpiryAfter"],
        events["certificateExpiryExpected"],
        "the proxy presents the last certificate written; {}",
        context()
    );
    let restarts = events["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 2, "{}", context());
    for r in restarts {
        assert!(
            r["servedAfterRestart"].as_u64().unwrap() > 0,
            "{r} served nothing after its restart; {}",
            context()
        );
    }

    for kind in ["slowloris", "silent", "delayedResets", "nonReaders"] {
        let h = &report["hostile"][kind];
        assert!(
            h["closedByProxy"].as_u64().unwrap() > 0,
            "the proxy closed no {kind} connection; {}",
            context()
        );
    }
    let closed = &report["proxyCounts"]["connectionsClosed"];
    for reason in [
        "first_byte_timeout",
        "premature_resets",
        "stream_idle_timeout",
    ] {
        assert!(
            closed[reason].as_f64().unwrap_or(0.0) > 0.0,
            "no connection closed for {reason}; {}",
            context()
        );
    }
    assert_eq!(
        report["proxyCounts"]["openConnectionsAfter"],
        0.0,
        "{}",
        context()
    );
}
