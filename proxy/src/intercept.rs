//! Transparent interception for the sidecar mode: the iptables rules (nat
//! table, IPv4) that send a pod's TCP traffic through its proxy, as
//! `infermesh-proxy init` installs and removes them.
//!
//! This module owns every nat chain whose name starts with `INFERMESH_` and
//! the jumps to them from `PREROUTING` and `OUTPUT`; it never changes any
//! other rule. Inbound TCP (`PREROUTING` → [`INBOUND_CHAIN`] →
//! [`IN_REDIRECT_CHAIN`]) is redirected to the proxy's inbound port and
//! outbound TCP made in the pod (`OUTPUT` → [`OUTPUT_CHAIN`] →
//! [`REDIRECT_CHAIN`]) to its outbound port. The proxy's own traffic (by
//! UID and GID), connections to `127.0.0.1`, the proxy's inbound and health
//! ports and the configured exclusions are left alone.
//!
//! Changes are computed from the table as `iptables-save -t nat` shows it
//! ([`plan_install`], [`plan_cleanup`], pure functions) and applied as one
//! `iptables-restore --noflush` transaction, so a run either applies fully
//! or not at all. Declaring our chains in that input flushes them, and a
//! jump is added only when it is missing, so installing twice leaves the
//! same rules as installing once, and installing with other options
//! replaces ours.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;

/// The prefix of every chain this module owns.
pub const CHAIN_PREFIX: &str = "INFERMESH_";
/// Inbound TCP, jumped to from `PREROUTING`: the exclusions, then the jump
/// to [`IN_REDIRECT_CHAIN`].
pub const INBOUND_CHAIN: &str = "INFERMESH_INBOUND";
/// Redirects to the proxy's inbound port.
pub const IN_REDIRECT_CHAIN: &str = "INFERMESH_IN_REDIRECT";
/// Outbound TCP, jumped to from `OUTPUT`: the exclusions, then the jump to
/// [`REDIRECT_CHAIN`].
pub const OUTPUT_CHAIN: &str = "INFERMESH_OUTPUT";
/// Redirects to the proxy's outbound port.
pub const REDIRECT_CHAIN: &str = "INFERMESH_REDIRECT";
/// Our chains, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];
/// The jump from `PREROUTING`, as `iptables-save` prints it.
pub const PREROUTING_JUMP: &str = "-A PREROUTING -p tcp -j INFERMESH_INBOUND";
/// The jump from `OUTPUT`, as `iptables-save` prints it.
pub const OUTPUT_JUMP: &str = "-A OUTPUT -p tcp -j INFERMESH_OUTPUT";

/// The proxy's inbound port by default (as Istio's).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The proxy's outbound port by default (as Istio's).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The proxy's health and metrics port by default (the gateway's
/// `--health-address` port), never redirected so that kubelet probes reach
/// the proxy.
pub const DEFAULT_HEALTH_PORT: u16 = 15020;
/// The UID the proxy runs as by default (as Istio's).
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// A value given for a port or CIDR option that is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a number from 1 to 65535.
    #[error("`{0}` is not a port (a number from 1 to 65535)")]
    Port(String),
    /// Not an IPv4 address, or not `ADDRESS/PREFIX`.
    #[error("`{0}` is not an IPv4 CIDR (like 10.0.0.0/8)")]
    Cidr(String),
    /// The prefix length is not a number from 0 to 32.
    #[error("`{0}`: the prefix length must be a number from 0 to 32")]
    Prefix(String),
    /// The address has bits set past the prefix length.
    #[error("`{given}` has bits set past its prefix length; did you mean {network}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        network: Ipv4Cidr,
    },
    /// A comma-separated list with an empty item, like `22,,80`.
    #[error("`{0}` has an empty item")]
    EmptyItem(String),
}

/// Parses one TCP port: a number from 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, ParseError> {
    let t = s.trim();
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Port(s.to_owned()));
    }
    match t.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ParseError::Port(s.to_owned())),
    }
}

