//! Packet fixtures through BPF_PROG_TEST_RUN: {input, expected verdict, expected output,
//! expected counter}, with the maps programmed by the real reconciler. The harness also asks
//! `lb explain` about each packet first and holds its answer against what the program did.

use std::net::Ipv4Addr;

use lb_common::{FlowKey, counters};
use lb_userspace::dataplane::maps::{BpfMaps, ServiceMaps};
use lb_userspace::model::{FrontendPolicy, FrontendType, L4Addr, Protocol};
use tests::fixture::{CLIENT, DROP, Harness, PASS, REDIRECT, VIP, XDP_PASS, XDP_TX, backend, frontend};
use tests::packet::{self, ETH_LEN, PacketSpec};

fn dst_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    let ip = &frame[ETH_LEN..];
    let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
    (Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), u16::from_be_bytes([l4[2], l4[3]]))
}

#[test]
fn tcp_syn_to_cluster_ip_is_rewritten_with_both_checksums() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02);
    let expected = syn.with_dst((Ipv4Addr::new(10, 244, 1, 11), 8080)).build();
    assert!(packet::checksums_valid(&expected));
    h.expect("SYN", &syn.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    // The flow is now tracked: its next packet takes the conntrack path to the same backend.
    let ack = PacketSpec::tcp(CLIENT, (VIP, 80), 0x10);
    let expected = ack.with_dst((Ipv4Addr::new(10, 244, 1, 11), 8080)).build();
    h.expect("ACK", &ack.build(), PASS, &expected, counters::FORWARD_TRACKED_FLOW);
    // Both packets' outcomes were also what `lb explain` said of them (every fixture's are).
    assert_eq!(h.explained, 2);
}

#[test]
fn tracked_flow_keeps_its_backend_when_the_backend_set_changes() {
    let mut h = Harness::new();
    let initial = vec![backend(11, 8080, Protocol::Tcp), backend(12, 8080, Protocol::Tcp)];
    h.program(vec![frontend(80, Protocol::Tcp, initial)]);
    let (_, out) = h.run(&PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build());
    let chosen = dst_of(&out);
    let chosen_backend = L4Addr { ip: chosen.0.into(), port: chosen.1, protocol: Protocol::Tcp };

    // Eight new backends join and the other original one leaves: a new pick would most
    // likely land elsewhere, the tracked flow must not.
    let mut changed: Vec<L4Addr> = (20..28).map(|i| backend(i, 8080, Protocol::Tcp)).collect();
    changed.push(chosen_backend);
    changed.sort();
    h.program(vec![frontend(80, Protocol::Tcp, changed)]);
    let ack = PacketSpec::tcp(CLIENT, (VIP, 80), 0x10);
    h.expect(
        "ACK after change",
        &ack.build(),
        PASS,
        &ack.with_dst(chosen).build(),
        counters::FORWARD_TRACKED_FLOW,
    );

    // Its backend removed too: the data path alone keeps the flow where it is (the collector
    // decides what becomes of it; see the backend-gone fixtures).
    let remaining: Vec<L4Addr> = (20..28).map(|i| backend(i, 8080, Protocol::Tcp)).collect();
    h.program(vec![frontend(80, Protocol::Tcp, remaining)]);
    h.expect(
        "ACK after removal",
        &ack.build(),
        PASS,
        &ack.with_dst(chosen).build(),
        counters::FORWARD_TRACKED_FLOW,
    );
}

#[test]
fn reply_from_backend_is_reverse_translated() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    h.run(&PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build());
    let syn_ack = PacketSpec::tcp((Ipv4Addr::new(10, 244, 1, 11), 8080), CLIENT, 0x12);
    let expected = syn_ack.with_src((VIP, 80)).build();
    h.expect("SYN-ACK", &syn_ack.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);
    assert!(packet::checksums_valid(&expected));
    // A packet from the backend to another client port is not a reply of the flow.
    let other = PacketSpec::tcp((Ipv4Addr::new(10, 244, 1, 11), 8080), (CLIENT.0, 40001), 0x12).build();
    h.expect("unrelated", &other, PASS, &other, counters::PASS_NOT_SERVICE);
}

