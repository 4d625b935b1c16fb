//! `lb explain SRC DST/PROTO`: where the data path sends a packet, and why, worked out from the
//! maps the way the programs read them: the frontend the destination matches (and which scope
//! of it the source gets), the source-range check, the eligible endpoints, the backend (the
//! flow's conntrack entry, the client's affinity record, the Maglev position or the hash slot),
//! and the packet after translation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use lb_common::{
    AffinityValue, In6, backend_flags, conntrack_flags, conntrack_state, counters, service_flags,
};
use serde::Serialize;

use crate::dataplane::conntrack::{
    self, FamilyFlowTables, FlowTables as _, FlowTablesError, PinnedFlowTables,
};
use crate::dataplane::datapath::{self, DatapathError};
use crate::dataplane::maps::{BpfMaps, FamilyAddress, MapsError, MapsSnapshot, ServiceMaps as _, SlotKey};
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

/// A client's affinity record, with its age in seconds.
pub type AffinityRecord = (AffinityValue, u64);

/// What the maps say about the packet's flow besides the service maps.
#[derive(Clone, Debug, Default)]
pub struct FlowFacts {
    /// The conntrack entry of the packet's 5-tuple, if the flow is tracked.
    pub tracked: Option<TrackedFlow>,
    /// The client's affinity record for the frontend, with its age in seconds.
    pub affinity: Option<AffinityRecord>,
    /// The data path's settings: Maglev table size and source-NAT address.
    pub maglev_table_size: u32,
    /// The source-NAT address of the query's family.
    pub snat_address: Option<IpAddr>,
    /// The reply tuple of the new flow's backend (backend -> client) belongs to another live
    /// flow (the client reached the same backend from this port through another frontend):
    /// the flow gets a source port of its own.
    pub reply_tuple_taken: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub packet: String,
    /// `None`: no frontend at the destination; the packet passes untouched.
    pub frontend: Option<FrontendMatch>,
    /// What happens to the packet, in a few words.
    pub verdict: String,
    /// The data path's verdict counter this packet moves (as `lb counters` names it).
    pub counter: &'static str,
    pub eligible: Vec<String>,
    /// Endpoints that are not eligible, and why (known only from the objects: filled in by
    /// `lb explain --manifests`).
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
    /// `conntrack_flags`.
    pub flags: u16,
}

