//! infermesh's load harness: an open-loop load generator corrected for
//! coordinated omission ([`load`]), mock model servers that speak the
//! OpenAI and KServe v2 APIs ([`mock`]), and a scenario runner that
//! compares a direct connection, infermesh and its peers side by side
//! ([`compare`]), and the control plane under thousands of simulated
//! proxies ([`mesh_scale`]).

#![forbid(unsafe_code)]

pub mod compare;
pub mod load;
pub mod mesh_scale;
pub mod mock;
pub mod plot;
pub mod process;
pub mod soak;
pub mod tls;
