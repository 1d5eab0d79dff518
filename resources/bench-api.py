#!/usr/bin/env python3
"""API benchmark (not a test): prints numbers.

- process start -> API socket accepting: wall time, and CPU time of the flint process up to
  that point (all threads' on-CPU nanoseconds from /proc/<pid>/task/*/schedstat), and
  getrusage of the whole process at exit;
- request latency on one keep-alive connection: GET / and PATCH /vm (pause/resume);
- PUT /actions InstanceStart latency, booting a tiny guest (a few bytes of code that spin),
  so it runs on any KVM, including the PVM one of CI machines;
- flint's resident memory with the API server up, before and after start.

usage: resources/bench-api.py [--runs N] [--flint PATH]
"""
import argparse
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import time


def tiny_guest(path):
    # mov dx, 0x3f8; "ok\n" out; jmp $
    code = b"\x66\xba\xf8\x03" + b"".join(b"\xb0" + bytes([c]) + b"\xee" for c in b"ok\n") + b"\xeb\xfe"
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x100000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, 0x100000, 0x100000, len(code), len(code), 0x1000)
    with open(path, "wb") as f:
        f.write(ehdr + phdr + code)


class Client:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""

    def request(self, method, path, body=None):
        data = body.encode() if body else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        self.s.sendall(head.encode() + b"\r\n" + data)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ")[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, v = line.split(b":", 1)
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            rest += self.s.recv(65536)
        self.buf = rest[length:]
        return status, rest[:length]


def cpu_ms(pid):
    """CPU time of every thread of `pid` so far, in ms (schedstat: nanoseconds on CPU)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e6


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_accepting(path, deadline=5.0):
    t_end = time.perf_counter() + deadline
    while time.perf_counter() < t_end:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            time.sleep(0.0002)
    raise SystemExit(f"flint did not accept on {path} within {deadline} s")


def summary(label, values, unit):
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(len(v) * 0.9))]
    p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
    print(f"{label:<44} median {statistics.median(v):9.3f} {unit}  min {v[0]:9.3f}  "
          f"p90 {p90:9.3f}  p99 {p99:9.3f}  max {v[-1]:9.3f}  (n={len(v)})")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--flint", default=os.path.join(here, "..", "target", "release", "flint"))
    args = ap.parse_args()
    if not os.path.exists(args.flint):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=os.path.join(here, ".."),
                       check=True)
    work = tempfile.mkdtemp(prefix="flint-bench-api-")
    sock = os.path.join(work, "api.sock")
    kernel = os.path.join(work, "spin.elf")
    tiny_guest(kernel)
    env = dict(os.environ, FLINT_LOG="error")

    start_wall, start_cpu_ms, exit_cpu_ms, idle_rss = [], [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        p = subprocess.Popen([args.flint, "--api-sock", sock], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        s = wait_accepting(sock)
        start_wall.append((time.perf_counter() - t0) * 1000)
        start_cpu_ms.append(cpu_ms(p.pid))
        idle_rss.append(rss_kib(p.pid) / 1024)
        s.close()
        p.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(p.pid, 0)
        exit_cpu_ms.append((usage.ru_utime + usage.ru_stime) * 1000)

    # Latency of requests on one keep-alive connection, then InstanceStart.
    get_us, pause_us, start_ms, running_rss = [], [], [], []
    for i in range(max(5, args.runs // 5)):
        p = subprocess.Popen([args.flint, "--api-sock", sock], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_accepting(sock).close()
        c = Client(sock)
        if i == 0:
            for _ in range(1000):
                t = time.perf_counter()
                status, _ = c.request("GET", "/")
                get_us.append((time.perf_counter() - t) * 1e6)
                assert status == 200
        assert c.request("PUT", "/boot-source", f'{{"kernel_image_path": "{kernel}"}}')[0] == 204
        t = time.perf_counter()
        status, body = c.request("PUT", "/actions", '{"action_type": "InstanceStart"}')
        start_ms.append((time.perf_counter() - t) * 1000)
        assert status == 204, body
        running_rss.append(rss_kib(p.pid) / 1024)
        for _ in range(20):
            t = time.perf_counter()
            assert c.request("PATCH", "/vm", '{"state": "Paused"}')[0] == 204
            assert c.request("PATCH", "/vm", '{"state": "Resumed"}')[0] == 204
            pause_us.append((time.perf_counter() - t) * 1e6 / 2)
        p.send_signal(signal.SIGTERM)
        p.wait()

    print(f"flint API benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          f"KVM: {'PVM (kvm_pvm)' if os.path.exists('/sys/module/kvm_pvm') else 'hardware'}")
    summary("process start -> API socket accepting", start_wall, "ms")
    summary("CPU time up to accepting (schedstat)", start_cpu_ms, "ms")
    summary("CPU time of the whole process (rusage)", exit_cpu_ms, "ms")
    summary("GET / latency (keep-alive)", get_us, "us")
    summary("PATCH /vm pause or resume latency", pause_us, "us")
    summary("PUT /actions InstanceStart (tiny guest)", start_ms, "ms")
    summary("VmRSS, API up, VM not started", idle_rss, "MiB")
    summary("VmRSS, tiny guest running (128 MiB)", running_rss, "MiB")


if __name__ == "__main__":
    main()
