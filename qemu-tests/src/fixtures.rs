//! Guest fixtures, built from Debian packages and turned into OCI images with umoci, so the
//! disks under test are made by `slotforge build` exactly as a user makes them:
//! - kernel image: Debian's vmlinuz (linux-image .deb, unpacked with dpkg-deb, cached under
//!   `target/qemu-fixtures/` by package version) and an initramfs of busybox-static, the
//!   modules below and `guest/initramfs-init.sh`;
//! - base image: busybox-static, the slotforge binary under test with its shared libraries, and
//!   `guest/appliance-init.sh` as `/sbin/init`;
//! - service images: busybox plus a payload of a chosen size.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules the guest needs, in load order (virtio disk and net, squashfs, vfat, ext4, efivarfs,
/// device-mapper + dm-verity).
pub const MODULES: &[&str] = &[
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk", "squashfs", "fat", "vfat", "nls_cp437",
    "nls_iso8859-1", "nls_ascii", "nls_utf8", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4", "failover", "net_failover", "virtio_net", "efivarfs",
    "reed_solomon", "dm-mod", "dm-bufio", "dm-verity", "overlay", "loop", "nbd",
];
/// Debian's veritysetup (cryptsetup-bin): the reference initramfs opens dm-verity roots with it.
pub const VERITYSETUP: &str = "/sbin/veritysetup";
pub const BUSYBOX: &str = "/bin/busybox";
/// Debian's fsck.fat (dosfstools): the reference init repairs the ESP with it before mounting.
pub const FSCK_FAT: &str = "/sbin/fsck.fat";

/// Debian's runc: the appliance runs its LinuxKit containers with it.
pub const RUNC: &str = "/usr/sbin/runc";
pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
const INITRAMFS_INIT: &str = include_str!("../guest/initramfs-init.sh");
const APPLIANCE_INIT: &str = include_str!("../guest/appliance-init.sh");

pub struct Fixtures {
    /// OCI layout, tag `1`: `/kernel` and `/initrd.img`.
    pub kernel: PathBuf,
    /// OCI layout, tag `1`: the appliance base with the agent.
    pub base: PathBuf,
    pub loader: PathBuf,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd} (see .ci/deps.sh)"))?;
    if !o.status.success() {
        bail!("{cmd} {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cache_root() -> PathBuf {
    std::env::var_os("SLOTFORGE_FIXTURE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("target/qemu-fixtures"))
}

/// Debian's kernel package, downloaded and unpacked once per package version.
pub fn kernel_tree() -> anyhow::Result<PathBuf> {
    let deps = run("apt-cache", &["depends", "linux-image-amd64"])?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")).map(str::to_string))
        .context("apt-cache knows no linux-image-amd64 dependency (run apt-get update)")?;
    let dir = cache_root().join(&pkg);
    let done = dir.join(".unpacked");
    if done.exists() {
        return Ok(dir);
    }
    let dl = cache_root().join("download");
    std::fs::create_dir_all(&dl)?;
    let _ = Command::new("chmod").args(["a+rwx", dl.to_str().unwrap()]).status();
    let o = Command::new("apt-get").arg("download").arg(&pkg).current_dir(&dl).output()?;
    if !o.status.success() {
        bail!("apt-get download {pkg}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let deb = std::fs::read_dir(&dl)?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{pkg}_"))).context("downloaded .deb not found")?;
    let _ = std::fs::remove_dir_all(&dir);
    run("dpkg-deb", &["-x", deb.to_str().unwrap(), dir.to_str().unwrap()])?;
    std::fs::write(&done, &pkg)?;
    let _ = std::fs::remove_file(&deb);
    Ok(dir)
}

fn find_module(tree: &Path, name: &str) -> Option<PathBuf> {
    let mut stack = vec![tree.join("lib/modules")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_string_lossy() == format!("{name}.ko") {
                return Some(p);
            }
        }
    }
    None
}

