//! The test peer that runs inside the namespaces.
//!
//! `serve`: a backend pod. Answers HTTP on a TCP port (several requests per connection when the
//! client keeps it alive) and datagrams on a UDP port with its own name and the client address it
//! saw, for a bounded time.
//!
//! `http` / `udp`: a client. Makes `count` requests, each from a new socket (so a new source port
//! and a new flow), and prints one line per request:
//! `ok <backend name> <client address the backend saw> <local address>` or `fail <reason>`.
//! UDP sockets are connected, so the kernel passes up only answers from exactly the address and
//! port the request went to, and an ICMP port unreachable for the request shows as `fail refused`.
//!
//! `pmtu`: sends datagrams that must not be fragmented and prints the path MTU the socket learned:
//! `mtu <bytes>`.
//!
//! `hold`: opens `count` keep-alive connections, makes one request on each (`held ok ...` lines,
//! then `holding`), waits until a file exists, then makes a second request on each (`again ok ...`
//! or `again fail <reason>`), so a test can change something while connections are established.
//!
//! `stream`: opens `count` keep-alive connections (`connected ok ...` lines, then `streaming`)
//! and keeps making a request on each every interval until a file exists; each connection then
//! prints `stream ok <backend> <requests> <slowest request in ms>`, or as soon as it breaks
//! `stream fail <reason> after <requests>`. A reset, a close, a request unanswered within the
//! timeout or an answer from another backend than the first one breaks a connection; so a test
//! can check that connections survive what happens meanwhile without a single glitch.
//!
//! `vlan`: makes an interface a tagged link (for kernels without 802.1Q; see `mod vlan`), prints
//! `tagging` and keeps the tags on until killed.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve as a backend named NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Option<SocketAddr>,
        #[arg(long)]
        udp: Option<SocketAddr>,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 600)]
        lifetime_secs: u64,
    },
    /// Make COUNT HTTP requests to TARGET, one TCP connection each.
    Http(Requests),
    /// Send COUNT datagrams to TARGET, one socket each, and wait for each answer.
    Udp(UdpRequests),
    /// Send SIZE-byte datagrams with "don't fragment" to TARGET and print the path MTU learned.
    Pmtu(Pmtu),
    /// Hold COUNT connections to TARGET open across an event (a file appearing).
    Hold(Hold),
    /// Keep COUNT connections to TARGET busy with requests until a file appears.
    Stream(Stream),
    /// Make IFACE a tagged link: push TAGs on every frame it sends, pop them from every frame it
    /// receives (after XDP), until killed or `LIFETIME_SECS` pass.
    Vlan(Vlan),
}

