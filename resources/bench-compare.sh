#!/usr/bin/env bash
# Boot comparison (not a test): boots the test guest N times with flint, N times with
# Debian's QEMU (-M microvm, KVM) and, when their binaries are there, N times each with
# Firecracker and Cloud Hypervisor, in the same host and the same run, in turn, and prints
# them side by side. Both VMMs are measured the same way from the outside by a tiny helper
# (vmm-probe, compiled from the C source below): time from just before fork+exec of the VMM
# until the guest's FLINT-GUEST-READY line arrives on the VMM's stdout (the serial console),
# and, at that moment, the VMM's VmRSS minus the resident part of its guest-RAM mapping
# (from /proc/PID/smaps). flint's own figures (boot-timer port write, VMM overhead at guest
# reboot) are printed too.
#
# usage: resources/bench-compare.sh [-n RUNS] [--memory MIB] [--format elf|bzimage]
#                                   [--peers DIR] [--only VMM,...] [--append ARGS]
#                                   [--flint-before PATH]
#
# --only VMM,...: boot only these of flint, qemu, firecracker, cloud-hypervisor (default all),
# and flint-config: flint from Firecracker's vm.json (`flint --no-api --config-file vm.json`),
# which, as for Firecracker, gives the guest no entropy device (`flint boot` always adds one).
# --flint-before PATH: also boot this other flint binary (e.g. a build of the previous commit),
# as the column "flint-before", to compare two builds of flint in one run.
# --append ARGS: add ARGS to every guest's command line (e.g. "loglevel=7 initcall_debug" to
# see where the guest's time goes; such runs are for analysis, not for the figures).
# BENCH_ECHO=1 (with BENCH_RAW=1 to see it) adds to the raw output every console and log line
# with the host's milliseconds since process start, flint's debug log (when vCPU 0 first
# entered the guest, its vCPU exits by kind) and Firecracker's log at Debug level and its
# metrics at exit (exits by kind, i8042 and UART accesses). Analysis only: it slows the VMMs.
#
# --peers DIR: where the `firecracker` and `cloud-hypervisor` binaries are (default
# ../shared/peers beside the checkout; see its README for how they were built). Either may be
# missing: its column is left out. Firecracker runs as `firecracker --no-api --config-file
# vm.json --level Error` (boot-source and machine-config only), Cloud Hypervisor as
# `cloud-hypervisor --kernel K --initramfs I --cmdline C --cpus boot=1 --memory size=M
# --serial tty --console off`. Cloud Hypervisor restarts a guest that reboots, so the probe
# stops it once the marker has arrived (its total time is not comparable; the others exit on
# the guest's i8042 reset).
#
# Both VMMs boot the same kernel file and initramfs with the same command line, except for
# `reboot=`: flint exits on the i8042 reset (reboot=k); QEMU's microvm has no i8042, so its
# guest uses a triple fault (reboot=t), which -no-reboot turns into an exit.
#
# Where the local /dev/kvm cannot boot Linux (PVM), the runs happen inside the nested KVM
# host (resources/nested-host/run.sh); timings there are only comparable with other timings
# taken in the same rig, in the same run. BENCH_RAW=1 prints the raw console lines.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=resources/lib.sh
. "$here/lib.sh"

runs=10
memory=128
format=elf
peers=$here/../../shared/peers
only=flint,qemu,firecracker,cloud-hypervisor
append=
flint_before=
while (($#)); do
    case $1 in
    -n) runs=${2:?}; shift ;;
    --peers) peers=${2:?}; shift ;;
    --memory) memory=${2:?}; shift ;;
    --format) format=${2:?}; shift ;;
    --only) only=${2:?}; shift ;;
    --append) append=${2:?}; shift ;;
    --flint-before) flint_before=${2:?}; shift ;;
    *) die "unknown argument: $1 (see the usage at the top of $0)" ;;
    esac
    shift
done
case $format in
elf) kernel_name=vmlinux ;;
bzimage) kernel_name=bzImage ;;
*) die "--format is elf or bzimage" ;;
esac

