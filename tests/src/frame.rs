//! Typed Ethernet frames for `BPF_PROG_TEST_RUN` tables, and the checks run on what comes out.
//!
//! Frames are described by their fields, never written as hex: [`Ipv4Frame`] builds
//! Ethernet (with optional VLAN tags) + IPv4 (with optional options and fragment bits) + TCP or
//! UDP with correct checksums; [`IcmpErrorFrame`] builds an ICMP error quoting such a packet;
//! [`arp_request`], [`ipv6_udp`] and [`icmp_echo_request`] build the traffic the data path must
//! leave alone. [`Ipv4L4::parse`] and [`IcmpQuote::parse`] read a frame back, and
//! [`verify_ipv4_checksum`], [`verify_l4_checksum`] and [`verify_quoted_ipv4_checksum`]
//! recompute the checksums from scratch (RFC 1071), so a wrong incremental update cannot hide
//! behind the same arithmetic that produced it.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use lb_common::checksum::{checksum_be, fold, l4_checksum_be, sum_be};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q VLAN tag (a customer tag, or the inner tag of Q-in-Q).
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (the outer tag of Q-in-Q).
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Bytes a VLAN tag adds to the Ethernet header: TPID and TCI.
pub const VLAN_HLEN: usize = 4;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = lb_common::IPPROTO_TCP;
pub const IPPROTO_UDP: u8 = lb_common::IPPROTO_UDP;
pub const IPV4_MIN_HDR_LEN: usize = 20;
pub const TCP_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;

/// Offsets of IPv4 header fields in a frame (the header starts right after Ethernet).
pub const IPV4_CHECK_OFFSET: usize = ETH_HLEN + 10;
pub const IPV4_SRC_OFFSET: usize = ETH_HLEN + 12;
pub const IPV4_DST_OFFSET: usize = ETH_HLEN + 16;

/// The MAC addresses the builders use unless told otherwise.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// IPv4 option bytes: Router Alert (RFC 2113), 4 bytes, so IHL becomes 6.
pub const IPV4_OPT_ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];
/// IPv4 option: No Operation (one byte).
pub const IPV4_OPT_NOP: u8 = 0x01;

/// TCP flags.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The transport of an [`Ipv4Frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            L4::Tcp => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        }
    }

    #[must_use]
    pub const fn header_len(self) -> usize {
        match self {
            L4::Tcp => TCP_HDR_LEN,
            L4::Udp => UDP_HDR_LEN,
        }
    }

    /// Offset of the checksum field from the start of the L4 header.
    #[must_use]
    pub const fn check_offset(self) -> usize {
        match self {
            L4::Tcp => 16,
            L4::Udp => 6,
        }
    }
}

/// The fragment bits of the IPv4 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    /// More Fragments.
    pub more: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub offset: u16,
}

/// One VLAN tag of an Ethernet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    /// [`ETH_P_8021Q`] or [`ETH_P_8021AD`].
    pub tpid: u16,
    /// The VLAN id (12 bits); priority and DEI are 0.
    pub vid: u16,
}

/// Ethernet + IPv4 + TCP or UDP, described by its fields.
///
/// [`Ipv4Frame::build`] computes the IPv4 total length and header checksum, the UDP length and
/// the L4 checksum over the pseudo-header; everything else is taken as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// VLAN tags, outermost first, between the MAC addresses and the IPv4 Ethernet type.
    pub vlan_tags: Vec<VlanTag>,
    pub l4: L4,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub ident: u16,
    pub dont_fragment: bool,
    pub fragment: Fragment,
    /// IPv4 options, padded with End of Options List (0) to a multiple of 4 bytes when built.
    pub options: Vec<u8>,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// `false`: a UDP checksum of 0 ("none", RFC 768). Ignored for TCP.
    pub udp_checksum: bool,
    pub payload: Vec<u8>,
    /// Zero bytes after the IPv4 packet, as Ethernet padding to the 60-byte minimum adds.
    pub trailer: usize,
}

