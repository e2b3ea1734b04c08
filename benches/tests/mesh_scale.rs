//! `infermesh-bench mesh-scale`, small: the real control plane (built next
//! to infermesh-bench, as `cargo test --workspace` leaves it) against a few
//! dozen of the proxy's own control-plane clients. Each phase must reach
//! exactly the proxies whose view it changes.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

#[test]
fn every_phase_reaches_the_proxies_whose_view_it_changes() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_infermesh-bench"));
    let control_plane = bench.with_file_name("infermesh-control-plane");
    assert!(
        control_plane.is_file(),
        "{} is not built; run `cargo build -p infermesh-control-plane` (or `cargo test --workspace`, which builds it)",
        control_plane.display()
    );
    let report = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(&bench)
        .args(["mesh-scale", "--proxies", "40", "--services", "20"])
        .args([
            "--namespaces",
            "5",
            "--settle",
            "0s",
            "--phase-timeout",
            "60s",
        ])
        .arg("--control-plane")
        .arg(&control_plane)
        .arg("--json")
        .arg(report.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(report.path()).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let phases = report["phases"].as_array().unwrap();
    let updated: Vec<u64> = phases
        .iter()
        .map(|p| p["proxies_updated"].as_u64().unwrap())
        .collect();
    // Service 7 is in namespace 2 with services 2, 12 and 17: their eight
    // sidecars hold it, and no other does.
    assert_eq!(updated, [40, 40, 8, 40], "{stdout}");
    // Its own namespace's 4 services (a backend and a route each) and the
    // shared one.
    assert_eq!(report["resources_per_proxy"], 10, "{stdout}");
    // After the restart the proxies already hold everything: each gets an
    // empty update.
    let restart = &phases[3];
    assert_eq!(restart["pushes"], 40, "{stdout}");
    assert!(
        restart["bytes_pushed"].as_u64().unwrap() < 40 * 64,
        "{stdout}"
    );
}
