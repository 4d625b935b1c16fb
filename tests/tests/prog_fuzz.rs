//! Packet fuzzing through BPF_PROG_TEST_RUN: random and mutated packets (truncated headers,
//! wrong lengths, IP options, fragments, bad checksums, random bytes) against a programmed set
//! of Services. A packet is changed only when it is addressed to a frontend or belongs to a
//! tracked flow; a changed packet whose checksums were valid leaves with valid checksums, and
//! nothing but addresses, ports, checksums, TTL and MACs changes; a packet that is none of lb's
//! business passes untouched.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use lb_common::FlowKey;
use lb_userspace::model::{FrontendType, L4Addr, Protocol};
use tests::fixture::{DROP, Harness, PASS, REDIRECT, VIP, backend, frontend};
use tests::packet::{self, ETH_LEN, PacketSpec};

/// xorshift64*: a fixed seed makes every run test the same packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The frontends' (address, port, protocol), as packets carry them.
fn frontends() -> BTreeSet<(Ipv4Addr, u16, u8)> {
    [(VIP, 80, packet::TCP), (VIP, 53, packet::UDP), (LB_IP, 80, packet::TCP)].into_iter().collect()
}

fn programmed() -> Harness {
    let mut h = Harness::new();
    let tcp = vec![backend(11, 8080, Protocol::Tcp), backend(12, 8080, Protocol::Tcp)];
    let mut lb = frontend(80, Protocol::Tcp, tcp.clone());
    lb.address = L4Addr { ip: LB_IP.into(), port: 80, protocol: Protocol::Tcp };
    lb.frontend_type = FrontendType::LoadBalancer;
    lb.policy.external = true;
    lb.policy.maglev = true;
    lb.policy.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    h.program(vec![
        frontend(80, Protocol::Tcp, tcp),
        frontend(53, Protocol::Udp, vec![backend(11, 5353, Protocol::Udp)]),
        lb,
    ]);
    h
}

/// A plausible packet: to a frontend, to a pod, from a pod, or elsewhere.
fn base(rng: &mut Rng) -> PacketSpec {
    let clients = [
        (Ipv4Addr::new(10, 0, 1, 2), 40000),
        (Ipv4Addr::new(10, 9, 9, 9), 1234),
        (Ipv4Addr::new(203, 0, 113, 5), 5555),
    ];
    let client = rng.pick(&clients);
    let client = (client.0, client.1 + rng.below(4) as u16);
    let targets = [
        (VIP, 80),
        (VIP, 53),
        (LB_IP, 80),
        (Ipv4Addr::new(10, 244, 1, 11), 8080),
        (Ipv4Addr::new(10, 96, 0, 99), 80),
    ];
    let target = rng.pick(&targets);
    let mut spec = if rng.below(2) == 0 {
        PacketSpec::tcp(client, target, rng.pick(&[0x02, 0x10, 0x12, 0x11, 0x04, 0x18]))
    } else {
        PacketSpec::udp(client, target)
    };
    if rng.below(4) == 0 {
        // A reply from a pod.
        spec = spec
            .with_src((Ipv4Addr::new(10, 244, 1, 11 + rng.below(2) as u8), rng.pick(&[8080, 5353])))
            .with_dst(client);
    }
    spec.payload = vec![rng.below(256) as u8; rng.below(80) as usize];
    if rng.below(8) == 0 {
        spec.ip_options = vec![1; 4 * (1 + rng.below(3) as usize)];
    }
    if rng.below(8) == 0 {
        spec.fragment = rng.pick(&[0x2000, 0x0001, 0x0010, 0x2004]);
    }
    spec
}

/// Breaks a built packet in one of the ways real traffic (or an attacker) does.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    match rng.below(8) {
        0 => {} // as built
        1 => {
            // Truncated (the kernel's test run wants a whole Ethernet and IPv4 header).
            let keep = ETH_LEN + 20 + rng.below((frame.len() - ETH_LEN - 20) as u64 + 1) as usize;
            frame.truncate(keep);
        }
        2 => {
            // A wrong total length.
            let len = rng.below(2000) as u16;
            frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&len.to_be_bytes());
        }
        3 => {
            // A bad IP checksum.
            frame[ETH_LEN + 10] ^= 0x5a;
        }
        4 => {
            // A bad L4 checksum.
            let at = frame.len() - 1;
            frame[at] ^= 0xff;
        }
        5 => {
            // A random header byte.
            let at = ETH_LEN + rng.below(40.min((frame.len() - ETH_LEN) as u64)) as usize;
            frame[at] = rng.below(256) as u8;
        }
        6 => {
            // Version or header length not what they claim.
            frame[ETH_LEN] = rng.pick(&[0x44, 0x46, 0x4f, 0x65, 0x35]);
        }
        _ => {
            // Random bytes after the IP header.
            for byte in frame.iter_mut().skip(ETH_LEN + 20) {
                if rng.below(4) == 0 {
                    *byte = rng.below(256) as u8;
                }
            }
        }
    }
    frame
}

