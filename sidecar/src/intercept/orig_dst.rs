//! Where a redirected connection was going: the kernel keeps the address the
//! agent dialled in the connection's conntrack entry, and hands it back
//! through `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
//!
//! A connection that has no original destination did not come through the
//! redirect (it dialled the listener directly, or there is no conntrack entry
//! at all), and one whose original destination is the listener itself would
//! make the sidecar dial itself: both are refused, never guessed at.

use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};

use super::InterceptError;

/// The address an agent dialled before its connection was redirected to the
/// sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OriginalDst(SocketAddr);

impl OriginalDst {
    pub fn addr(&self) -> SocketAddr {
        self.0
    }

    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

impl fmt::Display for OriginalDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Recovers the original destination of an accepted, redirected TCP
/// connection (a `std` or tokio `TcpStream`, or anything else holding the
/// socket).
///
/// The local address says which option to ask: an IPv4 connection (also one
/// shown as IPv4-mapped on a dual-stack socket) was redirected by iptables,
/// an IPv6 one by ip6tables.
pub fn original_dst(socket: &impl AsFd) -> Result<OriginalDst, InterceptError> {
    let local = local_addr(socket)?;
    let ipv4_mapped = match local {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
        SocketAddr::V4(_) => false,
    };
    let got = if local.is_ipv4() || ipv4_mapped {
        getsockopt(socket, sockopt::OriginalDst)
            .map(|raw| SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(raw))))
    } else {
        getsockopt(socket, sockopt::Ip6tOriginalDst)
            .map(|raw| SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(raw))))
    };
    let dst = got.map_err(|errno| InterceptError::NoOriginalDst {
        local,
        reason: errno.desc().to_string(),
    })?;
    check(dst, local)
}

/// The checks on what the kernel returned, apart from the syscall.
fn check(dst: SocketAddr, local: SocketAddr) -> Result<OriginalDst, InterceptError> {
    if dst.ip().is_unspecified() || dst.port() == 0 {
        return Err(InterceptError::NoOriginalDst {
            local,
            reason: format!("the kernel returned {dst}"),
        });
    }
    if same_endpoint(dst, local) {
        // Without a redirect, conntrack's original tuple is the connection
        // itself: the client dialled the listener directly.
        return Err(InterceptError::Loop { dst });
    }
    Ok(OriginalDst(dst))
}

/// Equal addresses, looking through the IPv4-mapped form and ignoring the
/// IPv6 scope and flow label the two sides may fill in differently.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |addr: SocketAddr| (addr.ip().to_canonical(), addr.port());
    canonical(a) == canonical(b)
}

fn local_addr(socket: &impl AsFd) -> Result<SocketAddr, InterceptError> {
    let raw = socket.as_fd().as_raw_fd();
    let storage: SockaddrStorage = getsockname(raw).map_err(|errno| InterceptError::Socket {
        what: "reading the local address of an accepted connection",
        reason: errno.desc().to_string(),
    })?;
    if let Some(v4) = storage.as_sockaddr_in() {
        return Ok(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = storage.as_sockaddr_in6() {
        return Ok(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    Err(InterceptError::Socket {
        what: "reading the local address of an accepted connection",
        reason: format!("not an IP socket (address family {:?})", storage.family()),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_redirected_destination_is_returned() {
        let local = addr("127.0.0.1:15001");
        for dst in [
            "93.184.216.34:443",
            "10.0.0.1:15001",
            "[2001:db8::1]:443",
            "[fe80::1]:80",
        ] {
            assert_eq!(check(addr(dst), local).unwrap().addr(), addr(dst));
        }
    }

    #[test]
    fn the_listener_itself_is_a_loop() {
        let cases = [
            ("127.0.0.1:15001", "127.0.0.1:15001"),
            ("[::1]:15001", "[::1]:15001"),
            ("127.0.0.1:15001", "[::ffff:127.0.0.1]:15001"),
        ];
        for (dst, local) in cases {
            assert!(
                matches!(
                    check(addr(dst), addr(local)),
                    Err(InterceptError::Loop { .. })
                ),
                "{dst} on {local}"
            );
        }
    }

    #[test]
    fn an_unspecified_destination_is_none() {
        let local = addr("127.0.0.1:15001");
        for dst in ["0.0.0.0:443", "10.0.0.1:0", "[::]:443"] {
            let err = check(addr(dst), local).unwrap_err();
            assert!(
                matches!(err, InterceptError::NoOriginalDst { .. }),
                "{dst}: {err}"
            );
        }
    }

    #[test]
    fn a_connection_that_was_not_redirected_is_refused() {
        // Loopback in this test's own namespace: never redirected, so either
        // conntrack has no entry (no original destination) or its original
        // tuple is the listener (a loop). Refused both ways.
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let Ok(listener) = TcpListener::bind((ip, 0)) else {
                continue; // no IPv6 on this machine
            };
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            let err = original_dst(&accepted).unwrap_err();
            assert!(
                matches!(
                    err,
                    InterceptError::NoOriginalDst { .. } | InterceptError::Loop { .. }
                ),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains(&listener.local_addr().unwrap().port().to_string())
            );
        }
    }
}
