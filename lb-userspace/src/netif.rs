//! Interface facts the agent needs: does it exist, which IPv4 addresses does it have.

use std::{ffi::CString, net::Ipv4Addr};

/// The interface's index, if it exists.
#[must_use]
pub fn index(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The IPv4 addresses configured on `iface`, in the kernel's order.
pub fn ipv4_addresses(iface: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, which stays valid until
        // freeifaddrs; `ifa_name` is a NUL-terminated string and `ifa_addr`, when not null,
        // points to a sockaddr whose family says which sockaddr it is.
        unsafe {
            let entry = &*cursor;
            let name = std::ffi::CStr::from_ptr(entry.ifa_name);
            if name.to_bytes() == iface.as_bytes()
                && !entry.ifa_addr.is_null()
                && i32::from((*entry.ifa_addr).sa_family) == libc::AF_INET
            {
                let sin = entry.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cursor = entry.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// This host's name, the default node name.
#[must_use]
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether the kernel forwards IPv4 in this network namespace: translated packets are routed by
/// the kernel, so without forwarding they are dropped.
#[must_use]
pub fn ipv4_forwarding_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

/// Lets `iface` accept packets whose source is one of this node's addresses
/// (`net.ipv4.conf.IFACE.accept_local=1`).
///
/// The reply of a flow to a remote endpoint, translated with SNAT, leaves XDP with the frontend as its source;
/// for a nodePort that is this node's own address, and the stack drops such an arriving packet
/// as a martian unless the interface accepts local sources.
pub fn accept_local_sources(iface: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    // In an unprivileged container /proc/sys is read-only: the DaemonSet's privileged init
    // container sets it, and a write that changes nothing is not needed.
    if std::fs::read_to_string(&path)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1")
}
