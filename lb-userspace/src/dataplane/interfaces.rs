//! Which interfaces lb translates traffic on: names and glob patterns (`veth*,cali*,eth0`),
//! re-evaluated whenever the kernel reports a link change, so pod interfaces that appear later
//! are attached and ones that go are forgotten.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::io::unix::AsyncFd;

/// rtnetlink multicast group of link (interface) changes.
const RTMGRP_LINK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum InterfacesError {
    #[error("interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("listing interfaces: {0}")]
    List(#[source] nix::Error),
    #[error("subscribing to link changes (netlink): {0}")]
    Netlink(#[source] std::io::Error),
}

/// The `--interfaces` list: literal names and glob patterns.
#[derive(Debug, Clone)]
pub struct InterfaceSelector {
    literals: Vec<String>,
    patterns: Vec<glob::Pattern>,
}

impl InterfaceSelector {
    pub fn parse(items: &[String]) -> Result<Self, InterfacesError> {
        let mut selector = Self { literals: Vec::new(), patterns: Vec::new() };
        for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
            if item.contains(['*', '?', '[']) {
                let pattern = glob::Pattern::new(item)
                    .map_err(|source| InterfacesError::Pattern { pattern: item.to_string(), source })?;
                selector.patterns.push(pattern);
            } else {
                selector.literals.push(item.to_string());
            }
        }
        Ok(selector)
    }

    /// Names given literally: these must exist when lb starts.
    pub fn literals(&self) -> &[String] {
        &self.literals
    }

    pub fn matches(&self, name: &str) -> bool {
        self.literals.iter().any(|l| l == name) || self.patterns.iter().any(|p| p.matches(name))
    }

    /// The interfaces that exist now and are selected, with their indexes.
    pub fn selected(&self) -> Result<BTreeMap<String, u32>, InterfacesError> {
        let interfaces = nix::net::if_::if_nameindex().map_err(InterfacesError::List)?;
        Ok(interfaces
            .iter()
            .filter_map(|i| Some((i.name().to_str().ok()?.to_string(), i.index())))
            .filter(|(name, _)| self.matches(name))
            .collect())
    }
}

/// Link change notifications from the kernel (rtnetlink, link group).
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self, InterfacesError> {
        let netlink = |e: nix::Error| InterfacesError::Netlink(e.into());
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(netlink)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)).map_err(netlink)?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open while registered.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(|e| InterfacesError::Netlink(e.into()))?;
        Ok(Self { socket })
    }

    /// Waits for at least one link change and drains what else is queued; the caller re-reads
    /// the interface list rather than decoding messages.
    pub async fn changed(&mut self) -> Result<(), InterfacesError> {
        let mut buffer = [0u8; 8192];
        let mut guard = self.socket.readable().await.map_err(InterfacesError::Netlink)?;
        loop {
            match recv(guard.get_inner().as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                Ok(_) => continue,
                // ENOBUFS: we missed messages; a re-read of the list covers them.
                Err(nix::Error::EAGAIN) => {
                    guard.clear_ready();
                    return Ok(());
                }
                Err(nix::Error::ENOBUFS) => continue,
                Err(e) => return Err(InterfacesError::Netlink(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_globs() {
        let selector = InterfaceSelector::parse(&["eth0".into(), "veth*".into(), " cali? ".into()]).unwrap();
        assert_eq!(selector.literals(), ["eth0"]);
        for (name, want) in
            [("eth0", true), ("eth1", false), ("veth1a2b", true), ("cali1", true), ("cali12", false)]
        {
            assert_eq!(selector.matches(name), want, "{name}");
        }
        assert!(InterfaceSelector::parse(&["veth[".into()]).is_err());
    }
}