impl Ipv4Frame {
    /// A TCP SYN from `src` to `dst`, no payload.
    #[must_use]
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Ipv4Frame {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            vlan_tags: Vec::new(),
            l4: L4::Tcp,
            src,
            dst,
            ttl: 64,
            ident: 0x1234,
            dont_fragment: true,
            fragment: Fragment::default(),
            options: Vec::new(),
            tcp_flags: TCP_SYN,
            seq: 0x0102_0304,
            ack: 0,
            udp_checksum: true,
            payload: Vec::new(),
            trailer: 0,
        }
    }

    /// A UDP datagram from `src` to `dst` with a checksum, no payload.
    #[must_use]
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Ipv4Frame {
            l4: L4::Udp,
            tcp_flags: 0,
            seq: 0,
            ..Ipv4Frame::tcp(src, dst)
        }
    }

    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    #[must_use]
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.src = src;
        self
    }

    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.dst = dst;
        self
    }

    /// IPv4 options; must fit the 40 bytes an IHL of 15 leaves.
    #[must_use]
    pub fn with_options(mut self, options: &[u8]) -> Self {
        assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
        self.options = options.to_vec();
        self
    }

    #[must_use]
    pub fn with_fragment(mut self, more: bool, offset: u16) -> Self {
        assert!(offset < 1 << 13, "the fragment offset has 13 bits");
        self.fragment = Fragment { more, offset };
        self
    }

    #[must_use]
    pub fn with_tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    #[must_use]
    pub fn without_udp_checksum(mut self) -> Self {
        self.udp_checksum = false;
        self
    }

    #[must_use]
    pub fn with_trailer(mut self, bytes: usize) -> Self {
        self.trailer = bytes;
        self
    }

    /// VLAN tags, outermost first.
    #[must_use]
    pub fn with_vlan_tags(mut self, tags: &[VlanTag]) -> Self {
        assert!(
            tags.iter().all(|t| t.vid < 1 << 12),
            "a VLAN id has 12 bits"
        );
        self.vlan_tags = tags.to_vec();
        self
    }

    /// Offset of the IPv4 header in the built frame.
    #[must_use]
    pub fn l3_offset(&self) -> usize {
        ETH_HLEN + VLAN_HLEN * self.vlan_tags.len()
    }

    /// The IPv4 header length in bytes (options padded to 4).
    #[must_use]
    pub fn ip_header_len(&self) -> usize {
        IPV4_MIN_HDR_LEN + self.options.len().div_ceil(4) * 4
    }

    /// Offset of the L4 header in the built frame.
    #[must_use]
    pub fn l4_offset(&self) -> usize {
        self.l3_offset() + self.ip_header_len()
    }

    /// The L4 header and payload with the checksum field zero.
    #[must_use]
    pub fn segment(&self) -> Vec<u8> {
        let mut segment = Vec::with_capacity(self.l4.header_len() + self.payload.len());
        segment.extend_from_slice(&self.src.port().to_be_bytes());
        segment.extend_from_slice(&self.dst.port().to_be_bytes());
        match self.l4 {
            L4::Tcp => {
                segment.extend_from_slice(&self.seq.to_be_bytes());
                segment.extend_from_slice(&self.ack.to_be_bytes());
                // Data offset 5 words, no TCP options.
                segment.extend_from_slice(&[5 << 4, self.tcp_flags]);
                segment.extend_from_slice(&64_240_u16.to_be_bytes()); // window
                segment.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            L4::Udp => {
                let len = UDP_HDR_LEN + self.payload.len();
                segment.extend_from_slice(&be16(len));
                segment.extend_from_slice(&[0, 0]); // checksum
            }
        }
        segment.extend_from_slice(&self.payload);
        segment
    }

    /// The L4 checksum field as built: the full RFC 1071 checksum over pseudo-header and
    /// segment; for UDP, 0 when disabled and 0xffff when it computes to 0 (RFC 768).
    #[must_use]
    pub fn l4_checksum(&self) -> u16 {
        let full = l4_checksum_be(
            self.src.ip().octets(),
            self.dst.ip().octets(),
            self.l4.number(),
            &self.segment(),
        );
        match (self.l4, self.udp_checksum, full) {
            (L4::Udp, false, _) => 0,
            (L4::Udp, true, 0) => 0xffff,
            _ => full,
        }
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut segment = self.segment();
        let check_at = self.l4.check_offset();
        segment[check_at..check_at + 2].copy_from_slice(&self.l4_checksum().to_be_bytes());

        let mut options = self.options.clone();
        options.resize(self.ip_header_len() - IPV4_MIN_HDR_LEN, 0);
        let flags = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.fragment.more) << 13)
            | self.fragment.offset;
        let header = Ipv4Header {
            ident: self.ident,
            flags_fragment: flags,
            ttl: self.ttl,
            protocol: self.l4.number(),
            src: *self.src.ip(),
            dst: *self.dst.ip(),
            options: &options,
        };

        let mut frame = ethernet_tagged(self.dst_mac, self.src_mac, &self.vlan_tags, ETH_P_IP);
        frame.extend_from_slice(&header.build(segment.len()));
        frame.extend_from_slice(&segment);
        frame.resize(frame.len() + self.trailer, 0);
        frame
    }

    /// The IPv4 packet alone: the frame without Ethernet header, tags and trailer.
    #[must_use]
    pub fn ip_packet(&self) -> Vec<u8> {
        let frame = self.build();
        frame[self.l3_offset()..frame.len() - self.trailer].to_vec()
    }
}

