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

/// Whether `ifindex` takes frames redirected from XDP (`ndo_xdp_xmit`), as the kernel's
/// `netdev` generic netlink family reports it (`xdp-features` has `ndo-xmit`). A veth only does
/// while its peer has an XDP program or GRO on; a frame redirected to a device that does not is
/// dropped without a trace, so XDP only sends to interfaces that say yes.
pub fn takes_xdp_frames(ifindex: u32) -> std::io::Result<bool> {
    let socket = GenlSocket::open()?;
    let family = socket.family_id(b"netdev\0")?;
    let reply = socket.request(
        family,
        NETDEV_CMD_DEV_GET,
        &attr(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes()),
    )?;
    let features = find_attr(&reply, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| v.get(..8))
        .and_then(|v| v.try_into().ok())
        .map_or(0, u64::from_ne_bytes);
    Ok(features & NETDEV_XDP_ACT_NDO_XMIT != 0)
}

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const GENL_HDRLEN: usize = 4;

/// One netlink attribute: length, type, value, padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The value of the first attribute of `kind` in a run of attributes.
fn find_attr(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let this = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if this == kind {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

/// A generic netlink socket for one request and its reply at a time.
struct GenlSocket(std::os::fd::OwnedFd);

impl GenlSocket {
    fn open() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor socket(2) just returned, owned by nobody else.
        Ok(GenlSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn family_id(&self, name: &[u8]) -> std::io::Result<u16> {
        let reply = self.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            &attr(CTRL_ATTR_FAMILY_NAME, name),
        )?;
        find_attr(&reply, CTRL_ATTR_FAMILY_ID)
            .and_then(|v| v.get(..2))
            .map(|v| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| std::io::Error::other("generic netlink: no family id in the reply"))
    }

    /// Sends one request; returns the attributes of its reply, or the error the kernel sent.
    fn request(&self, family: u16, command: u8, attrs: &[u8]) -> std::io::Result<Vec<u8>> {
        use std::os::fd::AsRawFd as _;
        let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
        message.extend_from_slice(&family.to_ne_bytes());
        // NLM_F_REQUEST (no ACK: the socket serves the next request); sequence 1; port 0.
        message.extend_from_slice(&0x1_u16.to_ne_bytes());
        message.extend_from_slice(&1_u32.to_ne_bytes());
        message.extend_from_slice(&0_u32.to_ne_bytes());
        message.extend_from_slice(&[command, 1, 0, 0]);
        message.extend_from_slice(attrs);
        let fd = self.0.as_raw_fd();
        // SAFETY: `message` is valid for its length for the whole call.
        if unsafe { libc::send(fd, message.as_ptr().cast(), message.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buffer = vec![0_u8; 16 * 1024];
        // The reply, or an NLMSG_ERROR in its place.
        // SAFETY: `buffer` is valid for writes of its length for the whole call.
        let got = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        let got = usize::try_from(got).map_err(|_| std::io::Error::last_os_error())?;
        let message = buffer.get(..got).unwrap_or_default();
        let header_len = message
            .get(..4)
            .map_or(0, |v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) as usize);
        let kind = message
            .get(4..6)
            .map_or(0, |v| u16::from_ne_bytes([v[0], v[1]]));
        if kind == NLMSG_ERROR {
            let errno = message
                .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                .map_or(0, |v| i32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
            return Err(std::io::Error::from_raw_os_error(-errno));
        }
        message
            .get(NLMSG_HDRLEN + GENL_HDRLEN..header_len.min(got))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("generic netlink: short reply"))
    }
}