impl<A: FamilyAddress> From<lb_common::ConntrackEntryOf<A>> for TrackedFlow {
    fn from(entry: lb_common::ConntrackEntryOf<A>) -> Self {
        Self {
            source: SocketAddr::new(entry.src_address.ip(), u16::from_be(entry.src_port)),
            destination: SocketAddr::new(entry.dst_address.ip(), u16::from_be(entry.dst_port)),
            reply: entry.is_reply(),
            state: entry.state,
            flags: entry.flags,
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

/// The name of a verdict counter.
fn counter(index: u32) -> &'static str {
    counters::NAMES[index as usize]
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
        counter: counter(counters::PASS_NOT_SERVICE),
        eligible: Vec::new(),
        not_eligible: Vec::new(),
        backend: None,
        chosen_by: None,
        translated: None,
    };
    let conclude = |explanation: &mut Explanation, verdict: &str, index: u32| {
        explanation.verdict = format!("{verdict} ({})", counter(index));
        explanation.counter = counter(index);
    };

    // The tracked flow's entry decides before any frontend is looked at. (A TCP SYN on the
    // tuple of an ended flow starts a new flow instead; explain describes the flow's other
    // packets.)
    if let Some(entry) = &facts.tracked {
        let (backend, source) = (entry.destination, entry.source);
        if entry.reply {
            conclude(
                &mut explanation,
                "a reply of a tracked flow: its source is rewritten back to the frontend",
                counters::REPLY_REVERSE_NAT,
            );
            explanation.translated = Some(format!("{source} -> {backend}/{}", query.protocol));
            return explanation;
        }
        explanation.frontend = frontend_match(snapshot, dst_address, dst_port, protocol, query.external);
        if let Some((key, value)) = lookup(snapshot, dst_address, dst_port, protocol, query.external) {
            explanation.eligible = eligible(snapshot, key, value.backend_count);
        }
        explanation.backend = Some(backend.to_string());
        explanation.chosen_by = Some(format!(
            "the flow is tracked ({}): it keeps the backend its first packet got",
            conntrack_state::name(entry.state)
        ));
        if query.protocol == Protocol::Tcp && entry.flags & conntrack_flags::BACKEND_GONE != 0 {
            conclude(
                &mut explanation,
                "reset: the flow's backend is no longer an endpoint, the client gets a TCP RST",
                counters::RESET_BACKEND_GONE,
            );
            return explanation;
        }
        if query.protocol == Protocol::Sctp && backend.port() != query.destination.port() {
            conclude(
                &mut explanation,
                "dropped: SCTP's checksum covers the ports, and the flow's backend listens on another port",
                counters::DROP_SCTP_PORT_REWRITE,
            );
            return explanation;
        }
        conclude(&mut explanation, "forwarded to the flow's backend", counters::FORWARD_TRACKED_FLOW);
        explanation.translated = Some(format!("{source} -> {backend}/{}", query.protocol));
        return explanation;
    }

    let Some((key, value)) = lookup(snapshot, dst_address, dst_port, protocol, query.external) else {
        conclude(
            &mut explanation,
            "no frontend at this address: passed untouched",
            counters::PASS_NOT_SERVICE,
        );
        return explanation;
    };
    let frontend = frontend_match(snapshot, dst_address, dst_port, protocol, query.external);
    let service_id = value.service_id;
    let count = usize::from(value.backend_count);
    explanation.eligible = eligible(snapshot, key, value.backend_count);
    explanation.frontend = frontend;

    if value.flags & service_flags::SOURCE_RANGES != 0 {
        let allowed = snapshot
            .source_ranges
            .iter()
            .any(|(id, range)| *id == service_id && range.contains(&query.source.ip()));
        if !allowed {
            conclude(
                &mut explanation,
                "dropped: the source is outside the Service's loadBalancerSourceRanges",
                counters::DROP_SOURCE_RANGE,
            );
            return explanation;
        }
    }
    if count == 0 {
        if value.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            conclude(
                &mut explanation,
                "dropped: Local traffic policy and no endpoint on this node",
                counters::DROP_NO_LOCAL_BACKEND,
            );
        } else {
            let answer = match query.protocol {
                Protocol::Tcp => "rejected: no endpoints, the client gets a TCP RST",
                Protocol::Udp | Protocol::Sctp => {
                    "rejected: no endpoints, the client gets ICMP port unreachable"
                }
            };
            conclude(&mut explanation, answer, counters::REJECT_NO_BACKEND);
        }
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
    } else if let Some((position, id)) = (value.maglev_table != 0 && facts.maglev_table_size != 0)
        .then(|| hash % facts.maglev_table_size)
        .and_then(|position| {
            let table = snapshot.maglev.get(&value.maglev_table)?;
            Some((position, *table.get(position as usize)?))
        })
    {
        (
            Some(id),
            format!(
                "Maglev: the flow's hash {hash:#010x} is position {position} of {}",
                facts.maglev_table_size
            ),
        )
    } else {
        // No Maglev table (or none at that position): the data path takes the hash slot.
        let slot = (hash % u32::from(value.backend_count)) as u16 + 1;
        let id = snapshot.services.get(&key.with_slot(slot)).map(|v| v.backend_id);
        (id, format!("hash: the flow's hash {hash:#010x} is slot {slot} of {count}"))
    };
    explanation.chosen_by = Some(chosen_by);
    let Some(backend) = backend_id.and_then(|id| snapshot.backends.get(&id).copied()) else {
        conclude(
            &mut explanation,
            "dropped: the service entry names a slot or backend that is missing",
            counters::DROP_SERVICE_INCONSISTENT,
        );
        return explanation;
    };
    let backend_address = SocketAddr::new(backend.ip, backend.port);
    explanation.backend = Some(backend_address.to_string());
    let host_backend = backend.flags & backend_flags::HOST != 0;
    let hairpin = query.source.ip() == backend.ip;
    let snat = (value.flags & service_flags::SNAT != 0 || hairpin) && !host_backend;
    let source = if snat {
        // SCTP keeps the client's port (its CRC32c covers the ports); the others get one free
        // on the node's address.
        let port =
            if query.protocol == Protocol::Sctp { query.source.port().to_string() } else { FREE_PORT.into() };
        match facts.snat_address {
            Some(address) => address_and_port(address, &port),
            None => {
                conclude(
                    &mut explanation,
                    "dropped: the flow needs source NAT and the node has no address for it",
                    counters::DROP_SNAT_FAILED,
                );
                return explanation;
            }
        }
    } else if facts.reply_tuple_taken {
        if query.protocol == Protocol::Sctp {
            conclude(
                &mut explanation,
                "dropped: the flow's reply tuple is another flow's, and SCTP keeps its port",
                counters::DROP_SNAT_FAILED,
            );
            return explanation;
        }
        address_and_port(query.source.ip(), FREE_PORT)
    } else {
        query.source.to_string()
    };
    // The data path tracks the flow before it rewrites, and refuses the rewrite then.
    if query.protocol == Protocol::Sctp && backend.port != dst_port {
        conclude(
            &mut explanation,
            "dropped: SCTP's checksum covers the ports, and this backend listens on another port",
            counters::DROP_SCTP_PORT_REWRITE,
        );
        return explanation;
    }
    let how = match (snat, hairpin) {
        (false, _) if facts.reply_tuple_taken => {
            ", with a source port of its own (another flow from this port reaches the same backend)"
        }
        (false, _) => "",
        (true, true) => ", source-NATed (hairpin)",
        (true, false) => ", source-NATed",
    };
    conclude(
        &mut explanation,
        &format!("forwarded to a backend as a new flow{how}"),
        counters::FORWARD_NEW_FLOW,
    );
    explanation.translated = Some(format!("{source} -> {backend_address}/{}", query.protocol));
    explanation
}

