//! Internet checksum arithmetic where the kernel's skb csum helpers do not serve: incremental
//! updates (RFC 1624) in the XDP program, which has no skb, and whole checksums of the replies
//! `reject` builds. Incremental updates take values as read from the packet: one's complement
//! sums do not depend on byte order as long as every operand uses the same one.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit word of the data it covers changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!from) + u32::from(to))
}

/// The checksum after a 32-bit field it covers changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(from as u16))
        + u32::from(!((from >> 16) as u16))
        + u32::from(to as u16)
        + u32::from((to >> 16) as u16);
    !fold(sum)
}

/// One's-complement sum of big-endian 16-bit words (an even number of bytes), not folded.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The checksum of `bytes` on top of a partial sum (a pseudo-header's, say), host order.
#[inline(always)]
pub fn checksum<const N: usize>(bytes: &[u8; N], partial: u32) -> u16 {
    !fold(sum_words(bytes, partial))
}
