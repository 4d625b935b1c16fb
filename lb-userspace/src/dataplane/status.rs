//! What the pinned maps hold, as the CLI shows it: `lb services`, `lb endpoints [--watch]`,
//! `lb stats`, `lb counters`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use lb_common::service_flags;

use crate::dataplane::maps::MapsSnapshot;
use crate::dataplane::reconcile::{ProgrammedFrontend, ProgrammedState};
use crate::model::FrontendType;

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

/// One frontend as `lb services` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRow {
    pub service: String,
    #[serde(rename = "type")]
    pub frontend_type: String,
    pub policy: String,
    pub frontend: String,
    pub backends: Vec<String>,
    /// With no backends: `dropped` (Local policy, none here) or `rejected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when_empty: Option<&'static str>,
}

/// One row per frontend: service, type, traffic policy, frontend, backends.
pub fn services_rows(snapshot: &MapsSnapshot) -> Vec<ServiceRow> {
    let state = ProgrammedState::from_snapshot(snapshot);
    let mut rows = Vec::new();
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
                Some(backend) => std::net::SocketAddr::new(backend.ip, backend.port).to_string(),
                None => format!("<missing backend {id}>"),
            })
            .collect();
        let when_empty = match (backends.is_empty(), programmed.flags & service_flags::DROP_WHEN_EMPTY != 0) {
            (false, _) => None,
            (true, true) => Some("dropped"),
            (true, false) => Some("rejected"),
        };
        rows.push(ServiceRow {
            service: name,
            frontend_type: kind,
            policy: policy(programmed, &ranges),
            frontend: frontend.to_string(),
            backends,
            when_empty,
        });
    }
    rows
}

/// `lb services`' table: up to three backends a frontend, as kubectl shows endpoints, or with
/// `wide` every one.
pub fn services_table(snapshot: &MapsSnapshot, wide: bool) -> String {
    let mut rows = vec![["SERVICE", "TYPE", "POLICY", "FRONTEND", "BACKENDS"].map(String::from).to_vec()];
    for row in services_rows(snapshot) {
        let backends = match row.when_empty {
            None => endpoints_cell(&row.backends, wide),
            Some("dropped") => "<none here: dropped>".to_string(),
            Some(_) => "<none: rejected>".to_string(),
        };
        rows.push(vec![row.service, row.frontend_type, row.policy, row.frontend, backends]);
    }
    columns(&rows)
}

/// Lays out rows in columns two spaces apart, as kubectl does (the last column unpadded).
pub fn columns(rows: &[Vec<String>]) -> String {
    lay_out(rows, 2, 0)
}

/// Lays out rows as kubectl's printer does (a tab writer with cells at least 10 wide and 3
/// spaces of padding; the last column unpadded). `--watch` lines are laid out one at a time.
pub fn kubectl_columns(rows: &[Vec<String>]) -> String {
    lay_out(rows, 3, 10)
}

/// Each column as wide as its widest cell plus `padding`, and at least `min_width`; the last
/// column unpadded.
fn lay_out(rows: &[Vec<String>], padding: usize, min_width: usize) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|col| {
            rows.iter()
                .filter_map(|r| r.get(col))
                .map(|c| (c.len() + padding).max(min_width))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        for (col, cell) in row.iter().enumerate() {
            if col + 1 == row.len() {
                let _ = writeln!(out, "{cell}");
            } else {
                let _ = write!(out, "{cell:width$}", width = widths[col]);
            }
        }
    }
    out
}

/// A Service's programmed endpoints, as `lb endpoints` shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEndpoints {
    pub namespace: String,
    pub name: String,
    /// `ip:port` of every backend its ClusterIP frontends (or, without one, its other
    /// frontends) send new flows to, sorted.
    pub endpoints: Vec<String>,
}

