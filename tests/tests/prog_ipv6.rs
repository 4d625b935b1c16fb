//! IPv6 packet fixtures through BPF_PROG_TEST_RUN: {input, expected verdict, expected output,
//! expected counter}, the IPv6 maps programmed by the real reconciler.

use std::net::Ipv6Addr;

use aya::maps::{HashMap, MapData};
use lb_common::{ConntrackEntry6, FlowKey6, counters, map_names};
use lb_userspace::dataplane::maps::{ServiceMaps, SlotKey};
use lb_userspace::model::{Frontend, FrontendPolicy, FrontendType, L4Addr, Protocol};
use tests::fixture::{Harness, PASS, REDIRECT};
use tests::packet::{self, DEST_OPTIONS, ETH_LEN, FRAGMENT, HOP_BY_HOP, Packet6Spec, ROUTING, TCP, UDP};

const CLIENT: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2), 40000);
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const POD: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 11), 8080);

/// A frontend `VIP:port/protocol` with `backends` (none: rejects).
fn frontend(port: u16, protocol: u8, backends: &[(Ipv6Addr, u16)]) -> Frontend {
    let protocol = Protocol::from_number(protocol).unwrap();
    let backends =
        backends.iter().map(|(ip, port)| L4Addr { ip: (*ip).into(), port: *port, protocol }).collect();
    let mut frontend = tests::fixture::frontend(port, protocol, backends);
    frontend.address.ip = VIP.into();
    frontend
}

fn program(h: &mut Harness, port: u16, protocol: u8, backends: &[(Ipv6Addr, u16)]) {
    h.program(vec![frontend(port, protocol, backends)]);
}

fn flows(h: &mut Harness) -> Vec<(FlowKey6, ConntrackEntry6)> {
    let map: HashMap<&MapData, FlowKey6, ConntrackEntry6> =
        HashMap::try_from(h.datapath.ebpf_mut().map(map_names::CONNTRACK6).unwrap()).unwrap();
    map.iter().map(Result::unwrap).collect()
}

#[test]
fn a_tcp_flow_to_an_ipv6_cluster_ip_is_translated_both_ways() {
    let mut h = Harness::new();
    program(&mut h, 80, TCP, &[POD]);
    let syn = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x02);
    let expected = syn.with_dst(POD).build();
    assert!(packet::checksums_valid6(&expected));
    h.expect("SYN", &syn.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    let flows = flows(&mut h);
    assert_eq!(flows.len(), 2, "both directions tracked: {flows:?}");
    let forward = flows.iter().find(|(key, _)| key.src() == CLIENT).unwrap();
    assert_eq!(forward.0.dst(), (VIP, 80));
    // The IDs the reconciler gave the frontend and the backend.
    let snapshot = h.reconciler.maps().snapshot().unwrap();
    let service_id = snapshot.services[&SlotKey::new(VIP, 80, TCP, 0)].service_id;
    let backend_id = snapshot.services[&SlotKey::new(VIP, 80, TCP, 1)].backend_id;
    assert_eq!(snapshot.backends[&backend_id].ip, POD.0);
    assert_eq!((forward.1.service_id, forward.1.backend_id), (service_id, backend_id));

    let syn_ack = Packet6Spec::tcp(POD, CLIENT, 0x12);
    h.expect(
        "SYN-ACK",
        &syn_ack.build(),
        PASS,
        &syn_ack.with_src((VIP, 80)).build(),
        counters::REPLY_REVERSE_NAT,
    );
    let ack = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x10);
    h.expect("ACK", &ack.build(), PASS, &ack.with_dst(POD).build(), counters::FORWARD_TRACKED_FLOW);
    // Its packets were also held against what `lb explain` said of them.
    assert!(h.explained >= 2, "{}", h.explained);
}

