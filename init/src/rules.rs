//! The rules of infermesh's nat chains for one [`InterceptConfig`], each
//! a line as `iptables-save` prints it, and the names of the chains and
//! of the jumps to them.

use crate::options::{InterceptConfig, Selection};

/// The prefix of every chain this crate owns.
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