/// Every Service's endpoints as the maps hold them, by `namespace/name`. A Service port with a
/// ClusterIP contributes its ClusterIP's backends (every ready endpoint, as
/// `kubectl get endpoints` lists them); other ports their frontends' backends.
pub fn service_endpoints(state: &ProgrammedState) -> BTreeMap<String, ServiceEndpoints> {
    // Service port name -> (has a ClusterIP frontend, backends).
    let mut ports: BTreeMap<&str, (bool, BTreeSet<String>)> = BTreeMap::new();
    for programmed in state.frontends.values() {
        let Some((kind, name)) = &programmed.meta else { continue };
        let cluster_ip = *kind == FrontendType::ClusterIp;
        let count = usize::from(programmed.count.unwrap_or(0)).min(programmed.slots.len());
        let backends = programmed.slots[..count].iter().filter_map(|id| state.backends.get(id));
        let entry = ports.entry(name.as_str()).or_default();
        if cluster_ip && !entry.0 {
            // The ClusterIP's view wins over what external frontends (maybe Local) added.
            *entry = (true, BTreeSet::new());
        }
        if cluster_ip || !entry.0 {
            entry.1.extend(backends.map(|b| std::net::SocketAddr::new(b.ip, b.port).to_string()));
        }
    }
    let mut services: BTreeMap<String, ServiceEndpoints> = BTreeMap::new();
    for (port_name, (_, backends)) in ports {
        let service = port_name.split_once(':').map_or(port_name, |(service, _)| service);
        let (namespace, name) = service.split_once('/').unwrap_or(("", service));
        let entry = services.entry(service.to_string()).or_insert_with(|| ServiceEndpoints {
            namespace: namespace.to_string(),
            name: name.to_string(),
            endpoints: Vec::new(),
        });
        entry.endpoints.extend(backends);
    }
    for service in services.values_mut() {
        service.endpoints.sort();
        service.endpoints.dedup();
    }
    services
}

/// The ENDPOINTS column as kubectl prints it: up to three, then how many more (all with
/// `wide`); `<none>` when there are none.
pub fn endpoints_cell(endpoints: &[String], wide: bool) -> String {
    const SHOWN: usize = 3;
    if endpoints.is_empty() {
        return "<none>".to_string();
    }
    if wide || endpoints.len() <= SHOWN {
        return endpoints.join(",");
    }
    format!("{} + {} more...", endpoints[..SHOWN].join(","), endpoints.len() - SHOWN)
}

/// `lb endpoints`: `NAME ENDPOINTS AGE` for one namespace's Services (`kubectl get endpoints`),
/// with a NAMESPACE column first when listing every namespace (`-A`). The maps keep no
/// creation time, so AGE is `<unknown>`, as kubectl prints for an object without one.
pub fn endpoints_table<'a>(
    services: impl IntoIterator<Item = &'a ServiceEndpoints>,
    all_namespaces: bool,
    wide: bool,
) -> String {
    let mut rows = vec![];
    let header: Vec<String> = if all_namespaces {
        ["NAMESPACE", "NAME", "ENDPOINTS", "AGE"].map(String::from).to_vec()
    } else {
        ["NAME", "ENDPOINTS", "AGE"].map(String::from).to_vec()
    };
    rows.push(header);
    for service in services {
        rows.push(endpoints_row(service, all_namespaces, wide, "<unknown>"));
    }
    kubectl_columns(&rows)
}

/// One row of `lb endpoints` (also what `--watch` prints for a change).
pub fn endpoints_row(service: &ServiceEndpoints, all_namespaces: bool, wide: bool, age: &str) -> Vec<String> {
    let mut row = Vec::new();
    if all_namespaces {
        row.push(service.namespace.clone());
    }
    row.extend([service.name.clone(), endpoints_cell(&service.endpoints, wide), age.to_string()]);
    row
}