/// An ICMP error (RFC 792) over IPv4, quoting the start of the packet it is about.
///
/// [`IcmpErrorFrame::build`] computes the outer IPv4 header and the ICMP checksums; the quote
/// is the quoted packet as built (its own checksums correct), cut and patched as told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpErrorFrame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The error's sender and receiver.
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: u8,
    pub code: u8,
    /// The 4 bytes after the checksum: unused (0), or the next-hop MTU of "fragmentation
    /// needed" in the last two.
    pub rest: [u8; 4],
    /// The packet the error is about, as its sender built it.
    pub quoted: Ipv4Frame,
    /// How many bytes of the quoted IPv4 packet are included; `None`: all of it.
    pub quoted_len: Option<usize>,
    /// The quoted packet's L4 checksum field, if not as built: translators rewrite a quote's
    /// addresses and ports but leave its L4 checksum alone (receivers do not verify it).
    pub quoted_l4_checksum: Option<u16>,
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

impl IcmpErrorFrame {
    /// "Destination unreachable, port unreachable" from `src` to `dst` about `quoted`, quoting
    /// all of it.
    #[must_use]
    pub fn port_unreachable(src: Ipv4Addr, dst: Ipv4Addr, quoted: Ipv4Frame) -> Self {
        IcmpErrorFrame {
            src_mac: NODE_MAC,
            dst_mac: CLIENT_MAC,
            src,
            dst,
            icmp_type: ICMP_DEST_UNREACH,
            code: ICMP_PORT_UNREACH,
            rest: [0; 4],
            quoted,
            quoted_len: None,
            quoted_l4_checksum: None,
        }
    }

    #[must_use]
    pub fn with_src(mut self, src: Ipv4Addr) -> Self {
        self.src = src;
        self
    }

    #[must_use]
    pub fn with_dst(mut self, dst: Ipv4Addr) -> Self {
        self.dst = dst;
        self
    }

    /// The quoted packet replaced by `quoted`.
    #[must_use]
    pub fn with_quoted(mut self, quoted: Ipv4Frame) -> Self {
        self.quoted = quoted;
        self
    }

    /// Only the first `len` bytes of the quoted IPv4 packet are included.
    #[must_use]
    pub fn with_quoted_len(mut self, len: usize) -> Self {
        self.quoted_len = Some(len);
        self
    }

    #[must_use]
    pub fn with_quoted_l4_checksum(mut self, check: u16) -> Self {
        self.quoted_l4_checksum = Some(check);
        self
    }

