use std::net::Ipv4Addr;

use tokio::task::LocalSet;

use super::*;

/// An answer as a client sees it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as raw bytes and reads the whole answer (the server closes).
pub(crate) async fn send(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(request)
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("no answer within 10 s"))
        .unwrap_or_else(|e| panic!("read: {e}"));
    let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("answer is UTF-8: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status in {status_line}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap_or_else(|| panic!("header {l:?}"));
            (n.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    let answer = Answer {
        status,
        headers,
        body: body.to_owned(),
    };
    assert_eq!(answer.header("connection"), Some("close"));
    if !request.starts_with(b"HEAD ") {
        assert_eq!(
            answer.header("content-length"),
            Some(answer.body.len().to_string().as_str())
        );
    }
    answer
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n\r\n").as_bytes(),
    )
    .await
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn echo_server() -> Server {
    let handler: Handler = Rc::new(|path| {
        (path == "/hello" || path == "/").then(|| Response::text(200, format!("path {path}\n")))
    });
    Server::start(loopback(), handler).unwrap_or_else(|e| panic!("bind: {e}"))
}

#[tokio::test]
async fn get_head_404_and_405() {
    LocalSet::new()
        .run_until(async {
            let server = echo_server();
            let addr = server.local_addr();
            let a = get(addr, "/hello?x=1").await;
            assert_eq!((a.status, a.body.as_str()), (200, "path /hello\n"));
            assert_eq!(a.header("content-type"), Some("text/plain; charset=utf-8"));

            let a = send(addr, b"HEAD /hello HTTP/1.0\r\n\r\n").await;
            assert_eq!((a.status, a.body.as_str()), (200, ""));
            assert_eq!(a.header("content-length"), Some("12"));

            assert_eq!(get(addr, "/nope").await.status, 404);
            assert_eq!(get(addr, "/hello/").await.status, 404);
            let a = send(addr, b"POST /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
            assert_eq!(a.status, 405);
            assert_eq!(a.header("allow"), Some("GET, HEAD"));
            // Bare LF line ends are accepted.
            assert_eq!(send(addr, b"GET / HTTP/1.1\n\n").await.status, 200);
        })
        .await;
}

#[tokio::test]
async fn garbage_and_oversized_requests_get_4xx_and_the_server_keeps_serving() {
    LocalSet::new()
        .run_until(async {
            let server = echo_server();
            let addr = server.local_addr();
            for garbage in [
                &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
                b"GET\r\n\r\n",
                b"GET /hello\r\n\r\n",
                b"GET hello HTTP/1.1\r\n\r\n",
                b"GET /hello HTTP/2.0\r\n\r\n",
                b"get /hello HTTP/1.1\r\n\r\n",
                b"GET /hello HTTP/1.1 extra\r\n\r\n",
                b"\r\n\r\n",
            ] {
                let a = send(addr, garbage).await;
                assert_eq!(a.status, 400, "{garbage:?}: {a:?}");
            }
            // A head without its end, larger than the limit.
            let mut big = b"GET /hello HTTP/1.1\r\nX-Filler: ".to_vec();
            big.resize(MAX_REQUEST_BYTES + 4096, b'a');
            let a = send(addr, &big).await;
            assert_eq!(a.status, 431, "{a:?}");
            // Just under the limit is fine.
            let mut fits = b"GET /hello HTTP/1.1\r\nX-Filler: ".to_vec();
            fits.resize(MAX_REQUEST_BYTES - 4, b'a');
            fits.extend_from_slice(b"\r\n\r\n");
            assert_eq!(send(addr, &fits).await.status, 200);
            assert_eq!(get(addr, "/hello").await.status, 200);
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_the_read_timeout() {
    LocalSet::new()
        .run_until(async {
            let server = echo_server();
            let mut stream = TcpStream::connect(server.local_addr())
                .await
                .unwrap_or_else(|e| panic!("connect: {e}"));
            stream
                .write_all(b"GET /hello HTTP/1.1\r\n")
                .await
                .unwrap_or_else(|e| panic!("write: {e}"));
            let mut raw = Vec::new();
            // Paused time jumps ahead when everything is idle: this returns once the server
            // gave up, with nothing sent.
            let read = tokio::time::timeout(READ_TIMEOUT * 2, stream.read_to_end(&mut raw)).await;
            assert!(matches!(read, Ok(Ok(0))), "{read:?} {raw:?}");
        })
        .await;
}

#[tokio::test]
async fn dropping_the_server_closes_the_port() {
    LocalSet::new()
        .run_until(async {
            let server = echo_server();
            let addr = server.local_addr();
            assert_eq!(get(addr, "/").await.status, 200);
            drop(server);
            // The aborted task drops its listener the next time the LocalSet runs it.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert!(TcpStream::connect(addr).await.is_err());
        })
        .await;
}

#[test]
fn request_line_parsing() {
    assert_eq!(
        parse_request(b"GET /a?b HTTP/1.1\r\n"),
        Request::Get {
            path: "/a",
            head_only: false
        }
    );
    assert_eq!(
        parse_request(b"DELETE / HTTP/1.1\r\n"),
        Request::OtherMethod
    );
    assert_eq!(parse_request(b"GET  / HTTP/1.1\r\n"), Request::Bad);
    assert_eq!(parse_request(b"\xff / HTTP/1.1\r\n"), Request::Bad);
    assert_eq!(
        find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
        Some(24)
    );
    assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
}