#[test]
fn udp_to_an_ipv6_cluster_ip_is_translated() {
    let mut h = Harness::new();
    let pod = (POD.0, 5353);
    program(&mut h, 53, UDP, &[pod]);
    let query = Packet6Spec::udp(CLIENT, (VIP, 53));
    let expected = query.with_dst(pod).build();
    assert!(packet::checksums_valid6(&expected));
    h.expect("query", &query.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    let answer = Packet6Spec::udp(pod, CLIENT);
    h.expect(
        "answer",
        &answer.build(),
        PASS,
        &answer.with_src((VIP, 53)).build(),
        counters::REPLY_REVERSE_NAT,
    );
}

#[test]
fn an_ipv6_frontend_without_endpoints_rejects_with_rst_or_icmpv6() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, TCP, &[]), frontend(53, UDP, &[])]);
    let syn = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x02);
    let rst = packet::tcp_reset_for6(&syn);
    assert!(packet::checksums_valid6(&rst));
    h.expect("SYN", &syn.build(), REDIRECT, &rst, counters::REJECT_NO_BACKEND);
    let query = Packet6Spec::udp(CLIENT, (VIP, 53));
    let unreachable = packet::icmpv6_port_unreachable_for(&query);
    assert!(packet::checksums_valid6(&unreachable));
    h.expect("UDP", &query.build(), REDIRECT, &unreachable, counters::REJECT_NO_BACKEND);
}

#[test]
fn extension_headers_are_passed_over_or_counted() {
    let mut h = Harness::new();
    program(&mut h, 80, TCP, &[POD]);
    // Options headers: walked over to the ports, and kept as they were.
    let syn = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x02)
        .with_extension(HOP_BY_HOP, 0)
        .with_extension(DEST_OPTIONS, 0);
    let expected = syn.with_dst(POD).build();
    assert!(packet::checksums_valid6(&expected));
    h.expect("hop-by-hop, destination options", &syn.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    // A routing header with segments left: the destination is a waypoint's. Untouched.
    let routed = Packet6Spec::tcp((CLIENT.0, 40001), (VIP, 80), 0x02).with_extension(ROUTING, 1).build();
    h.expect("routing header", &routed, PASS, &routed, counters::PASS_IPV6_EXTENSION);
    // More extension headers than the programs walk.
    let mut long = Packet6Spec::tcp((CLIENT.0, 40003), (VIP, 80), 0x02);
    for _ in 0..5 {
        long = long.with_extension(DEST_OPTIONS, 0);
    }
    let long = long.build();
    h.expect("five options headers", &long, PASS, &long, counters::PASS_IPV6_EXTENSION);
}

#[test]
fn malformed_and_foreign_ipv6_packets_pass_untouched() {
    let mut h = Harness::new();
    program(&mut h, 80, TCP, &[POD]);
    let syn = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x02).build();
    // The payload length claims more than the frame holds.
    let mut truncated = syn.clone();
    truncated.truncate(syn.len() - 10);
    h.expect("truncated", &truncated, PASS, &truncated, counters::PASS_TRUNCATED);
    // IPv6's EtherType, another version in the header.
    let mut wrong_version = syn.clone();
    wrong_version[ETH_LEN] = 0x40;
    h.expect("version 4 in an IPv6 frame", &wrong_version, PASS, &wrong_version, counters::PASS_MALFORMED);
    // Not a frontend.
    let other = Packet6Spec::tcp(CLIENT, (VIP, 81), 0x02).build();
    h.expect("no frontend", &other, PASS, &other, counters::PASS_NOT_SERVICE);
    // ICMPv6 (neighbour discovery, echo...) is the stack's.
    let mut echo = Packet6Spec::udp(CLIENT, (VIP, 80)).build();
    echo[ETH_LEN + 6] = packet::ICMPV6;
    h.expect("ICMPv6", &echo, PASS, &echo, counters::PASS_OTHER_PROTOCOL);
    assert!(flows(&mut h).is_empty());
}

