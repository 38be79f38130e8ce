#!/bin/sh
# Reference init for slotforge test appliances (docs/boot.md): mount, network, agent boot,
# services; if a bundle disk is attached (/dev/vdb), apply it (or pull the release it names)
# and reboot; else power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
bylabel() { for u in /sys/class/block/*/uevent; do grep -q "^PARTNAME=$1\$" "$u" && echo /dev/$(basename $(dirname "$u")); done; }
if grep -q slotforge.install /proc/cmdline; then
  # Booted from the USB installer: write the target disk, then power off. No network, no agent boot.
  /usr/bin/slotforge agent install
  sync
  echo '@slotforge {"event":"poweroff"}'
  poweroff -f
fi
# FAT has no journal: a power cut while a file was being written leaves leaked clusters or a
# temporary file whose chain is short (docs/upgrade-protocol.md#crash-states). Repair before
# mounting read-write, so damage never accumulates; systemd-boot has already read it by now.
esp=$(bylabel esp)
if [ -x /usr/sbin/fsck.fat ]; then
  out=$(/usr/sbin/fsck.fat -a "$esp" 2>&1); rc=$?
  [ "$rc" = 1 ] && echo "@slotforge {\"event\":\"esp-repaired\",\"fsck_exit\":$rc,\"lines\":$(printf '%s\n' "$out" | grep -vc '^$')}"
fi
mount -t vfat "$esp" /boot/efi
mount -t ext4 "$(bylabel images)" /var/lib/slotforge/images
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
/usr/bin/slotforge agent boot
# What image contents cost in RAM: tmpfs bytes under /run (not crossing into mounts: a sealed
# image is a read-only mount there, an unsealed one is unpacked into it), all tmpfs (Shmem),
# and the sealed images mounted from dm-verity devices.
run_kb=$(/bin/busybox du -skx /run | /bin/busybox cut -f1)
shmem_kb=$(sed -n 's/^Shmem: *\([0-9]*\) kB/\1/p' /proc/meminfo)
sealed=$(grep -c ' - squashfs /dev/mapper/slotforge-' /proc/self/mountinfo)
read up _ < /proc/uptime
echo "@slotforge {\"event\":\"memory\",\"run_kb\":$run_kb,\"shmem_kb\":$shmem_kb,\"sealed_mounts\":$sealed,\"uptime\":$up}"
echo "@slotforge {\"event\":\"host-ns\",\"net\":\"$(readlink /proc/self/ns/net)\",\"pid\":\"$(readlink /proc/self/ns/pid)\",\"uts\":\"$(readlink /proc/self/ns/uts)\",\"cgroup\":\"$(readlink /proc/self/ns/cgroup)\"}"
/usr/bin/slotforge agent run --scrub
next=poweroff
if [ -b /dev/vdb ]; then
  pause=""
  [ -b /dev/vdc ] && pause=$(head -c 32 /dev/vdc | tr -d '\000\n ')
  # The second disk holds a bundle, or one line `docker://HOST/REPO:TAG` naming a release
  # to pull by tag (`supply: registry-bundle`).
  ref=$(head -c 512 /dev/vdb | tr -d '\000' | head -n 1)
  case "$ref" in
    docker://*) cmd="update ${ref#docker://}" ;;
    *) cmd="apply /dev/vdb" ;;
  esac
  if /usr/bin/slotforge agent $cmd ${pause:+--pause-at $pause}; then
    next=reboot
  fi
fi
/usr/bin/slotforge agent shutdown
# `agent shutdown` closed the sealed images (dm-verity over loop over files in the partition),
# so nothing holds it: unmounted cleanly, no journal to replay at the next boot.
umount /var/lib/slotforge/images
umount /boot/efi
sync
echo "@slotforge {\"event\":\"$next\"}"
$next -f
