//! Offline checks of one crash state — a whole disk image file as a power cut left it — with the
//! standard readers and one decision: the GPT (`sgdisk -v`), the ESP (`fsck.vfat -n`), the
//! external-images partition (`e2fsck -fn` after replaying its journal, as the kernel's mount
//! would), and "which entry would systemd-boot start, and does it boot": the entry systemd-boot
//! orders first, its kernel, initrd and loader bytes as written by a complete step, its slot's
//! rootfs under the entry's root hash and its build's image set (`inspect::verify_slot`); an entry
//! on probation that would not boot is followed by what its boot counter falls back to.

use crate::format::inspect::{self, ReadOnly};
use crate::base::window::Window;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::process::Command;

/// A stretch of the disk the checks look at separately: a partition, or `gpt` (everything
/// outside the partitions: protective MBR, both GPT headers and entry arrays).
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub name: String,
    /// `esp`, `rootfs`, `external-images`, `data` (from the layout record), or `gpt`.
    pub role: String,
    pub start: u64,
    pub end: u64,
}

/// The disk's regions, from its GPT and layout record.
pub fn regions(disk: &Path) -> anyhow::Result<Vec<Region>> {
    let rep = inspect::inspect(disk)?;
    let role = |name: &str| -> String {
        rep.layout
            .as_ref()
            .and_then(|l| l.partitions.iter().find(|p| p.name == name))
            .map(|p| serde_json::to_value(p.role).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
            .unwrap_or_else(|| "unknown".into())
    };
    let mut out: Vec<Region> = rep.gpt.partitions.iter().map(|p| Region { name: p.name.clone(), role: role(&p.name), start: p.start, end: p.start + p.size }).collect();
    out.push(Region { name: "gpt".into(), role: "gpt".into(), start: 0, end: u64::MAX });
    Ok(out)
}

/// The region a byte belongs to (the last one, `gpt`, catches what no partition holds).
pub fn region_of(regions: &[Region], byte: u64) -> usize {
    regions.iter().position(|r| r.role != "gpt" && (r.start..r.end).contains(&byte)).unwrap_or(regions.len() - 1)
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

impl Verdict {
    /// An ESP verdict that passed only through the boot-time repair, for more than the dirty flag.
    pub fn needs_repair(&self) -> bool {
        self.ok && self.detail.contains("after fsck.vfat -a") && (self.detail.contains("leaked") || self.detail.contains("damage") || self.detail.contains("FSInfo"))
    }
    fn ok(detail: impl Into<String>) -> Self {
        Verdict { ok: true, detail: detail.into() }
    }
    fn bad(detail: impl Into<String>) -> Self {
        Verdict { ok: false, detail: detail.into() }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<(i32, String)> {
    let o = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    Ok((o.status.code().unwrap_or(-1), text))
}

fn last_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(n)..].join(" / ")
}

/// `sgdisk -v`: both GPT headers and entry arrays sound.
pub fn gpt(disk: &Path) -> anyhow::Result<Verdict> {
    let (code, out) = run(Command::new("sgdisk").arg("-v").arg(disk)).context("sgdisk (apt-get install gdisk)")?;
    Ok(if code == 0 && out.contains("No problems found") { Verdict::ok("sgdisk -v: no problems") } else { Verdict::bad(format!("sgdisk -v: {}", last_lines(&out, 3))) })
}

/// Copy a whole disk image, visiting only its data (holes stay holes).
pub fn copy_disk(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut src = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut dst = File::create(to).with_context(|| format!("creating {}", to.display()))?;
    dst.set_len(src.metadata()?.len())?;
    crate::base::window::copy_file_sparse(&mut src, &mut dst, 0)?;
    Ok(())
}

/// Copy a region into its own file (holes stay holes).
fn extract(disk: &Path, r: &Region, to: &Path) -> anyhow::Result<()> {
    let mut out = File::create(to)?;
    out.set_len(r.end - r.start)?;
    let mut w = Window::new(File::open(disk)?, r.start, r.end - r.start);
    crate::base::window::copy_sparse(&mut w, &mut out, 0)?;
    Ok(())
}

/// What `fsck.vfat -n` found on a FAT volume, by consequence.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FatFindings {
    /// The dirty flag (Linux sets it in the primary boot sector while the volume is mounted, so
    /// the backup differs at byte 65): a cut while mounted. Nothing reads it at boot.
    pub dirty: bool,
    /// FSInfo's free-cluster count is stale: a hint, recomputed by the repair.
    pub fsinfo: bool,
    /// Clusters allocated in the FAT that no file reaches (a file being written whose entry
    /// did not persist, or a deleted one whose FAT update did): leaked space.
    pub leaked_clusters: u64,
    /// Anything else (a file whose chain is shorter than its size, cross-links, bad entries).
    pub damage: Vec<String>,
}

/// Sort `fsck.vfat -n`'s report (dosfstools 4.2) into [`FatFindings`].
pub fn fat_findings(out: &str) -> FatFindings {
    let mut f = FatFindings::default();
    let mut lines = out.lines().map(str::trim).peekable();
    let mut file = String::new();
    while let Some(l) = lines.next() {
        if l.starts_with('/') && !l.contains(" files, ") {
            // The file the next lines are about.
            file = format!("{l}: ");
        } else if l.contains("Dirty bit is set") {
            f.dirty = true;
        } else if l.starts_with("There are differences between boot sector and its backup") {
            // The differing bytes follow: "65:01/00" is the dirty flag alone.
            let mut offsets = Vec::new();
            while let Some(n) = lines.peek() {
                if n.starts_with("This is mostly harmless") || n.starts_with("Differences:") {
                    lines.next();
                } else if n.split_whitespace().all(|w| w.contains(':') && w.contains('/')) && !n.is_empty() {
                    offsets.extend(n.split_whitespace().filter_map(|w| w.split(':').next()).map(str::to_string));
                    lines.next();
                } else {
                    break;
                }
            }
            if offsets.iter().all(|o| o == "65") {
                f.dirty = true;
            } else {
                f.damage.push(format!("boot sector differs from its backup at bytes {}", offsets.join(",")));
            }
        } else if l.starts_with("Free cluster summary wrong") {
            f.fsinfo = true;
        } else if let Some(r) = l.strip_prefix("Reclaimed ") {
            f.leaked_clusters += r.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        } else if l.is_empty()
            || l.starts_with("fsck.fat ")
            || l.starts_with("Automatically removing dirty bit")
            || l.starts_with("Leaving filesystem unchanged")
            || l.starts_with("Auto-correcting")
            || l.starts_with("FATs differ but appear to be intact")
            || l.starts_with("Using first FAT")
            || l.starts_with("Perform changes")
            || l.contains(" files, ")
            || l.starts_with("1) ")
            || l.starts_with("2) ")
            || l.starts_with("3) ")
            || l.starts_with("Not automatically fixing")
        {
        } else {
            f.damage.push(format!("{file}{l}"));
        }
    }
    f
}

/// `fsck.vfat -n` on a copy of the ESP, then the boot-time repair the reference init runs
/// (`fsck.vfat -a`, docs/boot.md) on that copy: the state passes if the volume is clean, or the
/// repair leaves it clean with every boot entry still in place. FAT has no journal: a cut in
/// the middle of writing a file always leaves something to repair.
pub fn esp(disk: &Path, r: &Region, scratch: &Path) -> anyhow::Result<Verdict> {
    let f = scratch.join("esp.vfat");
    extract(disk, r, &f)?;
    let res = (|| -> anyhow::Result<Verdict> {
        let (code, out) = run(Command::new("fsck.vfat").arg("-n").arg(&f)).context("fsck.vfat (apt-get install dosfstools)")?;
        if code == 0 {
            return Ok(Verdict::ok("fsck.vfat -n: clean"));
        }
        let found = fat_findings(&out);
        let mut what = Vec::new();
        if found.dirty {
            what.push("dirty bit (cut while mounted)".to_string());
        }
        if found.fsinfo {
            what.push("stale FSInfo free count".to_string());
        }
        if found.leaked_clusters > 0 {
            what.push(format!("{} leaked clusters", found.leaked_clusters));
        }
        what.extend(found.damage.iter().map(|d| format!("damage: {d}")));
        let entries_of = |path: &Path| -> anyhow::Result<Vec<String>> {
            let fs = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(path)?, 0, r.end - r.start)), fatfs::FsOptions::new().update_accessed_date(false))?;
            let root = fs.root_dir();
            let mut v: Vec<String> = crate::format::entries::list(&crate::format::entries::FatView(&root)).into_iter().map(|e| e.path).collect();
            v.sort();
            Ok(v)
        };
        let before = entries_of(&f).unwrap_or_default();
        let (rc, rout) = run(Command::new("fsck.vfat").arg("-a").arg(&f))?;
        let (code2, out2) = run(Command::new("fsck.vfat").arg("-n").arg(&f))?;
        let after = entries_of(&f).unwrap_or_default();
        Ok(if rc > 1 {
            Verdict::bad(format!("fsck.vfat -n: {}; fsck.vfat -a failed (exit {rc}): {}", what.join(", "), last_lines(&rout, 2)))
        } else if code2 != 0 {
            Verdict::bad(format!("fsck.vfat -n: {}; still after fsck.vfat -a: {}", what.join(", "), last_lines(&out2, 3)))
        } else if before != after {
            Verdict::bad(format!("fsck.vfat -n: {}; fsck.vfat -a changed the boot entries from {before:?} to {after:?}", what.join(", ")))
        } else {
            Verdict::ok(format!("fsck.vfat -n: {}; clean after fsck.vfat -a, entries kept", what.join(", ")))
        })
    })();
    let _ = std::fs::remove_file(&f);
    res
}

