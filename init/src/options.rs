//! What to intercept: the proxy's ports and identity, the exclusions and
//! inclusions, and the parsing of the `init` command's port and CIDR
//! options.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

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
