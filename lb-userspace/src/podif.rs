//! Pod interfaces (`--pod-iface`): which host-side interfaces match, and when the set changes.
//!
//! Pods come and go at any time, so the agent keeps the attached set in step with the wanted set:
//!
//! ```text
//! let mut events = LinkEvents::open()?;        // before the first scan, see LinkEvents::open
//! loop {
//!     let wanted = matching_interfaces(&patterns)?;
//!     let (to_attach, to_forget) = reconcile(&attached, &wanted);
//!     // forget first: a re-created interface is in both lists under the same name
//!     events.changed().await?;
//! }
//! ```

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fmt, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    str::FromStr,
};

use tokio::io::{Interest, unix::AsyncFd};

/// An interface: its name and its ifindex.
pub type Iface = (String, u32);

/// The longest interface name the kernel accepts: `IFNAMSIZ` less the terminating NUL.
pub const MAX_IFACE_NAME: usize = libc::IFNAMSIZ - 1;

/// Why a `--pod-iface` pattern was rejected. Each of these is a pattern that could never match a
/// real interface, so accepting it would silently attach nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("an interface pattern must not be empty")]
    Empty,
    #[error("interface pattern {pattern:?}: '[' at character {position} has no closing ']'")]
    UnclosedClass { pattern: String, position: usize },
    #[error("interface pattern {pattern:?}: range {start:?}-{end:?} is backwards")]
    ReversedRange {
        pattern: String,
        start: char,
        end: char,
    },
    #[error(
        "interface pattern {pattern:?} needs at least {needed} bytes, but interface names have \
         at most {MAX_IFACE_NAME}"
    )]
    TooLong { pattern: String, needed: usize },
    #[error("interface pattern {pattern:?}: interface names cannot contain {character:?}")]
    InvalidChar { pattern: String, character: char },
}

/// Shell-style glob over interface names: `*` any run, `?` one char, `[abc]`/`[a-z]` classes;
/// anything else literal.
///
/// A class may be negated with a leading `!` (`[!0-9]`), as in the shell; a `]` right after the
/// `[` or `[!`, and a `-` first or last, are members rather than syntax. There is no escape
/// character: interface names cannot contain `*`, `?` or `[` in practice, so none is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePattern {
    original: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    /// Whether this single-character token accepts `c`; a run is handled by the matcher.
    fn accepts(&self, c: char) -> bool {
        match self {
            Token::Literal(literal) => *literal == c,
            Token::AnyChar => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges
                    .iter()
                    .any(|&(start, end)| (start..=end).contains(&c))
                    != *negated
            }
        }
    }
}

/// Characters the kernel refuses in interface names (`dev_valid_name`).
fn forbidden_in_name(c: char) -> bool {
    c == '/' || c == ':' || c == '\0' || c.is_whitespace()
}

impl IfacePattern {
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while let Some(&c) = chars.get(i) {
            match c {
                '*' => {
                    // Consecutive stars match the same as one; folding them keeps matching linear.
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun);
                    }
                    i += 1;
                }
                '?' => {
                    tokens.push(Token::AnyChar);
                    i += 1;
                }
                '[' => {
                    let (token, next) = parse_class(pattern, &chars, i)?;
                    tokens.push(token);
                    i = next;
                }
                c if forbidden_in_name(c) => {
                    return Err(PatternError::InvalidChar {
                        pattern: pattern.to_owned(),
                        character: c,
                    });
                }
                c => {
                    tokens.push(Token::Literal(c));
                    i += 1;
                }
            }
        }
        // Every token but a run consumes one character, so this is the shortest name the pattern
        // can match; a literal counts its UTF-8 bytes because IFNAMSIZ is a byte limit.
        let needed: usize = tokens
            .iter()
            .map(|token| match token {
                Token::Literal(c) => c.len_utf8(),
                Token::AnyChar | Token::Class { .. } => 1,
                Token::AnyRun => 0,
            })
            .sum();
        if needed > MAX_IFACE_NAME {
            return Err(PatternError::TooLong {
                pattern: pattern.to_owned(),
                needed,
            });
        }
        Ok(Self {
            original: pattern.to_owned(),
            tokens,
        })
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        // Iterative matching with one backtrack point, the last `*` seen: on a mismatch that
        // star absorbs one more character. Runs in O(pattern × name) without recursion, so no
        // pattern can blow the stack or take exponential time.
        let name: Vec<char> = name.chars().collect();
        let (mut p, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while let Some(&c) = name.get(n) {
            match self.tokens.get(p) {
                Some(Token::AnyRun) => {
                    star = Some((p + 1, n));
                    p += 1;
                    continue;
                }
                Some(token) if token.accepts(c) => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
            let Some((after_star, absorbed_to)) = star else {
                return false;
            };
            p = after_star;
            n = absorbed_to + 1;
            star = Some((after_star, n));
        }
        self.tokens
            .get(p..)
            .is_some_and(|rest| rest.iter().all(|token| *token == Token::AnyRun))
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.original
    }
}

