#!/bin/busybox sh
# initramfs /init for slotforge test appliances: load the modules (order in /lib/modules/order),
# find the rootfs named by root=PARTLABEL=… in /proc/cmdline, mount the squashfs, switch root.
# A rootfs that does not mount (a broken slot) reboots, so boot counting moves on.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
root=$(sed -n 's/.*root=PARTLABEL=\([^ ]*\).*/\1/p' /proc/cmdline)
dev=""
for i in $(seq 100); do
  for u in /sys/class/block/*/uevent; do
    grep -q "^PARTNAME=$root\$" "$u" && dev=/dev/$(basename $(dirname "$u"))
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
echo "@slotforge {\"event\":\"initramfs\",\"root\":\"$root\",\"device\":\"$dev\"}"
if ! mount -t squashfs -o ro "$dev" /newroot || [ ! -x /newroot/sbin/init ]; then
  echo "@slotforge {\"event\":\"initramfs-failed\",\"root\":\"$root\"}"
  sleep 1
  reboot -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