/// `e2fsck -fn` on a copy of an ext4 partition after replaying its journal (`e2fsck -E
/// journal_only`, what mounting it does first).
pub fn ext4(disk: &Path, r: &Region, scratch: &Path) -> anyhow::Result<Verdict> {
    let f = scratch.join(format!("{}.ext4", r.name));
    extract(disk, r, &f)?;
    let (jc, jout) = run(Command::new("e2fsck").args(["-E", "journal_only", "-p"]).arg(&f)).context("e2fsck (apt-get install e2fsprogs)")?;
    let (code, out) = run(Command::new("e2fsck").arg("-fn").arg(&f))?;
    let _ = std::fs::remove_file(&f);
    Ok(if jc > 1 {
        Verdict::bad(format!("e2fsck journal replay (exit {jc}): {}", last_lines(&jout, 3)))
    } else if code == 0 {
        Verdict::ok(if jc == 1 { "e2fsck -fn: clean after replaying the journal" } else { "e2fsck -fn: clean" })
    } else {
        Verdict::bad(format!("e2fsck -fn (exit {code}): {}", last_lines(&out, 4)))
    })
}

/// The bytes a complete step leaves on the ESP — the loader, loader.conf, every entry's kernel,
/// initrd or UKI — read from the disks before and after the operation: a crash state's boot files
/// must be one of these, never a torn mix.
#[derive(Debug, Default, Clone)]
pub struct Known {
    /// The loader and loader.conf as any complete step wrote them.
    common: BTreeSet<String>,
    /// Per build (`slotforge.build=` of the entry that names them) and role (`linux`, `initrd`,
    /// `uki`): the digests a complete step wrote. An entry is judged against its own build's
    /// files only, so an old kernel under a new entry fails.
    boot: std::collections::BTreeMap<(String, &'static str), BTreeSet<String>>,
}

fn esp_region(rep: &inspect::InspectReport) -> Option<(u64, u64)> {
    rep.gpt.partitions.iter().find(|p| p.type_guid == crate::format::layout::types::ESP).map(|p| (p.start, p.size))
}

/// sha256 of a file on a FAT volume (`None` if it cannot be read whole).
fn fat_digest<T: fatfs::ReadWriteSeek>(root: &fatfs::Dir<T>, path: &str) -> Option<String> {
    let f = root.open_file(path.trim_start_matches('/')).ok()?;
    crate::base::hash::digest_reader(f).ok().map(|(d, _)| d.hex().to_string())
}

/// The boot files of `entry` with their roles: its kernel and initrd (Type #1) or the UKI itself.
fn boot_files(e: &crate::format::entries::EntryReport) -> Vec<(&'static str, String)> {
    if e.kind == "uki" {
        vec![("uki", e.path.clone())]
    } else {
        [("linux", &e.linux), ("initrd", &e.initrd)].into_iter().filter_map(|(r, p)| p.clone().map(|p| (r, p))).collect()
    }
}

/// The build an entry boots: `slotforge.build=` on its command line.
fn entry_build(e: &crate::format::entries::EntryReport) -> Option<String> {
    crate::format::cmdline::value(e.options.as_deref()?, "slotforge.build")
}

/// Whether systemd-boot would list the entry at all: a Type #1 entry needs a `linux` (or `efi`)
/// line — without one systemd-boot drops it; a UKI is its own image.
fn bootable_kind(e: &crate::format::entries::EntryReport) -> bool {
    e.kind == "uki" || e.linux.is_some()
}

impl Known {
    pub fn from_disks(disks: &[&Path]) -> anyhow::Result<Known> {
        let mut k = Known::default();
        for d in disks {
            let rep = inspect::inspect(d)?;
            let Some((start, size)) = esp_region(&rep) else {
                continue;
            };
            let fs = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(d)?, start, size)), fatfs::FsOptions::new().update_accessed_date(false))?;
            let root = fs.root_dir();
            for p in [crate::format::esp::LOADER_PATH, crate::format::esp::LOADER_CONF] {
                k.common.extend(fat_digest(&root, p));
            }
            for e in rep.esp.iter().flat_map(|e| &e.entries) {
                let Some(build) = entry_build(e) else { continue };
                for (role, p) in boot_files(e) {
                    if let Some(d) = fat_digest(&root, &p) {
                        k.boot.entry((build.clone(), role)).or_default().insert(d);
                    }
                }
            }
        }
        Ok(k)
    }
}

