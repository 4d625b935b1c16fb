//! Incremental Internet checksum updates (RFC 1624) for the XDP program, which has no skb and
//! so no kernel csum helpers. Values are taken as read from the packet: one's complement sums
//! do not depend on byte order as long as every operand uses the same one.

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
