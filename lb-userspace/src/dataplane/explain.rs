//! `lb explain SRC DST/PROTO`: where the data path sends a packet, and why, worked out from the
//! maps the way the programs read them: the frontend the destination matches (and which scope
//! of it the source gets), the source-range check, the eligible endpoints, the backend (the
//! flow's conntrack entry, the client's affinity record, the Maglev position or the hash slot),
//! and the packet after translation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use lb_common::{AffinityValue, In6, backend_flags, conntrack_state, service_flags};
use serde::Serialize;

use crate::dataplane::maps::{FamilyAddress, MapsSnapshot, SlotKey};
use crate::model::{FrontendType, Protocol, Scope};

/// The packet asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// Of the same family as `destination`.
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: Protocol,
    /// The packet arrives on an external interface (`--external-interfaces`): Local external
    /// policies apply to it. Otherwise it comes from a pod or the node: inside the cluster.
    pub external: bool,
}

/// What the maps say about the packet's flow besides the service maps.
#[derive(Clone, Debug, Default)]
pub struct FlowFacts {
    /// The conntrack entry of the packet's 5-tuple, if the flow is tracked.
    pub tracked: Option<TrackedFlow>,
    /// The client's affinity record for the frontend, with its age in seconds.
    pub affinity: Option<(AffinityValue, u64)>,
    /// The data path's settings: Maglev table size and source-NAT address.
    pub maglev_table_size: u32,
    /// The source-NAT address of the query's family.
    pub snat_address: Option<IpAddr>,
    /// Endpoints of the Service port that get no new flows, and why (from the objects, when
    /// `lb explain` was given them).
    pub excluded: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub packet: String,
    /// `None`: no frontend at the destination; the packet passes untouched.
    pub frontend: Option<FrontendMatch>,
    /// What happens to the packet, in a few words.
    pub verdict: String,
    pub eligible: Vec<String>,
    /// Endpoints that are not eligible, and why (known only from the objects).
    pub not_eligible: Vec<(String, String)>,
    pub backend: Option<String>,
    /// How the backend was picked.
    pub chosen_by: Option<String>,
    /// The packet as it leaves lb.
    pub translated: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendMatch {
    pub address: String,
    pub service: String,
    #[serde(rename = "type")]
    pub frontend_type: String,
    pub scope: String,
    pub service_id: u32,
    pub policy: String,
    pub source_ranges: Vec<String>,
}

/// What a conntrack entry says, of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedFlow {
    /// The addresses the packet is rewritten to.
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub reply: bool,
    /// `conntrack_state`.
    pub state: u8,
}

impl<A: FamilyAddress> From<lb_common::ConntrackEntryOf<A>> for TrackedFlow {
    fn from(entry: lb_common::ConntrackEntryOf<A>) -> Self {
        Self {
            source: SocketAddr::new(entry.src_address.ip(), u16::from_be(entry.src_port)),
            destination: SocketAddr::new(entry.dst_address.ip(), u16::from_be(entry.dst_port)),
            reply: entry.is_reply(),
            state: entry.state,
        }
    }
}

/// The data path's hash of the flow, as its family computes it.
fn flow_hash(query: &Query) -> u32 {
    let protocol = query.protocol.number();
    let (src_port, dst_port) = (query.source.port().to_be(), query.destination.port().to_be());
    match (query.source.ip(), query.destination.ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            lb_common::flow_hash(In6::from(src), In6::from(dst), src_port, dst_port, protocol)
        }
        (src, dst) => {
            let word = |ip: IpAddr| u32::from_ip(ip).unwrap_or(0);
            lb_common::flow_hash(word(src), word(dst), src_port, dst_port, protocol)
        }
    }
}

fn policy_words(flags: u16, affinity_timeout: u32, maglev_table: u32) -> String {
    let mut words =
        vec![if flags & service_flags::LOCAL_POLICY != 0 { "Local" } else { "Cluster" }.to_string()];
    if flags & service_flags::SNAT != 0 {
        words.push("source NAT".into());
    }
    if affinity_timeout != 0 {
        words.push(format!("ClientIP affinity {affinity_timeout}s"));
    }
    if maglev_table != 0 {
        words.push(format!("Maglev table {maglev_table}"));
    }
    words.join(", ")
}

