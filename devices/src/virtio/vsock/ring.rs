//! The buffer of a connection's host data on its way to the guest: a byte ring the host socket
//! is read into with one `readv` over its free space, and whose bytes are handed out as (at
//! most) two slices, so they go from the socket to guest memory with no copy in between.
//!
//! The ring holds at most `CAP` bytes but allocates only what the stream needs: 4 KiB at
//! first, doubled (up to `CAP`) each time a read fills all the room there was. A connection
//! that carries small messages (an agent's requests) keeps a small buffer; a bulk stream
//! reaches `CAP` after its first few reads.

use std::io::{self, IoSliceMut, Read};

/// The first allocation.
const MIN_ALLOC: usize = 4096;

/// A byte ring of at most `CAP` bytes.
#[derive(Debug)]
pub struct ByteRing<const CAP: usize> {
    /// The storage (empty until something is put in): its length is the ring's current size.
    buf: Vec<u8>,
    /// Where the oldest byte is.
    start: usize,
    /// Bytes held.
    len: usize,
    /// The last read filled all the room there was: the source may have more, so the next
    /// read gets a larger buffer.
    grow: bool,
}

impl<const CAP: usize> Default for ByteRing<CAP> {
    fn default() -> Self {
        ByteRing {
            buf: Vec::new(),
            start: 0,
            len: 0,
            grow: false,
        }
    }
}

impl<const CAP: usize> ByteRing<CAP> {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left (up to `CAP`, whatever is allocated now).
    pub fn free(&self) -> usize {
        CAP - self.len
    }

    /// Make the storage at least `size` bytes (at most `CAP`), the bytes held moved to its
    /// front in order.
    fn resize(&mut self, size: usize) {
        let size = size.min(CAP);
        if size <= self.buf.len() {
            return;
        }
        let mut bigger = vec![0; size];
        let (a, b) = self.peek(self.len);
        bigger[..a.len()].copy_from_slice(a);
        bigger[a.len()..a.len() + b.len()].copy_from_slice(b);
        self.buf = bigger;
        self.start = 0;
    }

    /// The next size up from the current one.
    fn next_size(&self) -> usize {
        (self.buf.len() * 2).max(MIN_ALLOC)
    }

    /// The free storage as two slices, in order (the second empty unless it wraps).
    fn free_slices(&mut self) -> (&mut [u8], &mut [u8]) {
        let size = self.buf.len();
        if self.len == size {
            return (&mut [], &mut []);
        }
        // `len < size`, so `size > 0`.
        let end = (self.start + self.len) % size;
        if end >= self.start {
            // Free: [end, size) then [0, start).
            let (head, tail) = self.buf.split_at_mut(end);
            (tail, &mut head[..self.start])
        } else {
            // Free: [end, start).
            (&mut self.buf[end..self.start], &mut [])
        }
    }

    /// Append as much of `data` as fits in `CAP`; returns how much did.
    pub fn extend(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        if n == 0 {
            return 0;
        }
        let mut size = self.buf.len().max(MIN_ALLOC);
        while size < self.len + n {
            size *= 2;
        }
        self.resize(size);
        let (a, b) = self.free_slices();
        let in_a = n.min(a.len());
        a[..in_a].copy_from_slice(&data[..in_a]);
        b[..n - in_a].copy_from_slice(&data[in_a..n]);
        self.len += n;
        n
    }

    /// One vectored read from `src` into all of the free storage, grown first if the last read
    /// filled it. Returns what the read returned: 0 is the end of the stream whenever the ring
    /// had room (nothing is read, and 0 returned, only when it holds `CAP` bytes).
    pub fn read_from<R: Read>(&mut self, src: &mut R) -> io::Result<usize> {
        if self.buf.len() < CAP && (self.grow || self.len == self.buf.len()) {
            self.resize(self.next_size());
        }
        let room = self.buf.len() - self.len;
        if room == 0 {
            return Ok(0);
        }
        let (a, b) = self.free_slices();
        let n = src.read_vectored(&mut [IoSliceMut::new(a), IoSliceMut::new(b)])?;
        // A reader reporting more than it was given is a bug there; never count past the room.
        let n = n.min(room);
        self.len += n;
        self.grow = n == room;
        Ok(n)
    }

    /// The oldest `n` bytes (at most all held) as two slices, in order.
    pub fn peek(&self, n: usize) -> (&[u8], &[u8]) {
        let n = n.min(self.len);
        if n == 0 {
            return (&[], &[]);
        }
        let first = n.min(self.buf.len() - self.start);
        (
            &self.buf[self.start..self.start + first],
            &self.buf[..n - first],
        )
    }