#[test]
fn udp_is_rewritten_and_a_zero_checksum_stays_zero() {
    let mut h = Harness::new();
    h.program(vec![frontend(53, Protocol::Udp, vec![backend(11, 5353, Protocol::Udp)])]);
    let query = PacketSpec::udp(CLIENT, (VIP, 53));
    let expected = query.with_dst((Ipv4Addr::new(10, 244, 1, 11), 5353)).build();
    h.expect("UDP", &query.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    assert!(packet::checksums_valid(&expected));

    let reply = PacketSpec::udp((Ipv4Addr::new(10, 244, 1, 11), 5353), CLIENT);
    h.expect(
        "UDP reply",
        &reply.build(),
        PASS,
        &reply.with_src((VIP, 53)).build(),
        counters::REPLY_REVERSE_NAT,
    );

    let no_checksum = PacketSpec { udp_zero_checksum: true, ..PacketSpec::udp((CLIENT.0, 40002), (VIP, 53)) };
    let expected = no_checksum.with_dst((Ipv4Addr::new(10, 244, 1, 11), 5353)).build();
    h.expect("UDP without checksum", &no_checksum.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    let udp_checksum_at = ETH_LEN + 20 + 6;
    assert_eq!(expected[udp_checksum_at..udp_checksum_at + 2], [0, 0]);
}

#[test]
fn packets_lb_does_not_own_pass_untouched() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    let other_ip = PacketSpec::tcp(CLIENT, (Ipv4Addr::new(10, 0, 2, 2), 80), 0x02).build();
    h.expect("other address", &other_ip, PASS, &other_ip, counters::PASS_NOT_SERVICE);
    let other_port = PacketSpec::tcp(CLIENT, (VIP, 81), 0x02).build();
    h.expect("other port", &other_port, PASS, &other_port, counters::PASS_NOT_SERVICE);
    let other_protocol = PacketSpec::udp(CLIENT, (VIP, 80)).build();
    h.expect("UDP to a TCP frontend", &other_protocol, PASS, &other_protocol, counters::PASS_NOT_SERVICE);
    let mut arp = packet::ethernet_header(0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    h.expect("ARP", &arp, PASS, &arp, counters::PASS_NOT_IP);
    let mut icmp = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build();
    icmp[ETH_LEN + 9] = 1;
    h.expect("ICMP", &icmp, PASS, &icmp, counters::PASS_OTHER_PROTOCOL);
}

#[test]
fn frontend_without_endpoints_rejects_with_rst_or_icmp() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![]), frontend(53, Protocol::Udp, vec![])]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02);
    let reset = packet::tcp_reset_for(&syn);
    h.expect("SYN", &syn.build(), REDIRECT, &reset, counters::REJECT_NO_BACKEND);
    assert!(packet::checksums_valid(&reset));
    let ack = PacketSpec::tcp(CLIENT, (VIP, 80), 0x10);
    h.expect("ACK", &ack.build(), REDIRECT, &packet::tcp_reset_for(&ack), counters::REJECT_NO_BACKEND);

    let query = PacketSpec::udp(CLIENT, (VIP, 53));
    let unreachable = packet::icmp_port_unreachable_for(&query);
    h.expect("UDP", &query.build(), REDIRECT, &unreachable, counters::REJECT_NO_BACKEND);

    // Never answer a RST; options are not stripped: both dropped, counted.
    let rst = PacketSpec::tcp(CLIENT, (VIP, 80), 0x04).build();
    h.expect("RST", &rst, DROP, &rst, counters::DROP_REJECT_FAILED);
    let with_options =
        PacketSpec { ip_options: vec![1, 1, 1, 1], ..PacketSpec::tcp(CLIENT, (VIP, 80), 0x02) }.build();
    h.expect("IP options", &with_options, DROP, &with_options, counters::DROP_REJECT_FAILED);
}

