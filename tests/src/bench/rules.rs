//! The rules kube-proxy writes for N Services, in its iptables and nftables modes, so the
//! benchmark compares lb with what a cluster would otherwise run. Layouts follow kube-proxy's
//! (pkg/proxy/iptables, pkg/proxy/nftables): a KUBE-SERVICES chain with one match per Service
//! port jumping to a per-service chain that picks an endpoint with `statistic`, or an nftables
//! verdict map keyed by address . protocol . port and a `numgen` pick.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One Service port and its endpoints (address, target port).
#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// kube-proxy names chains by a hash of the service port name; a counter is as unique.
fn chain_id(index: usize) -> String {
    format!("{index:016X}")
}

/// `iptables-restore` input for the nat table, with KUBE-SERVICES hooked into PREROUTING when
/// `hooked`. (Even unhooked, iptables' nat table registers netfilter hooks and so turns on
/// conntrack: the benchmark loads it only while measuring the iptables mode.)
pub fn iptables_restore(services: &[BenchService], hooked: bool) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for (index, service) in services.iter().enumerate() {
        let id = chain_id(index);
        let svc = format!("KUBE-SVC-{id}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j {svc}",
            service.cluster_ip,
            service.name,
            service.port,
            proto = service.protocol
        );
        let count = service.endpoints.len();
        for (n, (ip, port)) in service.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{id}{n:02}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // kube-proxy's even spread: the n-th of the remaining endpoints with 1/(count-n).
            if n + 1 < count {
                let probability = 1.0 / (count - n) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{}\" -m statistic --mode random --probability {probability:.11} -j {sep}",
                    service.name
                );
            } else {
                let _ = writeln!(rules, "-A {svc} -m comment --comment \"{}\" -j {sep}", service.name);
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                service.name
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"{}\" -m {proto} -j DNAT --to-destination {ip}:{port}",
                service.name,
                proto = service.protocol
            );
        }
    }
    if hooked {
        rules += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    }
    chains + &rules + "COMMIT\n"
}

/// `nft -f` input: table `ip kube-proxy` without its hook chain (see `nft_hook`).
pub fn nft_ruleset(services: &[BenchService]) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    out += "  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n";
    out += "  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n";
    if !services.is_empty() {
        out += "    elements = {\n";
        for (index, service) in services.iter().enumerate() {
            let _ = writeln!(
                out,
                "      {} . {} . {} : goto service-{},",
                service.cluster_ip,
                service.protocol,
                service.port,
                chain_id(index)
            );
        }
        out += "    }\n";
    }
    out += "  }\n";
    out += "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n";
    for (index, service) in services.iter().enumerate() {
        let id = chain_id(index);
        let picks: Vec<String> =
            (0..service.endpoints.len()).map(|n| format!("{n} : goto endpoint-{id}-{n}")).collect();
        let _ = writeln!(
            out,
            "  chain service-{id} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            service.endpoints.len(),
            picks.join(", ")
        );
        for (n, (ip, port)) in service.endpoints.iter().enumerate() {
            let _ = writeln!(
                out,
                "  chain endpoint-{id}-{n} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto {} dnat to {ip}:{port}\n  }}",
                service.protocol
            );
        }
    }
    out + "}\n"
}

/// Commands (for `nft -f -`) that hook the table in at prerouting, or unhook it.
pub fn nft_hook(add: bool) -> String {
    if add {
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n"
            .to_string()
    } else {
        "flush chain ip kube-proxy nat-prerouting\ndelete chain ip kube-proxy nat-prerouting\n".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<BenchService> {
        vec![BenchService {
            name: "default/web:http".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            protocol: "tcp",
            port: 80,
            endpoints: vec![(Ipv4Addr::new(10, 244, 0, 1), 8080), (Ipv4Addr::new(10, 244, 0, 2), 8080)],
        }]
    }

    #[test]
    fn iptables_layout_spreads_evenly() {
        let rules = iptables_restore(&services(), true);
        assert!(
            rules.contains(
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            )
        );
        assert!(rules.contains("-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp"));
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-000000000000000000"));
        assert!(rules.contains("-A KUBE-SVC-0000000000000000 -m comment --comment \"default/web:http\" -j KUBE-SEP-000000000000000001"));
        assert!(rules.contains("DNAT --to-destination 10.244.0.2:8080"));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn nft_layout_has_a_verdict_map_and_numgen() {
        let rules = nft_ruleset(&services());
        assert!(rules.contains("10.96.0.1 . tcp . 80 : goto service-0000000000000000"));
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-0000000000000000-0"));
        assert!(rules.contains("dnat to 10.244.0.2:8080"));
    }
}
