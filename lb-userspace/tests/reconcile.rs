//! The reconciler against in-memory maps: write order, idempotence, recovery from failed
//! writes, restore after a restart, and pruning.

use std::net::Ipv4Addr;

use lb_common::ServiceValue;
use lb_userspace::dataplane::in_memory::InMemoryMaps;
use lb_userspace::dataplane::maps::{BackendValue, SlotKey};
use lb_userspace::dataplane::reconcile::{Reconciler, render_snapshot};
use lb_userspace::model::{DesiredState, Frontend, FrontendType, L4Addr, Protocol, ServicePortName};

fn addr(last: u8, port: u16) -> L4Addr {
    L4Addr { ip: Ipv4Addr::new(10, 244, 0, last).into(), port, protocol: Protocol::Tcp }
}

fn vip(last: u8) -> L4Addr {
    L4Addr { ip: Ipv4Addr::new(10, 96, 0, last).into(), port: 80, protocol: Protocol::Tcp }
}

fn state(frontends: &[(L4Addr, &[u8])]) -> DesiredState {
    let frontends = frontends
        .iter()
        .map(|(address, backends)| {
            let frontend = Frontend {
                address: *address,
                scope: Default::default(),
                frontend_type: FrontendType::ClusterIp,
                policy: Default::default(),
                service: ServicePortName {
                    namespace: "default".into(),
                    name: format!("svc{}", last_octet(address.ip)),
                    port: String::new(),
                },
                backends: backends.iter().map(|b| addr(*b, 8080)).collect(),
                serving: backends.iter().map(|b| addr(*b, 8080)).collect(),
                listed: backends.iter().map(|b| addr(*b, 8080)).collect(),
            };
            (frontend.key(), frontend)
        })
        .collect();
    DesiredState { frontends, ..Default::default() }
}

fn reconciler() -> Reconciler<InMemoryMaps> {
    Reconciler::restore(InMemoryMaps::default()).unwrap()
}

/// Position of the first log line starting with `prefix`.
fn position(log: &[String], prefix: &str) -> usize {
    log.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix:?} not in {log:#?}"))
}

#[test]
fn new_frontend_writes_backends_then_slots_then_the_service_entry() {
    let mut r = reconciler();
    let report = r.reconcile(&state(&[(vip(1), &[1, 2])]));
    assert_eq!((report.programmed, report.errors.len()), (1, 0));
    let log = r.maps().log.clone();
    let entry = position(&log, "update service 10.96.0.1:80/6 slot 0");
    assert!(position(&log, "update backend 1") < position(&log, "update service 10.96.0.1:80/6 slot 1"));
    assert!(position(&log, "update backend 2") < position(&log, "update service 10.96.0.1:80/6 slot 2"));
    assert!(position(&log, "update service 10.96.0.1:80/6 slot 2") < entry);
    assert_eq!(entry, log.len() - 1, "the service entry is the last write: {log:#?}");
}

#[test]
fn shrinking_lowers_the_count_before_deleting_slots_and_backends() {
    let mut r = reconciler();
    r.reconcile(&state(&[(vip(1), &[1, 2, 3])]));
    let start = r.maps().log.len();
    r.reconcile(&state(&[(vip(1), &[1])]));
    let log = r.maps().log[start..].to_vec();
    let entry = position(&log, "update service 10.96.0.1:80/6 slot 0");
    assert!(entry < position(&log, "delete service 10.96.0.1:80/6 slot 3"), "{log:#?}");
    assert!(entry < position(&log, "delete service 10.96.0.1:80/6 slot 2"), "{log:#?}");
    assert!(
        position(&log, "delete service 10.96.0.1:80/6 slot 2") < position(&log, "delete backend"),
        "{log:#?}"
    );
    let slots = &r.maps().contents.services;
    assert_eq!(slots.len(), 2, "service entry and one slot remain");
    assert_eq!(r.maps().contents.backends.len(), 1);
}

#[test]
fn removing_a_frontend_deletes_its_service_entry_first() {
    let mut r = reconciler();
    r.reconcile(&state(&[(vip(1), &[1, 2]), (vip(2), &[2])]));
    let start = r.maps().log.len();
    let report = r.reconcile(&state(&[(vip(2), &[2])]));
    assert_eq!((report.removed, report.unchanged), (1, 1));
    let log = r.maps().log[start..].to_vec();
    assert_eq!(log[0], "delete service 10.96.0.1:80/6 slot 0", "{log:#?}");
    // Backend 2 is still used by the other frontend; backend 1 is released.
    assert_eq!(log.iter().filter(|l| l.starts_with("delete backend")).count(), 1, "{log:#?}");
    assert_eq!(r.maps().contents.backends.len(), 1);
}

