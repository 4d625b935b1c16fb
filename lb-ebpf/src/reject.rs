//! Rejecting a connection to a frontend without endpoints, as kube-proxy does: the packet is
//! turned, in place, into a TCP RST (for TCP) or an ICMP port unreachable (for UDP) addressed
//! to the client, and sent back out the interface it came in on. The client sees "connection
//! refused" at once instead of waiting on a black hole.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{PROTOCOL_TCP, counters};

use crate::{
    csum::{checksum, sum_words},
    headers::{
        DEFAULT_TTL, ETH_HEADER_LEN, ETH_MACS_LEN, ICMP_DEST_UNREACHABLE, ICMP_HEADER_LEN,
        ICMP_PORT_UNREACHABLE, ICMP_QUOTE_LEN, IPV4_DONT_FRAGMENT, IPV4_MIN_HEADER_LEN as IPV4_HEADER_LEN,
        IPV4_TOTAL_LEN_OFFSET, IPV4_VERSION_IHL_PLAIN, PROTOCOL_ICMP, TCP_ACK, TCP_ACK_OFFSET,
        TCP_CHECKSUM_OFFSET, TCP_DATA_OFFSET_OFFSET, TCP_FIN, TCP_FLAGS_OFFSET,
        TCP_MIN_HEADER_LEN as TCP_HEADER_LEN, TCP_RST, TCP_SEQ_OFFSET, TCP_SYN,
    },
    parse::Ipv4Flow,
    verdict::Verdict,
};

/// Turns the packet into the client's rejection and redirects it, counted as `counter`; `Err`
/// when that is not possible (the caller's verdict then drops it).
#[inline(always)]
pub fn reject(ctx: &TcContext, flow: &Ipv4Flow, counter: u32) -> Result<Verdict, Verdict> {
    let failed = || Verdict::drop(counters::DROP_REJECT_FAILED);
    // Options would have to be stripped; clients do not send them to Services.
    if flow.l4_offset != flow.l3_offset + IPV4_HEADER_LEN {
        return Err(failed());
    }
    // Fixed-size loads: the verifier needs every read length to be a constant.
    let macs: [u8; ETH_MACS_LEN] = ctx.load(0).map_err(|_| failed())?;
    let mut swapped = [0u8; ETH_MACS_LEN];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);

    if flow.protocol == PROTOCOL_TCP {
        tcp_reset(ctx, flow)?;
    } else {
        icmp_port_unreachable(ctx, flow)?;
    }
    ctx.store(0, &swapped, 0).map_err(|_| failed())?;
    // SAFETY: reads a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; it only records where the packet goes.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(failed());
    }
    Ok(Verdict::redirect(counter))
}

/// An IPv4 header from the rejected packet's destination back to its source.
#[inline(always)]
fn reply_ip_header(flow: &Ipv4Flow, protocol: u8, total_len: u16) -> [u8; IPV4_HEADER_LEN] {
    let mut ip = [0u8; IPV4_HEADER_LEN];
    ip[0] = IPV4_VERSION_IHL_PLAIN;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[6] = IPV4_DONT_FRAGMENT;
    ip[8] = DEFAULT_TTL;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&flow.dst_address.to_ne_bytes());
    ip[16..20].copy_from_slice(&flow.src_address.to_ne_bytes());
    let checksum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip
}