/// Parses the class opening at `chars[open]` (a `[`); returns it and the index after its `]`.
fn parse_class(pattern: &str, chars: &[char], open: usize) -> Result<(Token, usize), PatternError> {
    let unclosed = || PatternError::UnclosedClass {
        pattern: pattern.to_owned(),
        position: open + 1,
    };
    let mut i = open + 1;
    let negated = chars.get(i) == Some(&'!');
    if negated {
        i += 1;
    }
    let first = i;
    let mut ranges = Vec::new();
    loop {
        let &c = chars.get(i).ok_or_else(unclosed)?;
        if c == ']' && i != first {
            return Ok((Token::Class { negated, ranges }, i + 1));
        }
        // `a-z` is a range unless the `-` is the last member (`[a-]`), where it is literal.
        if chars.get(i + 1) == Some(&'-')
            && let Some(&end) = chars.get(i + 2)
            && end != ']'
        {
            if end < c {
                return Err(PatternError::ReversedRange {
                    pattern: pattern.to_owned(),
                    start: c,
                    end,
                });
            }
            ranges.push((c, end));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
}

impl FromStr for IfacePattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for IfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

/// Current interfaces (name, ifindex) whose name matches any pattern, sorted by name.
///
/// The list comes from `if_nameindex(3)`, which asks the kernel over a socket it opens itself,
/// so it is the view of the calling thread's network namespace. `/sys/class/net` is not used:
/// it shows the namespace sysfs was mounted in, which differs from the thread's after a
/// `setns`. Names that are not UTF-8 are skipped: CNIs name pod interfaces in ASCII, and such a
/// name could neither be given on the command line nor shown faithfully.
///
/// An interface can vanish right after the scan; attaching to it then fails, and the event its
/// removal raises leads to the next scan.
pub fn matching_interfaces(patterns: &[IfacePattern]) -> io::Result<Vec<Iface>> {
    let mut found: Vec<Iface> = interfaces()?
        .into_iter()
        .filter(|(name, _)| patterns.iter().any(|pattern| pattern.matches(name)))
        .collect();
    found.sort();
    Ok(found)
}

/// Every interface of the calling thread's network namespace.
fn interfaces() -> io::Result<Vec<Iface>> {
    // SAFETY: if_nameindex has no preconditions; a non-null result is freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut all = Vec::new();
    let mut cursor = head;
    loop {
        // SAFETY: `cursor` is within the array if_nameindex returned, which ends with an entry
        // whose index is 0 and name is null; we stop at that entry and never step past it.
        let entry = unsafe { &*cursor };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: a non-terminating entry's name is a NUL-terminated string owned by the array.
        let name = unsafe { CStr::from_ptr(entry.if_name) };
        if let Ok(name) = name.to_str() {
            all.push((name.to_owned(), entry.if_index));
        }
        // SAFETY: this entry was not the terminator, so the next one is still in the array.
        cursor = unsafe { cursor.add(1) };
    }
    // SAFETY: `head` came from if_nameindex, is freed once, and `all` holds no pointer into it.
    unsafe { libc::if_freenameindex(head) };
    Ok(all)
}

/// A `NETLINK_ROUTE` socket subscribed to `RTMGRP_LINK`, in the network namespace of the thread
/// that opened it.
#[derive(Debug)]
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

/// At most this many messages are read per wake-up, so a flood cannot keep `changed` from
/// returning; the rest is read by the next call.
const MAX_MESSAGES_PER_DRAIN: usize = 4096;

impl LinkEvents {
    /// Opens the socket. Call this before the first scan: the kernel only queues events for a
    /// socket that already exists, so an interface created between a scan and `open` would
    /// otherwise go unnoticed until some later, unrelated link event.
    ///
    /// Must be called within a Tokio runtime that has I/O enabled (without a runtime it returns
    /// an error; a runtime built without `enable_io` makes Tokio panic).
    pub fn open() -> io::Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "LinkEvents::open needs a Tokio runtime to register the socket with",
            ));
        }
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr = zeroed_sockaddr_nl();
        addr.nl_groups = libc::RTMGRP_LINK.cast_unsigned();
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                sockaddr_nl_len(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is dropped,
        // which happens only with the `AsyncFd` that now owns it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|err| err.into_parts().1)?;
        Ok(Self { socket })
    }

    /// Returns when any link was added, removed or changed since the last call (or since
    /// `open`). Every message already queued is read before returning, so a burst of events —
    /// a veth pair alone raises several — wakes the caller once. A receive-queue overflow
    /// (`ENOBUFS`: events were lost) counts as a change, because the caller rescans anyway.
    ///
    /// Cancel safe: dropping the future loses no event that a later call would have reported.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.socket.readable().await?;
            let drained = drain(guard.get_inner().as_fd())?;
            if drained.exhausted {
                // Only after the socket said EAGAIN: clearing earlier could sleep on queued data.
                guard.clear_ready();
            }
            if drained.changed {
                return Ok(());
            }
        }
    }
}

