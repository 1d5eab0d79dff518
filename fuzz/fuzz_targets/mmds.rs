//! Fuzz the MMDS as a guest reaches it: the input is a sequence of guest frames (each a
//! little-endian u16 length, then that many bytes) handed to a real MMDS endpoint (ARP, IPv4,
//! TCP by smoltcp, then flint's HTTP handling and data store), and the raw bytes of one HTTP
//! request for the request parser alone. It must never panic or hang, never queue more than
//! its bounds, and every frame it hands back must be a well-formed Ethernet frame from the
//! MMDS's own MAC address.

#![no_main]

use std::time::Instant;

use devices::mmds::endpoint::{MmdsEndpoint, MMDS_MAC};
use devices::mmds::guest_http::{answer, Parsed};
use devices::mmds::{Mmds, MmdsVersion, DEFAULT_IPV4};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = Mmds::shared(4096);
    {
        let mut s = store.lock().unwrap();
        s.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "n": 1}}}))
            .unwrap();
        if data.first().is_some_and(|b| b & 1 != 0) {
            s.configure(MmdsVersion::V2, false);
        }
    }
    // The request parser alone, on the whole input.
    if let Parsed::Answered { len, response, .. } =
        answer(data, &mut store.lock().unwrap(), Instant::now())
    {
        assert!(len <= data.len());
        assert!(response.starts_with(b"HTTP/1.1 "));
    }
    // The endpoint, fed frame by frame.
    let mut endpoint = MmdsEndpoint::new(DEFAULT_IPV4, store);
    let mut rest = data.get(1..).unwrap_or_default();
    let mut out = 0usize;
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let frame = &rest[..len.min(rest.len())];
        rest = &rest[frame.len()..];
        if endpoint.wants(frame) {
            endpoint.receive(frame);
        }
        while let Some(f) = endpoint.next_frame() {
            assert!(f.len() >= 14 && f.len() <= 1514, "{} bytes", f.len());
            assert_eq!(&f[6..12], &MMDS_MAC[..]);
            out += 1;
        }
    }
    assert!(out <= 64 * (data.len() + 1));
});
