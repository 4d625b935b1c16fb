//! SCTP packet fixtures through BPF_PROG_TEST_RUN, both families: translated like UDP but never
//! with a port changed, since SCTP's CRC32c covers the ports (and no addresses). Each expected
//! output is checked for a valid CRC32c as well as compared byte for byte.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{FlowKey, counters};
use lb_userspace::model::{FrontendType, L4Addr, Protocol};
use tests::fixture::{CLIENT, DROP, Harness, PASS, REDIRECT, VIP, backend, frontend};
use tests::packet::{self, ETH_LEN, Packet6Spec, PacketSpec};

const SCTP: Protocol = Protocol::Sctp;
const POD: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 1, 11), 2905);

#[test]
fn an_sctp_association_to_a_cluster_ip_is_translated_both_ways_with_its_crc_intact() {
    let mut h = Harness::new();
    h.program(vec![frontend(2905, SCTP, vec![backend(11, 2905, SCTP)])]);
    let init = PacketSpec::sctp(CLIENT, (VIP, 2905));
    let expected = init.with_dst(POD).build();
    assert!(packet::checksums_valid(&expected));
    // Only the address changed: the CRC32c bytes are the client's own.
    assert_eq!(expected[ETH_LEN + 28..ETH_LEN + 32], init.build()[ETH_LEN + 28..ETH_LEN + 32]);
    h.expect("INIT", &init.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);

    let init_ack = PacketSpec::sctp(POD, CLIENT);
    let expected = init_ack.with_src((VIP, 2905)).build();
    assert!(packet::checksums_valid(&expected));
    h.expect("INIT ACK", &init_ack.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);
    h.expect("COOKIE ECHO", &init.build(), PASS, &init.with_dst(POD).build(), counters::FORWARD_TRACKED_FLOW);
    // Its packets were also held against what `lb explain` said of them.
    assert!(h.explained >= 2, "{}", h.explained);
}

#[test]
fn an_sctp_association_to_an_ipv6_cluster_ip_is_translated_both_ways() {
    let mut h = Harness::new();
    let client = (Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2), 40000);
    let vip = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
    let pod = (Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 11), 2905);
    let mut cluster_ip = frontend(2905, SCTP, vec![L4Addr { ip: pod.0.into(), port: pod.1, protocol: SCTP }]);
    cluster_ip.address.ip = vip.into();
    h.program(vec![cluster_ip]);
    let init = Packet6Spec::sctp(client, (vip, 2905));
    let expected = init.with_dst(pod).build();
    assert!(packet::checksums_valid6(&expected));
    h.expect("INIT", &init.build(), PASS, &expected, counters::FORWARD_NEW_FLOW);
    let init_ack = Packet6Spec::sctp(pod, client);
    let expected = init_ack.with_src((vip, 2905)).build();
    h.expect("INIT ACK", &init_ack.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);
}

#[test]
fn an_sctp_packet_whose_translation_would_change_a_port_is_dropped() {
    let mut h = Harness::new();
    // The controller never programs this (the backend listens on another port); the data path
    // still refuses to send a packet whose CRC32c it would have broken.
    h.program(vec![frontend(2905, SCTP, vec![backend(11, 3905, SCTP)])]);
    let init = PacketSpec::sctp(CLIENT, (VIP, 2905)).build();
    h.expect("port rewrite", &init, DROP, &init, counters::DROP_SCTP_PORT_REWRITE);
}

#[test]
fn sctp_source_nat_keeps_the_client_port_or_drops() {
    let mut h = Harness::new();
    let node = Ipv4Addr::new(192, 168, 50, 1);
    h.set_snat_address(node);
    let mut external = frontend(2905, SCTP, vec![backend(11, 2905, SCTP)]);
    external.address.ip = Ipv4Addr::new(192, 168, 50, 100).into();
    external.frontend_type = FrontendType::ExternalIp;
    external.policy.snat = true;
    external.policy.external = true;
    let frontend_ip = Ipv4Addr::new(192, 168, 50, 100);
    h.program(vec![external]);

    let init = PacketSpec::sctp(CLIENT, (frontend_ip, 2905));
    let expected = init.with_src((node, CLIENT.1)).with_dst(POD).build();
    assert!(packet::checksums_valid(&expected));
    let moved = [counters::FORWARD_NEW_FLOW, counters::CONNTRACK_SNAT];
    h.expect_counters("INIT", &init.build(), PASS, &expected, &moved);
    let entry = h.conntrack().get(&FlowKey::new(CLIENT, (frontend_ip, 2905), packet::SCTP), 0).unwrap();
    assert_eq!((entry.src_address, entry.src_port), (u32::from(node).to_be(), CLIENT.1.to_be()));
    let init_ack = PacketSpec::sctp(POD, (node, CLIENT.1));
    let expected = init_ack.with_src((frontend_ip, 2905)).with_dst(CLIENT).build();
    h.expect("INIT ACK", &init_ack.build(), PASS, &expected, counters::REPLY_REVERSE_NAT);

    // Another client with the same port: the node's address and that port are taken, and no
    // other port may be given to SCTP.
    let other = PacketSpec::sctp((Ipv4Addr::new(10, 0, 1, 3), CLIENT.1), (frontend_ip, 2905)).build();
    h.expect("port taken", &other, DROP, &other, counters::DROP_SNAT_FAILED);
}

#[test]
fn sctp_to_a_service_without_endpoints_is_refused_with_icmp_port_unreachable() {
    let mut h = Harness::new();
    h.program(vec![frontend(2905, SCTP, vec![])]);
    let init = PacketSpec::sctp(CLIENT, (VIP, 2905));
    let unreachable = packet::icmp_port_unreachable_for(&init);
    assert!(packet::icmp_checksums_valid(&unreachable));
    h.expect("INIT", &init.build(), REDIRECT, &unreachable, counters::REJECT_NO_BACKEND);
}

#[test]
fn icmp_errors_about_an_sctp_flow_are_translated_back() {
    let mut h = Harness::new();
    h.program(vec![frontend(2905, SCTP, vec![backend(11, 2905, SCTP)])]);
    let init = PacketSpec::sctp(CLIENT, (VIP, 2905));
    h.run(&init.build());
    let mtu = [0, 0, 0x04, 0xb0];
    let from_pod = packet::icmp_error(POD.0, CLIENT.0, 3, 4, mtu, &init.with_dst(POD).build());
    let expected = packet::icmp_error(VIP, CLIENT.0, 3, 4, mtu, &init.build());
    assert!(packet::icmp_checksums_valid(&expected));
    h.expect("frag needed from the pod", &from_pod, PASS, &expected, counters::ICMP_ERROR_TRANSLATED);
}

#[test]
fn truncated_sctp_packets_are_never_rewritten() {
    let mut h = Harness::new();
    h.program(vec![frontend(2905, SCTP, vec![backend(11, 2905, SCTP)])]);
    // Ports and verification tag, no checksum: 8 bytes of the 12 of SCTP's common header.
    let mut short = PacketSpec::sctp(CLIENT, (VIP, 2905)).build();
    short.truncate(ETH_LEN + 20 + 8);
    short[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&28u16.to_be_bytes());
    h.expect("8 bytes of SCTP", &short, PASS, &short, counters::PASS_TRUNCATED);

    let vip6 = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
    let mut short6 =
        Packet6Spec::sctp((Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2), 40000), (vip6, 2905)).build();
    short6.truncate(ETH_LEN + 40 + 8);
    short6[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&8u16.to_be_bytes());
    h.expect("8 bytes of SCTP over IPv6", &short6, PASS, &short6, counters::PASS_TRUNCATED);
}