fn zeroed_sockaddr_nl() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers (one field private), for which all-zero is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = AF_NETLINK_FAMILY;
    addr
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "sockaddr_nl is 12 bytes, far below socklen_t's range"
)]
fn sockaddr_nl_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "AF_NETLINK is 16, which sa_family_t holds"
)]
const AF_NETLINK_FAMILY: libc::sa_family_t = libc::AF_NETLINK as libc::sa_family_t;

struct Drained {
    /// A message from the kernel arrived, or some were lost to an overflow.
    changed: bool,
    /// The socket reported EAGAIN: nothing is left to read.
    exhausted: bool,
}

/// Reads every queued message without blocking.
fn drain(socket: BorrowedFd<'_>) -> io::Result<Drained> {
    // The content is not needed, only that a message came: MSG_TRUNC discards the rest of each
    // datagram, so a small buffer suffices whatever the message size.
    let mut buf = [0u8; 64];
    let mut changed = false;
    for _ in 0..MAX_MESSAGES_PER_DRAIN {
        let mut from = zeroed_sockaddr_nl();
        let mut from_len = sockaddr_nl_len();
        // SAFETY: `buf`, `from` and `from_len` are valid for writes of the sizes passed.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&raw mut from).cast::<libc::sockaddr>(),
                &raw mut from_len,
            )
        };
        if n >= 0 {
            // Any process may unicast to this socket; only the kernel (port 0) reports links.
            changed |= from.nl_pid == 0;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => {
                return Ok(Drained {
                    changed,
                    exhausted: true,
                });
            }
            Some(libc::EINTR) => {}
            Some(libc::ENOBUFS) => changed = true,
            _ => return Err(err),
        }
    }
    Ok(Drained {
        changed,
        exhausted: false,
    })
}

