//! Rejecting a connection to a frontend without endpoints, as kube-proxy does: the packet is
//! turned, in place, into a TCP RST (for TCP) or an ICMP (ICMPv6) port unreachable (for UDP)
//! addressed to the client, and sent back out the interface it came in on. The client sees
//! "connection refused" at once instead of waiting on a black hole.
//!
//! The reply's headers are built in a per-CPU scratch buffer (`LB_REJECT_SCRATCH`), not on the
//! BPF stack: the IPv6 ones would not fit beside the rest of the path.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use lb_common::{In6, PROTOCOL_TCP, counters};

use crate::{
    csum::{checksum, sum_words},
    family::Family,
    headers::{
        DEFAULT_TTL, ETH_HEADER_LEN, ETH_MACS_LEN, ICMP_DEST_UNREACHABLE, ICMP_HEADER_LEN,
        ICMP_PORT_UNREACHABLE, ICMP_QUOTE_LEN, ICMPV6_DEST_UNREACHABLE, ICMPV6_PORT_UNREACHABLE,
        ICMPV6_QUOTE_LEN, IPV4_DONT_FRAGMENT, IPV4_MIN_HEADER_LEN as IPV4_HEADER_LEN, IPV4_TOTAL_LEN_OFFSET,
        IPV4_VERSION_IHL_PLAIN, IPV6_HEADER_LEN, IPV6_PAYLOAD_LEN_OFFSET, PROTOCOL_ICMP, PROTOCOL_ICMPV6,
        TCP_ACK, TCP_ACK_OFFSET, TCP_CHECKSUM_OFFSET, TCP_DATA_OFFSET_OFFSET, TCP_FIN, TCP_FLAGS_OFFSET,
        TCP_MIN_HEADER_LEN as TCP_HEADER_LEN, TCP_RST, TCP_SEQ_OFFSET, TCP_SYN,
    },
    maps::{LB_REJECT_SCRATCH, RejectScratch},
    parse::{Flow, Ipv4Flow, Ipv6Flow},
    verdict::Verdict,
};

#[inline(always)]
fn failed() -> Verdict {
    Verdict::drop(counters::DROP_REJECT_FAILED)
}

/// Copies `N` bytes of the packet at `offset` into `buffer` (a constant length, as the verifier
/// needs: aya's `load_bytes` clamps it to the packet, which it cannot bound away from 0).
#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, offset: usize, buffer: *mut u8) -> Result<(), Verdict> {
    // SAFETY: helper call on the program's own context; `buffer` has room for `N` bytes.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, offset as u32, buffer.cast(), N as u32) };
    if rc == 0 { Ok(()) } else { Err(failed()) }
}

/// Turns the packet into the client's rejection and redirects it, counted as `counter`; `Err`
/// when that is not possible (the caller's verdict then drops it).
#[inline(always)]
pub fn reject<A: Family>(ctx: &TcContext, flow: &Flow<A>, counter: u32) -> Result<Verdict, Verdict> {
    // IPv4 options or IPv6 extension headers would have to be stripped; clients do not send
    // them to Services.
    if flow.l4_offset != flow.l3_offset + A::HEADER_LEN {
        return Err(failed());
    }
    let scratch = LB_REJECT_SCRATCH.get_ptr_mut(0).ok_or_else(failed)?;
    // SAFETY: this CPU's buffer, and BPF programs are not preempted on a CPU while running.
    let scratch = unsafe { &mut *scratch };
    // Fixed-size loads: the verifier needs every read length to be a constant.
    load::<ETH_MACS_LEN>(ctx, 0, scratch.macs.as_mut_ptr())?;
    let mut i = 0;
    while i < 6 {
        scratch.swapped[i] = scratch.macs[i + 6];
        scratch.swapped[i + 6] = scratch.macs[i];
        i += 1;
    }

    A::write_reject(ctx, flow, scratch)?;
    ctx.store(0, &scratch.swapped, 0).map_err(|_| failed())?;
    // SAFETY: reads a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; it only records where the packet goes.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(failed());
    }
    Ok(Verdict::redirect(counter))
}

