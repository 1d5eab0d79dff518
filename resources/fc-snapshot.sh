#!/bin/sh
# Appended to the scenario of the Firecracker benchmarks (bench-sandbox-peers.sh,
# bench-density.sh), which runs inside the
# benchmark host: boot Firecracker (from a config file, API up) with the sandbox image,
# $CMDLINE, 1 vCPU, 128 MiB and the devices flint run's sandbox has (vsock, entropy, a
# balloon with free page reporting); once the guest agent has run `true` (so the guest is as
# far as flint's template), pause it and take a Full snapshot: $W/fc.state and $W/fc.mem.
# Needs $BIN/firecracker, $BIN/agent-client, $BIN/curl, $BIN/vmlinux, $BIN/sandbox.cpio.gz.
cat >"$W/fc.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$BIN/vmlinux", "initrd_path": "$BIN/sandbox.cpio.gz",
                  "boot_args": "$CMDLINE"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
  "vsock": {"guest_cid": 3, "uds_path": "$W/fc-boot.vsock"},
  "entropy": {},
  "balloon": {"amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true},
  "drives": []
}
JSON
fcapi() { # method path body
    out=$("$BIN/curl" -s -o "$W/body" -w '%{http_code}' --unix-socket "$W/fc-boot.sock" \
        -X "$1" -H 'Content-Type: application/json' -d "$3" "http://localhost$2")
    case $out in 2*) ;; *) echo "BENCH-FAILED firecracker $2: $out $(cat "$W/body")"; exit 1 ;; esac
}
rm -f "$W/fc-boot.sock" "$W/fc-boot.vsock"
"$BIN/firecracker" --api-sock "$W/fc-boot.sock" --config-file "$W/fc.json" --level Error \
    </dev/null >"$W/fc-boot.log" 2>&1 &
fcboot=$!
sleep 1
kill -0 $fcboot 2>/dev/null || { echo "BENCH-FAILED firecracker did not start"; cat "$W/fc-boot.log"; exit 1; }
"$BIN/agent-client" "$W/fc-boot.vsock" --timeout 300 -- true </dev/null ||
    { echo "BENCH-FAILED firecracker boot: no agent"; tail -n 20 "$W/fc-boot.log"; exit 1; }
fcapi PATCH /vm '{"state": "Paused"}'
fcapi PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$W/fc.state\", \"mem_file_path\": \"$W/fc.mem\"}"
kill -KILL $fcboot; wait $fcboot 2>/dev/null
echo "BENCH fc-snapshot $(du -k "$W/fc.mem" | cut -f1) KiB allocated of $(stat -c %s "$W/fc.mem") bytes"
