//! Backend selection for a new flow: the client's session affinity if it has one, else the
//! frontend's Maglev table (consistent: a change to the backend set moves only the flows of the
//! backends that changed, and every node picks the same backend for the same flow), else a hash
//! of the flow over the frontend's slots.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{AffinityKeyOf, AffinityValue, BackendOf, ServiceKeyOf, ServiceValue, counters};

use crate::{
    family::Family,
    maps::{LB_MAGLEV, config, count},
};

pub use lb_common::{flow_hash, mix};

/// Slot in 1..=backend_count (backend_count > 0) for a flow's hash.
#[inline(always)]
pub fn backend_slot(hash: u32, backend_count: u16) -> u16 {
    (hash % u32::from(backend_count)) as u16 + 1
}

/// Why no backend could be chosen although the frontend has some: a torn update or a bug.
pub enum Inconsistent {
    Slot,
    Backend,
}

/// The backend a new flow to `service` (found at `key`, slot 0) goes to. `client` is the
/// affinity key's client address.
#[inline(always)]
pub fn choose<A: Family>(
    key: &ServiceKeyOf<A>,
    service: &ServiceValue,
    hash: u32,
    client: A,
) -> Result<(u32, BackendOf<A>), Inconsistent> {
    let affinity_key = AffinityKeyOf { client_address: client, service_id: service.service_id };
    let now = if service.affinity_timeout != 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if let Some(found) = affinity(&affinity_key, service.affinity_timeout, now) {
            count(counters::AFFINITY_HIT);
            return Ok(found);
        }
        now
    } else {
        0
    };
    let backend_id = match maglev(service.maglev_table, hash) {
        Some(id) => id,
        None => {
            let slot_key = key.with_slot(backend_slot(hash, service.backend_count));
            // SAFETY: copied out at once.
            unsafe { A::services().get(slot_key) }.ok_or(Inconsistent::Slot)?.backend_id
        }
    };
    // SAFETY: copied out at once.
    let backend = *unsafe { A::backends().get(backend_id) }.ok_or(Inconsistent::Backend)?;
    if service.affinity_timeout != 0 {
        let value = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        let _ = A::affinity().insert(affinity_key, value, 0);
    }
    Ok((backend_id, backend))
}

/// The backend the client's last connection went to, if that was within the timeout and the
/// backend still exists (the collector removes records whose backend left the frontend). The
/// window slides: each new connection renews it.
#[inline(always)]
fn affinity<A: Family>(
    key: &AffinityKeyOf<A>,
    timeout_seconds: u32,
    now: u64,
) -> Option<(u32, BackendOf<A>)> {
    let record = A::affinity().get_ptr_mut(key)?;
    // SAFETY: a pointer into the map's value, valid for this program run.
    let record = unsafe { &mut *record };
    if now.wrapping_sub(record.last_used_ns) >= u64::from(timeout_seconds) * 1_000_000_000 {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = *unsafe { A::backends().get(record.backend_id) }?;
    record.last_used_ns = now;
    Some((record.backend_id, backend))
}

/// The backend ID at the flow's position in the frontend's Maglev table.
#[inline(always)]
fn maglev(table: u32, hash: u32) -> Option<u32> {
    if table == 0 {
        return None;
    }
    let size = config()?.maglev_table_size;
    if size == 0 {
        return None;
    }
    LB_MAGLEV.get_value(table, &(hash % size)).copied()
}
