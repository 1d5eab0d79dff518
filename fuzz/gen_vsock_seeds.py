#!/usr/bin/env python3
"""Write the seed corpora of the vsock fuzz targets (seeds/vsock_packet, seeds/vsock_muxer).

Run from fuzz/: python3 gen_vsock_seeds.py. The layouts are described at the top of
fuzz_targets/vsock_packet.rs and fuzz_targets/vsock_muxer.rs.
"""
import os
import struct

HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes


def hdr(op, length=0, src_cid=3, dst_cid=2, src_port=40000, dst_port=1000, type_=1, flags=0):
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, 1 << 18, 0)


def packet_image(chains, blobs):
    """chains: lists of (addr, len) descriptors; blobs: {addr: bytes}."""
    mem = bytearray(0x1000)
    index = 0
    heads = []
    for chain in chains:
        heads.append(index)
        for i, (addr, length) in enumerate(chain):
            nxt = index + 1
            flags = 1 if i + 1 < len(chain) else 0
            struct.pack_into("<QIHH", mem, 16 * index, addr, length, flags, nxt)
            index += 1
    struct.pack_into("<HH", mem, 0x100, 0, len(heads))
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, 0x104 + 2 * i, h)
    for addr, data in blobs.items():
        mem[addr:addr + len(data)] = data
    return bytes([0]) + bytes(mem).rstrip(b"\0")


def write(target, name, data):
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(data)


# vsock_packet
rw = hdr(5, 6) + b"abcdef"
write("vsock_packet", "rw", packet_image([[(0x300, 44), (0x400, 6)]], {0x300: rw[:44], 0x400: rw[44:]}))
write("vsock_packet", "split_header", packet_image(
    [[(0x300, 30), (0x380, 14), (0x400, 6)]], {0x300: rw[:30], 0x380: rw[30:44], 0x400: rw[44:]}))
write("vsock_packet", "request_and_bad", packet_image(
    [[(0x300, 44)], [(0x380, 40)], [(0x400, 44), (0x480, 3)]],
    {0x300: hdr(1), 0x380: hdr(1)[:40], 0x400: hdr(5, 10)}))
write("vsock_packet", "wrong_fields", packet_image(
    [[(0x300, 44)], [(0x380, 44)], [(0x400, 44)]],
    {0x300: hdr(9), 0x380: hdr(6, length=5), 0x400: hdr(1, src_cid=7, type_=2)}))
write("vsock_packet", "connect_line", b"\x00CONNECT 1234\n")

# vsock_muxer: opcode bytes and arguments (see World::step).
def op_packet(op, guest=0, host=4, flags=0, buf_alloc=0x4000, fwd=0, len_byte=0, mods=0):
    return bytes([0, (op - 1) | mods, guest, host, flags]) + struct.pack("<HH", buf_alloc, fwd) + bytes([len_byte])

RX16, LOOP, READ, EXPIRE, ACCEPT = bytes([1, 15]), bytes([6]), bytes([5]), bytes([9]), bytes([10])
connect = lambda b=0: bytes([2, b])
host_write = lambda n, i=0: bytes([3, n, i])

write("vsock_muxer", "host_to_guest", RX16 + connect(0) + LOOP + op_packet(2) + host_write(10) + LOOP + READ
      + op_packet(5, len_byte=8) + LOOP + READ + op_packet(7) + op_packet(4, flags=3) + LOOP + READ)
write("vsock_muxer", "guest_to_host", RX16 + op_packet(1, host=0) + LOOP + ACCEPT + op_packet(5, host=0, len_byte=100)
      + LOOP + READ + host_write(50) + LOOP + op_packet(6, host=0, fwd=1) + bytes([4, 1]) + LOOP + EXPIRE + LOOP)
write("vsock_muxer", "flood_without_rx", b"".join(op_packet(5, guest=i % 4, host=2 + i % 2, len_byte=1) for i in range(40))
      + RX16 + LOOP + RX16 + LOOP)
write("vsock_muxer", "restore", bytes([11, 0]) + connect(0x80) + LOOP + bytes([8, 0]) + bytes([8, 0]) + RX16 + LOOP
      + op_packet(2) + LOOP + READ + EXPIRE)
write("vsock_muxer", "reset_and_lies", RX16 + connect(1) + connect(0xc0) + LOOP + op_packet(2, guest=1)
      + op_packet(5, guest=1, len_byte=4, mods=0x20) + op_packet(5, guest=1, len_byte=4, mods=0x40)
      + op_packet(5, guest=1, len_byte=200) + bytes([11, 1]) + RX16 + LOOP + bytes([7, 3]) + READ)
