//! `infermesh-proxy init` against real iptables: installing twice leaves the
//! same rules, other options replace them, `--cleanup` removes everything
//! (twice is fine), `--dry-run` needs neither root nor iptables, and bad
//! values are refused.
//!
//! Every run that changes rules runs inside a network namespace made for
//! the test (`ip netns exec`), never on the host's own rules; every run
//! outside one has `--dry-run`, so even a parsing bug cannot reach the
//! host. Without root or `ip netns`, the namespace test says that it is
//! skipped and why.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use infermesh_tests::binary;
use infermesh_tests::netns::{Namespace, skipped};

const PREROUTING_JUMP: &str = "-A PREROUTING -p tcp -j INFERMESH_INBOUND";
const OUTPUT_JUMP: &str = "-A OUTPUT -p tcp -j INFERMESH_OUTPUT";

/// `infermesh-proxy init args` inside `ns`.
fn init(ns: &Namespace, args: &[&str]) -> Output {
    let proxy = binary("infermesh-proxy");
    let proxy = proxy.to_str().expect("a UTF-8 path");
    let mut all = vec!["init"];
    all.extend_from_slice(args);
    ns.exec(proxy, &all)
}

/// The namespace's nat table as `iptables-save -t nat` prints it,
/// without its comment lines (they hold the time) and packet counters.
fn nat(ns: &Namespace) -> Vec<String> {
    let out = ns.exec("iptables-save", &["-t", "nat"]);
    assert!(
        out.status.success(),
        "iptables-save -t nat failed (Debian package iptables; ./test.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            // `:CHAIN POLICY [packets:bytes]`
            Some(_) => l.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
            None => l.to_owned(),
        })
        .collect()
}

/// Asserts that the run succeeded; returns its stdout.
fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

fn count(rules: &[String], line: &str) -> usize {
    rules.iter().filter(|r| *r == line).count()
}

