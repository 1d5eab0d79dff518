# shellcheck shell=bash
# The guest's PID 1, for build-guest-initramfs.sh (/init) and build-rootfs.sh (/sbin/init).
# Source it after lib.sh; do not run it. It is a file of its own, not part of lib.sh, so that
# changing it rebuilds only the two images that carry it (both scripts put it in their stamp):
# lib.sh is in the stamps of other images too (the nested host kernel, the sandbox image).

# write_guest_init PATH initramfs|rootfs: write the init script to PATH (mode 755). Both kinds
# mount the usual file systems, write the boot-timer byte, print FLINT-GUEST-READY, then run
# the flint.exec= script of the kernel command line and print FLINT-GUEST-EXIT <status>, or
# without one give the user a shell on the console; then they reboot. The rootfs kind also
# syncs and remounts / read-only before the reboot, so the image stays clean.
write_guest_init() {
    local path=$1 kind=$2
    case $kind in
    initramfs | rootfs) ;;
    *) die "write_guest_init: the kind is initramfs or rootfs, not '$kind'" ;;
    esac
    {
        cat <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
INIT
        if [ "$kind" = rootfs ]; then
            echo '# Usually mounted by the kernel already (CONFIG_DEVTMPFS_MOUNT).'
        fi
        cat <<'INIT'
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

# Boot timer: byte 123 to I/O port 0x3f0 (offset 1008 of /dev/port); flint
# measures the time from its start to this write.
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 conv=notrunc 2>/dev/null

echo FLINT-GUEST-READY

exec_b64=
for word in $(cat /proc/cmdline); do
    case $word in
    flint.exec=*) exec_b64=${word#flint.exec=} ;;
    esac
done

if [ -n "$exec_b64" ]; then
    # Test mode: the harness put a shell script on the command line.
    echo "$exec_b64" | base64 -d >/tmp/flint-exec.sh
    sh /tmp/flint-exec.sh
    echo "FLINT-GUEST-EXIT $?"
else
INIT
        if [ "$kind" = rootfs ]; then
            cat <<'INIT'
    echo "flint demo guest (ext4 root on /dev/vda): this is a busybox shell; type 'exit' (or Ctrl-D) to reboot, which ends flint."
INIT
        else
            cat <<'INIT'
    echo "flint demo guest: this is a busybox shell; type 'exit' (or Ctrl-D) to reboot, which ends flint."
    # cttyhack gives the shell the real console as controlling terminal so
    # that Ctrl-C and job control work.
INIT
        fi
        cat <<'INIT'
    setsid cttyhack sh
fi
INIT
        if [ "$kind" = rootfs ]; then
            cat <<'INIT'
# Whatever was written reaches the disks before the reset, and / is left clean (journal
# checkpointed, no recovery needed: e2fsck -n on the image passes).
sync
mount -o remount,ro / 2>/dev/null
INIT
        fi
        cat <<'INIT'
# -f: reboot(2) directly (there is no init daemon to ask); with reboot=k the
# kernel resets through the i8042 controller and flint exits with status 0.
reboot -f
# Should reboot(2) ever return, do not let PID 1 exit (that would panic).
while :; do sleep 60; done
INIT
    } >"$path"
    chmod 755 "$path"
}