/// The initramfs: busybox, modules, the init script; a gzip'd newc cpio.
pub fn initramfs(kernel: &Path, out: &Path) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = tmp.path();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::copy(BUSYBOX, r.join("bin/busybox")).context("busybox-static is needed")?;
    let mut order = String::new();
    for m in MODULES {
        let p = find_module(kernel, m).with_context(|| format!("module {m} not in the kernel package"))?;
        std::fs::copy(p, r.join(format!("lib/modules/{m}.ko")))?;
        order += &format!("{m}\n");
    }
    std::fs::write(r.join("lib/modules/order"), order)?;
    std::fs::create_dir_all(r.join("run"))?;
    std::fs::create_dir_all(r.join("sbin"))?;
    copy_with_libs(Path::new(VERITYSETUP), &r.join("sbin/veritysetup"), r).context("veritysetup is needed (apt-get install cryptsetup-bin)")?;
    std::fs::write(r.join("init"), INITRAMFS_INIT)?;
    run("chmod", &["755", r.join("init").to_str().unwrap()])?;
    let sh = format!("cd {} && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1 > {}", r.display(), out.display());
    run("sh", &["-c", &sh])?;
    Ok(())
}

/// Copy the program `bin` to `dest` and every shared library `ldd` names under `root`.
pub fn copy_with_libs(bin: &Path, dest: &Path, root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest.parent().context("destination has a parent")?)?;
    std::fs::copy(bin, dest).with_context(|| format!("copying {}", bin.display()))?;
    for line in run("ldd", &[bin.to_str().unwrap()])?.lines() {
        let path = line.split("=>").nth(1).unwrap_or(line).split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            let d = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(d.parent().unwrap())?;
            std::fs::copy(path, &d).with_context(|| format!("copying {path}"))?;
        }
    }
    Ok(())
}

/// Make an OCI layout image `layout:tag` from the directory `src` with umoci.
pub fn umoci_image(layout: &Path, tag: &str, src: &Path, entrypoint: Option<&str>) -> anyhow::Result<()> {
    let l = layout.to_str().unwrap();
    if !layout.join("oci-layout").exists() {
        run("umoci", &["init", "--layout", l])?;
    }
    let img = format!("{l}:{tag}");
    run("umoci", &["new", "--image", &img])?;
    let bundle = layout.with_extension("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    run("umoci", &["unpack", "--rootless", "--image", &img, bundle.to_str().unwrap()])?;
    run("cp", &["-a", &format!("{}/.", src.display()), bundle.join("rootfs").to_str().unwrap()])?;
    run("umoci", &["repack", "--image", &img, bundle.to_str().unwrap()])?;
    std::fs::remove_dir_all(&bundle)?;
    if let Some(e) = entrypoint {
        run("umoci", &["config", "--image", &img, "--config.entrypoint", e])?;
    }
    Ok(())
}

/// Deterministic incompressible bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A service image: busybox plus `/data/payload` of `size` bytes.
pub fn service_image(layout: &Path, tag: &str, size: usize, seed: u64) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir_all(tmp.path().join("bin"))?;
    std::fs::create_dir_all(tmp.path().join("data"))?;
    std::fs::copy(BUSYBOX, tmp.path().join("bin/busybox"))?;
    std::fs::write(tmp.path().join("data/payload"), payload(size, seed))?;
    umoci_image(layout, tag, tmp.path(), Some("/bin/busybox"))
}

