//! HTTP/1.1 framing on top of `httparse`: find one complete request at the start of a
//! connection's buffer, and encode answers. Only `Content-Length` bodies are accepted.

use super::routes::Reply;

/// Largest request body accepted by default (Firecracker's default too).
pub const MAX_BODY: usize = 50 * 1024;
/// The largest body limit `--http-api-max-payload-size` may set: each connection may buffer
/// that much.
pub const MAX_BODY_LIMIT: usize = 64 << 20;
/// Largest request line plus headers accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;

/// One complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client keeps the connection open after the answer.
    pub keep_alive: bool,
    /// Bytes of the buffer this request used.
    pub len: usize,
}

/// The state of the bytes at the start of a connection's buffer.
#[derive(Debug, PartialEq)]
pub enum Framing {
    /// More bytes are needed; `expect_continue` when the head is complete and the client waits
    /// for `100 Continue` before sending its body.
    Incomplete {
        expect_continue: bool,
    },
    Complete(Parsed),
    /// Cannot be served: answer this and close the connection.
    Invalid(Reply),
}

fn header_eq(value: &[u8], want: &str) -> bool {
    std::str::from_utf8(value)
        .map(|v| v.trim().eq_ignore_ascii_case(want))
        .unwrap_or(false)
}

/// Look for one request at the start of `buf`, with a body of at most [`MAX_BODY`] bytes.
pub fn frame(buf: &[u8]) -> Framing {
    frame_limited(buf, MAX_BODY)
}

/// Look for one request at the start of `buf`, with a body of at most `max_body` bytes.
pub fn frame_limited(buf: &[u8], max_body: usize) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Framing::Invalid(Reply::fault(
                    431,
                    format!("the request head is longer than {MAX_HEAD} bytes"),
                ));
            }
            return Framing::Incomplete {
                expect_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Framing::Invalid(Reply::fault(
                431,
                format!("the request has more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => {
            return Framing::Invalid(Reply::fault(
                400,
                format!("the request is not valid HTTP/1.1: {e}"),
            ))
        }
    };
    if head_len > MAX_HEAD {
        return Framing::Invalid(Reply::fault(
            431,
            format!("the request head is longer than {MAX_HEAD} bytes"),
        ));
    }
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            let Some(n) = parsed else {
                return Framing::Invalid(Reply::fault(
                    400,
                    "the Content-Length header is not a number",
                ));
            };
            if length.is_some_and(|l| l != n) {
                return Framing::Invalid(Reply::fault(
                    400,
                    "the request has conflicting Content-Length headers",
                ));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Framing::Invalid(Reply::fault(
                411,
                "chunked or encoded bodies are not supported: send a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            if header_eq(h.value, "close") {
                keep_alive = false;
            } else if header_eq(h.value, "keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !header_eq(h.value, "100-continue") {
                return Framing::Invalid(Reply::fault(
                    417,
                    "the only Expect value understood is 100-continue",
                ));
            }
            expect_continue = http11;
        }
    }
    let body_len = length.unwrap_or(0);
    if body_len > max_body {
        return Framing::Invalid(Reply::fault(
            413,
            format!("the body has {body_len} bytes, more than the limit of {max_body}"),
        ));
    }
    let total = head_len + body_len;
    if buf.len() < total {
        return Framing::Incomplete { expect_continue };
    }
    Framing::Complete(Parsed {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        body: buf[head_len..total].to_vec(),
        keep_alive,
        len: total,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Append the bytes of `reply` to `out`; `close` adds `Connection: close`.
pub fn encode(reply: &Reply, close: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let status = reply.status;
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: flint\r\n",
        reason(status)
    );
    if let Some(allow) = reply.allow {
        let _ = write!(out, "Allow: {allow}\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    match &reply.body {
        Some(body) => {
            let text = body.to_string();
            let _ = write!(
                out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
        }
        // A 204 has no body and no Content-Length.
        None if status == 204 => out.extend_from_slice(b"\r\n"),
        None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(s: &str) -> Parsed {
        match frame(s.as_bytes()) {
            Framing::Complete(p) => p,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn invalid(s: &[u8]) -> u16 {
        match frame(s) {
            Framing::Invalid(r) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let p = complete("GET / HTTP/1.1\r\nHost: x\r\n\r\nextra");
        assert_eq!(
            (p.method.as_str(), p.path.as_str(), p.keep_alive, p.len),
            ("GET", "/", true, 27)
        );
        assert!(p.body.is_empty());
        let p = complete("PUT /vm HTTP/1.1\r\ncontent-length: 2\r\nConnection: close\r\n\r\n{}");
        assert_eq!((p.body.as_slice(), p.keep_alive), (&b"{}"[..], false));
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn partial_requests_wait_for_more() {
        for s in [
            "",
            "GET",
            "GET / HTTP/1.1\r\n",
            "PUT /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}",
        ] {
            assert_eq!(
                frame(s.as_bytes()),
                Framing::Incomplete {
                    expect_continue: false
                },
                "{s:?}"
            );
        }
        assert_eq!(
            frame(b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            Framing::Incomplete {
                expect_continue: true
            }
        );
    }

    #[test]
    fn bad_framing_is_refused() {
        assert_eq!(
            invalid(b"PUT /vm HTTP/1.1\r\nContent-Length: 51201\r\n\r\n"),
            413
        );
        assert_eq!(
            invalid(b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            invalid(b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            400
        );
        assert_eq!(
            invalid(b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            invalid(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(invalid(b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(invalid(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"), 400);
        assert_eq!(invalid(b"\x01\x02 / HTTP/1.1\r\n\r\n"), 400);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(invalid(long.as_bytes()), 431);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            invalid(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn answers_are_encoded() {
        let mut out = Vec::new();
        encode(&Reply::no_content(), false, &mut out);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nServer: flint\r\n\r\n");
        out.clear();
        encode(&Reply::fault(400, "no"), true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nServer: flint\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"fault_message\":\"no\"}"
        );
    }
}