/// RFC 9293 3.10.7.1: a RST answering a segment to a closed port.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, flow: &Ipv4Flow) -> Result<(), Verdict> {
    let failed = || Verdict::drop(counters::DROP_REJECT_FAILED);
    let incoming: [u8; TCP_HEADER_LEN] = ctx.load(flow.l4_offset).map_err(|_| failed())?;
    let flags = incoming[TCP_FLAGS_OFFSET];
    if flags & TCP_RST != 0 {
        return Err(failed()); // never answer a RST
    }
    let total_len: u16 = ctx.load::<u16>(flow.l3_offset + IPV4_TOTAL_LEN_OFFSET).map_err(|_| failed())?;
    let data_offset = usize::from(incoming[TCP_DATA_OFFSET_OFFSET] >> 4) * 4;
    let segment_len = usize::from(u16::from_be(total_len)).saturating_sub(IPV4_HEADER_LEN + data_offset)
        as u32
        + u32::from(flags & TCP_SYN != 0)
        + u32::from(flags & TCP_FIN != 0);

    let mut tcp = [0u8; TCP_HEADER_LEN];
    tcp[0..2].copy_from_slice(&incoming[2..4]);
    tcp[2..4].copy_from_slice(&incoming[0..2]);
    if flags & TCP_ACK != 0 {
        // seq = their ack
        tcp[TCP_SEQ_OFFSET..TCP_SEQ_OFFSET + 4]
            .copy_from_slice(&incoming[TCP_ACK_OFFSET..TCP_ACK_OFFSET + 4]);
        tcp[TCP_FLAGS_OFFSET] = TCP_RST;
    } else {
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&incoming[TCP_SEQ_OFFSET..TCP_SEQ_OFFSET + 4]);
        let ack = u32::from_be_bytes(seq).wrapping_add(segment_len);
        tcp[TCP_ACK_OFFSET..TCP_ACK_OFFSET + 4].copy_from_slice(&ack.to_be_bytes());
        tcp[TCP_FLAGS_OFFSET] = TCP_RST | TCP_ACK;
    }
    tcp[TCP_DATA_OFFSET_OFFSET] = (TCP_HEADER_LEN as u8 / 4) << 4;
    let ip = reply_ip_header(flow, PROTOCOL_TCP, (IPV4_HEADER_LEN + TCP_HEADER_LEN) as u16);
    let pseudo = pseudo_header_sum(&ip, TCP_HEADER_LEN as u16);
    let checksum = checksum(&tcp, pseudo);
    tcp[TCP_CHECKSUM_OFFSET..TCP_CHECKSUM_OFFSET + 2].copy_from_slice(&checksum.to_be_bytes());

    let new_len = (ETH_HEADER_LEN + IPV4_HEADER_LEN + TCP_HEADER_LEN) as u32;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(failed());
    }
    ctx.store(ETH_HEADER_LEN, &ip, 0).map_err(|_| failed())?;
    ctx.store(ETH_HEADER_LEN + IPV4_HEADER_LEN, &tcp, 0).map_err(|_| failed())?;
    Ok(())
}

/// RFC 792: destination unreachable, port unreachable, quoting the datagram's IP header and
/// its first 8 bytes.
#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext, flow: &Ipv4Flow) -> Result<(), Verdict> {
    let failed = || Verdict::drop(counters::DROP_REJECT_FAILED);
    let quote: [u8; ICMP_QUOTE_LEN] = ctx.load(flow.l3_offset).map_err(|_| failed())?;
    let mut icmp = [0u8; ICMP_HEADER_LEN];
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = ICMP_PORT_UNREACHABLE;
    let checksum = checksum(&quote, sum_words(&icmp, 0));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let ip =
        reply_ip_header(flow, PROTOCOL_ICMP, (IPV4_HEADER_LEN + ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u16);

    // Room for the new IP and ICMP headers in front of the quoted datagram, then cut after
    // the quote.
    let room = (IPV4_HEADER_LEN + ICMP_HEADER_LEN) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).map_err(|_| failed())?;
    let new_len = (ETH_HEADER_LEN + IPV4_HEADER_LEN + ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u32;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(failed());
    }
    ctx.store(ETH_HEADER_LEN, &ip, 0).map_err(|_| failed())?;
    ctx.store(ETH_HEADER_LEN + IPV4_HEADER_LEN, &icmp, 0).map_err(|_| failed())?;
    Ok(())
}

/// The TCP/UDP pseudo-header's contribution: addresses, protocol and L4 length.
#[inline(always)]
fn pseudo_header_sum(ip: &[u8; IPV4_HEADER_LEN], l4_len: u16) -> u32 {
    let mut addresses = [0u8; 8];
    addresses.copy_from_slice(&ip[12..20]);
    sum_words(&addresses, u32::from(ip[9]) + u32::from(l4_len))
}