/// What systemd-boot would do with this disk, and whether that boots.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// The entry that ends up booting (after any fallback), e.g. `slot-b+2-1.conf`.
    pub entry: Option<String>,
    pub slot: Option<String>,
    pub build: Option<String>,
    /// The first entry would not boot, but its counter makes systemd-boot fall back to this one.
    pub fallback: bool,
    pub ok: bool,
    pub detail: String,
}

/// The decision for a disk image: see the module's header. The ext4 partitions are read as the
/// kernel mounts them — after their journals replay — so the state is first copied to
/// `scratch` and `e2fsck -E journal_only` replays each journal in the copy.
pub fn decide(state: &Path, regions: &[Region], known: &Known, scratch: &Path) -> anyhow::Result<Decision> {
    let copy = scratch.join("decide.img");
    copy_disk(state, &copy)?;
    for r in regions.iter().filter(|r| r.role == "external-images") {
        // Replayed in a file of its own (e2fsck's `?offset=` loses the offset when it re-opens
        // the device after a replay), then put back. A journal it cannot replay shows in the
        // reads below.
        let part = scratch.join("decide.ext4");
        extract(&copy, r, &part)?;
        let _ = run(Command::new("e2fsck").args(["-E", "journal_only", "-p"]).arg(&part));
        let mut d = std::fs::OpenOptions::new().write(true).open(&copy)?;
        std::io::Seek::seek(&mut d, std::io::SeekFrom::Start(r.start))?;
        std::io::copy(&mut File::open(&part)?, &mut d)?;
        let _ = std::fs::remove_file(&part);
    }
    let d = decide_replayed(&copy, known);
    let _ = std::fs::remove_file(&copy);
    d
}

