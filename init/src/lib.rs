//! Transparent interception for infermesh's sidecar mode: the iptables
//! rules (nat table, IPv4) that send a pod's TCP traffic through its
//! proxy, as `infermesh-proxy init` installs and removes them. Like
//! Linkerd's proxy-init, it shares nothing with the data plane: it runs
//! once, before the proxy starts, in an init container.
//!
//! This crate owns every nat chain whose name starts with `INFERMESH_` and
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
//!
//! The crate is a pure plan and a thin layer of I/O:
//! - [`InterceptConfig`] and its option types (`options`): what to intercept;
//! - the chain rules a config makes (`rules`);
//! - [`plan_install`] and [`plan_cleanup`] (`plan`): the change to a nat
//!   table as `iptables-save` prints it, as pure functions;
//! - [`Iptables`], [`install`] and [`cleanup`] (`iptables`): running
//!   `iptables-save` and `iptables-restore`.

#![forbid(unsafe_code)]

mod iptables;
mod options;
mod plan;
mod rules;

pub use iptables::{InterceptError, Iptables, cleanup, install};
pub use options::{
    CidrList, DEFAULT_HEALTH_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID,
    InterceptConfig, Ipv4Cidr, ParseError, PortList, Selection, parse_port,
};
pub use plan::{Plan, cleanup_dry_run, dry_run, plan_cleanup, plan_install};
pub use rules::{
    CHAIN_PREFIX, CHAINS, IN_REDIRECT_CHAIN, INBOUND_CHAIN, OUTPUT_CHAIN, OUTPUT_JUMP,
    PREROUTING_JUMP, REDIRECT_CHAIN,
};

#[cfg(test)]
mod tests;
