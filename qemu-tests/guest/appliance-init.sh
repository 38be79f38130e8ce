#!/bin/sh
# Reference init for slotforge test appliances: mount, network, agent, services, power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
bylabel() { for u in /sys/class/block/*/uevent; do grep -q "^PARTNAME=$1\$" "$u" && echo /dev/$(basename $(dirname "$u")); done; }
mount -t vfat "$(bylabel esp)" /boot/efi
mount -t ext4 "$(bylabel images)" /var/lib/slotforge/images
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
/usr/bin/slotforge agent boot
/usr/bin/slotforge agent run
umount /var/lib/slotforge/images
umount /boot/efi
sync
echo '@slotforge {"event":"poweroff"}'
poweroff -f
