//! A tiny HTTP/1.1 server for the metrics and health endpoints: GET and HEAD only, one
//! request per connection (`Connection: close`), bounded request size, time limits on reading
//! and writing, a cap on concurrent connections. Anything else gets a 4xx answer or a closed
//! connection; no input can make it panic.
//!
//! Tasks are spawned with `tokio::task::spawn_local`, so handlers may hold `Rc` state of the
//! agent: start servers from inside a `tokio::task::LocalSet` (for example
//! `LocalSet::new().run_until(agent.serve(..))`).

use std::{cell::Cell, fmt::Write as _, io, net::SocketAddr, rc::Rc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The largest request head accepted (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client has to send its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering, unread input is drained for this long before closing, so the kernel does
/// not reset the connection (and destroy the answer) because of bytes nobody read.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// Connections served at once per server; more are closed at once. Health checkers and
/// Prometheus open a few.
pub const MAX_CONNECTIONS: usize = 64;

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Headers besides `Content-Type`, `Content-Length` and `Connection`.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    #[must_use]
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// Answers a GET for a path (without the query); `None` is a 404.
pub type Handler = Rc<dyn Fn(&str) -> Option<Response>>;

/// A running server; dropping it stops accepting (connections in flight finish on their own,
/// within the time limits).
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves `handler` on it. Must be called inside a `LocalSet`.
    pub fn start(addr: SocketAddr, handler: Handler) -> io::Result<Self> {
        // std's bind sets SO_REUSEADDR, so a restarted agent gets its port back at once.
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let local_addr = listener.local_addr()?;
        let task = tokio::task::spawn_local(accept_loop(listener, handler));
        Ok(Server { local_addr, task })
    }

    /// The bound address (the real port when `addr` had port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, handler: Handler) {
    let active = Rc::new(Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if active.get() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                active.set(active.get() + 1);
                let active = Rc::clone(&active);
                let handler = Rc::clone(&handler);
                tokio::task::spawn_local(async move {
                    serve_connection(stream, &handler).await;
                    active.set(active.get().saturating_sub(1));
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                log::warn!(
                    "HTTP server on {:?}: accepting a connection failed: {e}",
                    listener.local_addr().ok()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum ReadError {
    TooLarge,
    /// Closed, reset or timed out before a whole head arrived: nobody to answer.
    Gone,
}

/// Reads until the blank line that ends the head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| ReadError::Gone)?;
        if n == 0 {
            return Err(ReadError::Gone);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = find_head_end(&buf) {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(ReadError::TooLarge);
        }
    }
}

/// The end of the head: after `\r\n\r\n`, or `\n\n` from lenient clients.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .filter(|&end| end <= MAX_REQUEST_BYTES)
}

/// What the request line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Get { path: &'a str, head_only: bool },
    OtherMethod,
    Bad,
}

fn parse_request(head: &[u8]) -> Request<'_> {
    let Ok(head) = std::str::from_utf8(head) else {
        return Request::Bad;
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return Request::Bad;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match method {
        "GET" => Request::Get {
            path,
            head_only: false,
        },
        "HEAD" => Request::Get {
            path,
            head_only: true,
        },
        _ => Request::OtherMethod,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn encode(response: &Response, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        // Values are the agent's own; a line break would split the header, so drop it.
        let value: String = value.chars().filter(|c| !c.is_control()).collect();
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    out.into_bytes()
}

async fn serve_connection(mut stream: TcpStream, handler: &Handler) {
    let (response, head_only) =
        match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
            Err(_) | Ok(Err(ReadError::Gone)) => return,
            Ok(Err(ReadError::TooLarge)) => (
                Response::text(
                    431,
                    format!("request head larger than {MAX_REQUEST_BYTES} bytes\n"),
                ),
                false,
            ),
            Ok(Ok(head)) => match parse_request(&head) {
                Request::Get { path, head_only } => (
                    handler(path).unwrap_or_else(|| Response::text(404, "not found\n")),
                    head_only,
                ),
                Request::OtherMethod => {
                    let mut r = Response::text(405, "only GET and HEAD are served\n");
                    r.headers.push(("Allow", "GET, HEAD".to_owned()));
                    (r, false)
                }
                Request::Bad => (Response::text(400, "not an HTTP/1.x request\n"), false),
            },
        };
    let bytes = encode(&response, head_only);
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut drained = 0usize;
        let mut sink = [0u8; 4096];
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
pub(crate) mod tests;