    /// The quoted bytes as they appear after the ICMP header.
    #[must_use]
    pub fn quote(&self) -> Vec<u8> {
        let mut quote = self.quoted.ip_packet();
        if let Some(check) = self.quoted_l4_checksum {
            let at = self.quoted.ip_header_len() + self.quoted.l4.check_offset();
            quote[at..at + 2].copy_from_slice(&check.to_be_bytes());
        }
        if let Some(len) = self.quoted_len {
            quote.truncate(len);
        }
        quote
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut message = vec![self.icmp_type, self.code, 0, 0];
        message.extend_from_slice(&self.rest);
        message.extend_from_slice(&self.quote());
        let check = checksum_be(&message);
        message[2..4].copy_from_slice(&check.to_be_bytes());
        let header = Ipv4Header {
            ident: 0x4321,
            flags_fragment: 0,
            ttl: 64,
            protocol: IPPROTO_ICMP,
            src: self.src,
            dst: self.dst,
            options: &[],
        };
        let mut frame = ethernet(self.dst_mac, self.src_mac, ETH_P_IP);
        frame.extend_from_slice(&header.build(message.len()));
        frame.extend_from_slice(&message);
        frame
    }
}

/// `len` as a big-endian 16-bit field; test frames are far below 64 KiB.
fn be16(len: usize) -> [u8; 2] {
    u16::try_from(len)
        .expect("test frames are shorter than 64 KiB")
        .to_be_bytes()
}

fn ethernet(dst_mac: [u8; 6], src_mac: [u8; 6], ether_type: u16) -> Vec<u8> {
    ethernet_tagged(dst_mac, src_mac, &[], ether_type)
}

fn ethernet_tagged(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    tags: &[VlanTag],
    ether_type: u16,
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(128);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    for tag in tags {
        frame.extend_from_slice(&tag.tpid.to_be_bytes());
        frame.extend_from_slice(&tag.vid.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

struct Ipv4Header<'a> {
    ident: u16,
    flags_fragment: u16,
    ttl: u8,
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Already padded to a multiple of 4.
    options: &'a [u8],
}

impl Ipv4Header<'_> {
    fn build(&self, payload_len: usize) -> Vec<u8> {
        let header_len = IPV4_MIN_HDR_LEN + self.options.len();
        let ihl = u8::try_from(header_len / 4).expect("IHL fits in 4 bits");
        let mut header = Vec::with_capacity(header_len);
        header.push(0x40 | ihl);
        header.push(0); // DSCP/ECN
        header.extend_from_slice(&be16(header_len + payload_len));
        header.extend_from_slice(&self.ident.to_be_bytes());
        header.extend_from_slice(&self.flags_fragment.to_be_bytes());
        header.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        header.extend_from_slice(&self.src.octets());
        header.extend_from_slice(&self.dst.octets());
        header.extend_from_slice(self.options);
        let check = checksum_be(&header);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        header
    }
}

/// An ARP request ("who has `target`? tell `sender`"), broadcast.
#[must_use]
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet([0xff; 6], sender_mac, ETH_P_ARP);
    frame.extend_from_slice(&1_u16.to_be_bytes()); // hardware type: Ethernet
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes()); // protocol type
    frame.extend_from_slice(&[6, 4]); // address lengths
    frame.extend_from_slice(&1_u16.to_be_bytes()); // operation: request
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

/// An IPv6 UDP datagram with a correct checksum (over the IPv6 pseudo-header, RFC 8200 8.1).
#[must_use]
pub fn ipv6_udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_HDR_LEN + payload.len();
    let mut segment = Vec::with_capacity(udp_len);
    segment.extend_from_slice(&src.port().to_be_bytes());
    segment.extend_from_slice(&dst.port().to_be_bytes());
    segment.extend_from_slice(&be16(udp_len));
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(payload);
    let check = ipv6_l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, &segment);
    let check = if check == 0 { 0xffff } else { check };
    segment[6..8].copy_from_slice(&check.to_be_bytes());

    let mut frame = ethernet(NODE_MAC, CLIENT_MAC, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    frame.extend_from_slice(&be16(udp_len));
    frame.extend_from_slice(&[IPPROTO_UDP, 64]); // next header, hop limit
    frame.extend_from_slice(&src.ip().octets());
    frame.extend_from_slice(&dst.ip().octets());
    frame.extend_from_slice(&segment);
    frame
}

fn ipv6_l4_checksum(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, segment: &[u8]) -> u16 {
    let len = u32::try_from(segment.len()).expect("test frames are small");
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next_header]);
    !fold(sum_be(sum_be(0, &pseudo), segment))
}