#[test]
fn local_policy_without_a_local_endpoint_drops() {
    let mut h = Harness::new();
    let mut empty_here = frontend(80, Protocol::Tcp, vec![]);
    empty_here.policy = FrontendPolicy { local: true, drop_when_empty: true, ..Default::default() };
    h.program(vec![empty_here]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build();
    h.expect("no local endpoint", &syn, DROP, &syn, counters::DROP_NO_LOCAL_BACKEND);
}

#[test]
fn source_ranges_admit_listed_clients_only() {
    let mut h = Harness::new();
    let mut lb = frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)]);
    lb.frontend_type = FrontendType::LoadBalancer;
    lb.policy.source_ranges = vec!["10.0.1.0/24".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
    h.program(vec![lb.clone()]);
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 8080);
    for client in [CLIENT, (Ipv4Addr::new(192, 0, 2, 7), 41000)] {
        let syn = PacketSpec::tcp(client, (VIP, 80), 0x02);
        h.expect("listed", &syn.build(), PASS, &syn.with_dst(pod).build(), counters::FORWARD_NEW_FLOW);
    }
    for client in [(Ipv4Addr::new(10, 0, 2, 2), 40000), (Ipv4Addr::new(192, 0, 2, 8), 40000)] {
        let syn = PacketSpec::tcp(client, (VIP, 80), 0x02).build();
        h.expect("not listed", &syn, DROP, &syn, counters::DROP_SOURCE_RANGE);
    }
    // Ranges removed: everyone may connect, and the trie holds nothing for the frontend.
    lb.policy.source_ranges.clear();
    h.program(vec![lb]);
    let syn = PacketSpec::tcp((Ipv4Addr::new(10, 0, 2, 2), 40001), (VIP, 80), 0x02);
    h.expect("after removal", &syn.build(), PASS, &syn.with_dst(pod).build(), counters::FORWARD_NEW_FLOW);
    assert!(h.reconciler.maps().snapshot().unwrap().source_ranges.is_empty());
}

/// The source-NAT port the client direction of `flow` was given.
fn snat_port(h: &mut Harness, flow: &FlowKey) -> u16 {
    let entry = h.conntrack().get(flow, 0).expect("forward entry");
    let port = u16::from_be(entry.src_port);
    assert!((lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&port), "{port}");
    port
}

#[test]
fn cluster_policy_external_traffic_is_source_natted_and_replies_come_back() {
    let mut h = Harness::new();
    let node = Ipv4Addr::new(192, 168, 50, 1);
    h.set_snat_address(node);
    let mut node_port = frontend(30080, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)]);
    node_port.address.ip = node.into();
    node_port.frontend_type = FrontendType::NodePort;
    node_port.policy.snat = true;
    h.program(vec![node_port]);
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 8080);

    let syn = PacketSpec::tcp(CLIENT, (node, 30080), 0x02);
    let before = h.counters();
    let (verdict, out) = h.run(&syn.build());
    assert_eq!(verdict, PASS);
    let port = snat_port(&mut h, &FlowKey::new(CLIENT, (node, 30080), packet::TCP));
    assert_eq!(out, syn.with_src((node, port)).with_dst(pod).build());
    let after = h.counters();
    assert_eq!(after[counters::CONNTRACK_SNAT as usize], before[counters::CONNTRACK_SNAT as usize] + 1);

    let reply = PacketSpec::tcp(pod, (node, port), 0x12);
    let expected = reply.with_src((node, 30080)).with_dst(CLIENT).build();
    assert!(packet::checksums_valid(&expected));
    h.expect("SYN-ACK", &reply.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);
    let ack = PacketSpec::tcp(CLIENT, (node, 30080), 0x10);
    let expected = ack.with_src((node, port)).with_dst(pod).build();
    h.expect("ACK", &ack.build(), PASS, &expected, counters::FORWARD_TRACKED_FLOW);

    // Another client gets its own port.
    let other = (Ipv4Addr::new(10, 0, 1, 3), 40000);
    h.run(&PacketSpec::tcp(other, (node, 30080), 0x02).build());
    assert_ne!(snat_port(&mut h, &FlowKey::new(other, (node, 30080), packet::TCP)), port);
}

