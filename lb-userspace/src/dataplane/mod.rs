//! The data plane as userspace sees it: the eBPF object and its links, the pinned maps and
//! their layout, the reconciler that programs them, and the conntrack collector.

pub mod audit;
pub mod conntrack;
pub mod datapath;
pub mod explain;
#[cfg(any(test, feature = "testing"))]
pub mod in_memory;
pub mod interfaces;
pub mod layout;
pub mod links;
pub mod maglev;
pub mod maps;
pub mod node_addresses;
pub mod reconcile;
pub mod status;
