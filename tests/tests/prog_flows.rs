//! Packet fixtures for flows over their whole life, through BPF_PROG_TEST_RUN: TCP state
//! transitions, ended flows that never capture a new connection, flows whose backend left,
//! fragments, session affinity, Maglev, frontend scopes, host-network backends, a full table
//! and source-NAT port reuse.

use std::collections::BTreeSet;
use std::mem::size_of;
use std::net::Ipv4Addr;

use lb_common::{ConntrackEntry, FlowKey, conntrack_flags, conntrack_state, counters};
use lb_userspace::dataplane::datapath::{Capacity, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM};
use lb_userspace::dataplane::maglev::{self, MaglevBackend};
use lb_userspace::model::{FrontendType, L4Addr, Protocol, Scope};
use tests::fixture::{CLIENT, DROP, Harness, PASS, REDIRECT, VIP, backend, frontend};
use tests::packet::{self, ETH_LEN, PacketSpec};

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

const POD: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 1, 11), 8080);

fn one_backend(h: &mut Harness) {
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
}

fn entry(h: &mut Harness, key: &FlowKey) -> Option<ConntrackEntry> {
    h.conntrack().get(key, 0).ok()
}

fn forward_key(client: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey::new(client, (VIP, 80), packet::TCP)
}

fn reply_key(client: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey::new(POD, client, packet::TCP)
}

fn states(h: &mut Harness, client: (Ipv4Addr, u16)) -> (u8, u8) {
    let forward = entry(h, &forward_key(client)).expect("client-side entry");
    let reply = entry(h, &reply_key(client)).expect("reply entry");
    (forward.state, reply.state)
}

/// Client packet in, translated packet out.
fn client_packet(h: &mut Harness, client: (Ipv4Addr, u16), flags: u8, counter: u32) {
    let packet = PacketSpec::tcp(client, (VIP, 80), flags);
    h.expect("client packet", &packet.build(), PASS, &packet.with_dst(POD).build(), counter);
}

/// Backend packet in, reverse-translated packet out.
fn backend_packet(h: &mut Harness, client: (Ipv4Addr, u16), flags: u8) {
    let packet = PacketSpec::tcp(POD, client, flags);
    h.expect(
        "backend packet",
        &packet.build(),
        PASS,
        &packet.with_src((VIP, 80)).build(),
        counters::REPLY_REVERSE_NAT,
    );
}

#[test]
fn tcp_state_follows_the_handshake_and_the_close() {
    use conntrack_state::*;
    let mut h = Harness::new();
    one_backend(&mut h);
    client_packet(&mut h, CLIENT, SYN, counters::FORWARD_NEW_FLOW);
    assert_eq!(states(&mut h, CLIENT), (TCP_SYN_SENT, TCP_SYN_SENT));
    client_packet(&mut h, CLIENT, SYN, counters::FORWARD_TRACKED_FLOW); // a retransmission
    backend_packet(&mut h, CLIENT, SYN_ACK);
    assert_eq!(states(&mut h, CLIENT), (TCP_ESTABLISHED, TCP_ESTABLISHED));
    client_packet(&mut h, CLIENT, ACK, counters::FORWARD_TRACKED_FLOW);
    client_packet(&mut h, CLIENT, FIN_ACK, counters::FORWARD_TRACKED_FLOW);
    assert_eq!(states(&mut h, CLIENT), (TCP_CLOSING, TCP_CLOSING));
    backend_packet(&mut h, CLIENT, ACK); // half-closed: the backend may still send
    backend_packet(&mut h, CLIENT, FIN_ACK);
    assert_eq!(states(&mut h, CLIENT), (TCP_CLOSED, TCP_CLOSED));
    client_packet(&mut h, CLIENT, ACK, counters::FORWARD_TRACKED_FLOW); // the last ACK still goes

    // A RST ends a flow at once, from either side.
    let other = (CLIENT.0, 40001);
    client_packet(&mut h, other, SYN, counters::FORWARD_NEW_FLOW);
    backend_packet(&mut h, other, SYN_ACK);
    backend_packet(&mut h, other, RST);
    assert_eq!(states(&mut h, other), (TCP_CLOSED, TCP_CLOSED));

    // Entries carry their timestamps: created once, seen since.
    let forward = entry(&mut h, &forward_key(CLIENT)).unwrap();
    assert!(forward.created_ns > 0 && forward.last_seen_ns >= forward.created_ns);
    // Picked up mid-stream (entries lost), a flow is established from its first packet.
    let late = (CLIENT.0, 40002);
    client_packet(&mut h, late, ACK, counters::FORWARD_NEW_FLOW);
    assert_eq!(states(&mut h, late), (TCP_ESTABLISHED, TCP_ESTABLISHED));
}

