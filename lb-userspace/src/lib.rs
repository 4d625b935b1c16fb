//! lb's controller: Kubernetes objects in, BPF maps out.

pub mod allocator;
pub mod audit;
pub mod cluster;
pub mod conntrack;
pub mod convert;
pub mod datapath;
pub mod health;
pub mod health_check;
pub mod interfaces;
pub mod kube_source;
pub mod layout;
pub mod links;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod node_addresses;
pub mod pod_endpoints;
pub mod reconcile;
pub mod run;
pub mod status;
pub mod sync;
pub mod topology;