#[test]
fn hairpin_is_source_natted_and_without_a_node_address_dropped() {
    let mut h = Harness::new();
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 8080);
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    let from_itself = PacketSpec::tcp((pod.0, 45000), (VIP, 80), 0x02);
    let input = from_itself.build();
    h.expect("no SNAT address", &input, DROP, &input, counters::DROP_SNAT_FAILED);

    let node = Ipv4Addr::new(10, 244, 1, 1);
    h.set_snat_address(node);
    let (verdict, out) = h.run(&input);
    assert_eq!(verdict, PASS);
    let port = snat_port(&mut h, &FlowKey::new((pod.0, 45000), (VIP, 80), packet::TCP));
    assert_eq!(out, from_itself.with_src((node, port)).with_dst(pod).build());
    let reply = PacketSpec::tcp(pod, (node, port), 0x12);
    let expected = reply.with_src((VIP, 80)).with_dst((pod.0, 45000)).build();
    h.expect("reply to itself", &reply.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);
}

#[test]
fn malformed_and_truncated_packets_are_never_rewritten() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02);

    // (The kernel's test run refuses IPv4 frames shorter than 20 bytes of IP header, so the
    // shortest cases start there.)
    let mut ip_only = syn.build()[..ETH_LEN + 20].to_vec();
    ip_only[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&20u16.to_be_bytes());
    h.expect("IP header, no TCP header", &ip_only, PASS, &ip_only, counters::PASS_TRUNCATED);

    let mut long_ihl = syn.build();
    long_ihl[ETH_LEN] = 0x4f; // 60-byte header announced, the packet ends before its end
    long_ihl[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&80u16.to_be_bytes());
    h.expect("IHL past the end", &long_ihl, PASS, &long_ihl, counters::PASS_TRUNCATED);

    let mut bad_ihl = syn.build();
    bad_ihl[ETH_LEN] = 0x44;
    h.expect("IHL 4", &bad_ihl, PASS, &bad_ihl, counters::PASS_MALFORMED);

    let mut not_v4 = syn.build();
    not_v4[ETH_LEN] = 0x65;
    h.expect("version 6 in an IPv4 frame", &not_v4, PASS, &not_v4, counters::PASS_MALFORMED);

    let mut claims_more = syn.build();
    claims_more[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&200u16.to_be_bytes());
    h.expect("total length past the end", &claims_more, PASS, &claims_more, counters::PASS_TRUNCATED);

    let mut short_tcp = syn.build();
    short_tcp[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&30u16.to_be_bytes());
    h.expect("TCP header cut short", &short_tcp, PASS, &short_tcp, counters::PASS_TRUNCATED);

    let mut tiny_total = syn.build();
    tiny_total[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&12u16.to_be_bytes());
    h.expect("total length below header", &tiny_total, PASS, &tiny_total, counters::PASS_MALFORMED);

    let later_fragment = PacketSpec { fragment: 185, ..syn.clone() }.build();
    h.expect("non-first fragment", &later_fragment, PASS, &later_fragment, counters::PASS_FRAGMENT);
}

#[test]
fn ip_options_are_skipped_to_find_the_ports() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    // Four NOP options: IHL 6.
    let syn = PacketSpec { ip_options: vec![1, 1, 1, 1], ..PacketSpec::tcp(CLIENT, (VIP, 80), 0x02) };
    let expected = syn.with_dst((Ipv4Addr::new(10, 244, 1, 11), 8080)).build();
    h.expect("IP options", &syn.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    assert!(packet::checksums_valid(&expected));
}