/// The bug of "Connections over their whole life": an ended flow's reply entry
/// (pod:port -> client:port) must not take the pod's SYN-ACK to a later direct connection from
/// the same client port.
#[test]
fn an_ended_flows_reply_entry_never_takes_a_new_connection() {
    let mut h = Harness::new();
    one_backend(&mut h);
    client_packet(&mut h, CLIENT, SYN, counters::FORWARD_NEW_FLOW);
    backend_packet(&mut h, CLIENT, SYN_ACK);
    client_packet(&mut h, CLIENT, RST, counters::FORWARD_TRACKED_FLOW);

    // The client now connects to the pod directly from the same port: its SYN is not a
    // Service flow, and the pod's SYN-ACK passes untouched, the stale entry removed.
    let direct_syn = PacketSpec::tcp(CLIENT, POD, SYN).build();
    h.expect("direct SYN", &direct_syn, PASS, &direct_syn, counters::PASS_NOT_SERVICE);
    let direct_syn_ack = PacketSpec::tcp(POD, CLIENT, SYN_ACK).build();
    h.expect("direct SYN-ACK", &direct_syn_ack, PASS, &direct_syn_ack, counters::PASS_ENDED_FLOW);
    assert!(entry(&mut h, &reply_key(CLIENT)).is_none(), "the ended flow's reply entry is gone");
    let direct_ack = PacketSpec::tcp(POD, CLIENT, ACK).build();
    h.expect("direct data", &direct_ack, PASS, &direct_ack, counters::PASS_NOT_SERVICE);

    // A new connection to the ClusterIP on the same tuple is a new flow.
    h.expect_counters(
        "SYN on the ended flow's tuple",
        &PacketSpec::tcp(CLIENT, (VIP, 80), SYN).build(),
        PASS,
        &PacketSpec::tcp(CLIENT, POD, SYN).build(),
        &[counters::CONNTRACK_REOPENED, counters::FORWARD_NEW_FLOW],
    );
    assert_eq!(states(&mut h, CLIENT), (conntrack_state::TCP_SYN_SENT, conntrack_state::TCP_SYN_SENT));
}

/// What the collector does to a flow whose backend stopped being an endpoint, and what the
/// data path makes of it: the client's next packet is answered with a RST, and a new
/// connection on the same tuple goes to a live backend.
#[test]
fn a_flow_whose_backend_left_is_reset_and_its_tuple_reopens() {
    let mut h = Harness::new();
    one_backend(&mut h);
    client_packet(&mut h, CLIENT, SYN, counters::FORWARD_NEW_FLOW);
    backend_packet(&mut h, CLIENT, SYN_ACK);
    for key in [forward_key(CLIENT), reply_key(CLIENT)] {
        let mut marked = entry(&mut h, &key).unwrap();
        marked.flags |= conntrack_flags::BACKEND_GONE;
        h.conntrack().insert(key, marked, 0).unwrap();
    }
    let ack = PacketSpec::tcp(CLIENT, (VIP, 80), ACK);
    h.expect(
        "ACK after the backend left",
        &ack.build(),
        REDIRECT,
        &packet::tcp_reset_for(&ack),
        counters::RESET_BACKEND_GONE,
    );
    assert_eq!(states(&mut h, CLIENT), (conntrack_state::TCP_CLOSED, conntrack_state::TCP_CLOSED));

    let live = backend(12, 8080, Protocol::Tcp);
    h.program(vec![frontend(80, Protocol::Tcp, vec![live])]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), SYN);
    h.expect_counters(
        "reconnect",
        &syn.build(),
        PASS,
        &syn.with_dst((tests::fixture::ipv4(live.ip), live.port)).build(),
        &[counters::CONNTRACK_REOPENED, counters::FORWARD_NEW_FLOW],
    );
}