/// What to do to get from the attached set to the wanted set: `(to_attach, to_forget)`, each
/// sorted by name. An interface whose ifindex changed (deleted and re-created with the same
/// name) is in both: apply `to_forget` first. Should `wanted` name an interface twice, the last
/// entry wins, as it would in a map.
#[must_use]
pub fn reconcile(attached: &BTreeMap<String, u32>, wanted: &[Iface]) -> (Vec<Iface>, Vec<Iface>) {
    let wanted: BTreeMap<&str, u32> = wanted
        .iter()
        .map(|(name, index)| (name.as_str(), *index))
        .collect();
    let to_attach = wanted
        .iter()
        .filter(|&(name, index)| attached.get(*name) != Some(index))
        .map(|(name, index)| ((*name).to_owned(), *index))
        .collect();
    let to_forget = attached
        .iter()
        .filter(|&(name, index)| wanted.get(name.as_str()) != Some(index))
        .map(|(name, index)| (name.clone(), *index))
        .collect();
    (to_attach, to_forget)
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        process::{Command, Stdio},
        time::Duration,
    };

    use super::*;

    fn pattern(p: &str) -> IfacePattern {
        IfacePattern::new(p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
    }

    #[test]
    fn glob_matching() {
        let table: &[(&str, &str, bool)] = &[
            ("*", "eth0", true),
            ("*", "a", true),
            ("*", "", true),
            ("**", "lxc12", true),
            ("veth*", "veth", true),
            ("veth*", "veth1a2b3c", true),
            ("veth*", "vet", false),
            ("veth*", "xveth0", false),
            ("*veth", "myveth", true),
            ("*veth", "veth0", false),
            ("v*h*0", "vethab0", true),
            ("v*h*0", "veth01", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("?", "a", true),
            ("?", "", false),
            ("?", "ab", false),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("cali?*", "cali", false),
            ("cali?*", "cali1", true),
            ("cali?*", "calic0ffee", true),
            ("lxc*", "lxc_health", true),
            ("lxc*", "lx", false),
            ("eth[01]", "eth0", true),
            ("eth[01]", "eth2", false),
            ("eth[0-3]", "eth3", true),
            ("eth[0-3]", "eth4", false),
            ("eth[!0-3]", "eth4", true),
            ("eth[!0-3]", "eth0", false),
            ("[a-c][0-9]", "b7", true),
            ("[a-c][0-9]", "d7", false),
            ("x[]]", "x]", true),
            ("x[!]]", "x]", false),
            ("x[!]]", "xa", true),
            ("x[a-]", "x-", true),
            ("x[-a]", "x-", true),
            ("x[a-]", "xb", false),
            ("eth0", "eth0", true),
            ("eth0", "eth00", false),
            ("eth0", "eth", false),
            ("eth0.100", "eth0.100", true),
            ("eth0.100", "eth0x100", false),
            ("eth0.*", "eth0.100", true),
            ("br-*", "br-1a2b3c4d5e6f", true),
            ("br-*", "br_1", false),
            ("weave-?", "weave-1", true),
            ("\\", "\\", true),
            ("ä*", "äbc", true),
        ];
        for &(p, name, expected) in table {
            assert_eq!(
                pattern(p).matches(name),
                expected,
                "{p:?} matching {name:?}"
            );
        }
    }

    #[test]
    fn pathological_pattern_is_fast() {
        // Exponential in a naive backtracker; linear-ish here.
        let p = pattern("*a*a*a*a*a*a*b");
        assert!(!p.matches(&"a".repeat(15)));
    }

    #[test]
    fn pattern_errors() {
        let cases: &[(&str, PatternError)] = &[
            ("", PatternError::Empty),
            (
                "veth[",
                PatternError::UnclosedClass {
                    pattern: "veth[".into(),
                    position: 5,
                },
            ),
            (
                "eth[0-",
                PatternError::UnclosedClass {
                    pattern: "eth[0-".into(),
                    position: 4,
                },
            ),
            (
                "x[]",
                PatternError::UnclosedClass {
                    pattern: "x[]".into(),
                    position: 2,
                },
            ),
            (
                "eth[9-0]",
                PatternError::ReversedRange {
                    pattern: "eth[9-0]".into(),
                    start: '9',
                    end: '0',
                },
            ),
            (
                "averyverylongname",
                PatternError::TooLong {
                    pattern: "averyverylongname".into(),
                    needed: 17,
                },
            ),
            (
                "averyverylong???*",
                PatternError::TooLong {
                    pattern: "averyverylong???*".into(),
                    needed: 16,
                },
            ),
            (
                "eth 0",
                PatternError::InvalidChar {
                    pattern: "eth 0".into(),
                    character: ' ',
                },
            ),
            (
                "a/b",
                PatternError::InvalidChar {
                    pattern: "a/b".into(),
                    character: '/',
                },
            ),
            (
                "eth0:1",
                PatternError::InvalidChar {
                    pattern: "eth0:1".into(),
                    character: ':',
                },
            ),
        ];
        for (p, expected) in cases {
            assert_eq!(IfacePattern::new(p).as_ref(), Err(expected), "{p:?}");
        }
        // Exactly IFNAMSIZ - 1 is a valid name; stars add nothing to the minimum.
        assert!(IfacePattern::new("fifteen-chars-x").is_ok());
        assert!(IfacePattern::new("fifteen-chars-x*").is_ok());
    }

    #[test]
    fn parses_and_displays_the_original() {
        let p: IfacePattern = "cali?*".parse().unwrap();
        assert_eq!(p.to_string(), "cali?*");
        assert_eq!(p.as_str(), "cali?*");
        assert!("eth[".parse::<IfacePattern>().is_err());
    }

    fn owned(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|&(n, i)| (n.to_owned(), i)).collect()
    }

    fn map(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        owned(list).into_iter().collect()
    }

    #[test]
    fn reconcile_cases() {
        // Nothing attached yet: attach everything.
        assert_eq!(
            reconcile(&map(&[]), &owned(&[("veth1", 5), ("veth0", 4)])),
            (owned(&[("veth0", 4), ("veth1", 5)]), vec![])
        );
        // In step: nothing to do.
        assert_eq!(
            reconcile(&map(&[("veth0", 4)]), &owned(&[("veth0", 4)])),
            (vec![], vec![])
        );
        // A pod went away, another came.
        assert_eq!(
            reconcile(
                &map(&[("veth0", 4), ("veth1", 5)]),
                &owned(&[("veth1", 5), ("veth2", 6)])
            ),
            (owned(&[("veth2", 6)]), owned(&[("veth0", 4)]))
        );
        // Re-created under the same name: forget the old ifindex, attach the new one.
        assert_eq!(
            reconcile(&map(&[("veth0", 4)]), &owned(&[("veth0", 9)])),
            (owned(&[("veth0", 9)]), owned(&[("veth0", 4)]))
        );
        // Renamed, same ifindex: the name is the key, so it is forgotten and attached anew.
        assert_eq!(
            reconcile(&map(&[("veth0", 4)]), &owned(&[("lxc0", 4)])),
            (owned(&[("lxc0", 4)]), owned(&[("veth0", 4)]))
        );
        // Everything gone.
        assert_eq!(
            reconcile(&map(&[("veth0", 4)]), &[]),
            (vec![], owned(&[("veth0", 4)]))
        );
        // A duplicate name in `wanted`: the last entry wins.
        assert_eq!(
            reconcile(&map(&[("veth0", 4)]), &owned(&[("veth0", 4), ("veth0", 7)])),
            (owned(&[("veth0", 7)]), owned(&[("veth0", 4)]))
        );
    }

    #[test]
    fn open_outside_a_runtime_is_an_error() {
        assert!(LinkEvents::open().is_err());
    }

    /// A network namespace deleted on drop, so a failed assertion leaves nothing behind.
    struct TempNetns {
        name: String,
    }

    impl TempNetns {
        fn create(name: String) -> Self {
            // Remove a namespace a killed earlier run of this process id left behind.
            let _ = ip(&["netns", "del", &name]);
            assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
            Self { name }
        }
    }

    impl Drop for TempNetns {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Moves the calling thread (only it: a thread's netns is its own) into `name`.
    fn enter_netns(name: &str) {
        let file = File::open(format!("/run/netns/{name}")).expect("open the netns file");
        // SAFETY: `file` is an open namespace descriptor for the duration of the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
    }

    const EVENT_WAIT: Duration = Duration::from_secs(5);
    /// How long a second `changed` must stay quiet after a burst was drained.
    const QUIET_WAIT: Duration = Duration::from_millis(500);

    /// Needs root and `ip` (CI runs as root): a real veth pair in a namespace of its own.
    #[test]
    fn link_events_and_scan_in_a_netns() {
        let netns = TempNetns::create(format!("lbt-podif-{}", std::process::id()));
        let name = netns.name.clone();
        // A dedicated thread, since setns moves only the calling thread and the test harness's
        // threads are shared; the runtime is built there so the socket is opened in the netns.
        let outcome = std::thread::spawn(move || {
            enter_netns(&name);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .expect("runtime");
            runtime.block_on(check_link_events(&name));
        })
        .join();
        drop(netns);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn check_link_events(netns: &str) {
        let veth = [pattern("veth*")];
        let mut events = LinkEvents::open().expect("open the netlink socket");

        // A fresh namespace has only `lo`: this is the thread's view, not the host's.
        assert_eq!(
            matching_interfaces(&[pattern("*")]).unwrap(),
            owned(&[("lo", 1)])
        );
        assert_eq!(matching_interfaces(&veth).unwrap(), vec![]);

        // Creating a pair raises several events; one call must read them all.
        assert!(ip(&[
            "-n",
            netns,
            "link",
            "add",
            "vethpod1",
            "type",
            "veth",
            "peer",
            "name",
            "vethpeer1"
        ]));
        tokio::time::timeout(EVENT_WAIT, events.changed())
            .await
            .expect("an event within 5 s of adding the veth pair")
            .expect("reading the netlink socket");
        assert!(
            tokio::time::timeout(QUIET_WAIT, events.changed())
                .await
                .is_err(),
            "the burst was not drained in one call"
        );
        let expected: Vec<(String, u32)> = ["vethpeer1", "vethpod1"]
            .iter()
            .map(|n| ((*n).to_owned(), crate::netif::index(n).expect(n)))
            .collect();
        assert_eq!(matching_interfaces(&veth).unwrap(), expected);
        assert_eq!(
            matching_interfaces(&[pattern("vethpod?"), pattern("nothing")]).unwrap(),
            expected[1..].to_vec()
        );

        // Deleting one end removes both.
        assert!(ip(&["-n", netns, "link", "del", "vethpod1"]));
        tokio::time::timeout(EVENT_WAIT, events.changed())
            .await
            .expect("an event within 5 s of deleting the veth pair")
            .expect("reading the netlink socket");
        assert_eq!(matching_interfaces(&veth).unwrap(), vec![]);
    }
}