#[test]
fn init_twice_leaves_the_same_rules_and_cleanup_removes_them() {
    let ns = match Namespace::create("init") {
        Ok(ns) => ns,
        Err(why) => {
            skipped(
                "init_twice_leaves_the_same_rules_and_cleanup_removes_them",
                &format!("cannot make a network namespace: {why}"),
            );
            return;
        }
    };
    assert!(
        !nat(&ns).iter().any(|l| l.contains("INFERMESH")),
        "a new namespace has no rules of ours"
    );

    let first = succeeded("init", &init(&ns, &[]));
    assert!(first.contains("nat rules installed"), "{first}");
    let once = nat(&ns);
    let second = succeeded("init again", &init(&ns, &[]));
    assert!(second.contains("jumps: already in place"), "{second}");
    let twice = nat(&ns);
    assert_eq!(once, twice, "a second init changed the rules");
    assert_eq!(count(&twice, PREROUTING_JUMP), 1, "{twice:#?}");
    assert_eq!(count(&twice, OUTPUT_JUMP), 1, "{twice:#?}");
    let jumps: Vec<&String> = twice
        .iter()
        .filter(|l| l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT "))
        .collect();
    assert_eq!(jumps, [PREROUTING_JUMP, OUTPUT_JUMP]);

    // What --dry-run prints is what gets installed.
    let dry_run = succeeded("init --dry-run", &init(&ns, &["--dry-run"]));
    let mut printed: Vec<&str> = dry_run.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut installed: Vec<&str> = twice
        .iter()
        .filter(|l| l.starts_with("-A "))
        .map(String::as_str)
        .collect();
    printed.sort_unstable();
    installed.sort_unstable();
    assert_eq!(printed, installed);

    // Other options replace our rules; the jumps stay single.
    succeeded(
        "init with other options",
        &init(
            &ns,
            &[
                "--proxy-uid",
                "2000",
                "--exclude-inbound-ports",
                "22",
                "--exclude-outbound-cidrs",
                "10.96.0.0/12",
            ],
        ),
    );
    let replaced = nat(&ns);
    for line in [
        "-A INFERMESH_OUTPUT -m owner --uid-owner 2000 -j RETURN",
        "-A INFERMESH_OUTPUT -m owner --gid-owner 2000 -j RETURN",
        "-A INFERMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A INFERMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
    ] {
        assert_eq!(count(&replaced, line), 1, "{line} in {replaced:#?}");
    }
    assert!(
        !replaced.iter().any(|l| l.contains("1337")),
        "{replaced:#?}"
    );
    assert_eq!(count(&replaced, PREROUTING_JUMP), 1, "{replaced:#?}");
    assert_eq!(count(&replaced, OUTPUT_JUMP), 1, "{replaced:#?}");

    // A missing iptables is named, with what to do; nothing changes.
    let missing = init(&ns, &["--iptables", "/nonexistent/iptables"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("`/nonexistent/iptables-save` was not found")
            && stderr.contains("apt install iptables"),
        "{stderr}"
    );
    assert_eq!(nat(&ns), replaced);

    let cleanup = succeeded("init --cleanup", &init(&ns, &["--cleanup"]));
    assert!(cleanup.contains("removed"), "{cleanup}");
    let clean = nat(&ns);
    assert!(
        !clean.iter().any(|l| l.contains("INFERMESH")),
        "rules left after --cleanup: {clean:#?}"
    );
    let again = succeeded("init --cleanup again", &init(&ns, &["--cleanup"]));
    assert!(again.contains("nothing to remove"), "{again}");
    assert_eq!(nat(&ns), clean);
}

#[test]
fn dry_run_prints_the_rules_without_root_or_iptables() {
    // No iptables in PATH.
    let dry_run = || {
        let mut command = Command::new(binary("infermesh-proxy"));
        command
            .args(["init", "--dry-run"])
            .env("PATH", "/nonexistent");
        command
    };
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let out = if root {
        // As `nobody`, when that user may run the binary where it was built.
        match dry_run().uid(65534).gid(65534).output() {
            Ok(out) => out,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "NOTE dry_run_prints_the_rules_without_root_or_iptables: cannot run the binary as uid 65534 ({e}); running it as root, still without iptables in PATH"
                );
                dry_run().output().expect("run infermesh-proxy")
            }
        }
    } else {
        dry_run().output().expect("run infermesh-proxy")
    };
    let text = succeeded("init --dry-run", &out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.first(), Some(&"*nat"), "{text}");
    assert_eq!(lines.last(), Some(&"COMMIT"), "{text}");
    for line in [
        ":INFERMESH_INBOUND - [0:0]",
        ":INFERMESH_IN_REDIRECT - [0:0]",
        ":INFERMESH_OUTPUT - [0:0]",
        ":INFERMESH_REDIRECT - [0:0]",
        "-A INFERMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
        "-A INFERMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A INFERMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A INFERMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A INFERMESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A INFERMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        PREROUTING_JUMP,
        OUTPUT_JUMP,
    ] {
        assert!(lines.contains(&line), "no `{line}` in:\n{text}");
    }
}

#[test]
fn bad_ports_and_cidrs_are_refused_with_a_message() {
    for (args, expected) in [
        (
            &["--exclude-inbound-ports", "22,70000"][..],
            "`70000` is not a port (a number from 1 to 65535)",
        ),
        (&["--inbound-port", "0"][..], "`0` is not a port"),
        (
            &["--exclude-outbound-cidrs", "10.0.0.0/40"][..],
            "the prefix length must be a number from 0 to 32",
        ),
        (
            &["--include-outbound-cidrs", "10.0.0.300/8"][..],
            "`10.0.0.300/8` is not an IPv4 CIDR",
        ),
    ] {
        // --dry-run, so that a value wrongly accepted changes nothing.
        let out = Command::new(binary("infermesh-proxy"))
            .args(["init", "--dry-run"])
            .args(args)
            .output()
            .expect("run infermesh-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