/// An IPv4 network: an address with no bits set past its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network `addr/prefix`; refused when `prefix` is over 32 or
    /// `addr` has bits set past it.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, ParseError> {
        if prefix > 32 {
            return Err(ParseError::Prefix(format!("{addr}/{prefix}")));
        }
        let network = Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        if network.addr != addr {
            return Err(ParseError::HostBits {
                given: format!("{addr}/{prefix}"),
                network,
            });
        }
        Ok(network)
    }

    /// The network's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length, 0 to 32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Ipv4Cidr {
    type Err = ParseError;

    /// `ADDRESS/PREFIX` (like `10.0.0.0/8`), or a bare address for `/32`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let t = s.trim();
        let (addr, prefix) = t.split_once('/').unwrap_or((t, "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| ParseError::Cidr(s.to_owned()))?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::Prefix(s.to_owned()));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| ParseError::Prefix(s.to_owned()))?;
        if prefix > 32 {
            return Err(ParseError::Prefix(s.to_owned()));
        }
        Ipv4Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Splits a comma-separated list (`""` is the empty list), parses each item
/// and drops repeats, keeping the first.
fn parse_list<T: PartialEq>(
    s: &str,
    item: impl Fn(&str) -> Result<T, ParseError>,
) -> Result<Vec<T>, ParseError> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        if part.trim().is_empty() {
            return Err(ParseError::EmptyItem(s.to_owned()));
        }
        let value = item(part)?;
        if !out.contains(&value) {
            out.push(value);
        }
    }
    Ok(out)
}

/// A comma-separated list of ports, like `22,9090` (`""` is none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl FromStr for PortList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_list(s, parse_port).map(PortList)
    }
}

/// A comma-separated list of IPv4 CIDRs, like `10.0.0.0/8,192.168.0.0/16`
/// (`""` is none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Ipv4Cidr>);

impl FromStr for CidrList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_list(s, str::parse).map(CidrList)
    }
}

/// What an include option selects: `*` for everything, or a
/// comma-separated list (`""` selects nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Selection<T> {
    /// Everything (`*`).
    #[default]
    All,
    /// Only these.
    Only(Vec<T>),
}

impl FromStr for Selection<u16> {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.trim() == "*" {
            return Ok(Selection::All);
        }
        parse_list(s, parse_port).map(Selection::Only)
    }
}

impl FromStr for Selection<Ipv4Cidr> {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.trim() == "*" {
            return Ok(Selection::All);
        }
        parse_list(s, str::parse).map(Selection::Only)
    }
}

/// What to intercept: the proxy's ports and identity, and the exclusions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterceptConfig {
    /// Where inbound TCP is redirected; never redirected itself.
    pub inbound_port: u16,
    /// Where outbound TCP is redirected.
    pub outbound_port: u16,
    /// The proxy's health port, never redirected inbound (kubelet probes).
    pub health_port: u16,
    /// Outbound traffic of processes running as this UID (the proxy's) is
    /// never redirected.
    pub proxy_uid: u32,
    /// Outbound traffic of processes running as this GID is never
    /// redirected.
    pub proxy_gid: u32,
    /// Inbound destination ports never redirected.
    pub exclude_inbound_ports: Vec<u16>,
    /// Inbound destination ports redirected (after the exclusions).
    pub include_inbound_ports: Selection<u16>,
    /// Outbound destination ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never redirected.
    pub exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// Outbound destinations redirected (after the exclusions).
    pub include_outbound_cidrs: Selection<Ipv4Cidr>,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            health_port: DEFAULT_HEALTH_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: DEFAULT_PROXY_UID,
            exclude_inbound_ports: Vec::new(),
            include_inbound_ports: Selection::All,
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_cidrs: Selection::All,
        }
    }
}