# qemu-system-data holds qboot (/usr/share/qemu/bios-microvm.bin), microvm's default firmware.
ensure_packages qemu-system-x86 qemu-system-data gcc libc6-dev
"$here/build-guest-kernel.sh"
"$here/build-guest-initramfs.sh"
log "building flint (release)"
(cd "$here/.." && cargo build --release --quiet)
flint=${CARGO_TARGET_DIR:-$here/../target}/release/flint
guest=$FLINT_CACHE/guest
qemu=/usr/bin/qemu-system-x86_64

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/vmm-probe.c" <<'PROBE_C'
/* vmm-probe TIMEOUT_S GUEST_MIB PROGRAM ARGS...
 * Runs PROGRAM with stdin /dev/null and stdout on a pipe. Prints one line:
 *   PROBE ready_ms T rss_kib R guest_rss_kib G overhead_kib R-G exit S total_ms E
 * T: CLOCK_MONOTONIC from just before fork() to the arrival of FLINT-GUEST-READY;
 * R: VmRSS of PROGRAM at that moment; G: resident KiB of its guest-RAM mapping(s) (those
 * whose size is GUEST_MIB, rounded up by at most 4 MiB); E: until PROGRAM exited.
 * PROGRAM is killed after TIMEOUT_S. PROBE_ECHO=1 copies its output to stderr, each
 * line prefixed with the elapsed milliseconds. PROBE_STOP_AT_READY=1 kills PROGRAM once the
 * marker has arrived and reports exit 0 (for a VMM that restarts a rebooting guest). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t child;
static void on_alarm(int sig) { (void)sig; if (child > 0) kill(child, SIGKILL); }

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sample_mem(pid_t pid, long guest_kib, long *rss, long *guest_rss) {
    char path[64], line[512];
    *rss = -1;
    *guest_rss = 0;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (f) {
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmRSS: %ld", rss) == 1) break;
        fclose(f);
    }
    snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
    f = fopen(path, "r");
    if (!f) return;
    int in_guest = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        long v;
        char *dash = strchr(line, '-'), *space = strchr(line, ' ');
        if (dash && space && dash < space && sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {
            long kib = (long)((hi - lo) >> 10);
            in_guest = kib >= guest_kib && kib <= guest_kib + 4096;
        } else if (in_guest && sscanf(line, "Rss: %ld", &v) == 1) {
            *guest_rss += v;
        }
    }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: vmm-probe TIMEOUT_S GUEST_MIB PROGRAM ARGS...\n");
        return 2;
    }
    int timeout_s = atoi(argv[1]);
    long guest_kib = atol(argv[2]) * 1024;
    int fds[2];
    if (pipe(fds)) { perror("pipe"); return 2; }
    double t0 = now_ms();
    child = fork();
    if (child < 0) { perror("fork"); return 2; }
    if (child == 0) {
        int nul = open("/dev/null", O_RDONLY);
        dup2(nul, 0);
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(argv[3], argv + 3);
        perror("exec");
        _exit(127);
    }
    close(fds[1]);
    signal(SIGALRM, on_alarm);
    alarm(timeout_s);

    const char *marker = "FLINT-GUEST-READY";
    size_t mlen = strlen(marker), matched = 0;
    double ready = -1;
    long rss = -1, guest_rss = 0;
    char buf[4096], tail[2048];
    size_t tail_len = 0;
    int echo = getenv("PROBE_ECHO") != NULL, bol = 1;
    int stop_at_ready = getenv("PROBE_STOP_AT_READY") != NULL;
    for (;;) {
        ssize_t n = read(fds[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; i++) {
            if (ready < 0) {
                if (buf[i] == marker[matched]) {
                    if (++matched == mlen) {
                        ready = now_ms() - t0;
                        sample_mem(child, guest_kib, &rss, &guest_rss);
                        if (stop_at_ready) kill(child, SIGKILL);
                    }
                } else {
                    matched = buf[i] == marker[0];
                }
            }
            if (echo) {
                if (bol) fprintf(stderr, "[%9.1f] ", now_ms() - t0);
                fputc(buf[i], stderr);
                bol = buf[i] == '\n';
            }
            if (tail_len == sizeof tail) {
                memmove(tail, tail + sizeof tail / 2, sizeof tail / 2);
                tail_len = sizeof tail / 2;
            }
            tail[tail_len++] = buf[i];
        }
    }
    int status = 0;
    waitpid(child, &status, 0);
    double total = now_ms() - t0;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (stop_at_ready && ready >= 0) code = 0;
    if (ready < 0) {
        printf("PROBE-FAILED no FLINT-GUEST-READY; exit %d after %.0f ms; output tail:\n", code, total);
        fwrite(tail, 1, tail_len, stdout);
        printf("\nPROBE-END\n");
        return 1;
    }
    printf("PROBE ready_ms %.1f rss_kib %ld guest_rss_kib %ld overhead_kib %ld exit %d total_ms %.0f\n",
           ready, rss, guest_rss, rss - guest_rss, code, total);
    return code == 0 ? 0 : 1;
}
PROBE_C
gcc -O2 -static -Wall -Werror -o "$work/vmm-probe" "$work/vmm-probe.c" || die "cannot build vmm-probe"

cmdline="console=ttyS0 panic=1 pci=off acpi=off quiet flint.exec=$(printf 'true' | base64 -w0)${append:+ $append}"
for vmm in ${only//,/ }; do
    case $vmm in
    flint | flint-config | qemu | firecracker | cloud-hypervisor) ;;
    *) die "--only takes flint, flint-config, qemu, firecracker and cloud-hypervisor, not $vmm" ;;
    esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }
# The fastest microvm setup found in the nested host: no option ROMs, no RTC/PIT/PIC, no
# ACPI tables (flint has none either); firmware is qboot, QEMU's default for microvm.
qemu_args="-M microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=off,pic=off,acpi=off \
-enable-kvm -cpu host -m $memory -smp 1 -nodefaults -no-user-config -nographic \
-serial stdio -no-reboot"

cat >"$work/scenario.sh" <<SCENARIO
#!/bin/sh
# Runs in the benchmark host (nested or direct); \$BIN holds flint, the probe and the guest,
# \$QEMU is qemu-system-x86_64 (in the nested host at /usr/bin, where it finds /usr/share/qemu).
echo "BENCH qemu-version \$(\$QEMU --version | head -n1)"
for peer in firecracker cloud-hypervisor; do
    [ -x \$BIN/\$peer ] && echo "BENCH peer-version \$(\$BIN/\$peer --version 2>&1 | head -n1)"
done
# want VMM: whether this run boots VMM (--only); BENCH_ECHO: the consoles with times.
want() { case ",$only," in *",\$1,"*) return 0 ;; esac; return 1; }
ECHO=${BENCH_ECHO:-}
FC_LEVEL=Error
FC_METRICS=
if [ -n "\$ECHO" ]; then
    export PROBE_ECHO=1
    FC_LEVEL=Debug
    FC_METRICS=", \\"metrics\\": {\\"metrics_path\\": \\"\$TMPD/fc-metrics\\"}"
fi
echo_console() {
    [ -n "\$ECHO" ] || return 0
    sed "s/^/BENCH \$1 console /" \$TMPD/err
}
# flint_boot [before]: the flint under test, or the other build of --flint-before.
flint_boot() {
    want flint || return 0
    label=flint
    if [ "\${1:-}" = before ]; then
        [ -x \$BIN/flint-before ] || return 0
        label=flint-before
    fi
    FLINT_LOG=debug \$BIN/vmm-probe 60 $memory \$BIN/\$label boot --kernel \$BIN/$kernel_name \\
        --initrd \$BIN/initramfs.cpio.gz --vcpus 1 --memory $memory \\
        --cmdline "$cmdline reboot=k" >\$TMPD/out 2>\$TMPD/err || {
        echo "BENCH-FAILED \$label run \$i"; cat \$TMPD/out \$TMPD/err; exit 1; }
    sed "s/^/BENCH \$label /" \$TMPD/out
    grep -E 'guest boot time|VMM overhead|vCPU exits|enters the guest' \$TMPD/err |
        sed "s/^/BENCH \$label own /"
    echo_console \$label
}
qemu_boot() {
    want qemu || return 0
    \$BIN/vmm-probe 60 $memory \$QEMU $qemu_args -kernel \$BIN/$kernel_name \\
        -initrd \$BIN/initramfs.cpio.gz -append "$cmdline reboot=t" >\$TMPD/out 2>\$TMPD/err || {
        echo "BENCH-FAILED qemu run \$i"; cat \$TMPD/out \$TMPD/err; exit 1; }
    sed 's/^/BENCH qemu /' \$TMPD/out
    echo_console qemu
}
# fc_json: Firecracker's configuration file, also read by flint-config.
fc_json() {
    : >\$TMPD/fc-metrics
    cat >\$TMPD/fc.json <<FC_JSON
{"boot-source": {"kernel_image_path": "\$BIN/$kernel_name",
                 "initrd_path": "\$BIN/initramfs.cpio.gz",
                 "boot_args": "$cmdline reboot=k"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $memory},
 "drives": []\$FC_METRICS}
FC_JSON
}
flint_config_boot() {
    want flint-config || return 0
    fc_json
    \$BIN/vmm-probe 60 $memory \$BIN/flint --no-api --config-file \$TMPD/fc.json \
        --level Error >\$TMPD/out 2>\$TMPD/err || {
        echo "BENCH-FAILED flint-config run \$i"; cat \$TMPD/out \$TMPD/err; exit 1; }
    sed 's/^/BENCH flint-config /' \$TMPD/out
    echo_console flint-config
}
firecracker_boot() {
    [ -x \$BIN/firecracker ] && want firecracker || return 0
    fc_json
    \$BIN/vmm-probe 60 $memory \$BIN/firecracker --no-api --config-file \$TMPD/fc.json \
        --level \$FC_LEVEL >\$TMPD/out 2>\$TMPD/err || {
        echo "BENCH-FAILED firecracker run \$i"; cat \$TMPD/out \$TMPD/err; exit 1; }
    sed 's/^/BENCH firecracker /' \$TMPD/out
    echo_console firecracker
    [ -z "\$ECHO" ] || tail -n 1 \$TMPD/fc-metrics | sed 's/^/BENCH firecracker metrics /'
}
cloud_hypervisor_boot() {
    [ -x \$BIN/cloud-hypervisor ] && want cloud-hypervisor || return 0
    PROBE_STOP_AT_READY=1 \$BIN/vmm-probe 60 $memory \$BIN/cloud-hypervisor \
        --kernel \$BIN/$kernel_name --initramfs \$BIN/initramfs.cpio.gz \
        --cmdline "$cmdline reboot=k" --cpus boot=1 --memory size=${memory}M \
        --serial tty --console off >\$TMPD/out 2>\$TMPD/err || {
        echo "BENCH-FAILED cloud-hypervisor run \$i"; cat \$TMPD/out \$TMPD/err; exit 1; }
    sed 's/^/BENCH cloud-hypervisor /' \$TMPD/out
    echo_console cloud-hypervisor
}
# Rotate which VMM goes first so that drifting load hits all alike.
i=0
while [ \$i -lt $runs ]; do
    case \$((i % 4)) in
    0) flint_boot; qemu_boot; flint_config_boot; firecracker_boot; flint_boot before
       cloud_hypervisor_boot ;;
    1) qemu_boot; flint_boot before; firecracker_boot; cloud_hypervisor_boot; flint_boot
       flint_config_boot ;;
    2) flint_boot before; flint_config_boot; firecracker_boot; cloud_hypervisor_boot
       flint_boot; qemu_boot ;;
    *) cloud_hypervisor_boot; flint_config_boot; flint_boot; qemu_boot; firecracker_boot
       flint_boot before ;;
    esac
    i=\$((i + 1))
done
SCENARIO

if ! host_kvm_boots_linux; then
    log "local /dev/kvm cannot boot Linux: running 2 x $runs boots inside the nested KVM host"
    {
        echo "BIN=/bench; TMPD=/tmp; QEMU=$qemu"
        cat "$work/scenario.sh"
    } >"$work/nested.sh"
    peer_adds=()
    for peer in firecracker cloud-hypervisor; do
        [ -x "$peers/$peer" ] && peer_adds+=(--add "$peers/$peer:/bench/$peer")
    done
    "$here/nested-host/run.sh" --timeout $((120 + 80 * runs)) --scenario "$work/nested.sh" \
        --add "$flint:/bench/flint" ${flint_before:+--add "$flint_before:/bench/flint-before"} --add "$work/vmm-probe:/bench/vmm-probe" "${peer_adds[@]}" \
        --add "$qemu:$qemu" --add /usr/share/qemu:/usr/share/qemu \
        --add "$guest/$kernel_name:/bench/$kernel_name" \
        --add "$guest/initramfs.cpio.gz:/bench/initramfs.cpio.gz" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="nested KVM host (QEMU TCG, Debian cloud kernel, kvm_amd) on $(nproc) cores"
else
    mkdir -p "$work/bin"
    cp "$flint" "$work/vmm-probe" "$guest/$kernel_name" "$guest/initramfs.cpio.gz" "$work/bin/"
    [ -z "$flint_before" ] || cp "$flint_before" "$work/bin/flint-before"
    for peer in firecracker cloud-hypervisor; do
        [ -x "$peers/$peer" ] && cp "$peers/$peer" "$work/bin/"
    done
    BIN=$work/bin TMPD=$work QEMU=$qemu sh "$work/scenario.sh" >"$work/out" 2>&1 ||
        { cat "$work/out"; die "benchmark run failed"; }
    where="local hardware KVM"
fi

# stats LABEL UNIT: median, min, p90, max of the numbers on stdin.
stats() {
    sort -n | awk -v label="$1" -v unit="$2" '
        { v[NR] = $1 }
        END {
            if (NR == 0) { printf "%-44s no samples\n", label; exit 1 }
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            p90 = v[int(NR * 0.9 + 0.999)]
            printf "%-44s median %7.1f %s   min %7.1f   p90 %7.1f   max %7.1f   (n=%d)\n",
                label, med, unit, v[1], p90, v[NR], NR
        }'
}
# probe VMM FIELD: one PROBE field of one VMM, a number a line.
probe() {
    sed -n "s/.*BENCH $1 PROBE .*$2 \\([0-9.-]*\\).*/\\1/p" "$work/clean"
}