#[derive(Args)]
struct Requests {
    #[arg(long)]
    target: SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Source address (one of this namespace's addresses); by default the kernel picks it.
    #[arg(long)]
    bind: Option<Ipv4Addr>,
    /// After this many failures, skip the remaining requests (each still gets a `fail` line),
    /// so a broken path fails a test quickly instead of after COUNT timeouts.
    #[arg(long)]
    max_failures: Option<u32>,
}

#[derive(Args)]
struct UdpRequests {
    #[command(flatten)]
    common: Requests,
    /// Send request i from port BASE+i, so that another run repeats the same 5-tuples.
    #[arg(long)]
    source_port: Option<u16>,
}

#[derive(Args)]
struct Pmtu {
    #[arg(long)]
    target: SocketAddrV4,
    /// Datagram payload size in bytes.
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// Datagrams to send at most; sending stops early once the kernel refuses the size.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// How long to wait for an answer or an ICMP error after each datagram.
    #[arg(long, default_value_t = 300)]
    wait_ms: u64,
    #[arg(long)]
    bind: Option<Ipv4Addr>,
}

#[derive(Args)]
struct Hold {
    #[arg(long)]
    target: SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    #[arg(long)]
    bind: Option<Ipv4Addr>,
    /// Make the second requests once this file exists.
    #[arg(long)]
    until: PathBuf,
    /// Give up waiting for the file after this many seconds.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
}

#[derive(Args)]
struct Stream {
    #[arg(long)]
    target: SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between two requests on a connection.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    interval_ms: u64,
    /// A request unanswered for this long breaks its connection (and bounds the connect).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    #[arg(long)]
    bind: Option<Ipv4Addr>,
    /// Stop streaming and report once this file exists.
    #[arg(long)]
    until: PathBuf,
    /// Hard limit: stop after this many seconds even if the file never appears (every
    /// connection still streaming then reports a failure, and the probe exits with 1).
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
}

#[derive(Args)]
struct Vlan {
    #[arg(long)]
    iface: String,
    /// `802.1Q:ID` or `802.1ad:ID`, innermost first (repeatable).
    #[arg(long = "tag", required = true, value_parser = parse_tag)]
    tags: Vec<(u16, u16)>,
    #[arg(long, default_value_t = 600)]
    lifetime_secs: u64,
}

/// `802.1Q:ID` / `802.1ad:ID` as (ethertype, VLAN id).
fn parse_tag(text: &str) -> Result<(u16, u16), String> {
    let (proto, id) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected 802.1Q:ID or 802.1ad:ID"))?;
    let proto = match proto {
        "802.1Q" => 0x8100,
        "802.1ad" => 0x88a8,
        other => return Err(format!("unknown tag protocol {other:?}")),
    };
    let id: u16 = id.parse().map_err(|e| format!("VLAN id {id:?}: {e}"))?;
    if id == 0 || id > 4094 {
        return Err(format!("VLAN id {id} is outside 1-4094"));
    }
    Ok((proto, id))
}

/// Upper bound on a request or answer; anything longer is cut.
const MAX_MESSAGE: usize = 4096;
/// How long a backend keeps an idle keep-alive connection: longer than any test holds one.
const KEEP_ALIVE_IDLE: Duration = Duration::from_mins(1);
/// Requests a backend answers on one connection before closing it, to bound its loop.
const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve {
            name,
            tcp,
            udp,
            lifetime_secs,
        } => serve(&name, tcp, udp, Duration::from_secs(lifetime_secs)),
        Command::Http(args) => {
            let timeout = Duration::from_millis(args.timeout_ms);
            requests(args.count, args.max_failures, |_| {
                http_request(args.target, args.bind, timeout)
            });
            Ok(())
        }
        Command::Udp(args) => {
            let common = &args.common;
            let timeout = Duration::from_millis(common.timeout_ms);
            requests(common.count, common.max_failures, |i| {
                let port = match args.source_port {
                    Some(base) => Some(
                        u16::try_from(i)
                            .ok()
                            .and_then(|i| base.checked_add(i))
                            .ok_or_else(|| format!("source port {base}+{i} is out of range"))?,
                    ),
                    None => None,
                };
                udp_request(common.target, common.bind, port, timeout)
            });
            Ok(())
        }
        Command::Pmtu(args) => pmtu(&args),
        Command::Hold(args) => hold(&args),
        Command::Stream(args) => stream(&args),
        Command::Vlan(args) => vlan::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes `count` requests, printing one result line each.
fn requests(
    count: u32,
    max_failures: Option<u32>,
    request: impl Fn(u32) -> Result<String, String>,
) {
    let mut failures = 0;
    for i in 0..count {
        if max_failures.is_some_and(|max| failures >= max) {
            println!("fail skipped after {failures} failures");
            continue;
        }
        match request(i) {
            Ok(line) => println!("ok {line}"),
            Err(reason) => {
                failures += 1;
                println!("fail {reason}");
            }
        }
    }
}

fn serve(
    name: &str,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    lifetime: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + lifetime;
    let mut threads = Vec::new();
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let name = name.clone();
                        std::thread::spawn(move || answer_http(stream, &name, peer, deadline));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    if let Some(addr) = udp {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; MAX_MESSAGE];
            while Instant::now() < deadline {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
                }
            }
        }));
    }
    println!("serving");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Answers requests on one connection until the client closes it, asks to close, or idles.
