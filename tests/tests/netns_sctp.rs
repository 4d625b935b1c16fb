//! SCTP through lb with real packets: associations (the four-way handshake, over raw sockets:
//! the test kernel has no SCTP) to a dual-stack ClusterIP, from the client namespace, over
//! both families. The responders check every CRC32c they get, and the client checks theirs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use lb_userspace::dataplane::maps::MapsSnapshot;
use tests::playground::{Playground, dual_stack_pod_manifest};
use tests::{require_root, unique};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x70);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
const M3UA: u16 = 2905;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: signalling, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70, \"fd00:10:96::70\"]
  selector: {app: web}
  ports:
    - {name: m3ua, port: 2905, protocol: SCTP, nodePort: 30905}
";

fn sctp_backends(snapshot: &MapsSnapshot, ip: IpAddr, port: u16) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| {
            k.backend_slot == 0 && k.ip == ip && k.port == port && k.protocol == lb_common::PROTOCOL_SCTP
        })
        .map(|(_, v)| v.backend_count)
}

#[test]
fn sctp_associations_reach_a_dual_stack_cluster_ip_over_both_families() {
    require_root();
    let mut pg = Playground::dual_stack(&unique("sctp"), &[("web-a", POD_A), ("web-b", POD_B)]).unwrap();
    pg.serve_sctp(M3UA).unwrap();
    pg.write_manifest("services.yaml", SERVICE).unwrap();
    pg.write_manifest("web-a.yaml", &dual_stack_pod_manifest("web-a", POD_A)).unwrap();
    pg.write_manifest("web-b.yaml", &dual_stack_pod_manifest("web-b", POD_B)).unwrap();
    let manifests = pg.manifests.clone();
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--service-cluster-ip-range".as_ref(),
        "10.96.0.0/12,fd00:10:96::/112".as_ref(),
    ])
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        sctp_backends(s, VIP4.into(), M3UA) == Some(2) && sctp_backends(s, VIP6.into(), M3UA) == Some(2)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pg.lb_log()));
    // The NodePort would change the port: not programmed, and said why.
    let snapshot = pg.snapshot();
    assert!(
        !snapshot.services.keys().any(|k| k.port == 30905),
        "an SCTP NodePort frontend was programmed: {:?}",
        snapshot.services.keys().collect::<Vec<_>>()
    );
    assert!(pg.lb_log().contains("not on its nodePort 30905"), "{}", pg.lb_log());

    // Associations from distinct client ports (distinct flows): each completes its handshake
    // with one backend, the answers come from the ClusterIP, and both pods serve each family.
    for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let target = SocketAddr::new(vip, M3UA);
        let associations = pg
            .client
            .run(move || {
                (0..16u16)
                    .map(|i| tests::sctp::associate(target, 41000 + i, 0x7a90_0000 + u32::from(i)))
                    .collect::<Vec<_>>()
            })
            .unwrap();
        let mut pods = BTreeSet::new();
        for association in associations {
            let association =
                association.unwrap_or_else(|e| panic!("association to {target}: {e:#}\n{}", pg.lb_log()));
            assert_eq!(association.peer, target, "answers come from the ClusterIP");
            pods.insert(association.pod);
        }
        assert_eq!(pods.len(), 2, "both pods should serve {target}: {pods:?}");
    }
    let table = pg.services_table().unwrap();
    assert!(
        table.contains("10.96.0.70:2905/SCTP") && table.contains("[fd00:10:96::70]:2905/SCTP"),
        "{table}"
    );
}