impl InterceptConfig {
    /// The inbound ports never redirected: the inbound port (else the
    /// proxy's own inbound connections would loop), the health port, then
    /// the excluded ones; without repeats.
    pub fn inbound_exclusions(&self) -> Vec<u16> {
        let mut ports = vec![self.inbound_port];
        for &port in [self.health_port].iter().chain(&self.exclude_inbound_ports) {
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        ports
    }

    /// The rules of our chains, each a line as `iptables-save` prints it
    /// (`-A CHAIN ...`), in order: every exclusion (`-j RETURN`) comes
    /// before the jump to the redirect.
    pub fn chain_rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
        for port in self.inbound_exclusions() {
            rules.push(format!(
                "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        match &self.include_inbound_ports {
            Selection::All => {
                rules.push(format!("-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}"))
            }
            Selection::Only(ports) => rules.extend(ports.iter().map(|port| {
                format!("-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j {IN_REDIRECT_CHAIN}")
            })),
        }
        rules.push(format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        rules.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {} -j RETURN",
            self.proxy_gid
        ));
        rules.push(format!("-A {OUTPUT_CHAIN} -d 127.0.0.1/32 -j RETURN"));
        for port in &self.exclude_outbound_ports {
            rules.push(format!(
                "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        for cidr in &self.exclude_outbound_cidrs {
            rules.push(format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN"));
        }
        match &self.include_outbound_cidrs {
            Selection::All => rules.push(format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")),
            Selection::Only(cidrs) => rules.extend(
                cidrs
                    .iter()
                    .map(|cidr| format!("-A {OUTPUT_CHAIN} -d {cidr} -j {REDIRECT_CHAIN}")),
            ),
        }
        rules.push(format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rules
    }
}

impl fmt::Display for InterceptConfig {
    /// Two lines saying what is redirected where and what is not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = |ports: &[u16]| join(ports.iter());
        let inbound = match &self.include_inbound_ports {
            Selection::All => "any port".to_owned(),
            Selection::Only(p) if p.is_empty() => "no port".to_owned(),
            Selection::Only(p) => format!("ports {}", ports(p)),
        };
        writeln!(
            f,
            "inbound:  TCP to {inbound} -> {}, except to ports {}",
            self.inbound_port,
            ports(&self.inbound_exclusions())
        )?;
        let outbound = match &self.include_outbound_cidrs {
            Selection::All => "any address".to_owned(),
            Selection::Only(c) if c.is_empty() => "no address".to_owned(),
            Selection::Only(c) => join(c.iter()),
        };
        write!(
            f,
            "outbound: TCP to {outbound} -> {}, except from uid {} or gid {}, to 127.0.0.1/32",
            self.outbound_port, self.proxy_uid, self.proxy_gid
        )?;
        if !self.exclude_outbound_ports.is_empty() {
            write!(f, ", to ports {}", ports(&self.exclude_outbound_ports))?;
        }
        if !self.exclude_outbound_cidrs.is_empty() {
            write!(f, ", to {}", join(self.exclude_outbound_cidrs.iter()))?;
        }
        Ok(())
    }
}

fn join<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

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

/// Why the rules could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// An iptables program is not installed or not at the given path.
    #[error(
        "`{}` was not found: install iptables (Debian and Ubuntu: `apt install iptables`) or give its path with --iptables (`-save` and `-restore` are looked for beside it)",
        program.display()
    )]
    NotFound {
        /// The program.
        program: PathBuf,
    },
    /// An iptables program could not be started.
    #[error("cannot run `{}`: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An iptables program ran and failed.
    #[error("{}", failure(program, *status, stderr, input.as_deref()))]
    Failed {
        /// The program.
        program: PathBuf,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
        /// The input it was given, if any.
        input: Option<String>,
    },
}

fn failure(program: &Path, status: ExitStatus, stderr: &str, input: Option<&str>) -> String {
    let mut message = format!("`{}` failed ({status})", program.display());
    let stderr = stderr.trim_end();
    if stderr.is_empty() {
        message.push_str(" and printed nothing");
    } else {
        message.push_str(":\n");
        message.push_str(stderr);
    }
    if stderr.contains("Permission denied") || stderr.contains("must be root") {
        message.push_str(
            "\n(init changes the pod's network namespace: run it as root with the NET_ADMIN and NET_RAW capabilities, as a Kubernetes init container)",
        );
    }
    if let Some(input) = input {
        message.push_str("\nits input was:");
        for (n, line) in input.lines().enumerate() {
            message.push_str(&format!("\n{:>4}  {line}", n + 1));
        }
    }
    message
}

/// The iptables programs to use: `iptables-save` and `iptables-restore`
/// named after the chosen `iptables` (`iptables-legacy` →
/// `iptables-legacy-save`, `iptables-legacy-restore`) and in its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iptables {
    save: PathBuf,
    restore: PathBuf,
}

impl Iptables {
    /// The programs beside `iptables` (a path, or a name looked up in
    /// `PATH`).
    pub fn new(iptables: &Path) -> Self {
        let sibling = |suffix: &str| {
            let mut name = OsString::from(iptables.file_name().unwrap_or(iptables.as_os_str()));
            name.push(suffix);
            iptables.with_file_name(name)
        };
        Iptables {
            save: sibling("-save"),
            restore: sibling("-restore"),
        }
    }