fn answer_http(mut stream: TcpStream, name: &str, peer: SocketAddr, deadline: Instant) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(KEEP_ALIVE_IDLE));
    let body = format!("{name} {peer}\n");
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        if Instant::now() > deadline {
            return;
        }
        // Clients send one request and wait for its answer, so a request never shares a read
        // with the next one.
        let Some(request) = read_head(&mut stream) else {
            return;
        };
        let close = String::from_utf8_lossy(&request)
            .to_ascii_lowercase()
            .contains("connection: close");
        let connection = if close { "close" } else { "keep-alive" };
        // One write: `write!` would send the pieces as separate segments, and Nagle's
        // algorithm with the client's delayed ACK would hold each answer up by tens of ms.
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: \
             {connection}\r\n\r\n{body}",
            body.len()
        );
        let written = stream.write_all(answer.as_bytes());
        if close || written.is_err() {
            return;
        }
    }
}

/// Reads up to the end of an HTTP head; `None` on end of stream, error or an oversized head.
fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_MESSAGE {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

fn http_request(
    target: SocketAddrV4,
    bind: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<String, String> {
    let mut stream = tcp_connect(target, bind, timeout).map_err(|e| format!("connect: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let answer = http_exchange(&mut stream, target, false)?;
    Ok(format!("{answer} {local}"))
}

/// One request on `stream`; returns the body (backend name and the client address it saw).
fn http_exchange(
    stream: &mut TcpStream,
    target: SocketAddrV4,
    keep_alive: bool,
) -> Result<String, String> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    // One write, so the request leaves in one segment (see `answer_http`).
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: {connection}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| io_failure("send", &e))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 512];
    // Read the head, then as much body as it announces (the connection may stay open).
    let mut wanted = None;
    while response.len() < MAX_MESSAGE && wanted.is_none_or(|w| response.len() < w) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Err(io_failure("receive", &e)),
        }
        if wanted.is_none() {
            wanted = expected_length(&response);
        }
    }
    if response.is_empty() {
        return Err("closed by the peer before an answer".to_owned());
    }
    let response = String::from_utf8_lossy(&response);
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(format!("no HTTP answer: {response:?}"));
    };
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {head:?}"));
    }
    Ok(body.trim().to_owned())
}

/// A failed send or receive, with the kinds a test tells apart named plainly.
fn io_failure(what: &str, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            format!("{what}: reset ({error})")
        }
        // A socket read timeout shows as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("{what}: timeout ({error})")
        }
        _ => format!("{what}: {error}"),
    }
}

/// The length of the whole response once its head is complete: head plus `Content-Length`.
fn expected_length(response: &[u8]) -> Option<usize> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    Some(end + length)
}