/// Source, destination (address, port) and protocol.
type Carried = ((Ipv4Addr, u16), (Ipv4Addr, u16), u8);

/// What a frame's IPv4/TCP/UDP headers carry, when they are readable.
fn addresses(frame: &[u8]) -> Option<Carried> {
    let ip = frame.get(ETH_LEN..)?;
    let header = usize::from(ip.first()? & 0x0f) * 4;
    let l4 = ip.get(header..header + 4)?;
    let protocol = *ip.get(9)?;
    Some((
        (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), u16::from_be_bytes([l4[0], l4[1]])),
        (Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), u16::from_be_bytes([l4[2], l4[3]])),
        protocol,
    ))
}

/// The bytes a translation may change: MACs, TTL, IP checksum, addresses, ports and the L4
/// checksum.
fn changeable(frame: &[u8], at: usize) -> bool {
    if at < ETH_LEN {
        return true;
    }
    let ip = at - ETH_LEN;
    let header = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    matches!(ip, 8 | 10 | 11 | 12..=19)
        || (ip >= header && ip < header + 4)
        || (frame[ETH_LEN + 9] == packet::TCP && (ip == header + 16 || ip == header + 17))
        || (frame[ETH_LEN + 9] == packet::UDP && (ip == header + 6 || ip == header + 7))
}

#[test]
fn random_and_mutated_packets_are_translated_only_when_they_are_lbs() {
    let mut h = programmed();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let frontends = frontends();
    let (mut translated, mut untouched, mut dropped) = (0, 0, 0);
    for round in 0..4000 {
        let spec = base(&mut rng);
        let input = mutate(&mut rng, spec.build());
        // What lb may consider its own: a frontend by address, or a flow it tracks.
        let carried = addresses(&input);
        let to_frontend = carried
            .is_some_and(|(_, (ip, port), protocol)| frontends.contains(&(ip, port, protocol)))
            || carried.is_some_and(|(_, (ip, _), _)| ip == VIP || ip == LB_IP);
        let tracked = carried.is_some_and(|(src, dst, protocol)| {
            h.conntrack().get(&FlowKey::new(src, dst, protocol), 0).is_ok()
        });
        // Later fragments carry no ports: they follow a datagram lb translated.
        let fragment = input.len() > ETH_LEN + 8
            && u16::from_be_bytes([input[ETH_LEN + 6], input[ETH_LEN + 7]]) & 0x1fff != 0;
        let ours = to_frontend || tracked || fragment;
        let (verdict, output) = h.run(&input);
        assert_ne!(verdict, REDIRECT, "round {round}: no frontend here rejects or routes: {input:02x?}");
        if verdict == DROP {
            assert!(ours, "round {round}: dropped a packet that is not lb's: {input:02x?}");
            dropped += 1;
            continue;
        }
        assert_eq!(verdict, PASS, "round {round}");
        if output == input {
            untouched += 1;
            continue;
        }
        translated += 1;
        assert!(ours, "round {round}: changed a packet that is not lb's:\n{input:02x?}\n{output:02x?}");
        assert_eq!(output.len(), input.len(), "round {round}: length changed");
        for at in 0..input.len() {
            assert!(input[at] == output[at] || changeable(&input, at), "round {round}: byte {at} changed");
        }
        let well_formed = !fragment && packet::checksums_valid(&input);
        if well_formed {
            assert!(
                packet::checksums_valid(&output),
                "round {round}: bad checksums after translation:\n{output:02x?}"
            );
        }
    }
    eprintln!("{translated} translated, {untouched} untouched, {dropped} dropped");
    assert!(translated > 300 && untouched > 300 && dropped > 0, "{translated} {untouched} {dropped}");
}
