//! lb's controller: Kubernetes objects in, BPF maps out.

pub mod convert;
pub mod datapath;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod reconcile;
pub mod run;
pub mod status;