#[test]
fn reconciling_the_same_state_twice_writes_nothing() {
    let mut r = reconciler();
    let desired = state(&[(vip(1), &[1, 2]), (vip(2), &[])]);
    r.reconcile(&desired);
    let writes = r.maps().log.len();
    let report = r.reconcile(&desired);
    assert_eq!((report.programmed, report.unchanged), (0, 2));
    assert_eq!(r.maps().log.len(), writes);
}

#[test]
fn a_failed_write_is_repaired_by_the_next_reconcile() {
    let desired_a = state(&[(vip(1), &[1, 2, 3]), (vip(2), &[4])]);
    let desired_b = state(&[(vip(1), &[2, 5]), (vip(3), &[4, 6])]);
    let mut clean = reconciler();
    clean.reconcile(&desired_a);
    clean.reconcile(&desired_b);
    let want = render_snapshot(&clean.maps().contents);

    // Fail at every possible point of the second reconcile, then retry without failures.
    let total_writes = {
        let mut r = reconciler();
        r.reconcile(&desired_a);
        let before = r.maps().log.len();
        r.reconcile(&desired_b);
        r.maps().log.len() - before
    };
    for fail_after in 0..total_writes {
        let mut r = reconciler();
        r.reconcile(&desired_a);
        let mut failing = r.maps().clone();
        failing.fail_after_writes = Some(fail_after);
        let mut r = Reconciler::restore(failing).unwrap();
        let report = r.reconcile(&desired_b);
        assert!(!report.errors.is_empty(), "a write should have failed after {fail_after}");
        // The maps may be mid-change, but never point at a missing backend or slot.
        assert_consistent(&r.maps().contents);
        let mut healed = r.maps().clone();
        healed.fail_after_writes = None;
        let mut r = Reconciler::restore(healed).unwrap();
        let report = r.reconcile(&desired_b);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        r.prune().unwrap();
        assert_settled(&r.maps().contents);
        assert_eq!(render_snapshot(&r.maps().contents), want, "after failing at write {fail_after}");
    }
}

/// What every reader may rely on at every instant (`lb_userspace::dataplane::audit::always`).
fn assert_consistent(contents: &lb_userspace::dataplane::maps::MapsSnapshot) {
    let violations = lb_userspace::dataplane::audit::always(contents);
    assert!(violations.is_empty(), "{violations:#?}");
}