#[test]
fn icmpv6_errors_about_a_translated_flow_are_translated_back() {
    let mut h = Harness::new();
    program(&mut h, 80, TCP, &[POD]);
    let syn = Packet6Spec::tcp(CLIENT, (VIP, 80), 0x02);
    h.expect("SYN", &syn.build(), PASS, &syn.with_dst(POD).build(), counters::FORWARD_NEW_FLOW);
    // The segment as the pod got it, which an ICMPv6 error quotes.
    let delivered = syn.with_dst(POD);

    // The pod says it was too big: the client learns it about what it sent (to the frontend),
    // from the frontend, so its socket finds the error and lowers its path MTU.
    let too_big = packet::icmpv6_error(POD.0, CLIENT.0, 2, 0, 1280, &delivered);
    let expected = packet::icmpv6_error(VIP, CLIENT.0, 2, 0, 1280, &syn);
    assert!(packet::checksums_valid6(&expected));
    h.expect("packet too big", &too_big, PASS, &expected, counters::ICMP_ERROR_TRANSLATED);

    // A router on the way keeps its own address as the source.
    let router = Ipv6Addr::new(0xfd00, 0x244, 0xff, 0, 0, 0, 0, 1);
    let exceeded = packet::icmpv6_error(router, CLIENT.0, 3, 0, 0, &delivered);
    let expected = packet::icmpv6_error(router, CLIENT.0, 3, 0, 0, &syn);
    h.expect("time exceeded", &exceeded, PASS, &expected, counters::ICMP_ERROR_TRANSLATED);

    // Errors about no tracked flow, and ICMPv6 that is not an error, pass untouched.
    let stranger = Packet6Spec::tcp((CLIENT.0, 40001), POD, 0x02);
    let unknown = packet::icmpv6_error(POD.0, CLIENT.0, 1, 4, 0, &stranger);
    h.expect("error about no flow", &unknown, PASS, &unknown, counters::PASS_OTHER_PROTOCOL);
    let echo = packet::icmpv6_error(POD.0, CLIENT.0, 128, 0, 0, &delivered);
    h.expect("echo request", &echo, PASS, &echo, counters::PASS_OTHER_PROTOCOL);
}

/// A frame whose fragment header (the first extension header) carries identification `id`.
fn with_fragment_id(mut frame: Vec<u8>, id: u32) -> Vec<u8> {
    frame[ETH_LEN + 40 + 4..ETH_LEN + 40 + 8].copy_from_slice(&id.to_be_bytes());
    frame
}

#[test]
fn ipv6_fragments_follow_their_first_fragment() {
    let mut h = Harness::new();
    let pod = (POD.0, 5353);
    program(&mut h, 53, UDP, &[pod]);
    // The first fragment (offset 0, more to come) carries the ports: a new flow, translated.
    let first = Packet6Spec::udp(CLIENT, (VIP, 53)).with_extension(FRAGMENT, 1);
    let expected = with_fragment_id(first.with_dst(pod).build(), 7);
    h.expect(
        "first fragment",
        &with_fragment_id(first.build(), 7),
        PASS,
        &expected,
        counters::FORWARD_NEW_FLOW,
    );

    // A later fragment (offset 8, more to come) has no ports: only its destination changes, as
    // its first fragment's did. Its bytes after the fragment header are payload, left alone.
    let later = with_fragment_id(
        Packet6Spec::udp(CLIENT, (VIP, 53)).with_extension(FRAGMENT, (8 << 3) | 1).build(),
        7,
    );
    let mut translated = later.clone();
    translated[ETH_LEN + 24..ETH_LEN + 40].copy_from_slice(&pod.0.octets());
    h.expect("later fragment", &later, PASS, &translated, counters::FRAGMENT_TRANSLATED);

    // Another datagram's later fragment (no first fragment seen): untouched, counted.
    let stranger = with_fragment_id(later.clone(), 8);
    h.expect("unknown datagram", &stranger, PASS, &stranger, counters::PASS_FRAGMENT);

    // The last fragment (offset 16, no more) is translated and ends the datagram's record.
    let last =
        with_fragment_id(Packet6Spec::udp(CLIENT, (VIP, 53)).with_extension(FRAGMENT, 16 << 3).build(), 7);
    let mut translated = last.clone();
    translated[ETH_LEN + 24..ETH_LEN + 40].copy_from_slice(&pod.0.octets());
    h.expect("last fragment", &last, PASS, &translated, counters::FRAGMENT_TRANSLATED);
    h.expect("after the last", &last, PASS, &last, counters::PASS_FRAGMENT);
}

