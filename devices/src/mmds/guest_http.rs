//! The guest's HTTP/1.1 requests to the MMDS: `GET` (and `HEAD`) of a path in the store,
//! V2's `PUT /latest/api/token`, and the answers, as Firecracker gives them.

use std::time::{Duration, Instant};

use super::{Format, LookupError, Mmds, MmdsVersion};

/// Longest request head accepted (request line and headers); a longer one is answered 400 and
/// the connection closed.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// What one step of reading a connection's bytes gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete request of `len` bytes was answered with `response`; `close` asks to close
    /// the connection after it.
    Answered {
        len: usize,
        response: Vec<u8>,
        close: bool,
    },
}

fn response(status: u16, reason: &str, content_type: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: flint MMDS\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error(status: u16, reason: &str, message: &str) -> Vec<u8> {
    response(status, reason, "text/plain", message, "")
}

/// Answer the request at the start of `buf` from `mmds` at `now`.
pub fn answer(buf: &[u8], mmds: &mut Mmds, now: Instant) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Parsed::Incomplete,
        Ok(httparse::Status::Partial) => {
            return Parsed::Answered {
                len: buf.len(),
                response: error(400, "Bad Request", "The request is too long."),
                close: true,
            }
        }
        Err(_) => {
            return Parsed::Answered {
                len: buf.len(),
                response: error(400, "Bad Request", "The request is not HTTP/1.1."),
                close: true,
            }
        }
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    // A body is not part of any MMDS request: refuse rather than misread it as the next one.
    if header("content-length").is_some_and(|l| l != "0") || header("transfer-encoding").is_some() {
        return Parsed::Answered {
            len: buf.len(),
            response: error(400, "Bad Request", "MMDS requests have no body."),
            close: true,
        };
    }
    let close = header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"))
        || req.version == Some(0);
    let path = req.path.unwrap_or("/");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let response = match req.method.unwrap_or("") {
        "PUT" if path == "/latest/api/token" => token(mmds, now, &header),
        "GET" | "HEAD" => {
            let head_only = req.method == Some("HEAD");
            let mut r = get(mmds, path, now, &header);
            if head_only {
                if let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") {
                    r.truncate(end + 4);
                }
            }
            r
        }
        _ => response(
            405,
            "Method Not Allowed",
            "text/plain",
            "Not allowed HTTP method.",
            "Allow: GET, HEAD, PUT\r\n",
        ),
    };
    Parsed::Answered {
        len,
        response,
        close,
    }
}

fn token<'h>(mmds: &mut Mmds, now: Instant, header: &dyn Fn(&str) -> Option<&'h str>) -> Vec<u8> {
    if header("x-forwarded-for").is_some() {
        // A token must not be obtainable through a proxy in the guest.
        return error(
            400,
            "Bad Request",
            "Requests with X-Forwarded-For are refused.",
        );
    }
    let ttl = match header("x-metadata-token-ttl-seconds").map(str::parse::<u64>) {
        Some(Ok(s)) if (1..=super::MAX_TOKEN_TTL.as_secs()).contains(&s) => s,
        _ => {
            return error(
                400,
                "Bad Request",
                "X-metadata-token-ttl-seconds must be a number of seconds from 1 to 21600.",
            )
        }
    };
    let token = mmds.new_token(Duration::from_secs(ttl), now);
    if token.is_empty() {
        return error(500, "Internal Server Error", "No token could be made.");
    }
    response(200, "OK", "text/plain", &token, "")
}

fn get<'h>(
    mmds: &Mmds,
    path: &str,
    now: Instant,
    header: &dyn Fn(&str) -> Option<&'h str>,
) -> Vec<u8> {
    if mmds.version() == MmdsVersion::V2 {
        match header("x-metadata-token") {
            Some(t) if mmds.token_valid(t, now) => {}
            _ => {
                return error(
                    401,
                    "Unauthorized",
                    "No MMDS token or not a valid one: get one with PUT /latest/api/token.",
                )
            }
        }
    }
    let format = match header("accept") {
        Some(a) if a.to_ascii_lowercase().contains("application/json") => Format::Json,
        _ => Format::Imds,
    };
    match mmds.lookup(path, format) {
        Ok(body) => {
            let content_type = match format {
                Format::Json if !body.is_empty() => "application/json",
                _ => "text/plain",
            };
            response(200, "OK", content_type, &body, "")
        }
        Err(LookupError::NotFound) => error(404, "Not Found", "No such path in the MMDS."),
        Err(LookupError::UnsupportedType) => error(
            400,
            "Bad Request",
            "The value at that path cannot be written in IMDS format; ask with Accept: application/json.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mmds(version: MmdsVersion) -> Mmds {
        let mut m = Mmds::new(4096);
        m.put(json!({"latest": {"meta-data": {"id": "i-1", "n": 5}}}))
            .unwrap();
        m.configure(version, false);
        m
    }

    fn ask(m: &mut Mmds, req: &str) -> (String, bool) {
        match answer(req.as_bytes(), m, Instant::now()) {
            Parsed::Answered {
                response, close, ..
            } => (String::from_utf8(response).unwrap(), close),
            Parsed::Incomplete => panic!("incomplete: {req:?}"),
        }
    }

    fn body(r: &str) -> &str {
        r.split_once("\r\n\r\n").unwrap().1
    }

    #[test]
    fn v1_gets_in_both_formats() {
        let mut m = mmds(MmdsVersion::V1);
        let (r, close) = ask(&mut m, "GET /latest/meta-data/id HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert_eq!(body(&r), "i-1");
        assert!(!close);
        let (r, _) = ask(
            &mut m,
            "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(body(&r), r#"{"id":"i-1","n":5}"#);
        assert!(r.contains("Content-Type: application/json"), "{r}");
        let (r, close) = ask(&mut m, "GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        assert!(close);
        let (r, _) = ask(&mut m, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let (r, _) = ask(&mut m, "HEAD /latest/meta-data/id HTTP/1.1\r\n\r\n");
        assert!(
            r.ends_with("\r\n\r\n") && r.contains("Content-Length: 3"),
            "{r}"
        );
    }

    #[test]
    fn v2_needs_a_session_token() {
        let mut m = mmds(MmdsVersion::V2);
        let (r, _) = ask(&mut m, "GET /latest/meta-data/id HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let (r, _) = ask(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let token = body(&r).to_string();
        let (r, _) = ask(
            &mut m,
            &format!("GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"),
        );
        assert_eq!(body(&r), "i-1", "{r}");
        let (r, _) = ask(
            &mut m,
            "GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: wrong\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        for bad in [
            "PUT /latest/api/token HTTP/1.1\r\n\r\n",
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n",
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        ] {
            let (r, _) = ask(&mut m, bad);
            assert!(r.starts_with("HTTP/1.1 400"), "{bad:?}: {r}");
        }
        let (r, _) = ask(&mut m, "DELETE /latest HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }

    #[test]
    fn hostile_requests_get_an_answer_and_a_closed_connection() {
        let mut m = mmds(MmdsVersion::V1);
        assert_eq!(
            answer(
                b"GET /latest HTTP/1.1\r\nHost: x\r\n",
                &mut m,
                Instant::now()
            ),
            Parsed::Incomplete
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST));
        let (r, close) = ask(&mut m, &long);
        assert!(r.starts_with("HTTP/1.1 400") && close, "{r}");
        let (r, close) = ask(&mut m, "\x00\x01garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400") && close, "{r}");
        let (r, close) = ask(&mut m, "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert!(r.starts_with("HTTP/1.1 400") && close, "{r}");
    }
}
