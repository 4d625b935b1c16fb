//! Backend selection: a hash of the flow picks one of the frontend's backend slots. Stable for a
//! flow's lifetime only through conntrack; Maglev will make it stable across backend changes.

use crate::parse::Ipv4Flow;

/// murmur3's 32-bit finalizer: cheap, and spreads nearby ports over all slots.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
pub fn flow_hash(flow: &Ipv4Flow) -> u32 {
    let ports = (u32::from(flow.src_port) << 16) | u32::from(flow.dst_port);
    let mut h = mix(flow.src_address ^ 0x9e37_79b9);
    h = mix(h ^ flow.dst_address);
    h = mix(h ^ ports);
    mix(h ^ u32::from(flow.protocol))
}

/// Slot in 1..=backend_count (backend_count > 0) for a flow's hash.
#[inline(always)]
pub fn backend_slot(hash: u32, backend_count: u16) -> u16 {
    (hash % u32::from(backend_count)) as u16 + 1
}