/// Age as kubectl prints it (apimachinery's `HumanDuration`): `45s`, `3m12s`, `42m`, `5h3m`,
/// `30h`, `3d4h`, `20d`, `3y12d`.
pub fn kubectl_age(elapsed: std::time::Duration) -> String {
    let seconds = elapsed.as_secs();
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    let with_rest = |major: u64, unit: &str, minor: u64, minor_unit: &str| {
        if minor == 0 { format!("{major}{unit}") } else { format!("{major}{unit}{minor}{minor_unit}") }
    };
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        with_rest(minutes, "m", seconds % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        with_rest(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        with_rest(hours / 24, "d", hours % 24, "h")
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        with_rest(hours / 24 / 365, "y", (hours / 24) % 365, "d")
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

/// One Service port's traffic, for `lb stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceStats {
    pub service: String,
    #[serde(rename = "type")]
    pub frontend_type: String,
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

/// `lb stats`: per Service port and frontend type, then the data path's counters.
pub fn stats_table(services: &[ServiceStats], counters: &[(&str, u64)]) -> String {
    let mut rows = vec![
        ["SERVICE", "TYPE", "NEW FLOWS", "PACKETS", "BYTES", "REPLY PACKETS", "REPLY BYTES"]
            .map(String::from)
            .to_vec(),
    ];
    for s in services {
        rows.push(vec![
            s.service.clone(),
            s.frontend_type.clone(),
            s.new_flows.to_string(),
            s.packets.to_string(),
            s.bytes.to_string(),
            s.reply_packets.to_string(),
            s.reply_bytes.to_string(),
        ]);
    }
    let mut out = columns(&rows);
    out.push('\n');
    let mut rows = vec![vec!["COUNTER".to_string(), "VALUE".to_string()]];
    rows.extend(counters.iter().map(|(name, value)| vec![name.to_string(), value.to_string()]));
    out += &columns(&rows);
    out
}

/// `lb stats -o json`: the per-Service rows and the counters by name.
pub fn stats_json(services: &[ServiceStats], counters: &[(&str, u64)]) -> serde_json::Value {
    let counters: BTreeMap<&str, u64> = counters.iter().copied().collect();
    serde_json::json!({ "services": services, "counters": counters })
}

/// `lb counters`: the data path's packet counters, then the conntrack collector's statistics,
/// a name and a value a line.
pub fn counters_text(counters: &[(&str, u64)], collector: &[(&str, u64)]) -> String {
    let mut out = String::new();
    for (name, value) in counters.iter().chain(collector) {
        let _ = writeln!(out, "{name:36} {value}");
    }
    out
}

/// `lb counters -o json`.
pub fn counters_json(counters: &[(&str, u64)], collector: &[(&str, u64)]) -> serde_json::Value {
    let by_name =
        |list: &[(&str, u64)]| list.iter().map(|(n, v)| (n.to_string(), *v)).collect::<BTreeMap<_, _>>();
    serde_json::json!({ "counters": by_name(counters), "collector": by_name(collector) })
}

/// What `lb endpoints --watch` prints when the maps go from `last` to `now`: a line for each
/// Service whose endpoints changed, that appeared, or that left (its last row, as
/// `kubectl get endpoints --watch` prints a deleted object), or with `json` the Service as one
/// JSON object a line.
pub fn watch_lines(
    last: &BTreeMap<String, ServiceEndpoints>,
    now: &BTreeMap<String, ServiceEndpoints>,
    all_namespaces: bool,
    wide: bool,
    json: bool,
) -> String {
    let mut out = String::new();
    let changed = now.iter().filter(|(name, service)| last.get(*name) != Some(service));
    let left = last.iter().filter(|(name, _)| !now.contains_key(*name));
    for (_, service) in changed.chain(left) {
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(service).expect("plain strings serialize"));
        } else {
            out += &kubectl_columns(&[endpoints_row(service, all_namespaces, wide, "<unknown>")]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ages_and_endpoint_cells_read_as_kubectl_prints_them() {
        let age = |s: u64| kubectl_age(Duration::from_secs(s));
        assert_eq!(
            [age(45), age(192), age(600), age(2 * 3600 + 5 * 60), age(5 * 3600 + 3 * 60), age(30 * 3600)],
            ["45s", "3m12s", "10m", "125m", "5h3m", "30h"]
        );
        assert_eq!(
            [age(3 * 86_400 + 4 * 3600), age(20 * 86_400), age(3 * 365 * 86_400 + 12 * 86_400)],
            ["3d4h", "20d", "3y12d"]
        );
        let endpoints: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:80")).collect();
        assert_eq!(endpoints_cell(&endpoints, false), "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 + 2 more...");
        assert_eq!(endpoints_cell(&endpoints[..3], false), "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80");
        assert_eq!(endpoints_cell(&endpoints, true).split(',').count(), 5);
        assert_eq!(endpoints_cell(&[], false), "<none>");
    }
}