/// An ICMP echo request over IPv4, with correct IPv4 and ICMP checksums.
#[must_use]
pub fn icmp_echo_request(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut message = vec![8, 0, 0, 0]; // type 8 (echo request), code 0, checksum
    message.extend_from_slice(&ident.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(payload);
    let check = checksum_be(&message);
    message[2..4].copy_from_slice(&check.to_be_bytes());

    let header = Ipv4Header {
        ident: 0x4321,
        flags_fragment: 1 << 14,
        ttl: 64,
        protocol: IPPROTO_ICMP,
        src,
        dst,
        options: &[],
    };
    let mut frame = ethernet(NODE_MAC, CLIENT_MAC, ETH_P_IP);
    frame.extend_from_slice(&header.build(message.len()));
    frame.extend_from_slice(&message);
    frame
}

/// The first `len` bytes of `frame` (length fields inside are left as they were, as a frame
/// cut short on the wire would have them).
#[must_use]
pub fn truncate(frame: &[u8], len: usize) -> Vec<u8> {
    assert!(
        len <= frame.len(),
        "cannot truncate {} bytes to {len}",
        frame.len()
    );
    frame[..len].to_vec()
}

/// Offsets at which two frames of equal length differ.
#[must_use]
pub fn differing_offsets(a: &[u8], b: &[u8]) -> Vec<usize> {
    assert_eq!(a.len(), b.len(), "frames of different length");
    a.iter()
        .zip(b)
        .enumerate()
        .filter_map(|(i, (x, y))| (x != y).then_some(i))
        .collect()
}

/// Why a frame could not be read back, or a checksum did not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    TooShort {
        what: &'static str,
        need: usize,
        have: usize,
    },
    NotIpv4 {
        ether_type: u16,
    },
    BadIpv4Header {
        version_ihl: u8,
    },
    UnsupportedProtocol {
        protocol: u8,
    },
    Ipv4Checksum {
        stored: u16,
        computed: u16,
    },
    L4Checksum {
        protocol: u8,
        stored: u16,
        computed: u16,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort { what, need, have } => {
                write!(
                    f,
                    "frame too short for {what}: need {need} bytes, have {have}"
                )
            }
            FrameError::NotIpv4 { ether_type } => {
                write!(f, "EtherType {ether_type:#06x} is not IPv4")
            }
            FrameError::BadIpv4Header { version_ihl } => {
                write!(f, "bad IPv4 version/IHL byte {version_ihl:#04x}")
            }
            FrameError::UnsupportedProtocol { protocol } => {
                write!(f, "IP protocol {protocol} is not TCP, UDP or ICMP")
            }
            FrameError::Ipv4Checksum { stored, computed } => write!(
                f,
                "IPv4 header checksum is {stored:#06x}, recomputation gives {computed:#06x}"
            ),
            FrameError::L4Checksum {
                protocol,
                stored,
                computed,
            } => write!(
                f,
                "protocol {protocol} checksum is {stored:#06x}, recomputation gives \
                 {computed:#06x}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// An IPv4 packet's addresses, ports and layout, read from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4L4 {
    pub protocol: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Offset of the IPv4 header in the frame (after Ethernet and any VLAN tags).
    pub l3_offset: usize,
    /// IPv4 header length from IHL.
    pub ip_header_len: usize,
    /// Offset of the L4 header in the frame.
    pub l4_offset: usize,
    /// End of the IPv4 packet in the frame (Ethernet + total length); bytes after are padding.
    pub ip_end: usize,
}

impl Ipv4L4 {
    /// Reads Ethernet (skipping up to two VLAN tags), the IPv4 header and, for TCP and UDP,
    /// the ports (ICMP gets port 0).
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        // Up to two tags (one, or Q-in-Q): what the data path skips too.
        let max_type_at = ETH_HLEN - 2 + 2 * VLAN_HLEN;
        let mut type_at = ETH_HLEN - 2;
        let ether_type = loop {
            need(frame, "Ethernet", type_at + 2)?;
            let ether_type = u16::from_be_bytes([frame[type_at], frame[type_at + 1]]);
            if (ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD) && type_at < max_type_at {
                type_at += VLAN_HLEN;
            } else {
                break ether_type;
            }
        };
        if ether_type != ETH_P_IP {
            return Err(FrameError::NotIpv4 { ether_type });
        }
        Ipv4L4::parse_at(frame, type_at + 2, true)
    }

    /// Reads the IPv4 header at `l3` and what follows. `complete`: the packet must be all
    /// there (as its total length says); otherwise it may be cut after the L4 ports (a quote).
    fn parse_at(frame: &[u8], l3: usize, complete: bool) -> Result<Self, FrameError> {
        need(frame, "the IPv4 header", l3 + IPV4_MIN_HDR_LEN)?;
        let version_ihl = frame[l3];
        let ip_header_len = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ip_header_len < IPV4_MIN_HDR_LEN {
            return Err(FrameError::BadIpv4Header { version_ihl });
        }
        need(frame, "the IPv4 options", l3 + ip_header_len)?;
        let total_len = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
        let ip_end = if complete {
            need(frame, "the IPv4 total length", l3 + total_len)?;
            l3 + total_len
        } else {
            (l3 + total_len).min(frame.len())
        };
        let protocol = frame[l3 + 9];
        let addr =
            |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        let l4_offset = l3 + ip_header_len;
        let (src_port, dst_port) = match protocol {
            IPPROTO_TCP | IPPROTO_UDP => {
                let l4 = if protocol == IPPROTO_TCP {
                    L4::Tcp
                } else {
                    L4::Udp
                };
                // A quote need only hold the first 8 bytes (RFC 792).
                let l4_len = if complete { l4.header_len() } else { 8 };
                need(frame, "the L4 header", l4_offset + l4_len)?;
                let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
                (port(l4_offset), port(l4_offset + 2))
            }
            IPPROTO_ICMP => (0, 0),
            _ => return Err(FrameError::UnsupportedProtocol { protocol }),
        };
        Ok(Ipv4L4 {
            protocol,
            src: SocketAddrV4::new(addr(l3 + 12), src_port),
            dst: SocketAddrV4::new(addr(l3 + 16), dst_port),
            l3_offset: l3,
            ip_header_len,
            l4_offset,
            ip_end,
        })
    }

    /// Offset of the source port in the frame.
    #[must_use]
    pub fn src_port_offset(&self) -> usize {
        self.l4_offset
    }

    /// Offset of the destination port in the frame.
    #[must_use]
    pub fn dst_port_offset(&self) -> usize {
        self.l4_offset + 2
    }

    /// Offset of the L4 checksum in the frame (TCP, UDP or ICMP).
    #[must_use]
    pub fn l4_check_offset(&self) -> usize {
        self.l4_offset
            + match self.protocol {
                IPPROTO_TCP => L4::Tcp.check_offset(),
                IPPROTO_UDP => L4::Udp.check_offset(),
                _ => 2,
            }
    }
}

