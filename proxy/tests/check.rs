//! `infermesh-proxy check`: validating a config file without starting.

use std::process::Command;

fn check(text: &str) -> (bool, String, String) {
    check_with(text, &[])
}

/// `check` with more `args` on a file holding `text`: whether it passed,
/// its stdout and its stderr (the file named `gateway.yaml`).
fn check_with(text: &str, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh-proxy"))
        .arg("check")
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr)
        .unwrap()
        .replace(&path.display().to_string(), "gateway.yaml");
    (out.status.success(), stdout, stderr)
}

const LISTENER: &str = "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: { name: l }\nspec: { address: 127.0.0.1:8080 }\n---\n";

#[test]
fn a_valid_config_passes() {
    let (ok, stdout, _) = check(&format!(
        "{LISTENER}apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: m }}\nspec:\n  endpoints: [{{ address: 127.0.0.1:9000 }}]\n"
    ));
    assert!(ok);
    assert!(
        stdout.contains("ok (1 listeners, 1 backends, 0 routes; version "),
        "{stdout}"
    );
}

#[test]
fn a_config_without_a_listener_is_refused() {
    let (ok, _, stderr) = check(
        "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: { name: m }\nspec:\n  endpoints: [{ address: 127.0.0.1:9000 }]\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains(
            "config file gateway.yaml defines no Listener, so the proxy would serve nothing"
        ),
        "{stderr}"
    );
}

#[test]
fn an_empty_file_is_refused_and_said_to_be_empty() {
    for text in ["", "# emptied\n", "---\n"] {
        for args in [&[][..], &["--sidecar"][..]] {
            let (ok, stdout, stderr) = check_with(text, args);
            assert!(!ok, "{text:?} {args:?}: {stdout}");
            assert_eq!(
                stderr,
                "config has 1 error:\n  gateway.yaml:1:1: the file holds no documents (it is empty, or only comments); a config needs at least one resource\n",
                "{text:?} {args:?}"
            );
        }
    }
}

/// Eight problems in three documents, which took four rounds of `check`
/// when it stopped at the first type error of each document.
#[test]
fn one_run_names_every_problem_with_its_line_field_and_the_name_meant() {
    // The file api's own test loads (api/tests/every_problem.rs).
    let (ok, _, stderr) = check(include_str!("../../api/tests/fixtures/eight-problems.yaml"));
    assert!(!ok);
    assert_eq!(
        stderr,
        concat!(
            "config has 8 errors:\n",
            "  gateway.yaml:6:3: Listener/public: spec.protocl: unknown field `protocl`; did you mean `protocol`?\n",
            "  gateway.yaml:7:3: Listener/public: spec.outsideMesh: outsideMesh applies only to a listener with `capture: outbound`\n",
            "  gateway.yaml:13:3: Backend/llama: spec.connectTimeout: invalid type: sequence, expected a duration such as 250ms, 30s, 5m or 1h30m\n",
            "  gateway.yaml:14:3: Backend/llama: spec.dnsRefreshInterval: 10ms is too short; the minimum is 1s\n",
            "  gateway.yaml:17:7: Backend/llama: spec.endpoints[0].weight: invalid type: string \"heavy\", expected an integer from 0 to 4294967295\n",
            "  gateway.yaml:18:7: Backend/llama: spec.endpoints[1]: missing field `address`\n",
            "  gateway.yaml:19:19: Backend/llama: spec.loadBalancer.policy: unknown variant `leastRequests`, expected one of `peakEwma`, `leastRequest`, `roundRobin`; did you mean `leastRequest`?\n",
            "  gateway.yaml:22:1: kind: unknown kind \"Rout\"; did you mean `Route`?\n",
        )
    );
}

/// `check` on `path`: whether it passed, and its stderr.
fn check_path(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh-proxy"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn only_a_regular_file_of_sane_size_is_read() {
    let (ok, stderr) = check_path(std::path::Path::new("/dev/zero"));
    assert!(!ok);
    assert!(
        stderr.contains("/dev/zero is not a regular file (a device)"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("gateway.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let (ok, stderr) = check_path(&fifo);
    assert!(!ok, "a FIFO is refused, not waited on");
    assert!(
        stderr.contains("is not a regular file (a FIFO)"),
        "{stderr}"
    );

    let (ok, stderr) = check_path(dir.path());
    assert!(!ok);
    assert!(
        stderr.contains("is not a regular file (a directory)"),
        "{stderr}"
    );

    let large = dir.path().join("large.yaml");
    let padding = "# padding\n".repeat(450_000);
    std::fs::write(&large, format!("{LISTENER}{padding}")).unwrap();
    let (ok, stderr) = check_path(&large);
    assert!(!ok);
    assert!(stderr.contains("is larger than 4 MiB"), "{stderr}");
}

#[test]
fn every_error_is_printed_with_its_location_and_the_exit_code_is_nonzero() {
    let (ok, _, stderr) = check(
        "apiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: missing }]\n      timeout: 5s\n",
    );
    assert!(!ok);
    assert_eq!(
        stderr,
        "config has 2 errors:\n  gateway.yaml:6:20: Route/r: spec.rules[0].backends[0].name: backend \"missing\" is not defined (defined backends: none)\n  gateway.yaml:7:7: Route/r: spec.rules[0].timeout: unknown field `timeout`; did you mean `timeouts`?\n"
    );
}

#[test]
fn an_unreadable_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh-proxy"))
        .args(["check", "--config", "/nonexistent/gateway.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("cannot read config file /nonexistent/gateway.yaml"),
        "{stderr}"
    );
}

#[test]
fn the_gateway_examples_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    for example in ["gateway.yaml", "ensemble.yaml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_infermesh-proxy"))
            .args(["check", "--config", &format!("{dir}/{example}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
