//! Fuzz the REST API's HTTP/1.1 framing and routing as a client's bytes on one connection:
//! every request found is routed (the API's own answers encoded as the server would send them),
//! and what cannot be served is refused. Nothing may panic, the server never waits for more
//! bytes than its limits allow, and every answer is a well-formed HTTP response.
//!
//! Input: one byte `n`, then the connection's bytes, repeated `1 + n % 32` times (so that short
//! inputs reach the head and body limits).

#![no_main]

use flint::api::http::{self, Framing, MAX_BODY, MAX_HEAD};
use flint::api::routes::{self, Reply, Routed};
use libfuzzer_sys::fuzz_target;
use vmm::controller::{RequestError, Response};

/// Most bytes a connection buffers: the API's own limits.
const MAX_BUFFERED: usize = MAX_HEAD + MAX_BODY;

/// Encode `reply` and check it parses back as one complete response with its status.
fn check_encoded(reply: &Reply, close: bool) {
    let mut out = Vec::new();
    http::encode(reply, close, &mut out);
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&out) {
        Ok(httparse::Status::Complete(head)) => {
            assert_eq!(resp.code, Some(reply.status));
            let body = out.len() - head;
            if let Some(v) = &reply.body {
                assert_eq!(body, v.to_string().len());
            } else {
                assert_eq!(body, 0);
            }
        }
        other => panic!(
            "answer {:?} does not parse: {other:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, bytes)) = data.split_first() else {
        return;
    };
    let copies = 1 + usize::from(n % 32);
    let buf: Vec<u8> = bytes.repeat(copies);

    let mut at = 0;
    while at < buf.len() {
        match http::frame(&buf[at..]) {
            Framing::Incomplete { .. } => {
                // Waiting for more is fine only while the request may still fit the limits.
                assert!(buf.len() - at <= MAX_BUFFERED);
                break;
            }
            Framing::Invalid(reply) => {
                assert!((400..500).contains(&reply.status), "{reply:?}");
                check_encoded(&reply, true);
                break;
            }
            Framing::Complete(p) => {
                assert!(p.len > 0 && p.len <= buf.len() - at);
                assert!(p.body.len() <= MAX_BODY);
                at += p.len;
                let reply = match routes::route(&p.method, &p.path, &p.body) {
                    Routed::Reply(reply) => reply,
                    Routed::Forward(request) => {
                        // The VMM's answers: done, or refused with its message.
                        check_encoded(
                            &routes::reply_for(&request, Ok(Response::Done), None),
                            false,
                        );
                        let refused = RequestError {
                            field: Some(vmm::Field::DriveId),
                            message: format!("{request:?}"),
                        };
                        routes::reply_for(&request, Err(refused), None)
                    }
                };
                check_encoded(&reply, !p.keep_alive);
            }
        }
    }
});