    /// The `iptables-save` program.
    pub fn save_program(&self) -> &Path {
        &self.save
    }

    /// The `iptables-restore` program.
    pub fn restore_program(&self) -> &Path {
        &self.restore
    }

    /// The nat table, as `iptables-save -t nat` prints it.
    pub fn save_nat(&self) -> Result<String, InterceptError> {
        let output = run(&self.save, &["-t", "nat"], None)?;
        Ok(String::from_utf8_lossy(&output).into_owned())
    }

    /// Applies `input` with `iptables-restore --noflush`: one transaction
    /// that leaves every chain it does not name as it was.
    pub fn restore_noflush(&self, input: &str) -> Result<(), InterceptError> {
        run(&self.restore, &["--noflush"], Some(input)).map(drop)
    }
}

/// Runs `program` with `args`, feeding it `input`; its stdout on success.
fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<Vec<u8>, InterceptError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InterceptError::NotFound {
                program: program.to_owned(),
            },
            _ => InterceptError::Spawn {
                program: program.to_owned(),
                source,
            },
        })?;
    let stdin = child.stdin.take();
    // The input is written from another thread so that a program that
    // prints much before reading all of it cannot block on a full pipe; a
    // write error (the program exited early) shows in its status and
    // stderr below.
    let output = std::thread::scope(|scope| {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            scope.spawn(move || {
                let _ = stdin.write_all(input.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(|source| InterceptError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(InterceptError::Failed {
            program: program.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            input: input.map(str::to_owned),
        })
    }
}

/// Installs `config`'s rules: reads the nat table, then applies
/// [`plan_install`] in one `iptables-restore --noflush`. Running it again
/// leaves the same rules; running it with another config replaces ours.
pub fn install(iptables: &Iptables, config: &InterceptConfig) -> Result<Plan, InterceptError> {
    let plan = plan_install(&iptables.save_nat()?, config);
    iptables.restore_noflush(&plan.restore_input)?;
    Ok(plan)
}

/// Removes our jumps and chains: reads the nat table, then applies
/// [`plan_cleanup`]; changes nothing (and succeeds) when none is there.
pub fn cleanup(iptables: &Iptables) -> Result<Plan, InterceptError> {
    let plan = plan_cleanup(&iptables.save_nat()?);
    if !plan.is_noop() {
        iptables.restore_noflush(&plan.restore_input)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(config: &InterceptConfig) -> Vec<String> {
        config.chain_rules()
    }

    fn position(rules: &[String], line: &str) -> usize {
        rules
            .iter()
            .position(|r| r == line)
            .unwrap_or_else(|| panic!("no rule `{line}` in:\n{}", rules.join("\n")))
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    /// `iptables-save -t nat` after a default install, as iptables 1.8.9
    /// (nf_tables) prints it.
    const SAVED_DEFAULT: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 28 23:27:29 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:INFERMESH_INBOUND - [0:0]
:INFERMESH_IN_REDIRECT - [0:0]
:INFERMESH_OUTPUT - [0:0]
:INFERMESH_REDIRECT - [0:0]
-A PREROUTING -p tcp -j INFERMESH_INBOUND
-A OUTPUT -p tcp -j INFERMESH_OUTPUT
-A INFERMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A INFERMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A INFERMESH_INBOUND -p tcp -j INFERMESH_IN_REDIRECT
-A INFERMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A INFERMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A INFERMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A INFERMESH_OUTPUT -d 127.0.0.1/32 -j RETURN
-A INFERMESH_OUTPUT -j INFERMESH_REDIRECT
-A INFERMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Sat Nov 28 23:27:29 2026
";

    const SAVED_EMPTY: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 28 23:25:55 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
# Completed on Sat Nov 28 23:25:55 2026
";

    #[test]
    fn the_default_rules_are_exactly_these() {
        assert_eq!(
            plan_install(SAVED_EMPTY, &InterceptConfig::default()).restore_input,
            "\
*nat
:INFERMESH_INBOUND - [0:0]
:INFERMESH_IN_REDIRECT - [0:0]
:INFERMESH_OUTPUT - [0:0]
:INFERMESH_REDIRECT - [0:0]
-A INFERMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A INFERMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A INFERMESH_INBOUND -p tcp -j INFERMESH_IN_REDIRECT
-A INFERMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A INFERMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A INFERMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A INFERMESH_OUTPUT -d 127.0.0.1/32 -j RETURN
-A INFERMESH_OUTPUT -j INFERMESH_REDIRECT
-A INFERMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j INFERMESH_INBOUND
-A OUTPUT -p tcp -j INFERMESH_OUTPUT
COMMIT
"
        );
    }

    #[test]
    fn the_proxys_own_traffic_and_localhost_are_excluded_before_the_redirect() {
        let config = InterceptConfig {
            proxy_uid: 2102,
            proxy_gid: 2103,
            ..InterceptConfig::default()
        };
        let r = rules(&config);
        let redirect = position(&r, "-A INFERMESH_OUTPUT -j INFERMESH_REDIRECT");
        assert!(
            position(
                &r,
                "-A INFERMESH_OUTPUT -m owner --uid-owner 2102 -j RETURN"
            ) < redirect
        );
        assert!(
            position(
                &r,
                "-A INFERMESH_OUTPUT -m owner --gid-owner 2103 -j RETURN"
            ) < redirect
        );
        assert!(position(&r, "-A INFERMESH_OUTPUT -d 127.0.0.1/32 -j RETURN") < redirect);
        assert!(!r.iter().any(|l| l.contains("1337")), "{r:#?}");
    }

    #[test]
    fn the_inbound_and_health_ports_are_never_redirected() {
        let config = InterceptConfig {
            inbound_port: 4143,
            outbound_port: 4140,
            health_port: 4191,
            ..InterceptConfig::default()
        };
        let r = rules(&config);
        let redirect = position(&r, "-A INFERMESH_INBOUND -p tcp -j INFERMESH_IN_REDIRECT");
        assert!(
            position(
                &r,
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN"
            ) < redirect
        );
        assert!(
            position(
                &r,
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN"
            ) < redirect
        );
        position(
            &r,
            "-A INFERMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
        );
        position(
            &r,
            "-A INFERMESH_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
        );
    }

    #[test]
    fn excluded_inbound_ports_return_before_the_redirect_without_repeats() {
        let config = InterceptConfig {
            exclude_inbound_ports: vec![22, 15020, 9090],
            ..InterceptConfig::default()
        };
        assert_eq!(config.inbound_exclusions(), [15006, 15020, 22, 9090]);
        let r = rules(&config);
        let inbound: Vec<&str> = r
            .iter()
            .filter(|l| l.starts_with("-A INFERMESH_INBOUND "))
            .map(String::as_str)
            .collect();
        assert_eq!(
            inbound,
            [
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
                "-A INFERMESH_INBOUND -p tcp -j INFERMESH_IN_REDIRECT",
            ]
        );
    }

    #[test]
    fn included_inbound_ports_are_the_only_ones_redirected() {
        let config = InterceptConfig {
            include_inbound_ports: "8080,8443".parse().unwrap(),
            exclude_inbound_ports: vec![8443],
            ..InterceptConfig::default()
        };
        let r = rules(&config);
        let to_redirect: Vec<&String> = r
            .iter()
            .filter(|l| l.ends_with("-j INFERMESH_IN_REDIRECT"))
            .collect();
        assert_eq!(
            to_redirect,
            [
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 8080 -j INFERMESH_IN_REDIRECT",
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 8443 -j INFERMESH_IN_REDIRECT",
            ]
        );
        // An excluded port stays excluded even when included.
        assert!(
            position(
                &r,
                "-A INFERMESH_INBOUND -p tcp -m tcp --dport 8443 -j RETURN"
            ) < position(&r, to_redirect[1])
        );

        let none = InterceptConfig {
            include_inbound_ports: "".parse().unwrap(),
            ..InterceptConfig::default()
        };
        assert!(
            !rules(&none)
                .iter()
                .any(|l| l.ends_with("-j INFERMESH_IN_REDIRECT"))
        );
    }

    #[test]
    fn excluded_outbound_ports_and_cidrs_return_before_the_redirect() {
        let config = InterceptConfig {
            exclude_outbound_ports: "5432,6379".parse::<PortList>().unwrap().0,
            exclude_outbound_cidrs: "10.96.0.0/12,169.254.169.254"
                .parse::<CidrList>()
                .unwrap()
                .0,
            ..InterceptConfig::default()
        };
        let r = rules(&config);
        let redirect = position(&r, "-A INFERMESH_OUTPUT -j INFERMESH_REDIRECT");
        for line in [
            "-A INFERMESH_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A INFERMESH_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
            "-A INFERMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A INFERMESH_OUTPUT -d 169.254.169.254/32 -j RETURN",
        ] {
            assert!(position(&r, line) < redirect, "{line}");
        }
    }

    #[test]
    fn included_outbound_cidrs_are_the_only_ones_redirected() {
        let config = InterceptConfig {
            include_outbound_cidrs: "10.0.0.0/8,172.16.0.0/12".parse().unwrap(),
            exclude_outbound_cidrs: vec![cidr("10.96.0.0/12")],
            ..InterceptConfig::default()
        };
        let r = rules(&config);
        let output: Vec<&str> = r
            .iter()
            .filter(|l| l.starts_with("-A INFERMESH_OUTPUT "))
            .map(String::as_str)
            .collect();
        assert_eq!(
            output,
            [
                "-A INFERMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A INFERMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A INFERMESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A INFERMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A INFERMESH_OUTPUT -d 10.0.0.0/8 -j INFERMESH_REDIRECT",
                "-A INFERMESH_OUTPUT -d 172.16.0.0/12 -j INFERMESH_REDIRECT",
            ]
        );
    }

    #[test]
    fn installing_over_our_own_rules_keeps_the_jumps_and_rewrites_the_chains() {
        let plan = plan_install(SAVED_DEFAULT, &InterceptConfig::default());
        assert!(plan.jumps_added.is_empty(), "{plan:#?}");
        assert!(plan.jumps_removed.is_empty(), "{plan:#?}");
        assert_eq!(plan.jumps_kept, [PREROUTING_JUMP, OUTPUT_JUMP]);
        // The chains are declared (flushed) and refilled; no jump is added.
        let fresh = plan_install(SAVED_EMPTY, &InterceptConfig::default()).restore_input;
        let without_jumps: String = fresh
            .lines()
            .filter(|l| *l != PREROUTING_JUMP && *l != OUTPUT_JUMP)
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(plan.restore_input, without_jumps);
    }

    #[test]
    fn repeated_or_foreign_jumps_to_our_chains_are_removed() {
        let saved = SAVED_DEFAULT.replace(
            "-A OUTPUT -p tcp -j INFERMESH_OUTPUT\n",
            "-A OUTPUT -p tcp -j INFERMESH_OUTPUT\n-A OUTPUT -j INFERMESH_OUTPUT\n-A OUTPUT -p tcp -j INFERMESH_OUTPUT\n-A OUTPUT -d 10.0.0.1/32 -j DNAT --to-destination 10.0.0.2\n",
        );
        let plan = plan_install(&saved, &InterceptConfig::default());
        assert_eq!(
            plan.jumps_removed,
            [
                "-D OUTPUT -j INFERMESH_OUTPUT",
                "-D OUTPUT -p tcp -j INFERMESH_OUTPUT"
            ]
        );
        assert!(plan.jumps_added.is_empty());
        assert!(
            !plan.restore_input.contains("DNAT"),
            "other rules are left alone"
        );
    }

    #[test]
    fn stale_infermesh_chains_are_deleted_after_the_jumps_to_them() {
        let saved = SAVED_DEFAULT
            .replace(
                ":INFERMESH_REDIRECT - [0:0]\n",
                ":INFERMESH_REDIRECT - [0:0]\n:INFERMESH_OLD - [0:0]\n",
            )
            .replace(
                "COMMIT",
                "-A POSTROUTING -j INFERMESH_OLD\n-A INFERMESH_OLD -j RETURN\nCOMMIT",
            );
        let plan = plan_install(&saved, &InterceptConfig::default());
        assert_eq!(plan.chains_removed, ["INFERMESH_OLD"]);
        let input: Vec<&str> = plan.restore_input.lines().collect();
        let declared = input
            .iter()
            .position(|l| *l == ":INFERMESH_OLD - [0:0]")
            .unwrap();
        let unjumped = input
            .iter()
            .position(|l| *l == "-D POSTROUTING -j INFERMESH_OLD")
            .unwrap();
        let deleted = input.iter().position(|l| *l == "-X INFERMESH_OLD").unwrap();
        assert!(declared < unjumped && unjumped < deleted, "{input:#?}");
        assert_eq!(input.last(), Some(&"COMMIT"));
    }

    #[test]
    fn cleanup_removes_the_jumps_then_the_chains() {
        let plan = plan_cleanup(SAVED_DEFAULT);
        assert_eq!(
            plan.restore_input,
            "\
*nat
:INFERMESH_INBOUND - [0:0]
:INFERMESH_IN_REDIRECT - [0:0]
:INFERMESH_OUTPUT - [0:0]
:INFERMESH_REDIRECT - [0:0]
-D PREROUTING -p tcp -j INFERMESH_INBOUND
-D OUTPUT -p tcp -j INFERMESH_OUTPUT
-X INFERMESH_INBOUND
-X INFERMESH_IN_REDIRECT
-X INFERMESH_OUTPUT
-X INFERMESH_REDIRECT
COMMIT
"
        );
        assert_eq!(plan.chains_removed, CHAINS);
        assert_eq!(
            cleanup_dry_run()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count(),
            12
        );
    }

    #[test]
    fn cleanup_of_a_table_without_our_rules_changes_nothing() {
        assert!(plan_cleanup(SAVED_EMPTY).is_noop());
        assert!(plan_cleanup("").is_noop());
        // A chain of ours in another table is not in the nat table.
        assert!(plan_cleanup("*filter\n:INFERMESH_INBOUND - [0:0]\nCOMMIT\n").is_noop());
    }

    #[test]
    fn the_dry_run_is_the_install_input_with_comments() {
        let config = InterceptConfig::default();
        let text = dry_run(&config);
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(body, plan_install("", &config).restore_input);
        assert!(text.starts_with("# infermesh-proxy init --dry-run"));
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port(" 65535 "), Ok(65535));
        for bad in ["0", "65536", "-1", "+80", "http", ""] {
            assert_eq!(
                parse_port(bad),
                Err(ParseError::Port(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!("22, 9090,22".parse(), Ok(PortList(vec![22, 9090])));
        assert_eq!("".parse(), Ok(PortList(vec![])));
        assert_eq!(
            "22,,80".parse::<PortList>(),
            Err(ParseError::EmptyItem("22,,80".into()))
        );
        assert_eq!(
            "22,0".parse::<PortList>().unwrap_err().to_string(),
            "`0` is not a port (a number from 1 to 65535)"
        );
        assert_eq!("*".parse(), Ok(Selection::<u16>::All));
        assert_eq!("80".parse(), Ok(Selection::Only(vec![80u16])));
    }

    #[test]
    fn cidrs_are_an_ipv4_network_and_a_prefix_up_to_32() {
        let c = cidr("10.0.0.0/8");
        assert_eq!((c.addr(), c.prefix()), (Ipv4Addr::new(10, 0, 0, 0), 8));
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(cidr("192.168.1.7/32").to_string(), "192.168.1.7/32");
        for bad in [
            "10.0.0/8",
            "10.0.0.256/8",
            "::1/128",
            "fd00::/8",
            "ten/8",
            "/8",
        ] {
            assert_eq!(
                bad.parse::<Ipv4Cidr>(),
                Err(ParseError::Cidr(bad.into())),
                "{bad}"
            );
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/008",
        ] {
            assert_eq!(
                bad.parse::<Ipv4Cidr>(),
                Err(ParseError::Prefix(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "10.1.0.0/8".parse::<Ipv4Cidr>().unwrap_err().to_string(),
            "`10.1.0.0/8` has bits set past its prefix length; did you mean 10.0.0.0/8?"
        );
        assert_eq!(
            "10.0.0.0/8,10.0.0.0/8,172.16.0.0/12".parse(),
            Ok(CidrList(vec![cidr("10.0.0.0/8"), cidr("172.16.0.0/12")]))
        );
        assert_eq!("*".parse(), Ok(Selection::<Ipv4Cidr>::All));
    }

    #[test]
    fn save_and_restore_are_found_beside_the_chosen_iptables() {
        let default = Iptables::new(Path::new("iptables"));
        assert_eq!(default.save_program(), Path::new("iptables-save"));
        assert_eq!(default.restore_program(), Path::new("iptables-restore"));
        let legacy = Iptables::new(Path::new("/usr/sbin/iptables-legacy"));
        assert_eq!(
            legacy.save_program(),
            Path::new("/usr/sbin/iptables-legacy-save")
        );
        assert_eq!(
            legacy.restore_program(),
            Path::new("/usr/sbin/iptables-legacy-restore")
        );
    }

    #[test]
    fn a_missing_program_is_named_with_what_to_do() {
        let iptables = Iptables::new(Path::new("/nonexistent/iptables-nope"));
        let error = iptables.save_nat().unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, InterceptError::NotFound { .. }),
            "{error:?}"
        );
        assert!(
            message.contains("`/nonexistent/iptables-nope-save` was not found"),
            "{message}"
        );
        assert!(message.contains("--iptables"), "{message}");
    }

    #[test]
    fn a_failing_program_shows_its_stderr_and_numbered_input() {
        // `sh -c` stands in for a failing iptables-restore.
        let error = run(
            Path::new("sh"),
            &[
                "-c",
                "cat >/dev/null; echo 'Error occurred at line: 2' >&2; exit 2",
            ],
            Some("*nat\n-A NOPE -j RETURN\nCOMMIT\n"),
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("`sh` failed (exit status: 2):\nError occurred at line: 2\n"),
            "{message}"
        );
        assert!(message.contains("\n   2  -A NOPE -j RETURN"), "{message}");
    }

    #[test]
    fn the_summary_says_what_is_redirected_and_what_is_not() {
        let config = InterceptConfig {
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![cidr("10.96.0.0/12")],
            ..InterceptConfig::default()
        };
        assert_eq!(
            config.to_string(),
            "inbound:  TCP to any port -> 15006, except to ports 15006,15020,22\n\
             outbound: TCP to any address -> 15001, except from uid 1337 or gid 1337, to 127.0.0.1/32, to ports 5432, to 10.96.0.0/12"
        );
    }
}