#[test]
fn xdp_sends_remote_backend_traffic_back_out_over_ipv6_and_leaves_the_rest_to_tc() {
    use tests::fixture::{XDP_PASS, XDP_TX, mac_of};
    let mut h = Harness::new();
    // The harness namespace becomes a node: uplink lbx0 (fd00:50::1) with a peer, the other
    // node at ::2 (pods fd00:244:2::/64 behind it) and the client at ::100, known neighbours.
    let (other_node_mac, client_mac) = ([2, 0, 0, 0, 0, 0x22], [2, 0, 0, 0, 0, 0x64]);
    for command in [
        "ip link add lbx0 type veth peer name lbx1",
        "sysctl -qw net.ipv6.conf.lbx0.accept_dad=0",
        "ip link set lbx0 up",
        "ip link set lbx1 up",
        "ip addr add fd00:50::1/64 dev lbx0 nodad",
        "ip neigh add fd00:50::2 lladdr 02:00:00:00:00:22 dev lbx0 nud permanent",
        "ip neigh add fd00:50::100 lladdr 02:00:00:00:00:64 dev lbx0 nud permanent",
        "ip -6 route add fd00:244:2::/64 via fd00:50::2",
        "sysctl -qw net.ipv6.conf.all.forwarding=1",
    ] {
        let args: Vec<&str> = command.split(' ').collect();
        let status = std::process::Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(status.success(), "{command}");
    }
    let ingress = nix::net::if_::if_nametoindex("lbx0").unwrap();
    let uplink_mac = mac_of("lbx0");
    let node: Ipv6Addr = "fd00:50::1".parse().unwrap();
    let client: (Ipv6Addr, u16) = ("fd00:50::100".parse().unwrap(), 40000);
    let remote: (Ipv6Addr, u16) = ("fd00:244:2::11".parse().unwrap(), 8080);
    h.set_snat_address6(node);
    let mut node_port = frontend(30080, TCP, &[remote]);
    node_port.address.ip = node.into();
    node_port.frontend_type = FrontendType::NodePort;
    node_port.policy =
        FrontendPolicy { snat: true, node_address: true, external: true, ..Default::default() };
    h.program(vec![node_port, frontend(80, TCP, &[remote])]);
    let with_macs = |mut frame: Vec<u8>, dst: [u8; 6]| {
        frame[..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&uplink_mac);
        frame
    };

    // New flow to the NodePort (lb_xdp6, then lb_xdp6_new_flow): translated, source-NATed,
    // hop limit down, MACs for the other node.
    let syn = Packet6Spec::tcp(client, (node, 30080), 0x02);
    let (action, out) = h.run_xdp(ingress, &syn.build());
    assert_eq!(action, XDP_TX, "{out:02x?}");
    let forward =
        flows(&mut h).into_iter().find(|(key, _)| key.src() == client).expect("the flow is tracked");
    let port = u16::from_be(forward.1.src_port);
    assert!((lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&port), "{port}");
    let expected = Packet6Spec { hop_limit: 63, ..syn.with_src((node, port)).with_dst(remote) }.build();
    assert!(packet::checksums_valid6(&expected));
    assert_eq!(out, with_macs(expected, other_node_mac), "translated SYN");

    // A tracked flow's next packet (lb_xdp6 alone).
    let ack = Packet6Spec::tcp(client, (node, 30080), 0x10);
    let (action, out) = h.run_xdp(ingress, &ack.build());
    assert_eq!(action, XDP_TX);
    let expected = Packet6Spec { hop_limit: 63, ..ack.with_src((node, port)).with_dst(remote) }.build();
    assert_eq!(out, with_macs(expected, other_node_mac), "translated ACK");

    // The reply from the other node's pod goes back out to the client, from the NodePort.
    let reply = Packet6Spec::tcp(remote, (node, port), 0x12);
    let (action, out) = h.run_xdp(ingress, &reply.build());
    assert_eq!(action, XDP_TX);
    let expected = Packet6Spec { hop_limit: 63, ..reply.with_src((node, 30080)).with_dst(client) }.build();
    assert!(packet::checksums_valid6(&expected));
    assert_eq!(out, with_macs(expected, client_mac), "translated reply");

    // ClusterIP traffic is not XDP's, nor are extension headers: passed untouched.
    let to_cluster_ip = Packet6Spec::tcp(client, (VIP, 80), 0x02).build();
    assert_eq!(h.run_xdp(ingress, &to_cluster_ip), (XDP_PASS, to_cluster_ip));
    let with_options = syn.with_extension(DEST_OPTIONS, 0).build();
    assert_eq!(h.run_xdp(ingress, &with_options), (XDP_PASS, with_options));
}
