//! SCTP associations over raw sockets, for kernels built without SCTP (the test machines'
//! are): a client that runs the four-way handshake (INIT, INIT ACK, COOKIE ECHO, COOKIE ACK,
//! RFC 9260 section 5.1) and a pod-side responder that answers it with its name as the state
//! cookie. Both check every CRC32c they receive, so a translation that broke one shows up as a
//! packet nobody answers.
//!
//! Raw IPv4 sockets receive the IP header with the SCTP packet, raw IPv6 ones the SCTP packet
//! alone; both are sent without a header, which the kernel adds.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

use crate::packet::{SCTP, sctp_checksum, sctp_checksum_valid};

const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const ABORT: u8 = 6;
const COOKIE_ECHO: u8 = 10;
const COOKIE_ACK: u8 = 11;
/// The INIT ACK parameter carrying the state cookie.
const STATE_COOKIE: u16 = 7;

/// A raw SCTP socket of `family`'s, in the calling thread's network namespace.
pub fn raw_socket(ipv6: bool) -> Result<Socket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(SCTP))))
        .context("opening a raw SCTP socket")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(socket)
}

/// One SCTP packet: its ports, verification tag and chunks (type, flags, value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SctpPacket {
    pub src_port: u16,
    pub dst_port: u16,
    pub tag: u32,
    pub chunks: Vec<(u8, Vec<u8>)>,
}

impl SctpPacket {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.src_port.to_be_bytes());
        bytes.extend_from_slice(&self.dst_port.to_be_bytes());
        bytes.extend_from_slice(&self.tag.to_be_bytes());
        bytes.extend_from_slice(&[0; 4]);
        for (kind, value) in &self.chunks {
            bytes.extend_from_slice(&[*kind, 0]);
            bytes.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
            bytes.extend_from_slice(value);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        let crc = sctp_checksum(&bytes);
        bytes[8..12].copy_from_slice(&crc);
        bytes
    }

    /// Decodes an SCTP packet whose CRC32c is valid.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        ensure!(sctp_checksum_valid(bytes), "an SCTP packet with a bad CRC32c: {bytes:02x?}");
        let word = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let mut chunks = Vec::new();
        let mut at = 12;
        while at + 4 <= bytes.len() {
            let length = usize::from(word(at + 2));
            ensure!(length >= 4 && at + length <= bytes.len(), "a chunk runs past the packet");
            chunks.push((bytes[at], bytes[at + 4..at + length].to_vec()));
            at += length.next_multiple_of(4);
        }
        Ok(Self {
            src_port: word(0),
            dst_port: word(2),
            tag: u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")),
            chunks,
        })
    }
}

/// INIT's and INIT ACK's fixed fields: initiate tag, receiver window, streams, initial TSN.
fn init_fields(tag: u32) -> Vec<u8> {
    let mut value = tag.to_be_bytes().to_vec();
    value.extend_from_slice(&65535u32.to_be_bytes());
    value.extend_from_slice(&[0, 10, 0, 10]);
    value.extend_from_slice(&tag.to_be_bytes());
    value
}

/// Receives the next SCTP packet on `socket` before `deadline`, with the address it came from.
fn receive(socket: &Socket, deadline: Instant) -> Result<(SctpPacket, IpAddr)> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    while Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
        // SAFETY: recv_from initialised the first `len` bytes.
        let bytes: Vec<u8> = buf[..len].iter().map(|b| unsafe { b.assume_init() }).collect();
        let from = from.as_socket().context("a raw socket's peer is an IP address")?.ip();
        // IPv4 raw sockets see the IP header too.
        let sctp = if from.is_ipv4() { &bytes[usize::from(bytes[0] & 0x0f) * 4..] } else { &bytes[..] };
        return Ok((SctpPacket::decode(sctp)?, from));
    }
    bail!("no SCTP packet within the time allowed")
}

fn send(socket: &Socket, packet: &SctpPacket, to: IpAddr) -> Result<()> {
    // A raw socket's "port" is its protocol, or 0.
    socket.send_to(&packet.encode(), &SocketAddr::new(to, 0).into()).context("sending an SCTP packet")?;
    Ok(())
}

/// What an association through `target` found: the responder's name (its state cookie) and
/// the address every answer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    pub pod: String,
    pub peer: SocketAddr,
}

