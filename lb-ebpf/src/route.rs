//! Sending a translated packet straight to its next hop (FIB lookup, then redirect) instead of
//! through the stack's input routing. The stack would drop it as a martian: after source NAT,
//! or on the reply of a NodePort flow, its source is one of the node's own addresses.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::conntrack_flags;

use crate::{family::Family, headers::ETH_MACS_LEN, parse::Flow, verdict::Verdict};

/// The kernel's route and neighbour for a packet from `src_address` to `dst_address` that
/// arrived on `ingress`: the lookup's result code and, on success, egress interface and MACs.
#[inline(always)]
pub fn fib_lookup<A: Family>(
    ctx: *mut core::ffi::c_void,
    ingress: u32,
    protocol: u8,
    src_address: A,
    dst_address: A,
) -> (u32, FibLookup) {
    // SAFETY: plain old data; every field the kernel reads is set below.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    A::fib_addresses(&mut params, src_address, dst_address);
    params.l4_protocol = protocol;
    params.ifindex = ingress;
    // SAFETY: helper call with the program's context and a stack struct of the size passed.
    let result = unsafe { bpf_fib_lookup(ctx, &mut params, size_of::<FibLookup>() as i32, 0) };
    (result as u32, params)
}

/// The verdict for a rewritten packet: redirected to its next hop when `flags` (a flow's
/// `conntrack_flags`) say the stack would not take it, else passed with `counter`.
#[inline(always)]
pub fn if_flagged<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    flags: u16,
    src_address: A,
    dst_address: A,
    counter: u32,
) -> Verdict {
    if flags & conntrack_flags::ROUTE != 0
        && let Some(action) = to_next_hop(ctx, flow, src_address, dst_address)
    {
        return Verdict { action, counter };
    }
    Verdict::pass(counter)
}

/// Redirects the (already rewritten) packet to the next hop towards `dst_address`. `None`
/// leaves it to the stack: no route, forwarding off, or a TTL that the stack must answer.
#[inline(always)]
pub fn to_next_hop<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    src_address: A,
    dst_address: A,
) -> Option<i32> {
    // SAFETY: reads a field of the context the program was given.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let (result, params) = fib_lookup(ctx.skb.skb.cast(), ingress, flow.protocol, src_address, dst_address);
    if result != BPF_FIB_LKUP_RET_SUCCESS && result != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    // Forwarded here, so the TTL drops here (a TTL at 1 is left to the stack to answer).
    A::forward_hop(ctx, flow)?;
    let action = if result == BPF_FIB_LKUP_RET_SUCCESS {
        let mut macs = [0u8; ETH_MACS_LEN];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        ctx.store(0, &macs, 0).ok()?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(params.ifindex, 0) }
    } else {
        // No neighbour entry yet: the kernel resolves it and sends the packet.
        // SAFETY: plain helper call; no parameters passed.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    (action == i64::from(TC_ACT_REDIRECT)).then_some(TC_ACT_REDIRECT)
}
