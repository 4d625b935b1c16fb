//! `lb services`: what the pinned maps hold, as a table.

use std::fmt::Write as _;

use crate::maps::MapsSnapshot;
use crate::reconcile::ProgrammedState;

/// One row per frontend: service, type, frontend, backends.
pub fn services_table(snapshot: &MapsSnapshot) -> String {
    let state = ProgrammedState::from_snapshot(snapshot);
    let mut rows = vec![["SERVICE".to_string(), "TYPE".into(), "FRONTEND".into(), "BACKENDS".into()]];
    for (frontend, programmed) in &state.frontends {
        let (kind, name) = match &programmed.meta {
            Some((kind, name)) => (kind.to_string(), name.clone()),
            None => ("?".to_string(), format!("<service id {} without metadata>", programmed.service_id)),
        };
        let count = usize::from(programmed.count.unwrap_or(0));
        let backends: Vec<String> = programmed.slots[..count.min(programmed.slots.len())]
            .iter()
            .map(|id| match state.backends.get(id) {
                Some(backend) => format!("{}:{}", backend.ip, backend.port),
                None => format!("<missing backend {id}>"),
            })
            .collect();
        let backends = if backends.is_empty() { "<none: rejected>".to_string() } else { backends.join(",") };
        rows.push([name, kind, frontend.to_string(), backends]);
    }
    let widths: Vec<usize> = (0..3).map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out
}
