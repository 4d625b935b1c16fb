//! lb's controller: Kubernetes objects in, BPF maps out. The modules follow the flow, one way:
//!
//! - `source`: where objects come from (the API server, a directory of manifests, and what a
//!   cluster's controllers would add there: endpoints from Pods, ClusterIPs);
//! - `convert`: Kubernetes objects to lb's model (frontends, endpoints, topology);
//! - `model`: the vocabulary every step shares;
//! - `dataplane`: the maps, the programs and their links, and the reconciler that keeps the
//!   maps equal to the desired state;
//! - `daemon`: `lb run`'s loop, health and sync pacing.

pub mod convert;
pub mod daemon;
pub mod dataplane;
pub mod model;
pub mod source;
pub mod state;