/// Rewrites an IPv4 packet into its rejection.
#[inline(always)]
pub fn write_reject(ctx: &TcContext, flow: &Ipv4Flow, scratch: &mut RejectScratch) -> Result<(), Verdict> {
    if flow.protocol == PROTOCOL_TCP {
        tcp_reset(ctx, flow, scratch)
    } else {
        icmp_port_unreachable(ctx, flow, scratch)
    }
}

/// An IPv4 header from the rejected packet's destination back to its source.
#[inline(always)]
fn reply_ip_header(ip: &mut [u8; IPV4_HEADER_LEN], flow: &Ipv4Flow, protocol: u8, total_len: u16) {
    *ip = [0u8; IPV4_HEADER_LEN];
    ip[0] = IPV4_VERSION_IHL_PLAIN;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[6] = IPV4_DONT_FRAGMENT;
    ip[8] = DEFAULT_TTL;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&flow.dst_address.to_ne_bytes());
    ip[16..20].copy_from_slice(&flow.src_address.to_ne_bytes());
    let checksum = checksum(ip, 0);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// RFC 9293 3.10.7.1: a RST answering a segment to a closed port.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, flow: &Ipv4Flow, scratch: &mut RejectScratch) -> Result<(), Verdict> {
    let total_len: u16 = ctx.load::<u16>(flow.l3_offset + IPV4_TOTAL_LEN_OFFSET).map_err(|_| failed())?;
    let l4_len = usize::from(u16::from_be(total_len)).saturating_sub(IPV4_HEADER_LEN);
    reset_segment(ctx, flow.l4_offset, l4_len, scratch)?;
    reply_ip_header(&mut scratch.ipv4, flow, PROTOCOL_TCP, (IPV4_HEADER_LEN + TCP_HEADER_LEN) as u16);
    let pseudo = pseudo_header_sum(&scratch.ipv4, TCP_HEADER_LEN as u16);
    finish_reset(ctx, &scratch.ipv4, &mut scratch.tcp, pseudo)
}

/// Builds the RST (without its checksum) answering the TCP segment at `l4_offset`, `l4_len`
/// bytes with its data, in `scratch.tcp`.
#[inline(always)]
fn reset_segment(
    ctx: &TcContext,
    l4_offset: usize,
    l4_len: usize,
    scratch: &mut RejectScratch,
) -> Result<(), Verdict> {
    load::<TCP_HEADER_LEN>(ctx, l4_offset, scratch.incoming.as_mut_ptr())?;
    let incoming = &scratch.incoming;
    let flags = incoming[TCP_FLAGS_OFFSET];
    if flags & TCP_RST != 0 {
        return Err(failed()); // never answer a RST
    }
    let data_offset = usize::from(incoming[TCP_DATA_OFFSET_OFFSET] >> 4) * 4;
    let segment_len = l4_len.saturating_sub(data_offset) as u32
        + u32::from(flags & TCP_SYN != 0)
        + u32::from(flags & TCP_FIN != 0);

    let tcp = &mut scratch.tcp;
    *tcp = [0u8; TCP_HEADER_LEN];
    tcp[0..2].copy_from_slice(&incoming[2..4]);
    tcp[2..4].copy_from_slice(&incoming[0..2]);
    if flags & TCP_ACK != 0 {
        // seq = their ack
        tcp[TCP_SEQ_OFFSET..TCP_SEQ_OFFSET + 4]
            .copy_from_slice(&incoming[TCP_ACK_OFFSET..TCP_ACK_OFFSET + 4]);
        tcp[TCP_FLAGS_OFFSET] = TCP_RST;
    } else {
        let seq = u32::from_be_bytes([
            incoming[TCP_SEQ_OFFSET],
            incoming[TCP_SEQ_OFFSET + 1],
            incoming[TCP_SEQ_OFFSET + 2],
            incoming[TCP_SEQ_OFFSET + 3],
        ]);
        let ack = seq.wrapping_add(segment_len);
        tcp[TCP_ACK_OFFSET..TCP_ACK_OFFSET + 4].copy_from_slice(&ack.to_be_bytes());
        tcp[TCP_FLAGS_OFFSET] = TCP_RST | TCP_ACK;
    }
    tcp[TCP_DATA_OFFSET_OFFSET] = (TCP_HEADER_LEN as u8 / 4) << 4;
    Ok(())
}

