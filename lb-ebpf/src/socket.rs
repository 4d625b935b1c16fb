//! Socket-level load balancing for the node's own traffic (host processes, hostNetwork pods).
//! Their packets to a frontend never arrive on an interface lb sits on, so the frontend is
//! swapped for a backend where the socket names it: at connect() and at each UDP sendmsg().
//! getpeername() and recvmsg() then report the frontend again, so the application only ever
//! sees the address it asked for. Only sockets in lb's own network namespace are touched: a
//! pod's traffic is translated on its interface.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    maps::LruHashMap,
    programs::SockAddrContext,
};
use lb_common::{In6, SocketFrontend, SocketFrontend6, SocketKey, SocketKey6, counters};

use crate::{
    family::Family,
    flow::{self, Source},
    maps::{LB_CONFIG, LB_SOCKETS, LB_SOCKETS6, count, count_new_flow},
    select,
};

/// What a cgroup/sock_addr program returns: go on, or fail the call (with the error set by
/// `bpf_set_retval`, else EPERM).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// What a client of a Service without endpoints gets from kube-proxy's REJECT.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend::<u32>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend::<u32>(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend::<u32>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend::<u32>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend::<In6>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend::<In6>(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend::<In6>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend::<In6>(&ctx)
}

#[inline(always)]
fn in_node_namespace(ctx: &SockAddrContext) -> bool {
    let Some(config) = LB_CONFIG.get(0) else { return false };
    // SAFETY: helper call on the program's own context.
    config.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == config.netns_cookie
}

/// What the socket programs need of an address family: where the socket's address sits in
/// the context, and the family's socket map with its key and value.
trait SocketFamily: Family {
    type Key;
    type Frontend: Copy;

    fn sockets() -> &'static LruHashMap<Self::Key, Self::Frontend>;
    fn user_address(addr: &bpf_sock_addr) -> Self;
    fn set_user_address(addr: &mut bpf_sock_addr, address: &Self);
    /// The address folded to 32 bits, for the socket's hash.
    fn folded(&self) -> u32;
    fn key(cookie: u64, backend_address: Self, backend_port: u16) -> Self::Key;
    fn frontend(address: Self, port: u16) -> Self::Frontend;
    fn frontend_address(frontend: &Self::Frontend) -> (Self, u16);
}

impl SocketFamily for u32 {
    type Key = SocketKey;
    type Frontend = SocketFrontend;

    #[inline(always)]
    fn sockets() -> &'static LruHashMap<SocketKey, SocketFrontend> {
        &LB_SOCKETS
    }

    #[inline(always)]
    fn user_address(addr: &bpf_sock_addr) -> Self {
        addr.user_ip4
    }

    #[inline(always)]
    fn set_user_address(addr: &mut bpf_sock_addr, address: &Self) {
        addr.user_ip4 = *address;
    }

    #[inline(always)]
    fn folded(&self) -> u32 {
        *self
    }

    #[inline(always)]
    fn key(cookie: u64, backend_address: Self, backend_port: u16) -> SocketKey {
        SocketKey { cookie, backend_address, backend_port, _pad: 0 }
    }

    #[inline(always)]
    fn frontend(address: Self, port: u16) -> SocketFrontend {
        SocketFrontend { address, port, _pad: 0 }
    }

    #[inline(always)]
    fn frontend_address(frontend: &SocketFrontend) -> (Self, u16) {
        (frontend.address, frontend.port)
    }
}

impl SocketFamily for In6 {
    type Key = SocketKey6;
    type Frontend = SocketFrontend6;

    #[inline(always)]
    fn sockets() -> &'static LruHashMap<SocketKey6, SocketFrontend6> {
        &LB_SOCKETS6
    }

    /// Read a 32-bit word at a time, as the verifier requires of `user_ip6`.
    #[inline(always)]
    fn user_address(addr: &bpf_sock_addr) -> Self {
        let words = &addr.user_ip6;
        In6 { words: [words[0], words[1], words[2], words[3]] }
    }

    #[inline(always)]
    fn set_user_address(addr: &mut bpf_sock_addr, address: &Self) {
        let words = &mut addr.user_ip6;
        words[0] = address.words[0];
        words[1] = address.words[1];
        words[2] = address.words[2];
        words[3] = address.words[3];
    }

    #[inline(always)]
    fn folded(&self) -> u32 {
        self.words[0] ^ self.words[1] ^ self.words[2] ^ self.words[3]
    }

    #[inline(always)]
    fn key(cookie: u64, backend_address: Self, backend_port: u16) -> SocketKey6 {
        SocketKey6 { cookie, backend_address, backend_port, _pad: 0, _pad2: 0 }
    }

    #[inline(always)]
    fn frontend(address: Self, port: u16) -> SocketFrontend6 {
        SocketFrontend6 { address, port, _pad: 0 }
    }

    #[inline(always)]
    fn frontend_address(frontend: &SocketFrontend6) -> (Self, u16) {
        (frontend.address, frontend.port)
    }
}

/// Replaces a frontend address the socket is about to use with one of its backends. A connect
/// is a new flow; so is a datagram of a socket not yet sending to that backend.
#[inline(always)]
fn to_backend<A: SocketFamily>(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel passes a valid context for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Ok(protocol) = u8::try_from(addr.protocol) else { return ALLOW };
    let (frontend_address, frontend_port) = (A::user_address(addr), addr.user_port as u16);
    // The node is inside the cluster: a Local-policy frontend gives it every endpoint.
    let Some((key, service)) = flow::frontend(frontend_address, frontend_port, protocol, Source::InCluster)
    else {
        return ALLOW;
    };
    if service.backend_count == 0 {
        count(counters::SOCKET_REFUSED);
        // SAFETY: plain helper call; it sets the error the refused call returns.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let hash = select::mix((cookie as u32) ^ ((cookie >> 32) as u32) ^ frontend_address.folded());
    // Session affinity keys the node's sockets under client address 0: the node is one client.
    let Ok((_, backend)) = select::choose(&key, &service, hash, A::default()) else { return ALLOW };
    let socket = A::key(cookie, backend.address, backend.port);
    let frontend = A::frontend(frontend_address, frontend_port);
    // SAFETY: only whether an entry exists is read.
    if connect || unsafe { A::sockets().get(&socket) }.is_none() {
        count_new_flow(service.service_id);
    }
    if A::sockets().insert(&socket, &frontend, 0).is_err() {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
    A::set_user_address(addr, &backend.address);
    addr.user_port = u32::from(backend.port);
    count(counters::SOCKET_TRANSLATED);
    ALLOW
}

/// Reports the frontend in place of the backend a translated socket talks to.
#[inline(always)]
fn to_frontend<A: SocketFamily>(ctx: &SockAddrContext) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let socket = A::key(cookie, A::user_address(addr), addr.user_port as u16);
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { A::sockets().get(&socket) }.copied() {
        let (address, port) = A::frontend_address(&frontend);
        A::set_user_address(addr, &address);
        addr.user_port = u32::from(port);
    }
    ALLOW
}