pub fn explain(query: &Query, snapshot: &MapsSnapshot, facts: &FlowFacts) -> Explanation {
    let (dst_address, dst_port) = (query.destination.ip(), query.destination.port());
    let protocol = query.protocol.number();
    let mut explanation = Explanation {
        packet: format!(
            "{} -> {}/{} from {}",
            query.source,
            query.destination,
            query.protocol,
            if query.external { "outside the cluster" } else { "inside the cluster" }
        ),
        frontend: None,
        verdict: String::new(),
        eligible: Vec::new(),
        not_eligible: facts.excluded.clone(),
        backend: None,
        chosen_by: None,
        translated: None,
    };

    // The tracked flow's entry decides before any frontend is looked at.
    if let Some(entry) = &facts.tracked {
        let (backend, source) = (entry.destination, entry.source);
        if entry.reply {
            explanation.verdict =
                "a reply of a tracked flow: its source is rewritten back to the frontend".into();
            explanation.translated = Some(format!("{source} -> {backend}/{}", query.protocol));
            return explanation;
        }
        explanation.frontend = frontend_match(snapshot, dst_address, dst_port, protocol, query.external);
        explanation.backend = Some(backend.to_string());
        explanation.chosen_by = Some(format!(
            "the flow is tracked ({}): it keeps the backend its first packet got",
            conntrack_state::name(entry.state)
        ));
        explanation.verdict = "forwarded to the flow's backend".into();
        explanation.translated = Some(format!("{source} -> {backend}/{}", query.protocol));
        return explanation;
    }

    let Some((key, value)) = lookup(snapshot, dst_address, dst_port, protocol, query.external) else {
        explanation.verdict = "no frontend at this address: passed untouched (pass_not_service)".into();
        return explanation;
    };
    let frontend = frontend_match(snapshot, dst_address, dst_port, protocol, query.external);
    let service_id = value.service_id;
    let count = usize::from(value.backend_count);
    let slots: Vec<u32> = (1..=value.backend_count)
        .filter_map(|slot| snapshot.services.get(&key.with_slot(slot)).map(|v| v.backend_id))
        .collect();
    let address_of = |id: &u32| snapshot.backends.get(id).map(|b| SocketAddr::new(b.ip, b.port).to_string());
    explanation.eligible = slots.iter().filter_map(address_of).collect();
    explanation.frontend = frontend;

    if value.flags & service_flags::SOURCE_RANGES != 0 {
        let allowed = snapshot
            .source_ranges
            .iter()
            .any(|(id, range)| *id == service_id && range.contains(&query.source.ip()));
        if !allowed {
            explanation.verdict =
                "dropped: the source is outside the Service's loadBalancerSourceRanges (drop_source_range)"
                    .into();
            return explanation;
        }
    }
    if count == 0 {
        explanation.verdict = if value.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            "dropped: Local traffic policy and no endpoint on this node (drop_no_local_backend)".into()
        } else {
            match query.protocol {
                Protocol::Tcp => {
                    "rejected: no endpoints, the client gets a TCP RST (reject_no_backend)".into()
                }
                Protocol::Udp | Protocol::Sctp => {
                    "rejected: no endpoints, the client gets ICMP port unreachable (reject_no_backend)".into()
                }
            }
        };
        return explanation;
    }

    let hash = flow_hash(query);
    let affinity = facts.affinity.as_ref().filter(|(record, age)| {
        value.affinity_timeout != 0
            && *age < u64::from(value.affinity_timeout)
            && snapshot.backends.contains_key(&record.backend_id)
    });
    let (backend_id, chosen_by) = if let Some((record, age)) = affinity {
        (
            Some(record.backend_id),
            format!("session affinity: this client's last new connection ({age}s ago) went there"),
        )
    } else if value.maglev_table != 0 && facts.maglev_table_size != 0 {
        let position = hash % facts.maglev_table_size;
        let id =
            snapshot.maglev.get(&value.maglev_table).and_then(|table| table.get(position as usize)).copied();
        (
            id,
            format!(
                "Maglev: the flow's hash {hash:#010x} is position {position} of {}",
                facts.maglev_table_size
            ),
        )
    } else {
        let slot = (hash % u32::from(value.backend_count)) as u16 + 1;
        let id = snapshot.services.get(&key.with_slot(slot)).map(|v| v.backend_id);
        (id, format!("hash: the flow's hash {hash:#010x} is slot {slot} of {count}"))
    };
    let Some(backend) = backend_id.and_then(|id| snapshot.backends.get(&id).copied()) else {
        explanation.verdict =
            "dropped: the service entry names a slot or backend that is missing (drop_service_inconsistent)"
                .into();
        explanation.chosen_by = Some(chosen_by);
        return explanation;
    };
    let backend_address = SocketAddr::new(backend.ip, backend.port);
    explanation.backend = Some(backend_address.to_string());
    explanation.chosen_by = Some(chosen_by);
    let host_backend = backend.flags & backend_flags::HOST != 0;
    let hairpin = query.source.ip() == backend.ip;
    let snat = (value.flags & service_flags::SNAT != 0 || hairpin) && !host_backend;
    let source = if snat {
        // SCTP keeps the client's port (its CRC32c covers the ports); the others get one free
        // on the node's address.
        let port = if query.protocol == Protocol::Sctp {
            query.source.port().to_string()
        } else {
            "<a free port>".into()
        };
        match facts.snat_address {
            Some(IpAddr::V4(address)) => format!("{address}:{port}"),
            Some(IpAddr::V6(address)) => format!("[{address}]:{port}"),
            None => {
                explanation.verdict =
                    "dropped: the flow needs source NAT and the node has no address for it (drop_snat_failed)".into();
                return explanation;
            }
        }
    } else {
        query.source.to_string()
    };
    explanation.verdict = format!(
        "forwarded to a backend as a new flow{}",
        if snat { if hairpin { ", source-NATed (hairpin)" } else { ", source-NATed" } } else { "" }
    );
    explanation.translated = Some(format!("{source} -> {backend_address}/{}", query.protocol));
    explanation
}

