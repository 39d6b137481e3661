//! The open-file limit. Every metrics connection costs two descriptors (tiny_http clones
//! each socket), and the default soft limit (often 1024) is far below the hard one: as Go's
//! runtime does, a worker raises its soft limit to the hard limit at start, so running
//! out of descriptors takes the hard limit's worth of connections, not a few hundred.

/// Raises the soft RLIMIT_NOFILE to the hard limit (unix; a no-op elsewhere). A failure
/// is logged and changes nothing.
#[cfg(unix)]
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        log::debug!("open-file limit: getrlimit failed: {}", std::io::Error::last_os_error());
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        log::debug!("open-file limit: {} (already the hard limit)", lim.rlim_cur);
        return;
    }
    // macOS refuses a soft limit above OPEN_MAX even when the hard limit is unlimited.
    let want = if cfg!(target_os = "macos") { lim.rlim_max.min(10240) } else { lim.rlim_max };
    let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads one rlimit from a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        log::debug!("open-file limit raised from {} to {want}", lim.rlim_cur);
    } else {
        log::debug!("open-file limit: cannot raise {} to {want}: {}", lim.rlim_cur, std::io::Error::last_os_error());
    }
}

#[cfg(not(unix))]
pub fn raise_open_files_limit() {}

/// The soft RLIMIT_NOFILE (unix; None elsewhere, or when it cannot be read or is unlimited).
#[cfg(unix)]
pub fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // rlim_t is 32 bits on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
pub fn open_files_limit() -> Option<u64> {
    None
}

#[cfg(all(test, unix))]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        super::raise_open_files_limit();
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert!(cfg!(target_os = "macos") || lim.rlim_cur == lim.rlim_max, "{} < {}", lim.rlim_cur, lim.rlim_max);
    }
}
