//! infermesh's load harness. Today it holds the mock model server
//! ([`mock`]) that the README's demo and the proxy's measurements run
//! against; the open-loop load generator and the scenario runner that
//! compares infermesh with its peers come with the load-harness issue.

#![forbid(unsafe_code)]

pub mod mock;
