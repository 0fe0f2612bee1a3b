#!/bin/sh
# /init of the vhost_min test guest; tests/guest.py bakes it into the initramfs.
#
# The host hands over one run through the writable 9p share "vhost_min_ctl" (mounted on /ctl):
#   config   shell assignments: TIMEOUT (s), RUNNER ("sh" or empty), SHARES ("tag ..."), ENV lines
#   modules  "name path" per line, in load order (dependencies first; built-ins already left out)
#   script   what to run, with /src (the project, read-only) as cwd and on PYTHONPATH
# and takes back stdout, stderr, then status ("EXIT_STATUS TIMED_OUT", written last, by rename).
# A setup failure writes setup_error instead; either way the guest powers off, and QEMU exits.

export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /tmp /run /ctl /src /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
hostname vhost-min-guest

power_off() {
    sync
    umount /ctl 2>/dev/null
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 10
    exit 1  # init exiting panics, and panic=-1 with QEMU's -no-reboot ends QEMU too
}

fail() {
    echo "vhost_min-guest: setup failed: $*"
    echo "$*" >/ctl/setup_error 2>/dev/null
    power_off
}

# name path ... for what mounting the shares needs (9p and its dependencies).
load() {
    while read -r name path; do
        [ -n "$name" ] && [ ! -d "/sys/module/$name" ] || continue
        err=$(insmod "$path" 2>&1) || fail "insmod $path: $err"
    done
}

load </etc/vhost_min/boot-modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 vhost_min_ctl /ctl \
    || fail "cannot mount the vhost_min_ctl 9p share"
[ -r /ctl/config ] || fail "/ctl/config is missing"
. /ctl/config
load </ctl/modules
# LIO (target_core_mod) is configured through configfs: mount it when a module brought it.
if [ -d /sys/kernel/config ]; then
    mount -t configfs configfs /sys/kernel/config || fail "cannot mount configfs"
fi
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,ro vhost_min_src /src \
    || fail "cannot mount the vhost_min_src 9p share"
for tag in $SHARES; do
    mkdir -p "/mnt/$tag"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 "$tag" "/mnt/$tag" \
        || fail "cannot mount the $tag 9p share"
done
export PYTHONPATH=/src VHOST_MIN_GUEST=1

echo "vhost_min-guest: running the script (timeout ${TIMEOUT} s)"
cd /src
$RUNNER /ctl/script </dev/null >/ctl/stdout 2>/ctl/stderr &
child=$!
( sleep "$TIMEOUT"; touch /tmp/timed_out; kill -KILL "$child" ) 2>/dev/null &
watchdog=$!
wait "$child"
status=$?
kill "$watchdog" 2>/dev/null
timed_out=0
[ -e /tmp/timed_out ] && timed_out=1
echo "$status $timed_out" >/ctl/status.tmp && mv /ctl/status.tmp /ctl/status
echo "vhost_min-guest: exit status $status timed_out $timed_out"
power_off
