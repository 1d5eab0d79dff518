#!/usr/bin/env python3
"""Write the seed corpora of the queue, net, rng and transport fuzz targets (run from fuzz/).

Every seed lays out a split queue as the targets expect it: descriptor table at 0 (16
entries), available ring at 0x100, used ring at 0x200. Buffers lie past the image (guest
memory is larger and zero there) unless their contents matter.
"""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4


def image(chains, extra=None, size=0x300):
    """Guest memory with `chains` (lists of (addr, len, flags)) laid out from descriptor 0 and
    made available in order; `extra` maps descriptor index to a raw descriptor."""
    mem = bytearray(size)
    heads, i = [], 0
    for chain in chains:
        heads.append(i)
        for j, (addr, length, flags) in enumerate(chain):
            last = j + 1 == len(chain)
            f = flags | (0 if last else NEXT)
            struct.pack_into("<QIHH", mem, 16 * i, addr, length, f, i + 1)
            i += 1
    for index, (addr, length, flags, nxt) in (extra or {}).items():
        struct.pack_into("<QIHH", mem, 16 * index, addr, length, flags, nxt)
        heads.append(index)
    struct.pack_into("<HH", mem, 0x100, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, 0x104 + 2 * k, h)
    return mem


def write(target, name, data):
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(bytes(data))


# virtio_chain: flags bits 0-2 = log2(queue size).
mixed = image([[(0x1000, 16, 0), (0x1100, 64, WRITE), (0x1200, 8, WRITE)], [(0x1300, 32, 0)]])
write("virtio_chain", "two_chains", [4] + list(mixed))
indirect = image([[(0x1000, 16, 0)]], extra={5: (0x1100, 32, INDIRECT, 0), 6: (0x1000, 8, NEXT, 6)})
write("virtio_chain", "indirect_and_loop", [4] + list(indirect))
bogus = image([[(0x1000, 16, WRITE)]])
struct.pack_into("<H", bogus, 0x102, 40)
write("virtio_chain", "bogus_avail_idx", [4] + list(bogus))

# rng: flags (bit 0 EVENT_IDX).
write("rng", "two_requests", [0] + list(image([[(0x1000, 64, WRITE)], [(0x1100, 16, WRITE), (0x1200, 16, WRITE)]])))
write("rng", "event_idx_mixed", [1] + list(image([[(0x1000, 16, 0), (0x1100, 32, WRITE)], [(0x1300, 0, WRITE)]])))

# net_tx: a 12-byte header and a 60-byte frame, split and whole; one too short.
tx = image([[(0x300, 12, 0), (0x30c, 60, 0)], [(0x300, 72, 0)], [(0x300, 20, 0)]], size=0x400)
tx[0x30c:0x30c + 14] = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
write("net_tx", "frames", [0] + list(tx))

# net_rx: flags (bit 0 mergeable buffers), four frame lengths, then memory.
rx = image([[(0x1000, 1526, WRITE)], [(0x1600, 1526, WRITE)], [(0x1c00, 1526, WRITE)], [(0x2200, 8, WRITE)]])
lens = struct.pack("<IIII", 60, 1500, 3000, 2)
write("net_rx", "mergeable", [1] + list(lens) + list(rx))
write("net_rx", "single_buffers", [0] + list(lens) + list(rx))

# mmio_transport: the driver's whole setup of the entropy device, a notification, the event
# loop's processing, a snapshot and restore, and a reset.
ops = []


def op(kind, offset, value, width=2):
    ops.append(struct.pack("<BHBI", kind, offset, width, value))


op(1, 0x70, 1)
op(1, 0x70, 3)
op(1, 0x24, 1)
op(1, 0x20, 1)
op(1, 0x70, 11)
op(0, 0x70, 0)
op(1, 0x30, 0)
op(0, 0x34, 0)
op(1, 0x38, 16)
for reg, addr in ((0x80, 0), (0x90, 0x100), (0xA0, 0x200)):
    op(1, reg, addr)
op(1, 0x44, 1)
op(1, 0x70, 15)
op(1, 0x50, 0)
op(2, 0, 0)
op(0, 0x60, 0)
op(1, 0x64, 1)
op(3, 0, 0)
op(0, 0x100, 0, width=3)
op(1, 0x70, 0)
mem = image([[(0x1000, 64, WRITE)], [(0x1100, 16, WRITE)]])
write("mmio_transport", "setup_notify_snapshot_reset", list(struct.pack("<H", len(mem))) + list(mem) + list(b"".join(ops)))
