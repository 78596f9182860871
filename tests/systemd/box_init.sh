#!/bin/bash
# PID 1 of a fresh test box, before it becomes systemd. Started by tests/systemd/box.py as
#   unshare --pid --fork --mount --propagation=private --mount-proc --uts --ipc --cgroup [--net] \
#       -- bash box_init.sh WORKDIR HOST_MNT_NS_INODE [OVERLAYS]
# from inside the box's own cgroup. The box shares the host's root filesystem: every step here
# exists so that booting systemd cannot touch the host (/work/shared/SYSTEMD-TESTING.md, DANGER).
# Any failure aborts before systemd is exec'd (set -e).
set -euo pipefail

W=$1                  # the box's work directory on the host: masks.txt, generators.txt, console.fifo
HOST_MNT_NS=$2        # inode of the host's mount namespace, to prove we are not in it
OVERLAYS=${3:-etc var} # top-level directories to overlay: "etc var", or "etc var usr" to install
                      # packages (Box.boot(overlay_usr=True))
S=/run/aigis-box      # private scratch tmpfs: overlay layers and the staging /dev
say() { echo "box-init: $*"; }

# 0. Sanity: PID 1 of a new PID namespace, in a mount namespace that is not the host's.
[ "$$" = 1 ] || { say "not PID 1 of a new PID namespace" >&2; exit 1; }
[ "$(stat -L -c %i /proc/self/ns/mnt)" != "$HOST_MNT_NS" ] || { say "host mount ns!" >&2; exit 1; }

# util-linux's mount keeps a utab under /run/mount/, which it would create in the host's /run:
# keep it in the work directory until the box has its own /run.
export LIBMOUNT_UTAB=$W/utab

# 1. Nothing mounted from here on may propagate to the host.
mount --make-rprivate /

# 2. Fresh /run (the host's stays untouched) and a private scratch tmpfs inside it.
mount -t tmpfs -o mode=0755,nosuid,nodev,size=256m tmpfs /run
unset LIBMOUNT_UTAB
mkdir -m 0700 "$S"
mount -t tmpfs -o mode=0700,size=1g aigis-box-scratch "$S"

# 3. Private /dev: a tmpfs holding a few nodes bound from the host's /dev, so what the box creates
#    there (/dev/log, /dev/shm/*, pts) never reaches the host's devtmpfs. /dev/console and
#    /dev/kmsg are the FIFO that box.py drains into boot.log (PID 1's log before journald).
D=$S/dev
mkdir "$D"
mount -t tmpfs -o mode=0755,nosuid,size=4m aigis-box-dev "$D"
for node in null zero full random urandom tty; do
    : > "$D/$node"
    mount --bind "/dev/$node" "$D/$node"
done
for node in console kmsg; do
    : > "$D/$node"
    mount --bind "$W/console.fifo" "$D/$node"
done
mkdir "$D/pts" "$D/shm" "$D/mqueue"
ln -s /proc/self/fd "$D/fd"
ln -s /proc/self/fd/0 "$D/stdin"
ln -s /proc/self/fd/1 "$D/stdout"
ln -s /proc/self/fd/2 "$D/stderr"
ln -s pts/ptmx "$D/ptmx"
mount --move "$D" /dev
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm

# 4. A private cgroup2 (its root is the box cgroup, via the cgroup namespace), a fresh read-only
#    sysfs under it (mounting over the host's fails with "already mounted"), read-only /proc/sys.
umount -l /sys
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
for p in /proc/sys /proc/sysrq-trigger; do
    [ -e "$p" ] || continue  # this kernel may lack sysrq; never mount onto a missing path
    mount --bind "$p" "$p"
    mount -o remount,bind,ro "$p"
done

# The launcher (unshare, outside our PID namespace) starts in the box cgroup so that it roots our
# cgroup namespace; box.py moves it out. Wait (bounded) for that, so systemd finds itself alone.
# (mapfile is a builtin: a forked reader would itself show up in cgroup.procs.)
for ((i = 0; i < 100; i++)); do
    mapfile -t procs < /sys/fs/cgroup/cgroup.procs
    [ "${procs[*]}" = 1 ] && break
    sleep 0.05
done
[ "${procs[*]}" = 1 ] || say "warning: launcher still in the box cgroup (${procs[*]})"

# 5. /etc and /var (and /usr if asked): overlays whose upper layers live on the scratch tmpfs.
#    Refuse to write a single file into them unless all really are overlays. /bin, /sbin and /lib
#    are symlinks into /usr on Debian 12 (merged /usr), so an overlaid /usr covers them too; a
#    host without merged /usr would leave them writable, so refuse to overlay /usr there.
for d in etc var; do
    case " $OVERLAYS " in
    *" $d "*) ;;
    *) say "overlays must include /$d: '$OVERLAYS'"; exit 1 ;;
    esac
done
for d in $OVERLAYS; do
    case $d in
    etc | var) ;;
    usr)
        for l in bin sbin lib; do
            [ -L "/$l" ] || { say "/$l is not a symlink into /usr: cannot overlay /usr"; exit 1; }
        done
        ;;
    *) say "cannot overlay /$d"; exit 1 ;;
    esac
done
for d in $OVERLAYS; do
    mkdir -p "$S/$d/upper" "$S/$d/work"
    mount -t overlay -o "lowerdir=/$d,upperdir=$S/$d/upper,workdir=$S/$d/work" overlay "/$d"
    [ "$(findmnt -n -o FSTYPE --mountpoint "/$d")" = overlay ] || { say "/$d: no overlay"; exit 1; }
done

# 6. Identity: own machine id and hostname.
rm -f /etc/machine-id
tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id
echo aigis-box > /etc/hostname
hostname aigis-box

# 7. journald: volatile storage, no rate limit, does not read the kmsg FIFO.
mkdir -p /etc/systemd/journald.conf.d
cat > /etc/systemd/journald.conf.d/zz-aigis-box.conf <<'EOF'
[Journal]
Storage=volatile
RateLimitIntervalSec=0
RateLimitBurst=0
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
EOF

# 8. Masks. Units: /etc/systemd/system (the overlay's upper layer) outranks both the host's /etc
#    and /usr/lib, so these masks win over every host unit file. Generators: /run outranks all.
mkdir -p /etc/systemd/system
while read -r unit; do
    ln -sfn /dev/null "/etc/systemd/system/$unit"
done < "$W/masks.txt"
while read -r kind name; do
    mkdir -p "/run/systemd/$kind"
    ln -sfn /dev/null "/run/systemd/$kind/$name"
done < "$W/generators.txt"
for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer tmp.mount; do
    [ "$(readlink "/etc/systemd/system/$unit")" = /dev/null ] || { say "$unit unmasked"; exit 1; }
done

# 9. The only target the box boots: basic.target (sysinit, sockets, timers with the masks above).
cat > /etc/systemd/system/box.target <<'EOF'
[Unit]
Description=AIGIS test box
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF

# 10. Shared propagation inside the box, as systemd sets it up on a host (it skips that in a
#     container): systemd hands a unit its credentials (LoadCredential=) by moving a mount from a
#     helper namespace onto /run/credentials/UNIT, which reaches the unit only through
#     propagation. Step 1 cut every tie to the host's mounts, so these peer groups are the box's.
mount --make-rshared /

say "masked $(wc -l < "$W/masks.txt") units, $(wc -l < "$W/generators.txt") generators; exec systemd"
exec env -i container=aigis-box /lib/systemd/systemd --system --unit=box.target \
    --show-status=no --log-target=journal-or-kmsg