#[test]
fn conntrack_records_both_directions() {
    let mut h = Harness::new();
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    h.run(&PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build());
    let key = FlowKey::new(CLIENT, (VIP, 80), packet::TCP);
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 8080);
    let entry = h.conntrack().get(&key, 0).expect("forward entry");
    let addresses = |e: &lb_common::ConntrackEntry| {
        [(e.src_address, e.src_port), (e.dst_address, e.dst_port)]
            .map(|(address, port)| (Ipv4Addr::from(u32::from_be(address)), u16::from_be(port)))
    };
    assert!(!entry.is_reply());
    assert_eq!(addresses(&entry), [CLIENT, pod]);
    let reply = h.conntrack().get(&FlowKey::new(pod, CLIENT, packet::TCP), 0).expect("reply entry");
    assert!(reply.is_reply());
    assert_eq!(addresses(&reply), [(VIP, 80), CLIENT]);
    assert_eq!((reply.backend_id, reply.service_id), (entry.backend_id, entry.service_id));
}

#[test]
fn service_entry_pointing_at_a_missing_slot_drops() {
    use lb_common::ServiceValue;
    use lb_userspace::dataplane::maps::SlotKey;
    let mut h = Harness::new();
    // Written by hand, as a torn update would leave it: two slots announced, none written.
    let mut maps = BpfMaps::from_pins(&h.bpf_dir()).unwrap();
    maps.update_service(SlotKey::new(VIP, 80, packet::TCP, 0), ServiceValue::service_entry(9, 2)).unwrap();
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build();
    h.expect("missing slot", &syn, DROP, &syn, counters::DROP_SERVICE_INCONSISTENT);
}

#[test]
fn icmp_errors_about_a_translated_flow_are_translated_back() {
    let mut h = Harness::new();
    let pod = (Ipv4Addr::new(10, 244, 1, 11), 8080);
    h.program(vec![frontend(80, Protocol::Tcp, vec![backend(11, 8080, Protocol::Tcp)])]);
    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02);
    h.run(&syn.build());
    // The pod says "fragmentation needed, MTU 1200" about the packet it got (client -> pod);
    // the client must get it about the packet it sent (client -> ClusterIP), from the ClusterIP.
    let mtu = [0, 0, 0x04, 0xb0];
    let from_pod = packet::icmp_error(pod.0, CLIENT.0, 3, 4, mtu, &syn.with_dst(pod).build());
    let expected = packet::icmp_error(VIP, CLIENT.0, 3, 4, mtu, &syn.build());
    assert!(packet::icmp_checksums_valid(&expected));
    h.expect("frag needed from the pod", &from_pod, PASS, &expected, counters::ICMP_ERROR_TRANSLATED);

    // From a router on the way (not the pod): only the quote and destination change.
    let router = Ipv4Addr::new(10, 244, 0, 254);
    let from_router = packet::icmp_error(router, CLIENT.0, 11, 0, [0; 4], &syn.with_dst(pod).build());
    let expected = packet::icmp_error(router, CLIENT.0, 11, 0, [0; 4], &syn.build());
    h.expect("time exceeded", &from_router, PASS, &expected, counters::ICMP_ERROR_TRANSLATED);

    // About a flow lb does not track, or not an error at all: untouched.
    let other = PacketSpec::tcp((Ipv4Addr::new(10, 0, 9, 9), 1234), pod, 0x02).build();
    let untracked = packet::icmp_error(pod.0, Ipv4Addr::new(10, 0, 9, 9), 3, 4, mtu, &other);
    h.expect("untracked", &untracked, PASS, &untracked, counters::PASS_OTHER_PROTOCOL);
    let mut echo = packet::icmp_error(pod.0, CLIENT.0, 8, 0, [0; 4], &syn.build());
    echo[ETH_LEN + 20] = 8; // echo request, whatever follows
    h.expect("echo", &echo, PASS, &echo, counters::PASS_OTHER_PROTOCOL);
}

