#!/bin/busybox sh
# initramfs /init for slotforge appliances (docs/boot.md): load the modules (order in
# /lib/modules/order), find the root partition by GPT name, open it with dm-verity when the
# command line carries systemd's verity parameters (roothash=, systemd.verity_root_data=,
# systemd.verity_root_hash=, systemd.verity_root_options=hash-offset=N), mount the squashfs
# read-only, switch root. A rootfs that does not open or mount (a broken or tampered slot)
# reboots, so boot counting moves on to the other slot.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
# The last `key=value` of the command line for key $1.
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
# The block device whose GPT partition name is $1 (waits for it to appear).
bylabel() {
  for i in $(seq 100); do
    for u in /sys/class/block/*/uevent; do
      grep -q "^PARTNAME=$1\$" "$u" && { echo /dev/$(basename $(dirname "$u")); return; }
    done
    sleep 0.1
  done
}
fail() {
  echo "@slotforge {\"event\":\"initramfs-failed\",\"root\":\"$root\",\"why\":\"$1\"}"
  sleep 1
  reboot -f
}
roothash=$(arg roothash)
if [ -n "$roothash" ]; then
  data=$(arg systemd.verity_root_data); hash=$(arg systemd.verity_root_hash)
  root=${data#PARTLABEL=}
  off=$(arg systemd.verity_root_options | tr ',' '\n' | sed -n 's/^hash-offset=//p')
else
  root=$(arg root); root=${root#PARTLABEL=}
fi
dev=$(bylabel "$root")
echo "@slotforge {\"event\":\"initramfs\",\"root\":\"$root\",\"device\":\"$dev\"}"
mnt=$dev
if [ -n "$roothash" ]; then
  hdev=$(bylabel "${hash#PARTLABEL=}")
  export DM_DISABLE_UDEV=1
  veritysetup open "$dev" root "$hdev" "$roothash" ${off:+--hash-offset=$off} 2>/dev/console || fail verity-open
  st=$(veritysetup status root | sed -n 's/^ *status: *//p')
  echo "@slotforge {\"event\":\"verity\",\"root_hash\":\"$roothash\",\"hash_offset\":\"$off\",\"status\":\"$st\"}"
  mnt=/dev/mapper/root
fi
mount -t squashfs -o ro "$mnt" /newroot || fail mount
[ -x /newroot/sbin/init ] || fail no-init
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