#[test]
fn later_fragments_follow_their_first_fragment_both_ways() {
    let mut h = Harness::new();
    h.program(vec![frontend(53, Protocol::Udp, vec![backend(11, 5353, Protocol::Udp)])]);
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 5353);
    let query = PacketSpec { payload: vec![7; 1200], ..PacketSpec::udp(CLIENT, (VIP, 53)) };
    let (first, later) = query.fragments(600);
    let (want_first, want_later) = query.with_dst(pod).fragments(600);

    // A later fragment before its first one: nothing to follow yet.
    h.expect("later fragment first", &later, PASS, &later, counters::PASS_FRAGMENT);
    h.expect("first fragment", &first, PASS, &want_first, counters::FORWARD_NEW_FLOW);
    h.expect("later fragment", &later, PASS, &want_later, counters::FRAGMENT_TRANSLATED);
    assert!(packet::fragments_valid(&want_first, &want_later));

    let answer = PacketSpec { payload: vec![9; 2000], ..PacketSpec::udp(pod, CLIENT) };
    let (first, later) = answer.fragments(1000);
    let (want_first, want_later) = answer.with_src((VIP, 53)).fragments(1000);
    h.expect("first reply fragment", &first, PASS, &want_first, counters::REPLY_REVERSE_NAT);
    h.expect("later reply fragment", &later, PASS, &want_later, counters::FRAGMENT_TRANSLATED);
    assert!(packet::fragments_valid(&want_first, &want_later));
    // That was the datagram's last fragment: its record is gone, so another datagram reusing
    // the IP ID is not translated by it.
    h.expect("after the last fragment", &later, PASS, &later, counters::PASS_FRAGMENT);
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let mut h = Harness::new();
    let backends: Vec<L4Addr> = (11..19).map(|i| backend(i, 8080, Protocol::Tcp)).collect();
    let mut sticky = frontend(80, Protocol::Tcp, backends.clone());
    sticky.policy.affinity_timeout = 60;
    h.program(vec![sticky.clone()]);
    let chosen = |h: &mut Harness, client: (Ipv4Addr, u16)| {
        let (verdict, out) = h.run(&PacketSpec::tcp(client, (VIP, 80), SYN).build());
        assert_eq!(verdict, PASS);
        let ip = &out[ETH_LEN..];
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
    };
    let first = chosen(&mut h, CLIENT);
    let before = h.counters()[counters::AFFINITY_HIT as usize];
    for port in 40001..40021 {
        assert_eq!(chosen(&mut h, (CLIENT.0, port)), first, "client port {port}");
    }
    assert_eq!(h.counters()[counters::AFFINITY_HIT as usize] - before, 20);
    // Without affinity the same ports spread over the backends.
    sticky.policy.affinity_timeout = 0;
    h.program(vec![sticky]);
    let spread: BTreeSet<Ipv4Addr> = (41001..41021).map(|port| chosen(&mut h, (CLIENT.0, port))).collect();
    assert!(spread.len() > 1, "{spread:?}");
}