/// `Err` unless `frame` has at least `len` bytes.
fn need(frame: &[u8], what: &'static str, len: usize) -> Result<(), FrameError> {
    if frame.len() < len {
        Err(FrameError::TooShort {
            what,
            need: len,
            have: frame.len(),
        })
    } else {
        Ok(())
    }
}

/// An ICMP error frame read back: the error's own packet and the one it quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpQuote {
    pub outer: Ipv4L4,
    pub icmp_type: u8,
    pub code: u8,
    /// Offsets are in the whole frame; `ip_end` is where the quote ends.
    pub quoted: Ipv4L4,
}

impl IcmpQuote {
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        let outer = Ipv4L4::parse(frame)?;
        if outer.protocol != IPPROTO_ICMP {
            return Err(FrameError::UnsupportedProtocol {
                protocol: outer.protocol,
            });
        }
        // Type, code, checksum and 4 more bytes come before the quote.
        let quoted = Ipv4L4::parse_at(&frame[..outer.ip_end], outer.l4_offset + 8, false)?;
        Ok(IcmpQuote {
            outer,
            icmp_type: frame[outer.l4_offset],
            code: frame[outer.l4_offset + 1],
            quoted,
        })
    }
}

/// Recomputes the IPv4 header checksum over the header (options included) with the checksum
/// field taken as zero, and compares it with the stored one.
pub fn verify_ipv4_checksum(frame: &[u8]) -> Result<(), FrameError> {
    verify_header_checksum(frame, &Ipv4L4::parse(frame)?)
}

