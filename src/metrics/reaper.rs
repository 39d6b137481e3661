//! Closing metrics connections from outside tiny_http (Linux). tiny_http 0.12 never lets
//! its user close a connection nor bounds how many it keeps, so this thread finds the
//! endpoint's connections among the process's descriptors (/proc/self/fd: sockets whose
//! local port is the endpoint's and that have a peer) and shuts down:
//!
//! - the connections the endpoint dropped (a client that does not read its answers);
//! - connections older than [`MAX_AGE`] (slow clients that send a byte now and then,
//!   which the idle timeout never catches);
//! - the oldest connections beyond [`MAX_CONNECTIONS`].
//!
//! Each descriptor is examined and shut down through a duplicate of it, so a descriptor
//! closed and reused meanwhile is never touched: the duplicate pins the socket it named.
//! Shutting a socket down both ways makes tiny_http's reads end, and makes the kernel reset
//! the connection when more data comes, discarding what the client still had to send.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::io::RawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Connections kept at most; the oldest beyond are closed.
pub const MAX_CONNECTIONS: usize = 512;
/// Age after which a connection is closed, busy or not.
pub const MAX_AGE: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_secs(1);

/// Runs forever: a scan every second, or at once when a dropped connection is sent.
pub fn run(local: SocketAddr, dropped: mpsc::Receiver<SocketAddr>) {
    let mut first_seen: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut to_cut: HashSet<SocketAddr> = HashSet::new();
    loop {
        match dropped.recv_timeout(EVERY) {
            Ok(peer) => {
                to_cut.insert(peer);
                to_cut.extend(dropped.try_iter());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let peers = connections(local, |_, _| {});
        first_seen.retain(|p, _| peers.contains(p));
        for p in &peers {
            first_seen.entry(*p).or_insert(now);
        }
        let mut by_age: Vec<(Instant, SocketAddr)> = first_seen.iter().map(|(p, t)| (*t, *p)).collect();
        by_age.sort();
        let over = by_age.len().saturating_sub(MAX_CONNECTIONS);
        for (i, (seen, p)) in by_age.iter().enumerate() {
            if i < over || now.duration_since(*seen) >= MAX_AGE {
                to_cut.insert(*p);
            }
        }
        to_cut.retain(|p| peers.contains(p));
        if to_cut.is_empty() {
            continue;
        }
        connections(local, |fd, peer| {
            if to_cut.contains(&peer) {
                // SAFETY: `fd` is our own duplicate, open for the length of this call.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        });
        log::debug!(
            "metrics endpoint: closed {} of {} connections (dropped, older than {MAX_AGE:?}, or over {MAX_CONNECTIONS})",
            to_cut.len(),
            peers.len()
        );
        to_cut.clear();
    }
}

/// The peers of the endpoint's connections, calling `each(duplicate_fd, peer)` for every
/// descriptor found (a connection has two: tiny_http clones each socket).
fn connections(local: SocketAddr, mut each: impl FnMut(RawFd, SocketAddr)) -> HashSet<SocketAddr> {
    let mut peers = HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return peers };
    let fds: Vec<RawFd> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds {
        let is_socket = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC on any number either fails or gives a descriptor we own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        let mine = sock_addr(dup, false).filter(|a| same_endpoint(*a, local));
        if let Some(peer) = mine.and_then(|_| sock_addr(dup, true)) {
            peers.insert(peer);
            each(dup, peer);
        }
        // SAFETY: closing the duplicate we made.
        unsafe { libc::close(dup) };
    }
    peers
}

/// Whether a socket's local address is the endpoint's (any address for a wildcard bind).
fn same_endpoint(a: SocketAddr, local: SocketAddr) -> bool {
    a.port() == local.port() && (local.ip().is_unspecified() || a.ip() == local.ip())
}

/// The local (or, with `peer`, remote) address of an IP socket.
fn sock_addr(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid; the call writes at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: `ptr` and `len` describe `ss`, which we own.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says `ss` holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { *(&ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says `ss` holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { *(&ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_accepted_connections_and_shuts_them_down() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(local).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let found = connections(local, |_, _| {});
        assert!(found.contains(&peer), "{found:?}");
        assert_eq!(found.len(), 1, "the listener and the client's own socket are not connections: {found:?}");
        connections(local, |fd, p| {
            if p == peer {
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        });
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(client.read(&mut [0u8; 8]).unwrap(), 0, "the client sees the connection closed");
        drop(server_side);
    }
}