/// The backends in a frontend's slots: where its new flows may go.
fn eligible(snapshot: &MapsSnapshot, key: SlotKey, count: u16) -> Vec<String> {
    (1..=count)
        .filter_map(|slot| snapshot.services.get(&key.with_slot(slot)))
        .filter_map(|slot| snapshot.backends.get(&slot.backend_id))
        .map(|backend| SocketAddr::new(backend.ip, backend.port).to_string())
        .collect()
}

/// `address:port` as a socket address prints, for a port given as text (`FREE_PORT`, say).
pub fn address_and_port(address: IpAddr, port: &str) -> String {
    match address {
        IpAddr::V4(address) => format!("{address}:{port}"),
        IpAddr::V6(address) => format!("[{address}]:{port}"),
    }
}

/// Stands for the source port the data path picks for a flow that needs one of its own (source
/// NAT, or a reply tuple another flow holds) when the flow's first packet arrives.
pub const FREE_PORT: &str = "<a free port>";

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("reading the service maps: {0}")]
    Maps(#[from] MapsError),
    #[error("reading the data path's settings: {0}")]
    Settings(#[from] DatapathError),
    #[error(transparent)]
    FlowTables(#[from] FlowTablesError),
    #[error("reading {map}: {source}")]
    Lookup {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The maps and the facts about the query's flow that `lb explain` works from, as the pins
/// under `bpf_dir` hold them now (a running lb's, or a stopped one's).
pub fn read_pinned(bpf_dir: &Path, query: &Query) -> Result<(MapsSnapshot, FlowFacts), ExplainError> {
    let maps = BpfMaps::from_pins(bpf_dir)?;
    let mut snapshot = maps.snapshot()?;
    let config = datapath::read_config(bpf_dir)?;
    let tables = PinnedFlowTables::open(bpf_dir)?;
    let snat_address = match query.source.ip() {
        IpAddr::V4(_) => (config.snat_address != 0)
            .then(|| std::net::Ipv4Addr::from(u32::from_be(config.snat_address)).into()),
        IpAddr::V6(_) => datapath::read_config6(bpf_dir)
            .ok()
            .map(|config| std::net::Ipv6Addr::from(config.snat_address))
            .filter(|address| !address.is_unspecified())
            .map(Into::into),
    };
    let service = lookup(
        &snapshot,
        query.destination.ip(),
        query.destination.port(),
        query.protocol.number(),
        query.external,
    )
    .map(|(_, value)| value);
    // Only the frontend's own Maglev table: reading every slot of the tables' array costs
    // thousands of calls.
    if let Some(table) = service.map(|value| value.maglev_table).filter(|table| *table != 0)
        && let Some(contents) = maps.maglev_contents(table)?
    {
        snapshot.maglev.insert(table, contents);
    }
    let service_id = service.map(|value| value.service_id);
    let (tracked, affinity) = match (&tables.v6, query.source.ip()) {
        (_, IpAddr::V4(_)) => flow_facts(&tables.v4, query, service_id)?,
        (Some(v6), IpAddr::V6(_)) => flow_facts(v6, query, service_id)?,
        (None, IpAddr::V6(_)) => (None, None),
    };
    let mut facts = FlowFacts {
        tracked,
        affinity,
        maglev_table_size: config.maglev_table_size,
        snat_address,
        reply_tuple_taken: false,
    };
    // Whether the backend explain picks has this client port's reply tuple free.
    let first = explain(query, &snapshot, &facts);
    let keeps_source = first
        .translated
        .as_deref()
        .and_then(|t| t.split(" -> ").next())
        .is_some_and(|source| source == query.source.to_string());
    if first.counter == counter(counters::FORWARD_NEW_FLOW)
        && keeps_source
        && let Some(backend) = first.backend.as_deref().and_then(|b| b.parse::<SocketAddr>().ok())
    {
        facts.reply_tuple_taken = match (&tables.v6, query.source.ip()) {
            (_, IpAddr::V4(_)) => reply_tuple_taken(&tables.v4, query, backend)?,
            (Some(v6), IpAddr::V6(_)) => reply_tuple_taken(v6, query, backend)?,
            (None, IpAddr::V6(_)) => false,
        };
    }
    Ok((snapshot, facts))
}

/// The conntrack key of a packet from `source` to `destination` (`None` if either is not of
/// family `A`), with the byte order the data path writes.
fn flow_key<A: FamilyAddress>(
    source: SocketAddr,
    destination: SocketAddr,
    protocol: Protocol,
) -> Option<lb_common::FlowKeyOf<A>> {
    Some(lb_common::FlowKeyOf {
        src_address: A::from_ip(source.ip())?,
        dst_address: A::from_ip(destination.ip())?,
        src_port: source.port().to_be(),
        dst_port: destination.port().to_be(),
        protocol: protocol.number(),
        _pad0: 0,
        _pad1: 0,
    })
}

/// Whether the reply tuple of a new flow from the query's client to `backend` is held by
/// another live flow, as the data path finds when it tracks the flow.
fn reply_tuple_taken<A: FamilyAddress>(
    tables: &FamilyFlowTables<A>,
    query: &Query,
    backend: SocketAddr,
) -> Result<bool, ExplainError>
where
    FamilyFlowTables<A>: conntrack::FlowTables<A>,
{
    let Some(key) = flow_key::<A>(backend, query.source, query.protocol) else { return Ok(false) };
    let existing = tables
        .flow_entry(&key)
        .map_err(|source| ExplainError::Lookup { map: "the conntrack table", source })?
        .map(TrackedFlow::from);
    // Free when it is this same flow's (a new connection on its tuple) or its flow has ended.
    Ok(existing
        .is_some_and(|entry| entry.state != conntrack_state::TCP_CLOSED && entry.source != query.destination))
}

/// The query's conntrack entry, and the client's affinity record for the frontend (with its age
/// in seconds), from one family's tables.
fn flow_facts<A: FamilyAddress>(
    tables: &FamilyFlowTables<A>,
    query: &Query,
    service_id: Option<u32>,
) -> Result<(Option<TrackedFlow>, Option<AffinityRecord>), ExplainError>
where
    FamilyFlowTables<A>: conntrack::FlowTables<A>,
    lb_common::FlowKeyOf<A>: aya::Pod,
    lb_common::ConntrackEntryOf<A>: aya::Pod,
    lb_common::AffinityKeyOf<A>: aya::Pod,
{
    let Some(key) = flow_key::<A>(query.source, query.destination, query.protocol) else {
        return Ok((None, None));
    };
    let src_address = key.src_address;
    let tracked = tables
        .flow_entry(&key)
        .map_err(|source| ExplainError::Lookup { map: "the conntrack table", source })?
        .map(Into::into);
    let Some(service_id) = service_id else { return Ok((tracked, None)) };
    let record = tables
        .affinity_record(&lb_common::AffinityKeyOf { client_address: src_address, service_id })
        .map_err(|source| ExplainError::Lookup { map: "the affinity table", source })?;
    let affinity = record.map(|record| {
        (record, conntrack::monotonic_ns().saturating_sub(record.last_used_ns) / 1_000_000_000)
    });
    Ok((tracked, affinity))
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
