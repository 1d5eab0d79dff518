#!/bin/sh
# Appended to the scenario of the sandbox benchmarks (bench-sandbox-peers.sh,
# bench-density.sh) when they measure Cloud Hypervisor; runs inside the benchmark host. Boots
# Cloud Hypervisor (API up) with the sandbox image, the PCI kernel's ELF vmlinux
# ($BIN/vmlinux), $CMDLINE without pci=off (its devices are virtio over PCI), 1 vCPU,
# 128 MiB and the devices flint run's sandbox has: vsock (its hybrid vsock, whose host side
# speaks flint's `CONNECT <port>` protocol), entropy (--rng) and a balloon with free page
# reporting. Once the guest agent has run `true` (so the guest is as far as flint's
# template), pauses it and snapshots it into $W/ch-snap (config.json, state.json,
# memory-ranges).
# Cloud Hypervisor v54's restore takes no new vsock socket path (its restore options
# override only network and VFIO file descriptors): a restored VM binds the path in the
# snapshot's config.json, and fails if that path exists. So `ch_restore_dir DIR VSOCK` makes a
# restore directory of its own for each sandbox: config.json with VSOCK as the socket path,
# state.json and memory-ranges symbolic links to the snapshot's; and removes VSOCK.
# Needs $BIN/cloud-hypervisor, $BIN/agent-client, $BIN/curl, $BIN/vmlinux, $BIN/sandbox.cpio.gz.
chapi() { # method path [body]
    out=$("$BIN/curl" -s -o "$W/body" -w '%{http_code}' --unix-socket "$W/ch-boot.sock" \
        -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "http://localhost/api/v1/$2")
    case $out in 2*) ;; *) echo "BENCH-FAILED cloud-hypervisor $2: $out $(cat "$W/body")"; exit 1 ;; esac
}
rm -rf "$W/ch-boot.sock" "$W/ch-boot.sock.lock" "$W/ch-boot.vsock" "$W/ch-snap"
mkdir -p "$W/ch-snap"
"$BIN/cloud-hypervisor" --api-socket path="$W/ch-boot.sock" --kernel "$BIN/vmlinux" \
    --initramfs "$BIN/sandbox.cpio.gz" --cmdline "$(echo "$CMDLINE" | sed 's/ pci=off//')" \
    --cpus boot=1 --memory size=128M --vsock cid=3,socket="$W/ch-boot.vsock" --rng src=/dev/urandom \
    --balloon size=0,deflate_on_oom=on,free_page_reporting=on --serial tty --console off \
    </dev/null >"$W/ch-boot.log" 2>&1 &
chboot=$!
sleep 1
kill -0 $chboot 2>/dev/null || { echo "BENCH-FAILED cloud-hypervisor did not start"; cat "$W/ch-boot.log"; exit 1; }
"$BIN/agent-client" "$W/ch-boot.vsock" --timeout 300 -- true </dev/null ||
    { echo "BENCH-FAILED cloud-hypervisor boot: no agent"; tail -n 20 "$W/ch-boot.log"; exit 1; }
chapi PUT vm.pause
chapi PUT vm.snapshot "{\"destination_url\": \"file://$W/ch-snap\"}"
kill -KILL $chboot; wait $chboot 2>/dev/null
rm -f "$W/ch-boot.sock" "$W/ch-boot.sock.lock" "$W/ch-boot.vsock"
grep -q "\"$W/ch-boot.vsock\"" "$W/ch-snap/config.json" ||
    { echo "BENCH-FAILED cloud-hypervisor's snapshot config has no vsock socket path to replace"; cat "$W/ch-snap/config.json"; exit 1; }
echo "BENCH ch-snapshot $(du -k "$W/ch-snap/memory-ranges" | cut -f1) KiB allocated of $(stat -c %s "$W/ch-snap/memory-ranges") bytes"
ch_restore_dir() { # DIR VSOCK
    rm -rf "$1" "$2"
    mkdir -p "$1"
    sed "s#\"$W/ch-boot.vsock\"#\"$2\"#" "$W/ch-snap/config.json" >"$1/config.json"
    ln -s "$W/ch-snap/state.json" "$1/state.json"
    ln -s "$W/ch-snap/memory-ranges" "$1/memory-ranges"
}