/// The service entry for the destination as the source sees it: an in-cluster source gets a
/// two-scope frontend's internal view.
fn lookup(
    snapshot: &MapsSnapshot,
    address: IpAddr,
    port: u16,
    protocol: u8,
    external: bool,
) -> Option<(SlotKey, lb_common::ServiceValue)> {
    let key = SlotKey::new(address, port, protocol, 0);
    let value = *snapshot.services.get(&key)?;
    if !external && value.flags & service_flags::TWO_SCOPES != 0 {
        let internal = SlotKey { scope: lb_common::scope::INTERNAL, ..key };
        if let Some(value) = snapshot.services.get(&internal) {
            return Some((internal, *value));
        }
    }
    Some((key, value))
}

fn frontend_match(
    snapshot: &MapsSnapshot,
    address: IpAddr,
    port: u16,
    protocol: u8,
    external: bool,
) -> Option<FrontendMatch> {
    let (key, value) = lookup(snapshot, address, port, protocol, external)?;
    let meta = snapshot.service_meta.get(&value.service_id);
    let scope = match Scope::from_code(key.scope) {
        Some(Scope::Internal) => "in-cluster view (every endpoint: Local applies to external sources only)",
        _ if value.flags & service_flags::TWO_SCOPES != 0 => "external view (the traffic policy applies)",
        _ => "every source sees the same endpoints",
    };
    Some(FrontendMatch {
        address: format!(
            "{}/{}",
            SocketAddr::new(key.address(), key.port()),
            Protocol::from_number(protocol).map_or("?".to_string(), |p| p.to_string())
        ),
        service: meta.map_or_else(
            || format!("<service id {} without metadata>", value.service_id),
            |m| m.name().to_string(),
        ),
        frontend_type: meta
            .and_then(|m| FrontendType::from_code(m.frontend_type))
            .map_or("?".to_string(), |t| t.to_string()),
        scope: scope.to_string(),
        service_id: value.service_id,
        policy: policy_words(value.flags, value.affinity_timeout, value.maglev_table),
        source_ranges: snapshot
            .source_ranges
            .iter()
            .filter(|(id, _)| *id == value.service_id)
            .map(|(_, range)| range.to_string())
            .collect(),
    })
}

/// The explanation as `lb explain` prints it.
pub fn render(explanation: &Explanation) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: &str| {
        let _ = writeln!(out, "{label:<12}{text}");
    };
    line("Packet", &explanation.packet);
    match &explanation.frontend {
        Some(frontend) => {
            line(
                "Frontend",
                &format!("{} {} of {}", frontend.address, frontend.frontend_type, frontend.service),
            );
            line("Scope", &frontend.scope);
            line("Policy", &frontend.policy);
            if !frontend.source_ranges.is_empty() {
                line("Sources", &format!("only from {}", frontend.source_ranges.join(", ")));
            }
        }
        None => line("Frontend", "none"),
    }
    if explanation.frontend.is_some() {
        let eligible = if explanation.eligible.is_empty() {
            "none".to_string()
        } else {
            format!("{}: {}", explanation.eligible.len(), explanation.eligible.join(", "))
        };
        line("Eligible", &eligible);
        for (endpoint, reason) in &explanation.not_eligible {
            line("Not", &format!("{endpoint}: {reason}"));
        }
    }
    if let Some(backend) = &explanation.backend {
        line("Backend", backend);
    }
    if let Some(chosen_by) = &explanation.chosen_by {
        line("Because", chosen_by);
    }
    line("Verdict", &explanation.verdict);
    if let Some(translated) = &explanation.translated {
        line("Sent as", translated);
    }
    out
}

/// Reasons, by endpoint, that the objects give for endpoints the Service port lists but the
/// maps do not send new flows to.
pub fn excluded_endpoints(
    endpoints: &[crate::convert::topology::Endpoint],
    eligible: &[String],
    local_policy: bool,
    node_name: Option<&str>,
) -> Vec<(String, String)> {
    let mut reasons = BTreeMap::new();
    let any_ready = endpoints.iter().any(|e| e.conditions.ready);
    for endpoint in endpoints {
        let address = SocketAddr::new(endpoint.addr.ip, endpoint.addr.port).to_string();
        if eligible.contains(&address) {
            continue;
        }
        let conditions = &endpoint.conditions;
        let on_node = conditions.node_name.as_deref();
        let reason = if local_policy && (node_name.is_none() || on_node != node_name) {
            format!("on node {}, and the traffic policy is Local", on_node.unwrap_or("<unknown>"))
        } else if !(conditions.ready || conditions.serving && conditions.terminating) {
            "not ready".to_string()
        } else if !conditions.ready {
            if any_ready {
                "terminating: used only while no endpoint is ready".to_string()
            } else {
                "terminating".to_string()
            }
        } else {
            "topology: its hints send this node's traffic to other endpoints".to_string()
        };
        reasons.insert(address, reason);
    }
    reasons.into_iter().collect()
}