#[test]
fn xdp_sends_remote_backend_traffic_back_out_and_leaves_the_rest_to_tc() {
    let mut h = Harness::new();
    // The harness namespace becomes a node: uplink lbx0 (192.168.50.1) with a peer, the other
    // node at .2 (pods 10.244.2.0/24 behind it) and the client at .100, both known neighbours.
    let (other_node_mac, client_mac) = ([2, 0, 0, 0, 0, 0x22], [2, 0, 0, 0, 0, 0x64]);
    for command in [
        "ip link add lbx0 type veth peer name lbx1",
        "ip link set lbx0 up",
        "ip link set lbx1 up",
        "ip addr add 192.168.50.1/24 dev lbx0",
        "ip neigh add 192.168.50.2 lladdr 02:00:00:00:00:22 dev lbx0 nud permanent",
        "ip neigh add 192.168.50.100 lladdr 02:00:00:00:00:64 dev lbx0 nud permanent",
        "ip route add 10.244.2.0/24 via 192.168.50.2",
        "sysctl -qw net.ipv4.ip_forward=1",
    ] {
        let args: Vec<&str> = command.split(' ').collect();
        let status = std::process::Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(status.success(), "{command}");
    }
    let ingress = nix::net::if_::if_nametoindex("lbx0").unwrap();
    let uplink_mac = tests::fixture::mac_of("lbx0");
    let node = Ipv4Addr::new(192, 168, 50, 1);
    let client = (Ipv4Addr::new(192, 168, 50, 100), 40000);
    h.set_snat_address(node);
    let remote = L4Addr { ip: Ipv4Addr::new(10, 244, 2, 11).into(), port: 8080, protocol: Protocol::Tcp };
    let mut node_port = frontend(30080, Protocol::Tcp, vec![remote]);
    node_port.address.ip = node.into();
    node_port.frontend_type = FrontendType::NodePort;
    node_port.policy =
        FrontendPolicy { snat: true, node_address: true, external: true, ..Default::default() };
    let mut cluster_ip = frontend(80, Protocol::Tcp, vec![remote]);
    cluster_ip.policy = FrontendPolicy::default();
    h.program(vec![node_port, cluster_ip]);

    // New flow to the NodePort: translated, source-NATed, TTL down, MACs for the other node.
    let syn = PacketSpec::tcp(client, (node, 30080), 0x02);
    let (action, out) = h.run_xdp(ingress, &syn.build());
    assert_eq!(action, XDP_TX);
    let port = snat_port(&mut h, &FlowKey::new(client, (node, 30080), packet::TCP));
    let expected = PacketSpec { ttl: 63, macs: Some((other_node_mac, uplink_mac)), ..syn.clone() }
        .with_src((node, port))
        .with_dst((tests::fixture::ipv4(remote.ip), remote.port))
        .build();
    assert!(packet::checksums_valid(&expected));
    assert_eq!(out, expected, "translated SYN");

    // The reply from the other node's pod goes back out to the client, from the NodePort.
    let reply = PacketSpec::tcp((tests::fixture::ipv4(remote.ip), remote.port), (node, port), 0x12);
    let (action, out) = h.run_xdp(ingress, &reply.build());
    assert_eq!(action, XDP_TX);
    let expected = PacketSpec { ttl: 63, macs: Some((client_mac, uplink_mac)), ..reply.clone() }
        .with_src((node, 30080))
        .with_dst(client)
        .build();
    assert_eq!(out, expected, "translated reply");

    // ClusterIP traffic is not XDP's: passed untouched, no flow recorded.
    let to_cluster_ip = PacketSpec::tcp(client, (VIP, 80), 0x02).build();
    assert_eq!(h.run_xdp(ingress, &to_cluster_ip), (XDP_PASS, to_cluster_ip));
    assert!(h.conntrack().get(&FlowKey::new(client, (VIP, 80), packet::TCP), 0).is_err());
}

#[test]
fn pinned_maps_have_the_shape_a_restart_expects() {
    // A restart re-creates any pinned map whose shape differs from what it expects (losing
    // flows): the maps this build creates must match, or every restart would.
    let h = Harness::new();
    let dir = h.bpf_dir();
    for (name, wanted) in lb_userspace::dataplane::datapath::expected_shapes(
        &lb_userspace::dataplane::datapath::Capacity::default(),
    ) {
        let shape = lb_userspace::dataplane::datapath::pinned_shape(&dir.join(name))
            .unwrap_or_else(|| panic!("{name}: no pin"));
        assert_eq!(shape, wanted, "{name}");
    }
}