/// External frontends pick from a Maglev table: the backend a flow gets is the table's, the
/// same as any node computes, and a backend's removal moves only flows it must.
#[test]
fn maglev_picks_the_tables_backend_and_a_removal_moves_only_its_flows() {
    let mut h = Harness::new();
    let backends: Vec<L4Addr> = (11..16).map(|i| backend(i, 8080, Protocol::Tcp)).collect();
    let mut lb = frontend(80, Protocol::Tcp, backends.clone());
    lb.frontend_type = FrontendType::LoadBalancer;
    lb.policy.external = true;
    lb.policy.maglev = true;
    h.program(vec![lb.clone()]);
    let expected = |backends: &[L4Addr], client: (Ipv4Addr, u16)| {
        let mut order: Vec<MaglevBackend> =
            backends.iter().map(|b| MaglevBackend { address: b.ip, port: b.port }).collect();
        order.sort();
        let table = maglev::populate(&order, lb_common::MAGLEV_TABLE_SIZE);
        let hash = lb_common::flow_hash(
            u32::from(client.0).to_be(),
            u32::from(VIP).to_be(),
            client.1.to_be(),
            80u16.to_be(),
            packet::TCP,
        );
        order[table[(hash % lb_common::MAGLEV_TABLE_SIZE) as usize] as usize].address
    };
    let chosen = |h: &mut Harness, client: (Ipv4Addr, u16)| {
        let (_, out) = h.run(&PacketSpec::tcp(client, (VIP, 80), SYN).build());
        Ipv4Addr::new(out[ETH_LEN + 16], out[ETH_LEN + 17], out[ETH_LEN + 18], out[ETH_LEN + 19])
    };
    let clients: Vec<(Ipv4Addr, u16)> =
        (0..200).map(|i| (Ipv4Addr::new(198, 18, 0, i as u8), 40000 + i)).collect();
    let before: Vec<Ipv4Addr> = clients.iter().map(|c| chosen(&mut h, *c)).collect();
    for (client, got) in clients.iter().zip(&before) {
        assert_eq!(*got, expected(&backends, *client), "{client:?}");
    }
    let removed = backends[2];
    lb.backends.retain(|b| *b != removed);
    h.program(vec![lb.clone()]);
    // New flows (other client ports), checked against the table without the removed backend:
    // every flow that did not go to it still goes where it went.
    let moved_clients: Vec<(Ipv4Addr, u16)> = clients.iter().map(|(ip, port)| (*ip, port + 1000)).collect();
    for client in &moved_clients {
        let was = expected(&backends, *client);
        let now = chosen(&mut h, *client);
        assert_eq!(now, expected(&lb.backends, *client));
        if was != removed.ip {
            assert_eq!(now, was, "{client:?} moved although its backend stayed");
        }
    }
}

/// A Local-policy LoadBalancer IP: sources outside the cluster get the local endpoint only;
/// pods get every endpoint, as kube-proxy sends in-cluster traffic.
#[test]
fn in_cluster_sources_of_a_local_policy_frontend_reach_every_endpoint() {
    let mut h = Harness::new();
    let local = backend(11, 8080, Protocol::Tcp);
    let remote = L4Addr { ip: Ipv4Addr::new(10, 244, 2, 12).into(), port: 8080, protocol: Protocol::Tcp };
    let mut external = frontend(80, Protocol::Tcp, vec![]);
    external.frontend_type = FrontendType::LoadBalancer;
    external.policy.external = true;
    external.policy.local = true;
    external.policy.drop_when_empty = true;
    external.policy.two_scopes = true;
    let mut internal = external.clone();
    internal.scope = Scope::Internal;
    internal.policy.local = false;
    internal.policy.drop_when_empty = false;
    internal.policy.two_scopes = false;
    internal.backends = vec![remote];
    h.program(vec![external.clone(), internal.clone()]);

    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), SYN);
    h.program = INGRESS_EXTERNAL_PROGRAM;
    h.expect(
        "external source, no local endpoint",
        &syn.build(),
        DROP,
        &syn.build(),
        counters::DROP_NO_LOCAL_BACKEND,
    );
    h.program = INGRESS_PROGRAM;
    let from_pod = PacketSpec::tcp((Ipv4Addr::new(10, 244, 1, 30), 40000), (VIP, 80), SYN);
    h.expect(
        "pod",
        &from_pod.build(),
        PASS,
        &from_pod.with_dst((tests::fixture::ipv4(remote.ip), remote.port)).build(),
        counters::FORWARD_NEW_FLOW,
    );

    external.backends = vec![local];
    external.policy.drop_when_empty = false;
    h.program(vec![external, internal]);
    h.program = INGRESS_EXTERNAL_PROGRAM;
    let other = PacketSpec::tcp((CLIENT.0, 40100), (VIP, 80), SYN);
    h.expect(
        "external source",
        &other.build(),
        PASS,
        &other.with_dst((tests::fixture::ipv4(local.ip), local.port)).build(),
        counters::FORWARD_NEW_FLOW,
    );
}