tr -d "\r" <"$work/out" >"$work/clean"
[ -z "${BENCH_RAW:-}" ] || cat "$work/clean"
echo "boot comparison: $runs boots per VMM, alternating; $format kernel, 1 vCPU, $memory MiB, $(date -u +%Y-%m-%d)"
echo "where: $where"
sed -n 's/.*BENCH qemu-version /other VMM: /p; s/.*BENCH peer-version /other VMM: /p' "$work/clean"
! wants qemu || echo "other VMM command: qemu-system-x86_64 $qemu_args -kernel $kernel_name -initrd initramfs.cpio.gz -append \"$cmdline reboot=t\""
echo
echo "process start -> FLINT-GUEST-READY on the console (measured from outside, same for both):"
# The VMMs with samples: those asked for (--only) that ran.
vmms=
for vmm in flint:flint flint-before:flint-before flint-config:flint-config \
    qemu:qemu-microvm firecracker:firecracker cloud-hypervisor:cloud-hypervisor; do
    grep -q "BENCH ${vmm%%:*} PROBE" "$work/clean" && vmms="$vmms $vmm"
done
for vmm in $vmms; do
    probe "${vmm%%:*}" ready_ms | stats "  ${vmm#*:}" ms
done
echo "VMM VmRSS minus resident guest RAM, sampled at FLINT-GUEST-READY:"
for vmm in $vmms; do
    probe "${vmm%%:*}" overhead_kib | awk '{ print $1 / 1024 }' | stats "  ${vmm#*:}" MiB
done
wants flint || exit 0
echo "flint's own figures:"
sed -n 's/.*BENCH flint own flint: debug: vCPU 0 enters the guest \([0-9]*\) ms.*/\1/p' "$work/clean" |
    stats "  process start -> vCPU 0 enters the guest" ms
sed -n 's/.*BENCH flint own flint: guest boot time: \([0-9]*\) ms$/\1/p' "$work/clean" |
    stats "  process start -> guest /init (boot timer)" ms
sed -n 's/.*BENCH flint own flint: debug: memory: VMM overhead \([0-9]*\) KiB.*/\1/p' "$work/clean" |
    awk '{ print $1 / 1024 }' | stats "  VMM memory beyond guest RAM (at reboot)" MiB