    /// Drop the oldest `n` bytes (at most all held).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.len -= n;
        // Restart at the front when empty: the next read gets one contiguous slice.
        self.start = if self.len == 0 {
            0
        } else {
            (self.start + n) % self.buf.len()
        };
    }

    /// Drop everything held.
    pub fn clear(&mut self) {
        self.consume(self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that hands out `data` in reads of at most `chunk` bytes, spread over the
    /// buffers like readv(2), and counts its calls.
    struct Source {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        calls: usize,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [IoSliceMut::new(buf)])
        }
        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let mut left = self.chunk.min(self.data.len() - self.at);
            let mut n = 0;
            for b in bufs.iter_mut() {
                let k = left.min(b.len());
                b[..k].copy_from_slice(&self.data[self.at..self.at + k]);
                self.at += k;
                n += k;
                left -= k;
            }
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn take<const C: usize>(r: &mut ByteRing<C>, n: usize, out: &mut Vec<u8>) {
        let (a, b) = r.peek(n);
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        let k = a.len() + b.len();
        r.consume(k);
    }

    #[test]
    fn bytes_keep_their_order_across_the_wrap() {
        let data = pattern(10_000);
        let mut src = Source {
            data: data.clone(),
            at: 0,
            chunk: 333,
            calls: 0,
        };
        let mut r = ByteRing::<1000>::default();
        let mut out = Vec::new();
        let mut wrapped = 0;
        while out.len() < data.len() {
            while r.free() > 0 && src.at < data.len() {
                r.read_from(&mut src).unwrap();
            }
            // Odd sizes, so the wrap falls inside packets.
            let (a, b) = r.peek(617);
            if !b.is_empty() {
                wrapped += 1;
                assert_eq!(a.len() + b.len(), 617.min(r.len()));
            }
            take(&mut r, 617, &mut out);
        }
        assert_eq!(out, data);
        assert!(wrapped > 3, "the test must cross the wrap: {wrapped}");
        assert!(r.is_empty());
    }

    #[test]
    fn a_read_fills_both_sides_of_the_wrap_at_once() {
        let mut r = ByteRing::<16>::default();
        assert_eq!(r.extend(b"0123456789"), 10);
        let mut sink = Vec::new();
        take(&mut r, 8, &mut sink);
        assert_eq!(sink, b"01234567");
        // Held: "89" at 8..10; free: 10..16 and 0..8, 14 bytes in two pieces.
        let mut src = Source {
            data: b"abcdefghijklmnopq".to_vec(),
            at: 0,
            chunk: 100,
            calls: 0,
        };
        assert_eq!(r.read_from(&mut src).unwrap(), 14);
        assert_eq!(src.calls, 1);
        assert_eq!(r.free(), 0);
        assert_eq!(r.read_from(&mut src).unwrap(), 0, "full: no read");
        assert_eq!(src.calls, 1);
        let mut out = Vec::new();
        take(&mut r, 100, &mut out);
        assert_eq!(out, b"89abcdefghijklmn");
        assert_eq!(r.extend(&[1; 20]), 16, "extend stops at the room left");
    }

    #[test]
    fn storage_grows_only_while_reads_fill_it() {
        let mut r = ByteRing::<65536>::default();
        for len in [100, 3000] {
            let mut small = Source {
                data: vec![5; len],
                at: 0,
                chunk: usize::MAX,
                calls: 0,
            };
            assert_eq!(r.read_from(&mut small).unwrap(), len);
            assert_eq!(r.buf.len(), MIN_ALLOC, "small messages keep a small buffer");
            r.consume(len);
        }
        // A bulk stream: the storage doubles while reads fill it, up to CAP.
        let data = pattern(200_000);
        let mut bulk = Source {
            data: data.clone(),
            at: 0,
            chunk: usize::MAX,
            calls: 0,
        };
        let mut sizes = Vec::new();
        while r.free() > 0 {
            r.read_from(&mut bulk).unwrap();
            sizes.push(r.buf.len());
        }
        assert_eq!(sizes, [4096, 8192, 16384, 32768, 65536]);
        let mut out = Vec::new();
        take(&mut r, 1000, &mut out);
        // Room again, but never more storage than CAP.
        assert_eq!(r.read_from(&mut bulk).unwrap(), 1000);
        assert_eq!(r.buf.len(), 65536);
        take(&mut r, usize::MAX, &mut out);
        assert!(
            out == data[..out.len()],
            "bytes kept their order through the growth"
        );
        assert_eq!(out.len(), 65536 + 1000);
    }

    #[test]
    fn nothing_is_allocated_until_used_and_empty_restarts_at_the_front() {
        let mut r = ByteRing::<64>::default();
        assert!(r.buf.is_empty());
        assert_eq!(r.peek(10), (&[][..], &[][..]));
        r.consume(5);
        assert_eq!((r.len(), r.free()), (0, 64));
        r.extend(b"abc");
        assert_eq!(r.buf.len(), 64);
        r.consume(3);
        assert_eq!(r.start, 0);
        r.extend(b"xyz");
        r.clear();
        assert!(r.is_empty());
    }
}