fn udp_request(
    target: SocketAddrV4,
    bind: Option<Ipv4Addr>,
    port: Option<u16>,
    timeout: Duration,
) -> Result<String, String> {
    let local = SocketAddrV4::new(bind.unwrap_or(Ipv4Addr::UNSPECIFIED), port.unwrap_or(0));
    // A fixed port is reused by the next run at once; SO_REUSEADDR keeps that from depending on
    // how quickly the previous socket went away.
    let socket = if port.is_some() {
        bound_socket(libc::SOCK_DGRAM, local, true).map(UdpSocket::from)
    } else {
        UdpSocket::bind(local)
    }
    .map_err(|e| format!("bind {local}: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket
        .connect(target)
        .map_err(|e| format!("connect: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    socket.send(b"hello").map_err(|e| udp_error("send", &e))?;
    let mut buf = [0u8; MAX_MESSAGE];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| udp_error("receive", &e))?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    Ok(format!("{} {}:{}", answer.trim(), local.ip(), local.port()))
}

/// `refused` for an ICMP port unreachable (the kernel matched it to this connected socket), so
/// tests can tell it from a timeout or a wrong answer.
fn udp_error(what: &str, error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::ConnectionRefused {
        "refused".to_owned()
    } else {
        format!("{what}: {error}")
    }
}

fn pmtu(args: &Pmtu) -> io::Result<()> {
    let socket = UdpSocket::bind((args.bind.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?;
    // DO: the kernel sets DF, never fragments locally, and takes frag-needed answers as the path
    // MTU, which is what a client behind the load balancer must be able to learn.
    set_int_option(
        &socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    socket.connect(args.target)?;
    socket.set_read_timeout(Some(Duration::from_millis(args.wait_ms.max(1))))?;
    let payload = vec![b'x'; args.size];
    let mut buf = [0u8; MAX_MESSAGE];
    for _ in 0..args.attempts {
        match socket.send(&payload) {
            Ok(n) => println!("sent {n}"),
            // The kernel refuses datagrams above the path MTU it has learned: nothing more to do.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                println!("send refused: {e}");
                break;
            }
            Err(e) => println!("send failed: {e}"),
        }
        match socket.recv(&mut buf) {
            Ok(n) => println!("answer {}", String::from_utf8_lossy(&buf[..n]).trim()),
            Err(e) => println!("no answer: {e}"),
        }
    }
    println!(
        "mtu {}",
        get_int_option(&socket, libc::IPPROTO_IP, libc::IP_MTU)?
    );
    Ok(())
}

fn hold(args: &Hold) -> io::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut streams = Vec::new();
    for _ in 0..args.count {
        let held = tcp_connect(args.target, args.bind, timeout)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut stream| {
                let local = stream.local_addr().map_err(|e| e.to_string())?;
                let answer = http_exchange(&mut stream, args.target, true)?;
                Ok((stream, format!("{answer} {local}")))
            });
        match held {
            Ok((stream, line)) => {
                println!("held ok {line}");
                streams.push(Some(stream));
            }
            Err(reason) => {
                println!("held fail {reason}");
                streams.push(None);
            }
        }
    }
    println!("holding");
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    while !args.until.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{} did not appear within {}s",
                args.until.display(),
                args.wait_secs
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for stream in &mut streams {
        let Some(stream) = stream else {
            println!("again fail no connection");
            continue;
        };
        let result = stream
            .local_addr()
            .map_err(|e| e.to_string())
            .and_then(|local| {
                http_exchange(stream, args.target, true).map(|answer| format!("{answer} {local}"))
            });
        match result {
            Ok(line) => println!("again ok {line}"),
            Err(reason) => println!("again fail {reason}"),
        }
    }
    Ok(())
}

fn stream(args: &Stream) -> io::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let mut connections = Vec::new();
    for _ in 0..args.count {
        let connected = tcp_connect(args.target, args.bind, timeout)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut stream| {
                // Sends must not block forever either (a full send buffer toward a dead path).
                stream
                    .set_write_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                let local = stream.local_addr().map_err(|e| e.to_string())?;
                let answer = http_exchange(&mut stream, args.target, true)?;
                Ok((stream, answer, local))
            });
        match connected {
            Ok((stream, answer, local)) => {
                println!("connected ok {answer} {local}");
                let backend = answer.split_whitespace().next().unwrap_or("").to_owned();
                connections.push((stream, backend));
            }
            Err(reason) => println!("connected fail {reason}"),
        }
    }
    println!("streaming");
    let interval = Duration::from_millis(args.interval_ms);
    // Bounds the loop by count as well as by time: more requests than the hard limit allows.
    let max_requests = args.max_secs.saturating_mul(1000) / args.interval_ms + 1;
    let threads: Vec<_> = connections
        .into_iter()
        .map(|(stream, backend)| {
            let until = args.until.clone();
            let target = args.target;
            std::thread::spawn(move || {
                keep_streaming(
                    stream,
                    target,
                    &backend,
                    &until,
                    interval,
                    deadline,
                    max_requests,
                )
            })
        })
        .collect();
    let mut gave_up = false;
    for thread in threads {
        gave_up |= thread.join().unwrap_or(true);
    }
    if gave_up {
        return Err(io::Error::other(format!(
            "{} did not appear within {}s",
            args.until.display(),
            args.max_secs
        )));
    }
    Ok(())
}

/// Makes a request on `stream` every `interval` until `until` exists, and prints how the
/// connection ended. Returns whether it gave up at the hard limit.
fn keep_streaming(
    mut stream: TcpStream,
    target: SocketAddrV4,
    backend: &str,
    until: &std::path::Path,
    interval: Duration,
    deadline: Instant,
    max_requests: u64,
) -> bool {
    // The request that opened the connection counts.
    let mut requests: u64 = 1;
    let mut slowest = Duration::ZERO;
    let failure = loop {
        if until.exists() {
            println!("stream ok {backend} {requests} {}", slowest.as_millis());
            return false;
        }
        if Instant::now() > deadline || requests >= max_requests {
            break format!("gave up: {} did not appear in time", until.display());
        }
        std::thread::sleep(interval);
        let started = Instant::now();
        match http_exchange(&mut stream, target, true) {
            Ok(answer) => {
                slowest = slowest.max(started.elapsed());
                let answered_by = answer.split_whitespace().next().unwrap_or("");
                if answered_by != backend {
                    break format!("backend changed from {backend} to {answered_by}");
                }
                requests += 1;
            }
            Err(reason) => break reason,
        }
    };
    println!("stream fail {failure} after {requests}");
    failure.starts_with("gave up")
}

/// A TCP connection to `target`, from `bind` if given, within `timeout`.
fn tcp_connect(
    target: SocketAddrV4,
    bind: Option<Ipv4Addr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(bind) = bind else {
        let stream = TcpStream::connect_timeout(&target.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        return Ok(stream);
    };
    // std cannot bind before connecting: build the socket by hand, then hand it to std.
    let stream = TcpStream::from(bound_socket(
        libc::SOCK_STREAM,
        SocketAddrV4::new(bind, 0),
        false,
    )?);
    // Linux bounds a blocking connect by the send timeout (it then fails with EINPROGRESS).
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let addr = sockaddr(target);
    // SAFETY: `addr` is a valid sockaddr_in and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return Err(if error.raw_os_error() == Some(libc::EINPROGRESS) {
            io::Error::new(io::ErrorKind::TimedOut, "connection timed out")
        } else {
            error
        });
    }
    Ok(stream)
}

