//! The test peer that runs inside the namespaces.
//!
//! `serve`: a backend pod. Answers HTTP on a TCP port and datagrams on a UDP port with its own
//! name and the client address it saw, for a bounded time.
//!
//! `http` / `udp`: a client. Makes `count` requests, each from a new socket (so a new source port
//! and a new flow), and prints one line per request:
//! `ok <backend name> <client address the backend saw> <local address>` or `fail <reason>`.
//! A UDP answer must come from exactly the address and port the request went to.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
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
    Udp(Requests),
}

#[derive(Args)]
struct Requests {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Upper bound on a request or answer; anything longer is cut.
const MAX_MESSAGE: usize = 4096;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve {
            name,
            tcp,
            udp,
            lifetime_secs,
        } => serve(&name, tcp, udp, Duration::from_secs(lifetime_secs)),
        Command::Http(args) => {
            requests(&args, http_request);
            Ok(())
        }
        Command::Udp(args) => {
            requests(&args, udp_request);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes `args.count` requests, printing one result line each.
fn requests(args: &Requests, request: fn(SocketAddr, Duration) -> Result<String, String>) {
    for _ in 0..args.count {
        match request(args.target, Duration::from_millis(args.timeout_ms)) {
            Ok(line) => println!("ok {line}"),
            Err(reason) => println!("fail {reason}"),
        }
    }
}

fn serve(
    name: &str,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    lifetime: Duration,
) -> std::io::Result<()> {
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
                        std::thread::spawn(move || answer_http(stream, &name, peer));
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

fn answer_http(mut stream: TcpStream, name: &str, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut request = Vec::new();
    let mut buf = [0u8; 512];
    while request.len() < MAX_MESSAGE && !request.ends_with(b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{name} {peer}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn http_request(target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 512];
    while response.len() < MAX_MESSAGE {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(format!("no HTTP answer: {response:?}"));
    };
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {head:?}"));
    }
    Ok(format!("{} {local}", body.trim()))
}

fn udp_request(target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(b"hello", target)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, from) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("receive: {e}"))?;
    if from != target {
        return Err(format!("answer came from {from}, not {target}"));
    }
    let answer = String::from_utf8_lossy(&buf[..n]);
    Ok(format!("{} {}:{}", answer.trim(), local.ip(), local.port()))
}