/// Runs SCTP's four-way handshake from `local_port` to `target` on a raw socket of the calling
/// thread's namespace. The COOKIE ACK comes only from the responder whose cookie this is, so a
/// completed handshake shows that every packet of the flow reached the same backend.
pub fn associate(target: SocketAddr, local_port: u16, tag: u32) -> Result<Association> {
    let socket = raw_socket(target.is_ipv6())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let to_target = |tag: u32, chunk: (u8, Vec<u8>)| SctpPacket {
        src_port: local_port,
        dst_port: target.port(),
        tag,
        chunks: vec![chunk],
    };
    // Ours only: other answers (to another association's port) are not for this one.
    let answer = |kind: u8| -> Result<(SctpPacket, IpAddr)> {
        loop {
            let (packet, from) = receive(&socket, deadline)?;
            if packet.dst_port != local_port {
                continue;
            }
            ensure!(
                packet.chunks.first().is_some_and(|c| c.0 == kind),
                "expected chunk {kind}, got {packet:?}"
            );
            ensure!(packet.tag == tag, "{packet:?} does not carry our tag {tag:#x}");
            return Ok((packet, from));
        }
    };
    send(&socket, &to_target(0, (INIT, init_fields(tag))), target.ip())?;
    let (init_ack, from) = answer(INIT_ACK).context("no INIT ACK")?;
    let peer = SocketAddr::new(from, init_ack.src_port);
    let value = &init_ack.chunks[0].1;
    let their_tag = u32::from_be_bytes(value[0..4].try_into()?);
    let params = &value[16..];
    ensure!(u16::from_be_bytes([params[0], params[1]]) == STATE_COOKIE, "no state cookie: {init_ack:?}");
    let cookie = params[4..usize::from(u16::from_be_bytes([params[2], params[3]]))].to_vec();
    send(&socket, &to_target(their_tag, (COOKIE_ECHO, cookie.clone())), target.ip())?;
    let (cookie_ack, from) = answer(COOKIE_ACK).context("no COOKIE ACK")?;
    ensure!(SocketAddr::new(from, cookie_ack.src_port) == peer, "the COOKIE ACK came from elsewhere");
    // The cookie: our tag, then the responder's name.
    Ok(Association { pod: String::from_utf8(cookie[4..].to_vec())?, peer })
}

/// Answers SCTP handshakes to `port` on `socket` until `stop`, with a state cookie of the
/// client's tag and `name`; a COOKIE ECHO with another responder's cookie gets an ABORT.
pub fn respond(socket: Socket, port: u16, name: String, stop: Arc<AtomicBool>) {
    const OUR_TAG: u32 = 0x5eed_0001;
    while !stop.load(Ordering::Relaxed) {
        let Ok((packet, from)) = receive(&socket, Instant::now() + Duration::from_millis(100)) else {
            continue;
        };
        let Some((kind, value)) = packet.chunks.first() else { continue };
        if packet.dst_port != port {
            continue;
        }
        let reply = |chunk: (u8, Vec<u8>), tag: u32| SctpPacket {
            src_port: port,
            dst_port: packet.src_port,
            tag,
            chunks: vec![chunk],
        };
        let answer = match *kind {
            INIT if value.len() >= 16 => {
                // Stateless, as SCTP servers are until COOKIE ECHO: the cookie holds the
                // client's tag and this responder's name.
                let their_tag = &value[0..4];
                let mut init_ack = init_fields(OUR_TAG);
                init_ack.extend_from_slice(&STATE_COOKIE.to_be_bytes());
                init_ack.extend_from_slice(&((8 + name.len()) as u16).to_be_bytes());
                init_ack.extend_from_slice(their_tag);
                init_ack.extend_from_slice(name.as_bytes());
                reply((INIT_ACK, init_ack), u32::from_be_bytes(their_tag.try_into().expect("4 bytes")))
            }
            COOKIE_ECHO if packet.tag == OUR_TAG && value.len() >= 4 => {
                let their_tag = u32::from_be_bytes(value[0..4].try_into().expect("4 bytes"));
                let kind = if &value[4..] == name.as_bytes() { COOKIE_ACK } else { ABORT };
                reply((kind, Vec::new()), their_tag)
            }
            _ => continue,
        };
        let _ = send(&socket, &answer, from);
    }
}