/// A new IPv4 socket of type `kind` bound to `local`, with `SO_REUSEADDR` if `reuse_addr`.
fn bound_socket(kind: libc::c_int, local: SocketAddrV4, reuse_addr: bool) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if reuse_addr {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let addr = sockaddr(local);
    // SAFETY: `addr` is a valid sockaddr_in and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn set_int_option(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives for the call and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            socklen::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int_option(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: `value` and `len` live for the call and `len` is the size of `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A tagged link without VLAN devices: the test kernel has neither 802.1Q (`CONFIG_VLAN_8021Q`)
/// nor TC's vlan action, so two tiny TC programs, written here as raw instructions (no eBPF
/// toolchain needed for the probe), do what the VLAN devices' transmit and receive would.
///
/// Egress: pushes the tags with `bpf_skb_vlan_push`, attached first among the interface's tcx
/// programs, so a program attached later (the agent's) sees what it would see under a VLAN
/// device: the outer tag in the skb's metadata and inner tags in the data. With VLAN offload off
/// on the veth, the kernel then writes the outer tag into the frame as well.
/// Ingress: pops as many tags with `bpf_skb_vlan_pop`, so the kernel takes the frame as untagged
/// (without a VLAN device it would drop a tagged one). XDP runs before it and sees the tags.
mod vlan {
    use std::{
        ffi::CString,
        io,
        os::fd::{FromRawFd as _, OwnedFd},
        time::{Duration, Instant},
    };

    use super::Vlan;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    /// With no relative program: attach before every other one.
    const BPF_F_BEFORE: u32 = 1 << 3;
    const FUNC_SKB_VLAN_PUSH: i32 = 18;
    const FUNC_SKB_VLAN_POP: i32 = 19;
    /// `TCX_NEXT` (`TC_ACT_UNSPEC`): let the next program and the stack decide.
    const TCX_NEXT: i32 = -1;
    const LICENSE: &[u8] = b"Dual MIT/GPL\0";

    /// `bpf_attr` for `BPF_PROG_LOAD`, up to the fields used; the rest stays zero.
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        rest: [u8; 80],
    }

    /// `bpf_attr` for `BPF_LINK_CREATE` with tcx options.
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        pad: u32,
        expected_revision: u64,
        rest: [u8; 96],
    }

    fn insn(code: u8, dst: u8, src: u8, imm: i32) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[0] = code;
        bytes[1] = (src << 4) | dst;
        bytes[4..].copy_from_slice(&imm.to_le_bytes());
        bytes
    }
    fn mov_reg(dst: u8, src: u8) -> [u8; 8] {
        insn(0xbf, dst, src, 0) // BPF_ALU64 | BPF_MOV | BPF_X
    }
    fn mov_imm(dst: u8, imm: i32) -> [u8; 8] {
        insn(0xb7, dst, 0, imm) // BPF_ALU64 | BPF_MOV | BPF_K
    }
    fn call(helper: i32) -> [u8; 8] {
        insn(0x85, 0, 0, helper) // BPF_JMP | BPF_CALL
    }
    fn exit() -> [u8; 8] {
        insn(0x95, 0, 0, 0) // BPF_JMP | BPF_EXIT
    }

    /// `r6 = ctx`; per tag `bpf_skb_vlan_push(ctx, htons(proto), id)`; `return TCX_NEXT`.
    fn push_program(tags: &[(u16, u16)]) -> Vec<[u8; 8]> {
        let mut program = vec![mov_reg(6, 1)];
        for &(proto, id) in tags {
            // The helper takes the protocol in network byte order in the low 16 bits.
            let proto_be = i32::from(u16::from_ne_bytes(proto.to_be_bytes()));
            program.extend([
                mov_reg(1, 6),
                mov_imm(2, proto_be),
                mov_imm(3, i32::from(id)),
                call(FUNC_SKB_VLAN_PUSH),
            ]);
        }
        program.extend([mov_imm(0, TCX_NEXT), exit()]);
        program
    }

    /// `r6 = ctx`; `count` times `bpf_skb_vlan_pop(ctx)`; `return TCX_NEXT`.
    fn pop_program(count: usize) -> Vec<[u8; 8]> {
        let mut program = vec![mov_reg(6, 1)];
        for _ in 0..count {
            program.extend([mov_reg(1, 6), call(FUNC_SKB_VLAN_POP)]);
        }
        program.extend([mov_imm(0, TCX_NEXT), exit()]);
        program
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
        // SAFETY: `attr` is a live, fully initialised bpf_attr prefix of the size passed, and
        // the kernel reads or writes nothing beyond it (the pointers in it are valid too).
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf() result out of range"))?;
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn load(program: &[[u8; 8]]) -> io::Result<OwnedFd> {
        let mut log = vec![0u8; 65536];
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: u32::try_from(program.len()).map_err(io::Error::other)?,
            insns: program.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level: 1,
            log_size: u32::try_from(log.len()).map_err(io::Error::other)?,
            log_buf: log.as_mut_ptr() as u64,
            rest: [0; 80],
        };
        bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            io::Error::other(format!(
                "loading a VLAN program: {e}: {}",
                String::from_utf8_lossy(&log[..end])
            ))
        })
    }

    fn attach(
        program: &OwnedFd,
        ifindex: u32,
        attach_type: u32,
        flags: u32,
    ) -> io::Result<OwnedFd> {
        use std::os::fd::AsRawFd as _;
        let mut attr = LinkCreateAttr {
            prog_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
            target_ifindex: ifindex,
            attach_type,
            flags,
            relative_fd: 0,
            pad: 0,
            expected_revision: 0,
            rest: [0; 96],
        };
        bpf(BPF_LINK_CREATE, &mut attr)
            .map_err(|e| io::Error::other(format!("attaching a VLAN program (tcx): {e}")))
    }

    pub(super) fn run(args: &Vlan) -> io::Result<()> {
        let name = CString::new(args.iface.clone()).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::other(format!("no interface {}", args.iface)));
        }
        let push = load(&push_program(&args.tags))?;
        let pop = load(&pop_program(args.tags.len()))?;
        // The links detach when this process exits and the kernel closes their descriptors.
        let _egress = attach(&push, ifindex, BPF_TCX_EGRESS, BPF_F_BEFORE)?;
        let _ingress = attach(&pop, ifindex, BPF_TCX_INGRESS, 0)?;
        println!("tagging");
        let deadline = Instant::now() + Duration::from_secs(args.lifetime_secs);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}
