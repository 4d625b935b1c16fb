//! `lb run`: the loop that ties sources to the data plane, its health endpoints and pacing.

pub mod config;
pub mod events;
pub mod health;
pub mod health_check;
pub mod metrics;
pub mod preflight;
pub mod run;
pub mod sync;