/// Checksums the RST `tcp` over `pseudo` (the pseudo-header's sum), cuts the packet to `ip`
/// and `tcp`, and writes them.
#[inline(always)]
fn finish_reset<const IP_LEN: usize>(
    ctx: &TcContext,
    ip: &[u8; IP_LEN],
    tcp: &mut [u8; TCP_HEADER_LEN],
    pseudo: u32,
) -> Result<(), Verdict> {
    let checksum = checksum(tcp, pseudo);
    tcp[TCP_CHECKSUM_OFFSET..TCP_CHECKSUM_OFFSET + 2].copy_from_slice(&checksum.to_be_bytes());
    let new_len = (ETH_HEADER_LEN + IP_LEN + TCP_HEADER_LEN) as u32;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(failed());
    }
    ctx.store(ETH_HEADER_LEN, ip, 0).map_err(|_| failed())?;
    ctx.store(ETH_HEADER_LEN + IP_LEN, tcp, 0).map_err(|_| failed())?;
    Ok(())
}

/// RFC 792: destination unreachable, port unreachable, quoting the datagram's IP header and
/// its first 8 bytes.
#[inline(always)]
fn icmp_port_unreachable(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    scratch: &mut RejectScratch,
) -> Result<(), Verdict> {
    let quote = &mut scratch.quote;
    load::<ICMP_QUOTE_LEN>(ctx, flow.l3_offset, quote.as_mut_ptr())?;
    let icmp = &mut scratch.icmp;
    *icmp = [0u8; ICMP_HEADER_LEN];
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = ICMP_PORT_UNREACHABLE;
    let quoted: &[u8; ICMP_QUOTE_LEN] = quote[..ICMP_QUOTE_LEN].try_into().map_err(|_| failed())?;
    let checksum = checksum(quoted, sum_words(icmp, 0));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let ip = &mut scratch.ipv4;
    reply_ip_header(ip, flow, PROTOCOL_ICMP, (IPV4_HEADER_LEN + ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u16);

    // Room for the new IP and ICMP headers in front of the quoted datagram, then cut after
    // the quote.
    let room = (IPV4_HEADER_LEN + ICMP_HEADER_LEN) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).map_err(|_| failed())?;
    let new_len = (ETH_HEADER_LEN + IPV4_HEADER_LEN + ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u32;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(failed());
    }
    ctx.store(ETH_HEADER_LEN, ip, 0).map_err(|_| failed())?;
    ctx.store(ETH_HEADER_LEN + IPV4_HEADER_LEN, icmp, 0).map_err(|_| failed())?;
    Ok(())
}

/// The TCP/UDP pseudo-header's contribution: addresses, protocol and L4 length.
#[inline(always)]
fn pseudo_header_sum(ip: &[u8; IPV4_HEADER_LEN], l4_len: u16) -> u32 {
    let mut sum = u32::from(ip[9]) + u32::from(l4_len);
    let mut i = 12;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    sum
}

/// Rewrites an IPv6 packet (without extension headers) into its rejection.
#[inline(always)]
pub fn write_reject6(ctx: &TcContext, flow: &Ipv6Flow, scratch: &mut RejectScratch) -> Result<(), Verdict> {
    if flow.protocol == PROTOCOL_TCP {
        tcp_reset6(ctx, flow, scratch)
    } else {
        icmpv6_port_unreachable(ctx, flow, scratch)
    }
}

