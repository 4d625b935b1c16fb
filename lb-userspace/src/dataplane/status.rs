//! `lb services`: what the pinned maps hold, as a table.

use std::fmt::Write as _;

use lb_common::service_flags;

use crate::dataplane::maps::MapsSnapshot;
use crate::dataplane::reconcile::{ProgrammedFrontend, ProgrammedState};

/// The traffic policy column: Cluster or Local, whether new flows are source-NATed, session
/// affinity, Maglev, and the allowed source ranges.
fn policy(programmed: &ProgrammedFrontend, source_ranges: &[String]) -> String {
    let flags = programmed.flags;
    let mut policy = if flags & service_flags::LOCAL_POLICY != 0 { "Local" } else { "Cluster" }.to_string();
    if flags & service_flags::SNAT != 0 {
        policy += "+SNAT";
    }
    if programmed.affinity_timeout != 0 {
        let _ = write!(policy, " ClientIP/{}s", programmed.affinity_timeout);
    }
    if programmed.maglev_table != 0 {
        policy += " maglev";
    }
    if flags & service_flags::SOURCE_RANGES != 0 {
        let _ = write!(policy, " from {}", source_ranges.join(","));
    }
    policy
}

/// One row per frontend: service, type, traffic policy, frontend, backends.
pub fn services_table(snapshot: &MapsSnapshot) -> String {
    let state = ProgrammedState::from_snapshot(snapshot);
    let mut rows =
        vec![["SERVICE".to_string(), "TYPE".into(), "POLICY".into(), "FRONTEND".into(), "BACKENDS".into()]];
    for (frontend, programmed) in &state.frontends {
        let (kind, name) = match &programmed.meta {
            Some((kind, name)) => (kind.to_string(), name.clone()),
            None => ("?".to_string(), format!("<service id {} without metadata>", programmed.service_id)),
        };
        let ranges: Vec<String> = programmed.source_ranges.iter().map(ToString::to_string).collect();
        let count = usize::from(programmed.count.unwrap_or(0));
        let backends: Vec<String> = programmed.slots[..count.min(programmed.slots.len())]
            .iter()
            .map(|id| match state.backends.get(id) {
                Some(backend) => format!("{}:{}", backend.ip, backend.port),
                None => format!("<missing backend {id}>"),
            })
            .collect();
        let backends = match (backends.is_empty(), programmed.flags & service_flags::DROP_WHEN_EMPTY != 0) {
            (false, _) => backends.join(","),
            (true, true) => "<none here: dropped>".to_string(),
            (true, false) => "<none: rejected>".to_string(),
        };
        rows.push([name, kind, policy(programmed, &ranges), frontend.to_string(), backends]);
    }
    let widths: Vec<usize> = (0..4).map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(out, "{cell:width$}  ");
        }
        let _ = writeln!(out, "{}", row[4]);
    }
    out
}