/// [`verify_ipv4_checksum`] for the IPv4 header an ICMP error quotes.
pub fn verify_quoted_ipv4_checksum(frame: &[u8]) -> Result<(), FrameError> {
    verify_header_checksum(frame, &IcmpQuote::parse(frame)?.quoted)
}

fn verify_header_checksum(frame: &[u8], ip: &Ipv4L4) -> Result<(), FrameError> {
    let mut header = frame[ip.l3_offset..ip.l3_offset + ip.ip_header_len].to_vec();
    let stored = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].fill(0);
    let computed = checksum_be(&header);
    if stored == computed {
        Ok(())
    } else {
        Err(FrameError::Ipv4Checksum { stored, computed })
    }
}

/// What a verified L4 checksum was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// Equal to the full recomputation.
    Valid,
    /// A UDP checksum of 0: the sender computed none (RFC 768).
    UdpNone,
}

/// Recomputes the TCP or UDP checksum over the pseudo-header and the whole segment (as far as the
/// IPv4 total length says, so Ethernet padding is excluded), or the ICMP checksum over the
/// message, and compares it with the stored one.
///
/// A UDP checksum that computes to 0 must be sent as 0xffff, and a stored 0 means "none"; both
/// are reported as such rather than accepted as equal.
pub fn verify_l4_checksum(frame: &[u8]) -> Result<L4Checksum, FrameError> {
    let ip = Ipv4L4::parse(frame)?;
    let check_at = ip.l4_check_offset() - ip.l4_offset;
    let mut segment = frame[ip.l4_offset..ip.ip_end].to_vec();
    if segment.len() < check_at + 2 {
        return Err(FrameError::TooShort {
            what: "the L4 checksum",
            need: ip.l4_offset + check_at + 2,
            have: ip.ip_end,
        });
    }
    let stored = u16::from_be_bytes([segment[check_at], segment[check_at + 1]]);
    segment[check_at..check_at + 2].fill(0);
    let computed = match ip.protocol {
        IPPROTO_ICMP => checksum_be(&segment),
        protocol => {
            let full = l4_checksum_be(
                ip.src.ip().octets(),
                ip.dst.ip().octets(),
                protocol,
                &segment,
            );
            if protocol == IPPROTO_UDP && full == 0 {
                0xffff
            } else {
                full
            }
        }
    };
    match (ip.protocol, stored) {
        (IPPROTO_UDP, 0) => Ok(L4Checksum::UdpNone),
        _ if stored == computed => Ok(L4Checksum::Valid),
        (protocol, _) => Err(FrameError::L4Checksum {
            protocol,
            stored,
            computed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 5), 40_000)
    }

    fn node() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 10), 30_080)
    }

    #[test]
    fn built_frames_read_back_and_verify() {
        let frames = [
            Ipv4Frame::tcp(client(), node()).with_payload(*b"hello"),
            Ipv4Frame::udp(client(), node()).with_payload(*b"odd"),
            Ipv4Frame::udp(client(), node())
                .with_options(&IPV4_OPT_ROUTER_ALERT)
                .with_trailer(9),
            Ipv4Frame::tcp(client(), node()).with_options(&[IPV4_OPT_NOP; 40]),
        ];
        for spec in frames {
            let frame = spec.build();
            let ip = Ipv4L4::parse(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!((ip.src, ip.dst), (client(), node()));
            assert_eq!(ip.l4_offset, spec.l4_offset());
            assert_eq!(frame.len(), ip.ip_end + spec.trailer);
            verify_ipv4_checksum(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(
                verify_l4_checksum(&frame),
                Ok(L4Checksum::Valid),
                "{spec:?}"
            );
            // The receiver's check: summing everything, checksum included, gives 0.
            assert_eq!(
                checksum_be(&frame[ETH_HLEN..ETH_HLEN + ip.ip_header_len]),
                0
            );
        }
    }

    #[test]
    fn tagged_frames_read_back_and_verify() {
        let tags = [
            VlanTag {
                tpid: ETH_P_8021AD,
                vid: 200,
            },
            VlanTag {
                tpid: ETH_P_8021Q,
                vid: 100,
            },
        ];
        for count in 1..=2 {
            let spec = Ipv4Frame::udp(client(), node())
                .with_payload(*b"tagged")
                .with_vlan_tags(&tags[2 - count..]);
            let frame = spec.build();
            let ip = Ipv4L4::parse(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(ip.l3_offset, ETH_HLEN + VLAN_HLEN * count);
            assert_eq!(
                (ip.src, ip.dst, ip.l4_offset),
                (client(), node(), spec.l4_offset())
            );
            assert_eq!(frame[12..14], tags[2 - count].tpid.to_be_bytes());
            verify_ipv4_checksum(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(verify_l4_checksum(&frame), Ok(L4Checksum::Valid));
            // Untagged, the IPv4 packet is the same bytes.
            assert_eq!(
                spec.ip_packet(),
                spec.clone().with_vlan_tags(&[]).ip_packet()
            );
        }
    }

    #[test]
    fn icmp_errors_read_back_and_verify() {
        let quoted = Ipv4Frame::udp(client(), node()).with_payload(*b"query");
        let error = IcmpErrorFrame::port_unreachable(*node().ip(), *client().ip(), quoted.clone());
        for (spec, quote_len) in [
            (error.clone(), quoted.ip_packet().len()),
            (error.clone().with_quoted_len(28), 28),
        ] {
            let frame = spec.build();
            let got = IcmpQuote::parse(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!((got.icmp_type, got.code), (3, 3));
            assert_eq!(
                (*got.outer.src.ip(), *got.outer.dst.ip()),
                (*node().ip(), *client().ip())
            );
            assert_eq!((got.quoted.src, got.quoted.dst), (client(), node()));
            assert_eq!(got.quoted.ip_end - got.quoted.l3_offset, quote_len);
            verify_ipv4_checksum(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            verify_quoted_ipv4_checksum(&frame).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(verify_l4_checksum(&frame), Ok(L4Checksum::Valid));
        }
        let mut corrupted = error.build();
        let quoted_dst = IcmpQuote::parse(&corrupted).unwrap().quoted.l3_offset + 16;
        corrupted[quoted_dst] ^= 1;
        assert!(matches!(
            verify_quoted_ipv4_checksum(&corrupted),
            Err(FrameError::Ipv4Checksum { .. })
        ));
    }

    #[test]
    fn corrupted_frames_fail_verification() {
        let mut frame = Ipv4Frame::tcp(client(), node())
            .with_payload(*b"abcd")
            .build();
        let last = frame.len() - 1;
        frame[last] ^= 0x40;
        assert!(matches!(
            verify_l4_checksum(&frame),
            Err(FrameError::L4Checksum { .. })
        ));
        frame[IPV4_DST_OFFSET] ^= 1;
        assert!(matches!(
            verify_ipv4_checksum(&frame),
            Err(FrameError::Ipv4Checksum { .. })
        ));
    }

    #[test]
    fn udp_without_checksum_reads_as_none() {
        let frame = Ipv4Frame::udp(client(), node())
            .without_udp_checksum()
            .build();
        assert_eq!(verify_l4_checksum(&frame), Ok(L4Checksum::UdpNone));
    }

    #[test]
    fn other_frames_have_valid_checksums() {
        let icmp = icmp_echo_request(*client().ip(), *node().ip(), 7, 1, b"ping");
        verify_ipv4_checksum(&icmp).unwrap();
        assert_eq!(verify_l4_checksum(&icmp), Ok(L4Checksum::Valid));
        let v6 = ipv6_udp(
            SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), 5000, 0, 0),
            SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), 30_080, 0, 0),
            b"v6",
        );
        // Receiver's check over pseudo-header and segment.
        let segment = &v6[ETH_HLEN + 40..];
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&v6[ETH_HLEN + 8..ETH_HLEN + 24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&v6[ETH_HLEN + 24..ETH_HLEN + 40]).unwrap());
        assert_eq!(ipv6_l4_checksum(src, dst, IPPROTO_UDP, segment), 0);
        assert_eq!(
            arp_request(CLIENT_MAC, *client().ip(), *node().ip()).len(),
            42
        );
    }
}
