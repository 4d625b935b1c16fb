//! Where the objects come from.

pub mod cluster;
pub mod cluster_ip;
pub mod kube;
pub mod manifests;
pub mod pods;
