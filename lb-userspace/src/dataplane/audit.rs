//! The maps' invariants, checked from a snapshot.
//!
//! What any reader (the data path, `lb services`) may rely on at every instant, even in the
//! middle of an update: a service entry's slots all exist and point at backends that exist,
//! and a Maglev table it names exists and points only at backends that exist. During an update
//! a reader may see the old backend count with slots being rewritten one by one (a surviving
//! backend in two slots for a moment), or a backend written before any slot points at it.
//!
//! What holds once a sync is done (`settled`): besides the above, no backend, metadata entry
//! or slot that nothing uses.

use std::collections::BTreeSet;

use crate::dataplane::maps::MapsSnapshot;

/// Violations of what must hold at every instant.
pub fn always(snapshot: &MapsSnapshot) -> Vec<String> {
    let mut violations = Vec::new();
    for (key, value) in snapshot.services.iter().filter(|(key, _)| key.backend_slot == 0) {
        let frontend = format!(
            "{}/{} scope {}",
            std::net::SocketAddr::new(key.address(), key.port()),
            key.protocol,
            key.scope
        );
        for slot in 1..=value.backend_count {
            match snapshot.services.get(&key.with_slot(slot)) {
                None => {
                    violations.push(format!("{frontend}: slot {slot} of {} missing", value.backend_count))
                }
                Some(slot_value) => match snapshot.backends.get(&slot_value.backend_id) {
                    None => violations.push(format!(
                        "{frontend}: slot {slot} points at missing backend {}",
                        slot_value.backend_id
                    )),
                    // The data path looks the ID up in the frontend's family's map only.
                    Some(backend) if backend.ip.is_ipv4() != key.ip.is_ipv4() => violations.push(format!(
                        "{frontend}: slot {slot} points at backend {} of the other family",
                        slot_value.backend_id
                    )),
                    Some(_) => {}
                },
            }
        }
        if value.maglev_table != 0
            && let Some(table) = snapshot.maglev.get(&value.maglev_table)
            && let Some(missing) = table.iter().find(|id| {
                snapshot.backends.get(id).is_none_or(|backend| backend.ip.is_ipv4() != key.ip.is_ipv4())
            })
        {
            violations.push(format!(
                "{frontend}: Maglev table {} points at missing backend {missing} (or one of the other family)",
                value.maglev_table
            ));
        }
    }
    violations
}

/// Violations of what must hold once a sync is done: `always`, and nothing unused.
pub fn settled(snapshot: &MapsSnapshot) -> Vec<String> {
    let mut violations = always(snapshot);
    let entries: Vec<_> = snapshot.services.iter().filter(|(key, _)| key.backend_slot == 0).collect();
    for (key, value) in snapshot.services.iter().filter(|(key, _)| key.backend_slot > 0) {
        let entry = snapshot.services.get(&key.with_slot(0));
        if entry.is_none_or(|entry| key.backend_slot > entry.backend_count) {
            violations.push(format!(
                "{}:{}/{} slot {} is beyond its entry's count",
                key.address(),
                key.port(),
                key.protocol,
                key.backend_slot
            ));
        }
        let _ = value;
    }
    let used: BTreeSet<u32> = snapshot
        .services
        .values()
        .filter(|value| value.backend_id != 0)
        .map(|value| value.backend_id)
        .chain(
            entries
                .iter()
                .filter_map(|(_, value)| snapshot.maglev.get(&value.maglev_table))
                .flat_map(|table| table.iter().copied()),
        )
        .collect();
    for id in snapshot.backends.keys().filter(|id| !used.contains(id)) {
        violations.push(format!("backend {id} is used by no slot"));
    }
    let service_ids: BTreeSet<u32> = entries.iter().map(|(_, value)| value.service_id).collect();
    for id in snapshot.service_meta.keys().filter(|id| !service_ids.contains(id)) {
        violations.push(format!("metadata {id} belongs to no frontend"));
    }
    let named: BTreeSet<u32> = entries.iter().map(|(_, value)| value.maglev_table).collect();
    for table in snapshot.maglev.keys().filter(|table| !named.contains(table)) {
        violations.push(format!("Maglev table {table} is named by no frontend"));
    }
    violations
}
