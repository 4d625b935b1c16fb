//! Internet checksum arithmetic done in the program rather than by the kernel's skb csum
//! helpers: incremental updates (RFC 1624) of the IPv4 header checksum and in the XDP program
//! (which has no skb), the combined differences handed to `l4_csum_replace`, and whole checksums
//! of the replies `reject` builds. Values are taken as read from the packet: one's complement
//! sums do not depend on byte order as long as every operand uses the same one.

/// One's complement addition of 32-bit words (end-around carry).
#[inline(always)]
pub fn add32(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum difference of a 32-bit field changing from `from` to `to`.
#[inline(always)]
pub fn diff4(from: u32, to: u32) -> u32 {
    add32(!from, to)
}

/// The checksum difference of a 16-bit field changing from `from` to `to`.
#[inline(always)]
pub fn diff2(from: u16, to: u16) -> u32 {
    add32(u32::from(!from), u32::from(to))
}

/// A checksum after the data it covers changed by `diff` (a sum of `diff4`/`diff2`).
#[inline(always)]
pub fn apply_diff(check: u16, diff: u32) -> u16 {
    !fold(add32(diff, u32::from(!check)))
}

/// The checksum after a 16-bit word of the data it covers changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    apply_diff(check, diff2(from, to))
}

/// The checksum after a 32-bit field it covers changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    apply_diff(check, diff4(from, to))
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