/// What holds once a sync is done (`lb_userspace::dataplane::audit::settled`).
fn assert_settled(contents: &lb_userspace::dataplane::maps::MapsSnapshot) {
    let violations = lb_userspace::dataplane::audit::settled(contents);
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn restore_keeps_ids_and_writes_nothing_for_an_unchanged_state() {
    let desired = state(&[(vip(1), &[1, 2]), (vip(2), &[3])]);
    let mut r = reconciler();
    r.reconcile(&desired);
    let before = render_snapshot(&r.maps().contents);
    let mut maps = r.maps().clone();
    maps.log.clear();
    let mut restarted = Reconciler::restore(maps).unwrap();
    let report = restarted.reconcile(&desired);
    assert_eq!((report.programmed, report.unchanged), (0, 2));
    assert!(restarted.maps().log.is_empty(), "{:#?}", restarted.maps().log);
    assert_eq!(restarted.prune().unwrap(), 0);
    assert_eq!(render_snapshot(&restarted.maps().contents), before);
    // New IDs do not collide with restored ones.
    restarted.reconcile(&state(&[(vip(1), &[1, 2]), (vip(2), &[3]), (vip(3), &[9])]));
    assert_eq!(restarted.maps().contents.backends.len(), 4);
    assert_consistent(&restarted.maps().contents);
}

#[test]
fn prune_removes_entries_nobody_wants() {
    let mut maps = InMemoryMaps::default();
    let stray_slot = SlotKey::new(Ipv4Addr::new(10, 96, 9, 9), 80, 6, 4);
    maps.contents.services.insert(stray_slot, ServiceValue::backend_slot(7, 7));
    maps.contents.backends.insert(7, BackendValue::new(Ipv4Addr::new(10, 244, 9, 9), 80, 6));
    let mut r = Reconciler::restore(maps).unwrap();
    r.reconcile(&state(&[(vip(1), &[1])]));
    assert_eq!(r.prune().unwrap(), 1, "the slot after a gap");
    assert!(!r.maps().contents.services.contains_key(&stray_slot));
    assert_consistent(&r.maps().contents);
}

/// `state`, with Maglev on every frontend (as external frontends have it).
fn maglev_state(frontends: &[(L4Addr, &[u8])]) -> DesiredState {
    let mut desired = state(frontends);
    for frontend in desired.frontends.values_mut() {
        frontend.policy.maglev = true;
    }
    desired
}

#[test]
fn ids_are_never_handed_out_twice() {
    let mut r = reconciler();
    r.reconcile(&state(&[(vip(1), &[1]), (vip(2), &[2])]));
    r.reconcile(&state(&[(vip(2), &[2])]));
    r.reconcile(&state(&[(vip(2), &[2]), (vip(3), &[3])]));
    let contents = &r.maps().contents;
    let entry = |vip: L4Addr| contents.services[&SlotKey::new(vip.ip, vip.port, 6, 0)];
    assert_eq!(entry(vip(3)).service_id, 3, "frontend 1's ID is not reused");
    assert_eq!(
        contents.backends.keys().copied().collect::<Vec<_>>(),
        vec![2, 3],
        "backend 1's ID is not reused"
    );
    // IDs that flows still name (found at start) are reserved too.
    r.reserve_ids(10, 20);
    r.reconcile(&state(&[(vip(2), &[2]), (vip(3), &[3]), (vip(4), &[4])]));
    assert_eq!(r.maps().contents.services[&SlotKey::new(vip(4).ip, 80, 6, 0)].service_id, 11);
    assert!(r.maps().contents.backends.contains_key(&21));
}

#[test]
fn a_maglev_table_is_whole_before_an_entry_names_it_and_frontends_share_it() {
    let mut r = reconciler();
    let report = r.reconcile(&maglev_state(&[(vip(1), &[1, 2, 3]), (vip(2), &[1, 2, 3])]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let log = r.maps().log.clone();
    assert_eq!(
        log.iter().filter(|l| l.starts_with("create maglev table")).count(),
        1,
        "one table, shared: {log:#?}"
    );
    // Created filled: the table is whole when it enters the map, before any entry names it.
    let created = position(&log, "create maglev table 1 size 16381");
    assert!(created < position(&log, "update service 10.96.0.1:80/6 slot 0"), "{log:#?}");
    let contents = &r.maps().contents;
    for last in [1, 2] {
        assert_eq!(contents.services[&SlotKey::new(vip(last).ip, 80, 6, 0)].maglev_table, 1);
    }
    assert_consistent(contents);

    // One frontend's set changes: it gets a table of its own; the shared one stays for the other.
    let start = r.maps().log.len();
    r.reconcile(&maglev_state(&[(vip(1), &[1, 2, 3, 4]), (vip(2), &[1, 2, 3])]));
    let log = r.maps().log[start..].to_vec();
    let entry = position(&log, "update service 10.96.0.1:80/6 slot 0");
    assert!(position(&log, "create maglev table 2 size 16381") < entry, "{log:#?}");
    assert!(!log.iter().any(|l| l.starts_with("delete maglev table")), "{log:#?}");
    assert_consistent(&r.maps().contents);

    // The other frontend goes: the shared table goes after its last user's entry.
    let start = r.maps().log.len();
    r.reconcile(&maglev_state(&[(vip(1), &[1, 2, 3, 4])]));
    let log = r.maps().log[start..].to_vec();
    assert!(
        position(&log, "delete service 10.96.0.2:80/6 slot 0") < position(&log, "delete maglev table 1"),
        "{log:#?}"
    );
    assert_eq!(r.maps().contents.maglev.keys().copied().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn a_backend_change_rewrites_only_the_maglev_positions_that_change() {
    let mut r = reconciler();
    r.reconcile(&maglev_state(&[(vip(1), &[1, 2, 3, 4, 5])]));
    let before = r.maps().contents.maglev[&1].clone();
    let start = r.maps().log.len();
    r.reconcile(&maglev_state(&[(vip(1), &[1, 2, 3, 4])]));
    let log = r.maps().log[start..].to_vec();
    let after = &r.maps().contents.maglev[&1];
    let changed = before.iter().zip(after).filter(|(b, a)| b != a).count();
    assert_eq!(log.iter().filter(|l| l.starts_with("write maglev positions 1")).count(), 1, "{log:#?}");
    assert!(log.contains(&format!("write maglev positions 1 x{changed}")), "{changed} changed: {log:#?}");
    // A fifth of the positions belonged to the removed backend; few others moved.
    assert!(changed < 16381 / 5 + 16381 / 50, "{changed} positions rewritten");
    let removed_backend = 5;
    assert!(!after.contains(&removed_backend));
    assert_consistent(&r.maps().contents);
}

#[test]
fn a_failed_write_with_maglev_tables_is_repaired_by_the_next_reconcile() {
    let desired_a = maglev_state(&[(vip(1), &[1, 2, 3]), (vip(2), &[1, 2, 3]), (vip(3), &[4])]);
    let desired_b = maglev_state(&[(vip(1), &[2, 5]), (vip(2), &[1, 2, 3, 6]), (vip(4), &[4])]);
    let mut clean = reconciler();
    clean.reconcile(&desired_a);
    clean.reconcile(&desired_b);
    let total_writes = {
        let mut r = reconciler();
        r.reconcile(&desired_a);
        let before = r.maps().log.len();
        r.reconcile(&desired_b);
        r.maps().log.len() - before
    };
    for fail_after in 0..total_writes {
        let mut r = reconciler();
        r.reconcile(&desired_a);
        let mut failing = r.maps().clone();
        failing.fail_after_writes = Some(fail_after);
        let mut r = Reconciler::restore(failing).unwrap();
        let report = r.reconcile(&desired_b);
        assert!(!report.errors.is_empty(), "a write should have failed after {fail_after}");
        assert_consistent(&r.maps().contents);
        let mut healed = r.maps().clone();
        healed.fail_after_writes = None;
        let mut r = Reconciler::restore(healed).unwrap();
        let report = r.reconcile(&desired_b);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        r.prune().unwrap();
        assert_settled(&r.maps().contents);
        // Same frontends, backends and table contents as a clean run (IDs may differ).
        let tables = |contents: &lb_userspace::dataplane::maps::MapsSnapshot| contents.maglev.len();
        assert_eq!(
            tables(&r.maps().contents),
            tables(&clean.maps().contents),
            "after failing at write {fail_after}"
        );
    }
}

/// A failure after a Maglev table was taken gives it back: once the frontends are gone, no
/// table is left, however the writes failed on the way (in one reconciler, without a restart
/// recounting users).
#[test]
fn maglev_tables_are_given_back_after_failed_writes() {
    let desired = maglev_state(&[(vip(1), &[1, 2, 3]), (vip(2), &[1, 2, 4])]);
    let total_writes = {
        let mut r = reconciler();
        r.reconcile(&desired);
        r.maps().log.len()
    };
    for fail_after in 0..total_writes {
        let mut r = reconciler();
        r.maps_mut().fail_after_writes = Some(fail_after);
        r.reconcile(&desired);
        r.maps_mut().fail_after_writes = None;
        let report = r.reconcile(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_consistent(&r.maps().contents);
        // Each frontend fails after another write while being removed, then is removed.
        for remove_fail_after in [0, 1, 2] {
            r.maps_mut().fail_after_writes = Some(remove_fail_after);
            r.reconcile(&DesiredState::default());
            r.maps_mut().fail_after_writes = None;
        }
        r.reconcile(&DesiredState::default());
        assert!(
            r.maglev_tables().is_empty(),
            "after failing at write {fail_after}: {:?}",
            r.maglev_tables().keys()
        );
        assert!(r.maps().contents.maglev.is_empty(), "after failing at write {fail_after}");
    }
}

/// A full services map refuses only the frontend that does not fit, naming the flag to raise;
/// the others keep being served, and the refused one is programmed as soon as room appears.
#[test]
fn a_full_map_refuses_only_the_excess_frontend_until_room_appears() {
    let mut r =
        Reconciler::restore(InMemoryMaps { services_capacity: Some(7), ..Default::default() }).unwrap();
    let report = r.reconcile(&state(&[(vip(1), &[1]), (vip(2), &[2, 3]), (vip(3), &[4, 5, 6])]));
    assert_eq!((report.programmed, report.refused), (2, 1), "{report:?}");
    assert!(
        report.errors[0].to_string().contains("default/svc3")
            && report.errors[0].to_string().contains("--max-service-slots"),
        "{report:?}"
    );
    assert_consistent(&r.maps().contents);
    let entries = |r: &Reconciler<InMemoryMaps>| {
        r.maps()
            .contents
            .services
            .keys()
            .filter(|k| k.backend_slot == 0)
            .map(|k| last_octet(k.address()))
            .collect::<Vec<_>>()
    };
    assert_eq!(entries(&r), vec![1, 2]);
    // svc2 goes: svc3 fits now, in the same reconcile.
    let report = r.reconcile(&state(&[(vip(1), &[1]), (vip(3), &[4, 5, 6])]));
    assert_eq!((report.refused, report.removed), (0, 1), "{report:?}");
    assert_eq!(entries(&r), vec![1, 3]);
    assert_consistent(&r.maps().contents);
}

/// A backend no slot uses any more stays for the grace period (a reader that took its slot
/// just before the rewrite still finds it), and keeps its ID if it comes back meanwhile.
#[test]
fn unused_backends_stay_for_the_grace_period() {
    let mut r = reconciler();
    r.set_backend_grace(std::time::Duration::from_millis(300));
    r.reconcile(&state(&[(vip(1), &[1, 2])]));
    let id_of_2 =
        *r.maps().contents.backends.iter().find(|(_, b)| b.address() == addr(2, 8080).ip).unwrap().0;
    r.reconcile(&state(&[(vip(1), &[1])]));
    assert_eq!(r.maps().contents.backends.len(), 2, "still there during the grace period");
    assert_consistent(&r.maps().contents);
    // Back within the grace period: the same ID.
    r.reconcile(&state(&[(vip(1), &[1, 2])]));
    let slots: Vec<u32> =
        r.maps().contents.services.values().filter(|v| v.backend_id != 0).map(|v| v.backend_id).collect();
    assert!(slots.contains(&id_of_2), "{slots:?}");
    // Gone for longer than the grace period: deleted at the next reconcile.
    r.reconcile(&state(&[(vip(1), &[1])]));
    std::thread::sleep(std::time::Duration::from_millis(350));
    r.reconcile(&state(&[(vip(1), &[1])]));
    assert_eq!(r.maps().contents.backends.len(), 1);
    assert_settled(&r.maps().contents);
}

/// Slots past a count lowered twice stay for the grace period counted from the latest
/// lowering: a reader that took the middle count just before the second change still finds
/// its slot.
#[test]
fn surplus_slots_stay_for_the_grace_period_after_the_latest_lowering() {
    let mut r = reconciler();
    r.set_backend_grace(std::time::Duration::from_millis(300));
    let slots = |r: &Reconciler<InMemoryMaps>| {
        let mut slots: Vec<u16> = r.maps().contents.services.keys().map(|k| k.backend_slot).collect();
        slots.sort_unstable();
        slots
    };
    r.reconcile(&state(&[(vip(1), &[1, 2, 3])]));
    r.reconcile(&state(&[(vip(1), &[1, 2])]));
    std::thread::sleep(std::time::Duration::from_millis(200));
    r.reconcile(&state(&[(vip(1), &[1])]));
    std::thread::sleep(std::time::Duration::from_millis(150));
    // 350 ms after the first lowering, 150 ms after the latest.
    r.reconcile(&state(&[(vip(1), &[1])]));
    assert_eq!(slots(&r), vec![0, 1, 2, 3], "slot 2 was within the count 150 ms ago");
    assert_consistent(&r.maps().contents);
    std::thread::sleep(std::time::Duration::from_millis(200));
    r.reconcile(&state(&[(vip(1), &[1])]));
    assert_eq!(slots(&r), vec![0, 1]);
    assert_settled(&r.maps().contents);
}

fn last_octet(ip: std::net::IpAddr) -> u8 {
    match ip {
        std::net::IpAddr::V4(ip) => ip.octets()[3],
        std::net::IpAddr::V6(ip) => ip.octets()[15],
    }
}
