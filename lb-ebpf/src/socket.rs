//! Socket-level load balancing for the node's own traffic (host processes, hostNetwork pods).
//! Their packets to a frontend never arrive on an interface lb sits on, so the frontend is
//! swapped for a backend where the socket names it: at connect() and at each UDP sendmsg().
//! getpeername() and recvmsg() then report the frontend again, so the application only ever
//! sees the address it asked for. Only sockets in lb's own network namespace are touched: a
//! pod's traffic is translated on its interface.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{In6, SocketFrontend, SocketFrontend6, SocketKey, SocketKey6, counters};

use crate::{
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
    to_backend(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx)
}

#[inline(always)]
fn in_node_namespace(ctx: &SockAddrContext) -> bool {
    let Some(config) = LB_CONFIG.get(0) else { return false };
    // SAFETY: helper call on the program's own context.
    config.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == config.netns_cookie
}

/// Replaces a frontend address the socket is about to use with one of its backends. A connect
/// is a new flow; so is a datagram of a socket not yet sending to that backend.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel passes a valid context for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Ok(protocol) = u8::try_from(addr.protocol) else { return ALLOW };
    let (frontend_address, frontend_port) = (addr.user_ip4, addr.user_port as u16);
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
    let hash = select::mix((cookie as u32) ^ ((cookie >> 32) as u32) ^ frontend_address);
    // Session affinity keys the node's sockets under client address 0: the node is one client.
    let Ok((_, backend)) = select::choose(&key, &service, hash, 0) else { return ALLOW };
    let socket = SocketKey { cookie, backend_address: backend.address, backend_port: backend.port, _pad: 0 };
    let frontend = SocketFrontend { address: frontend_address, port: frontend_port, _pad: 0 };
    // SAFETY: only whether an entry exists is read.
    if connect || unsafe { LB_SOCKETS.get(&socket) }.is_none() {
        count_new_flow(service.service_id);
    }
    if LB_SOCKETS.insert(&socket, &frontend, 0).is_err() {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
    addr.user_ip4 = backend.address;
    addr.user_port = u32::from(backend.port);
    count(counters::SOCKET_TRANSLATED);
    ALLOW
}

/// Reports the frontend in place of the backend a translated socket talks to.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let socket =
        SocketKey { cookie, backend_address: addr.user_ip4, backend_port: addr.user_port as u16, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { LB_SOCKETS.get(&socket) }.copied() {
        addr.user_ip4 = frontend.address;
        addr.user_port = u32::from(frontend.port);
    }
    ALLOW
}

/// The socket's IPv6 address field (`user_ip6`), read a 32-bit word at a time as the verifier
/// requires.
#[inline(always)]
fn user_ip6(words: &[u32; 4]) -> In6 {
    In6 { words: [words[0], words[1], words[2], words[3]] }
}

#[inline(always)]
fn set_user_ip6(words: &mut [u32; 4], address: &In6) {
    words[0] = address.words[0];
    words[1] = address.words[1];
    words[2] = address.words[2];
    words[3] = address.words[3];
}

/// `to_backend` for IPv6 sockets.
#[inline(always)]
fn to_backend6(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel passes a valid context for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Ok(protocol) = u8::try_from(addr.protocol) else { return ALLOW };
    let (frontend_address, frontend_port) = (user_ip6(&addr.user_ip6), addr.user_port as u16);
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
    let folded = frontend_address.words[0]
        ^ frontend_address.words[1]
        ^ frontend_address.words[2]
        ^ frontend_address.words[3];
    let hash = select::mix((cookie as u32) ^ ((cookie >> 32) as u32) ^ folded);
    let Ok((_, backend)) = select::choose(&key, &service, hash, In6::default()) else { return ALLOW };
    let socket = SocketKey6 {
        cookie,
        backend_address: backend.address,
        backend_port: backend.port,
        _pad: 0,
        _pad2: 0,
    };
    let frontend = SocketFrontend6 { address: frontend_address, port: frontend_port, _pad: 0 };
    // SAFETY: only whether an entry exists is read.
    if connect || unsafe { LB_SOCKETS6.get(&socket) }.is_none() {
        count_new_flow(service.service_id);
    }
    if LB_SOCKETS6.insert(&socket, &frontend, 0).is_err() {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
    set_user_ip6(&mut addr.user_ip6, &backend.address);
    addr.user_port = u32::from(backend.port);
    count(counters::SOCKET_TRANSLATED);
    ALLOW
}

/// `to_frontend` for IPv6 sockets.
#[inline(always)]
fn to_frontend6(ctx: &SockAddrContext) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let socket = SocketKey6 {
        cookie,
        backend_address: user_ip6(&addr.user_ip6),
        backend_port: addr.user_port as u16,
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { LB_SOCKETS6.get(&socket) }.copied() {
        set_user_ip6(&mut addr.user_ip6, &frontend.address);
        addr.user_port = u32::from(frontend.port);
    }
    ALLOW
}