/// A backend at one of the node's own addresses (a host-network endpoint) is never
/// source-NATed: its replies leave through this node anyway.
#[test]
fn host_network_backends_are_not_source_natted() {
    let mut h = Harness::new();
    let node = Ipv4Addr::new(192, 168, 50, 1);
    h.set_snat_address(node);
    let host = L4Addr { ip: node.into(), port: 6443, protocol: Protocol::Tcp };
    let mut node_port = frontend(30443, Protocol::Tcp, vec![host]);
    node_port.frontend_type = FrontendType::NodePort;
    node_port.address.ip = node.into();
    node_port.policy.snat = true;
    node_port.policy.node_address = true;
    node_port.policy.external = true;
    h.reconciler.set_host_addresses([node.into()].into_iter().collect());
    h.program(vec![node_port]);
    let syn = PacketSpec::tcp(CLIENT, (node, 30443), SYN);
    h.expect(
        "to a host backend",
        &syn.build(),
        PASS,
        &syn.with_dst((node, 6443)).build(),
        counters::FORWARD_NEW_FLOW,
    );
}

#[test]
fn a_full_table_refuses_new_flows_and_keeps_the_old_ones() {
    let mut h = Harness::with_capacity(&Capacity { flows: 4, ..Capacity::default() });
    one_backend(&mut h);
    for port in [40000, 40001] {
        client_packet(&mut h, (CLIENT.0, port), SYN, counters::FORWARD_NEW_FLOW);
    }
    let third = PacketSpec::tcp((CLIENT.0, 40002), (VIP, 80), SYN).build();
    h.expect("table full", &third, DROP, &third, counters::DROP_CONNTRACK_FULL);
    // The flows already tracked keep working.
    client_packet(&mut h, (CLIENT.0, 40000), ACK, counters::FORWARD_TRACKED_FLOW);
    backend_packet(&mut h, (CLIENT.0, 40001), SYN_ACK);
}

/// Source-NAT ports are reused only once their flow has ended.
#[test]
fn a_source_nat_port_is_reused_only_after_its_flow_ended() {
    let mut h = Harness::new();
    let node = Ipv4Addr::new(192, 168, 50, 1);
    h.set_snat_address(node);
    h.set_snat_ports(61000, 61000);
    let mut node_port = frontend(30080, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)]);
    node_port.frontend_type = FrontendType::NodePort;
    node_port.address.ip = node.into();
    node_port.policy.snat = true;
    node_port.policy.external = true;
    h.program(vec![node_port]);
    let first = PacketSpec::tcp(CLIENT, (node, 30080), SYN);
    h.expect_counters(
        "first flow",
        &first.build(),
        PASS,
        &first.with_src((node, 61000)).with_dst(POD).build(),
        &[counters::FORWARD_NEW_FLOW, counters::CONNTRACK_SNAT],
    );
    let second = PacketSpec::tcp((Ipv4Addr::new(10, 0, 9, 9), 40000), (node, 30080), SYN);
    h.expect("port taken by a live flow", &second.build(), DROP, &second.build(), counters::DROP_SNAT_FAILED);
    let rst = PacketSpec::tcp(CLIENT, (node, 30080), RST);
    h.expect(
        "first flow ends",
        &rst.build(),
        PASS,
        &rst.with_src((node, 61000)).with_dst(POD).build(),
        counters::FORWARD_TRACKED_FLOW,
    );
    h.expect_counters(
        "port of an ended flow",
        &second.build(),
        PASS,
        &second.with_src((node, 61000)).with_dst(POD).build(),
        &[counters::FORWARD_NEW_FLOW, counters::CONNTRACK_SNAT],
    );
}

