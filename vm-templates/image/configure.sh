#!/bin/sh
# Base configuration, run inside the guest rootfs (chroot, /proc mounted) after debootstrap and
# after overlay/ has been copied in. Part of the base layer's cache key: editing it rebuilds the base.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

unit_exists() { [ -e "/lib/systemd/system/$1" ] || [ -e "/etc/systemd/system/$1" ]; }

# --- services we want -------------------------------------------------------------------------
systemctl enable systemd-networkd.service systemd-networkd-wait-online.service ssh.service \
    neuraos-agent.service serial-getty@ttyS0.service
# qemu-guest-agent has no [Install]: udev starts it when the org.qemu.guest_agent.0 port appears.
test -e /lib/udev/rules.d/60-qemu-guest-agent.rules

# --- what slows a TCG boot and does nothing for a throwaway guest -----------------------------
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
         e2scrub_reap.service fstrim.timer man-db.timer remote-fs.target getty@tty1.service \
         systemd-pstore.service networking.service; do
    if unit_exists "$u"; then systemctl disable "$u" >/dev/null 2>&1 || true; fi
done
for u in systemd-firstboot.service apt-daily.service apt-daily-upgrade.service man-db.service \
         e2scrub_all.service e2scrub_reap.service systemd-timesyncd.service; do
    systemctl mask "$u" >/dev/null
done
systemctl set-default multi-user.target

# --- identity: every guest gets its own machine-id at first boot ------------------------------
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id

# --- root: no password (locked); ssh key only, installed by the image layer -------------------
passwd -l root >/dev/null

# --- initramfs: small, with the virtio and ext4 modules (see /etc/initramfs-tools) ------------
update-initramfs -u -k all
initrd=$(ls /boot/initrd.img-* | sort -V | tail -n1)
have=$(lsinitramfs "$initrd")
for m in virtio_pci virtio_blk virtio_net ext4; do
    echo "$have" | grep -q "/$m\.ko" || { echo "E: $m.ko missing from $initrd" >&2; exit 1; }
done

# --- size: docs, man pages, translations, package lists ---------------------------------------
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find /usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/*
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*
echo "I: base configured"