/// Build the kernel and base images for the slotforge binary `agent`.
pub fn build(agent: &Path) -> anyhow::Result<Fixtures> {
    let tmp = tempfile::Builder::new().prefix("slotforge-qemu-fixtures-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let ktree = kernel_tree()?;
    let kdir = dir.join("kernel-src");
    std::fs::create_dir_all(&kdir)?;
    let vmlinuz = std::fs::read_dir(ktree.join("boot"))?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-")).context("no vmlinuz in the kernel package")?;
    std::fs::copy(vmlinuz, kdir.join("kernel"))?;
    initramfs(&ktree, &kdir.join("initrd.img"))?;
    let kernel = dir.join("kernel");
    umoci_image(&kernel, "1", &kdir, None)?;

    let b = dir.join("base-src");
    for d in ["bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "boot/efi", "var/lib/slotforge/images", "usr/bin"] {
        std::fs::create_dir_all(b.join(d))?;
    }
    std::fs::copy(BUSYBOX, b.join("bin/busybox"))?;
    for a in ["sh", "mount", "umount", "sleep", "cat", "ls", "ip", "poweroff", "reboot", "sync", "grep", "sed", "basename", "dirname", "echo", "mkdir", "head", "tr", "readlink"] {
        std::os::unix::fs::symlink("busybox", b.join("bin").join(a))?;
    }
    copy_with_libs(agent, &b.join("usr/bin/slotforge"), &b)?;
    copy_with_libs(Path::new(RUNC), &b.join("usr/sbin/runc"), &b).context("runc is needed (apt-get install runc)")?;
    // No veritysetup: the agent opens sealed external images with dm-verity by ioctl
    // (docs/agent.md#opening-a-sealed-image); only the initramfs has it, for the slot.
    // The reference init repairs the ESP before mounting it (a power cut tears FAT).
    copy_with_libs(Path::new(FSCK_FAT), &b.join("usr/sbin/fsck.fat"), &b).context("fsck.fat is needed (apt-get install dosfstools)")?;
    let _ = Command::new("strip").arg(b.join("usr/bin/slotforge")).status();
    std::fs::write(b.join("sbin/init"), APPLIANCE_INIT)?;
    run("chmod", &["755", b.join("sbin/init").to_str().unwrap()])?;
    let base = dir.join("base");
    umoci_image(&base, "1", &b, None)?;
    if !Path::new(SYSTEMD_BOOT).exists() {
        bail!("{SYSTEMD_BOOT} is missing (apt-get install systemd-boot-efi)");
    }
    Ok(Fixtures { kernel, base, loader: SYSTEMD_BOOT.into(), dir, _tmp: tmp })
}

/// The probe every LinuxKit-fidelity container runs: one JSON line on stdout saying what the
/// container sees (capabilities, namespaces, hostname, mounts, limits, devices, its root).
pub const PROBE: &str = r#"#!/bin/sh
n=$1
w() { if touch "$1" 2>/dev/null; then echo true; else echo false; fi; }
caps=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
if [ -d /hostrun ]; then hr=$(w /hostrun/probe-$n); else hr=absent; fi
if [ -d /hostrun/made-by-runtime ]; then mk=true; else mk=false; fi
dev=false
if [ -c /dev/probe-null ] && echo x > /dev/probe-null 2>/dev/null; then dev=true; fi
if [ -d /vol-rw ]; then vw=$(w /vol-rw/from-$n); vs=$(ls /vol-rw | tr '\n' ' '); else vw=absent; vs=; fi
if [ -d /vol-ro ]; then vr=$(w /vol-ro/probe-$n); else vr=absent; fi
if [ -f /vol-ro/probe.sh ]; then vp=true; else vp=false; fi
if [ -f /vol-oci/index.json ] && [ -f /vol-oci/oci-layout ]; then vo=true; else vo=false; fi
sl=$(for c in /proc/[0-9]*/comm; do if [ "$(cat $c 2>/dev/null)" = sleep ]; then cat ${c%/comm}/cgroup; fi; done | tr '\n' ' ')
echo "{\"name\":\"$n\",\"caps\":\"$caps\",\"oom\":$(cat /proc/self/oom_score_adj),\"net\":\"$(readlink /proc/self/ns/net)\",\"pidns\":\"$(readlink /proc/self/ns/pid)\",\"cgroupns\":\"$(readlink /proc/self/ns/cgroup)\",\"pid\":$$,\"host\":\"$(hostname)\",\"hostrun\":\"$hr\",\"root_writable\":$(w /probe-root),\"made\":$mk,\"dev\":$dev,\"ip_forward\":$(cat /proc/sys/net/ipv4/ip_forward),\"nofile\":\"$(ulimit -n)\",\"sleeper_cgroup\":\"$sl\",\"uid\":$(id -u),\"resolv\":\"$(cat /etc/resolv.conf | tr -d '\n#')\",\"vol_rw\":\"$vw\",\"vol_seen\":\"$vs\",\"vol_ro\":\"$vr\",\"vol_ro_probe\":$vp,\"vol_oci\":$vo}"
"#;

/// An image with busybox and [`PROBE`] at `/probe.sh`, carrying `label` as its
/// `org.mobyproject.config` label.
pub fn probe_image(layout: &Path, tag: &str, label: &str) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    for a in ["sh", "sed", "cat", "touch", "readlink", "hostname", "tr", "id", "sleep", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", bin.join(a))?;
    }
    std::fs::write(tmp.path().join("probe.sh"), PROBE)?;
    umoci_image(layout, tag, tmp.path(), Some("/bin/sh"))?;
    run("umoci", &["config", "--image", &format!("{}:{tag}", layout.display()), "--config.label", &format!("org.mobyproject.config={label}")])?;
    Ok(())
}