/// loadBalancerSourceRanges cannot be got round with IP options or fragments: a source outside
/// the ranges is dropped whatever its header carries, and its later fragments (which carry no
/// ports) are never translated, not even with the IP ID of an admitted client's datagram.
#[test]
fn source_ranges_hold_against_ip_options_and_fragments() {
    let mut h = Harness::new();
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 5353);
    let mut lb = frontend(53, Protocol::Udp, vec![backend(11, 5353, Protocol::Udp)]);
    lb.frontend_type = FrontendType::LoadBalancer;
    lb.policy.external = true;
    lb.policy.source_ranges = vec!["10.0.1.0/24".parse().unwrap()];
    h.program(vec![lb]);
    let outsider = (Ipv4Addr::new(192, 0, 2, 66), 40000);

    let with_options =
        PacketSpec { ip_options: vec![1, 1, 1, 1], ..PacketSpec::udp(outsider, (VIP, 53)) }.build();
    h.expect("IP options", &with_options, DROP, &with_options, counters::DROP_SOURCE_RANGE);
    let datagram = PacketSpec { payload: vec![3; 600], ..PacketSpec::udp(outsider, (VIP, 53)) };
    let (first, later) = datagram.fragments(200);
    h.expect("first fragment", &first, DROP, &first, counters::DROP_SOURCE_RANGE);
    h.expect("later fragment", &later, PASS, &later, counters::PASS_FRAGMENT);

    // An admitted client's datagram is translated; an outsider's later fragment with the same
    // IP ID is not (the record is keyed by source and destination too).
    let admitted = PacketSpec { payload: vec![4; 600], ..PacketSpec::udp(CLIENT, (VIP, 53)) };
    let (first, _) = admitted.fragments(200);
    let (want_first, _) = admitted.with_dst(pod).fragments(200);
    h.expect("admitted first fragment", &first, PASS, &want_first, counters::FORWARD_NEW_FLOW);
    let (_, later) = datagram.fragments(200);
    h.expect("outsider's later fragment", &later, PASS, &later, counters::PASS_FRAGMENT);
}

/// During a migration (a start with other map sizes), the links switch to the new programs one
/// at a time. A flow the new programs start is written to the map the old ones read too, so
/// its reply is translated on an interface whose link has not switched yet; and a flow the old
/// programs started is found there by the new ones.
#[test]
fn during_a_migration_new_flows_are_shared_with_the_previous_map() {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let bpf = |command: i64, attr: &mut [u64; 16]| -> i64 {
        // SAFETY: bpf(2) with a zero-padded attribute buffer larger than the command reads.
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, command, attr.as_mut_ptr(), 128usize) };
        assert!(rc >= 0, "bpf({command}): {}", std::io::Error::last_os_error());
        rc
    };
    let mut h = Harness::new();
    one_backend(&mut h);
    // The old programs' conntrack map (a hash map of the same form, another size), offered to
    // the new programs as LB_CONNTRACK_PREVIOUS as a start does.
    let mut attr = [0u64; 16];
    attr[0] = 1 | ((size_of::<FlowKey>() as u64) << 32); // BPF_MAP_TYPE_HASH
    attr[1] = size_of::<ConntrackEntry>() as u64 | (1024u64 << 32);
    // SAFETY: the kernel just returned this descriptor.
    let old = unsafe { OwnedFd::from_raw_fd(bpf(0, &mut attr) as i32) };
    let outer = match h.datapath.ebpf_mut().map(lb_common::map_names::CONNTRACK_PREVIOUS) {
        Some(aya::maps::Map::ArrayOfMaps(data)) => data.fd().as_fd().as_raw_fd(),
        _ => panic!("no LB_CONNTRACK_PREVIOUS"),
    };
    let (slot, inner) = (0u32, old.as_raw_fd() as u32);
    let mut attr = [0u64; 16];
    attr[0] = outer as u64;
    attr[1] = &slot as *const u32 as u64;
    attr[2] = &inner as *const u32 as u64;
    bpf(2, &mut attr); // BPF_MAP_UPDATE_ELEM
    let old = aya::maps::MapData::from_fd(old).unwrap();
    let old: aya::maps::HashMap<_, FlowKey, ConntrackEntry> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(old)).unwrap();

    client_packet(&mut h, CLIENT, SYN, counters::FORWARD_NEW_FLOW);
    for key in [forward_key(CLIENT), reply_key(CLIENT)] {
        let shared = old.get(&key, 0).expect("the new flow's entry in the previous map");
        assert_eq!(Some(shared), entry(&mut h, &key), "the same entry in both maps");
    }
}