fn decide_replayed(disk: &Path, known: &Known) -> anyhow::Result<Decision> {
    let bad = |detail: String| Decision { entry: None, slot: None, build: None, fallback: false, ok: false, detail };
    let rep = match inspect::inspect_with(disk, false) {
        Ok(r) => r,
        Err(e) => return Ok(bad(format!("unreadable: {e:#}"))),
    };
    let (Some(esp), Some((start, size))) = (&rep.esp, esp_region(&rep)) else {
        return Ok(bad("the ESP is unreadable".into()));
    };
    let fs = fatfs::FileSystem::new(ReadOnly(Window::new(File::open(disk)?, start, size)), fatfs::FsOptions::new().update_accessed_date(false))?;
    let root = fs.root_dir();
    for p in [crate::format::esp::LOADER_PATH, crate::format::esp::LOADER_CONF] {
        if !fat_digest(&root, p).is_some_and(|d| known.common.contains(&d)) {
            return Ok(bad(format!("{p} is missing or not as any complete step wrote it")));
        }
    }
    let mut why = Vec::new();
    // systemd-boot drops an entry it cannot start at all (no `linux` line) before ordering.
    let listed: Vec<crate::format::entries::EntryReport> = esp
        .entries
        .iter()
        .filter(|e| {
            let keep = bootable_kind(e);
            if !keep {
                why.push(format!("{} has no linux line (systemd-boot drops it)", e.file));
            }
            keep
        })
        .cloned()
        .collect();
    let order = crate::format::entries::boot_order(&listed);
    for (i, e) in order.iter().enumerate() {
        let problem = (|| -> anyhow::Result<Option<String>> {
            let Some(build) = entry_build(e) else {
                return Ok(Some("names no build (slotforge.build=)".into()));
            };
            for (role, p) in boot_files(e) {
                let Some(d) = fat_digest(&root, &p) else {
                    return Ok(Some(format!("{p} is missing")));
                };
                if !known.boot.get(&(build.clone(), role)).is_some_and(|ds| ds.contains(&d)) {
                    return Ok(Some(format!("{p} is not the {role} build {build} wrote (torn, or another build's)")));
                }
            }
            let Some(slot) = &e.slot else {
                return Ok(Some("names no slot".into()));
            };
            let v = inspect::verify_slot(disk, &rep, slot)?;
            let failed: Vec<String> = v.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
            Ok((!failed.is_empty()).then(|| failed.join("; ")))
        })()?;
        match problem {
            None => {
                let build = rep.slots.iter().find(|s| Some(&s.slot) == e.slot.as_ref()).and_then(|s| s.release.as_ref()).map(|r| r.build_id.clone());
                let detail = if why.is_empty() { format!("systemd-boot starts {}", e.file) } else { format!("systemd-boot starts {} after {}", e.file, why.join("; ")) };
                return Ok(Decision { entry: Some(e.file.clone()), slot: e.slot.clone(), build, fallback: i > 0, ok: true, detail });
            }
            Some(p) => {
                why.push(format!("{} would not boot ({p})", e.file));
                // Only a counted entry is given up on; a good entry would be retried for ever.
                if e.tries_left.is_none() {
                    break;
                }
            }
        }
    }
    if order.is_empty() {
        why.push("no boot entry".into());
    }
    Ok(bad(why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsck_vfat_reports_sorted_by_consequence() {
        // dosfstools 4.2's words, as read from replayed crash states of an apply.
        let dirty = "fsck.fat 4.2 (2021-01-31)\nThere are differences between boot sector and its backup.\nThis is mostly harmless. Differences: (offset:original/backup)\n  65:01/00\n  Not automatically fixing this.\nFree cluster summary wrong (50258 vs. really 36240)\n  Auto-correcting.\nReclaimed 1966 unused clusters (1006592 bytes).\nLeaving filesystem unchanged.\n/tmp/esp.vfat: 19 files, 11150/61141 clusters\n";
        let f = fat_findings(dirty);
        assert_eq!(f, FatFindings { dirty: true, fsinfo: true, leaked_clusters: 1966, damage: vec![] });
        let torn = "fsck.fat 4.2 (2021-01-31)\n/b/vmlinuz\n  Contains a free cluster (50560). Assuming EOF.\n/b/vmlinuz\n  File size is 7176982 bytes, cluster chain length is 2064896 bytes.\n  Truncating file to 2064896 bytes.\n";
        let f = fat_findings(torn);
        assert!(!f.dirty && f.damage.len() == 3, "{f:?}");
        let other = "There are differences between boot sector and its backup.\nThis is mostly harmless. Differences: (offset:original/backup)\n  65:01/00\n  71:41/20\n";
        assert_eq!(fat_findings(other).damage.len(), 1);
    }
}
