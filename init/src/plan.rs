//! The change to a nat table that installs or removes infermesh's rules,
//! computed from the table as `iptables-save -t nat` prints it: pure
//! functions, so every case is tested without root or iptables.

use std::collections::HashSet;

use crate::options::InterceptConfig;
use crate::rules::{CHAIN_PREFIX, CHAINS, OUTPUT_JUMP, PREROUTING_JUMP};

/// The nat table as `iptables-save -t nat` prints it: its chains and rules.
#[derive(Debug, Default)]
struct NatTable {
    chains: Vec<String>,
    /// `(chain, line)`, the line as printed (`-A CHAIN ...`).
    rules: Vec<(String, String)>,
}

impl NatTable {
    /// Reads the `*nat` section; comments, counters and other tables are
    /// ignored.
    fn parse(save: &str) -> NatTable {
        let mut table = NatTable::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.push(name.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ")
                && let Some(chain) = rest.split_whitespace().next()
            {
                table.rules.push((chain.to_owned(), line.to_owned()));
            }
        }
        table
    }
}

/// The chain a rule jumps or goes to, if any.
fn target(rule: &str) -> Option<&str> {
    let mut tokens = rule.split_whitespace();
    while let Some(token) = tokens.next() {
        if matches!(token, "-j" | "--jump" | "-g" | "--goto") {
            return tokens.next();
        }
    }
    None
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// A change to the nat table: the `iptables-restore --noflush` input and
/// what it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The input for `iptables-restore --noflush`; empty when there is
    /// nothing to change.
    pub restore_input: String,
    /// Jumps added to built-in chains (`-A ...` lines).
    pub jumps_added: Vec<String>,
    /// Jumps already in place and kept.
    pub jumps_kept: Vec<String>,
    /// Rules of other chains jumping to ours that are deleted, as `-D ...`
    /// lines: on install, repeats and other forms than ours; on cleanup,
    /// all of them.
    pub jumps_removed: Vec<String>,
    /// Our chains declared (created, or flushed when they exist) and filled.
    pub chains_written: Vec<String>,
    /// `INFERMESH_` chains deleted.
    pub chains_removed: Vec<String>,
}

impl Plan {
    /// Whether the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.restore_input.is_empty()
    }
}

/// The change that makes `current` (the `iptables-save -t nat` output) hold
/// exactly `config`'s rules, when `config` is given, or none of ours when
/// it is not: our chains are declared (which flushes them) and refilled,
/// the two jumps are kept when present and added when missing, any other
/// rule jumping to an `INFERMESH_` chain is deleted, and `INFERMESH_`
/// chains that are no longer wanted are deleted.
fn plan(current: &str, config: Option<&InterceptConfig>) -> Plan {
    let table = NatTable::parse(current);
    let wanted_jumps: &[&str] = match config {
        Some(_) => &[PREROUTING_JUMP, OUTPUT_JUMP],
        None => &[],
    };
    let wanted_chains: &[&str] = match config {
        Some(_) => &CHAINS,
        None => &[],
    };
    let mut kept = HashSet::new();
    let mut jumps_removed = Vec::new();
    for (chain, line) in &table.rules {
        if is_ours(chain) || !target(line).is_some_and(is_ours) {
            continue;
        }
        if wanted_jumps.contains(&line.as_str()) && kept.insert(line.as_str()) {
            continue;
        }
        jumps_removed.push(format!("-D{}", &line["-A".len()..]));
    }
    let jumps_kept: Vec<String> = wanted_jumps
        .iter()
        .filter(|j| kept.contains(**j))
        .map(|j| (*j).to_owned())
        .collect();
    let jumps_added: Vec<String> = wanted_jumps
        .iter()
        .filter(|j| !kept.contains(**j))
        .map(|j| (*j).to_owned())
        .collect();
    let chains_removed: Vec<String> = table
        .chains
        .iter()
        .filter(|c| is_ours(c) && !wanted_chains.contains(&c.as_str()))
        .cloned()
        .collect();
    let chains_written: Vec<String> = wanted_chains.iter().map(|c| (*c).to_owned()).collect();

    let mut restore_input = String::new();
    if config.is_some() || !jumps_removed.is_empty() || !chains_removed.is_empty() {
        let mut lines = vec!["*nat".to_owned()];
        lines.extend(
            chains_written
                .iter()
                .chain(&chains_removed)
                .map(|c| format!(":{c} - [0:0]")),
        );
        lines.extend(jumps_removed.iter().cloned());
        lines.extend(config.map(InterceptConfig::chain_rules).unwrap_or_default());
        lines.extend(jumps_added.iter().cloned());
        lines.extend(chains_removed.iter().map(|c| format!("-X {c}")));
        lines.push("COMMIT".to_owned());
        restore_input = lines.join("\n") + "\n";
    }
    Plan {
        restore_input,
        jumps_added,
        jumps_kept,
        jumps_removed,
        chains_written,
        chains_removed,
    }
}

/// The change that installs `config`'s rules on a nat table that is
/// `current` (the output of `iptables-save -t nat`).
pub fn plan_install(current: &str, config: &InterceptConfig) -> Plan {
    plan(current, Some(config))
}

/// The change that removes every jump to and every `INFERMESH_` chain from
/// a nat table that is `current`; a no-op ([`Plan::is_noop`]) when there is
/// none.
pub fn plan_cleanup(current: &str) -> Plan {
    plan(current, None)
}

const DRY_RUN_HEADER: &str =
    "# infermesh-proxy init --dry-run: input for `iptables-restore --noflush` (nat table, IPv4)\n";

/// What `init --dry-run` prints: the `iptables-restore --noflush` input
/// that installs `config` on a nat table without our rules. On a real run
/// the jumps are added only when they are missing.
pub fn dry_run(config: &InterceptConfig) -> String {
    format!(
        "{DRY_RUN_HEADER}# (a real run adds the PREROUTING and OUTPUT jumps only when they are missing)\n{}",
        plan_install("", config).restore_input
    )
}

/// What `init --cleanup --dry-run` prints: the `iptables-restore
/// --noflush` input that removes a complete install.
pub fn cleanup_dry_run() -> String {
    let installed = plan_install("", &InterceptConfig::default()).restore_input;
    format!(
        "{DRY_RUN_HEADER}# (a real run removes only the jumps and chains it finds)\n{}",
        plan_cleanup(&installed).restore_input
    )
}