/// An IPv6 header from the rejected packet's destination back to its source.
#[inline(always)]
fn reply_ipv6_header(ip: &mut [u8; IPV6_HEADER_LEN], flow: &Ipv6Flow, next_header: u8, payload_len: u16) {
    *ip = [0u8; IPV6_HEADER_LEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next_header;
    ip[7] = DEFAULT_TTL;
    write_address(ip, 8, flow.dst_address);
    write_address(ip, 24, flow.src_address);
}

#[inline(always)]
fn write_address(ip: &mut [u8; IPV6_HEADER_LEN], offset: usize, address: In6) {
    let mut i = 0;
    while i < 4 {
        ip[offset + i * 4..offset + i * 4 + 4].copy_from_slice(&address.words[i].to_ne_bytes());
        i += 1;
    }
}

/// The IPv6 pseudo-header's contribution (RFC 8200 8.1): addresses, upper-layer length and
/// next header.
#[inline(always)]
fn pseudo_header_sum6(ip: &[u8; IPV6_HEADER_LEN], l4_len: u16) -> u32 {
    let mut sum = u32::from(ip[6]) + u32::from(l4_len);
    let mut i = 8;
    while i < IPV6_HEADER_LEN {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn tcp_reset6(ctx: &TcContext, flow: &Ipv6Flow, scratch: &mut RejectScratch) -> Result<(), Verdict> {
    let payload_len: u16 = ctx.load::<u16>(flow.l3_offset + IPV6_PAYLOAD_LEN_OFFSET).map_err(|_| failed())?;
    reset_segment(ctx, flow.l4_offset, usize::from(u16::from_be(payload_len)), scratch)?;
    reply_ipv6_header(&mut scratch.ipv6, flow, PROTOCOL_TCP, TCP_HEADER_LEN as u16);
    let pseudo = pseudo_header_sum6(&scratch.ipv6, TCP_HEADER_LEN as u16);
    finish_reset(ctx, &scratch.ipv6, &mut scratch.tcp, pseudo)
}

/// RFC 4443 3.1: destination unreachable, port unreachable, quoting the packet's IPv6 header
/// and its first 8 bytes. Unlike ICMP's, the ICMPv6 checksum covers a pseudo-header.
#[inline(always)]
fn icmpv6_port_unreachable(
    ctx: &TcContext,
    flow: &Ipv6Flow,
    scratch: &mut RejectScratch,
) -> Result<(), Verdict> {
    load::<ICMPV6_QUOTE_LEN>(ctx, flow.l3_offset, scratch.quote.as_mut_ptr())?;
    let icmp_len = (ICMP_HEADER_LEN + ICMPV6_QUOTE_LEN) as u16;
    reply_ipv6_header(&mut scratch.ipv6, flow, PROTOCOL_ICMPV6, icmp_len);
    let icmp = &mut scratch.icmp;
    *icmp = [0u8; ICMP_HEADER_LEN];
    icmp[0] = ICMPV6_DEST_UNREACHABLE;
    icmp[1] = ICMPV6_PORT_UNREACHABLE;
    let checksum = checksum(&scratch.quote, sum_words(icmp, pseudo_header_sum6(&scratch.ipv6, icmp_len)));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let room = (IPV6_HEADER_LEN + ICMP_HEADER_LEN) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).map_err(|_| failed())?;
    let new_len = (ETH_HEADER_LEN + IPV6_HEADER_LEN + ICMP_HEADER_LEN + ICMPV6_QUOTE_LEN) as u32;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(failed());
    }
    ctx.store(ETH_HEADER_LEN, &scratch.ipv6, 0).map_err(|_| failed())?;
    ctx.store(ETH_HEADER_LEN + IPV6_HEADER_LEN, &scratch.icmp, 0).map_err(|_| failed())?;
    Ok(())
}

const _: () = assert!(ICMPV6_QUOTE_LEN >= ICMP_QUOTE_LEN);
const _: () = assert!(ETH_MACS_LEN == 12);
