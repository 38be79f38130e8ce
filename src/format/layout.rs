//! Disk layouts: pure data files in `layouts/` and a pure planner that turns one into byte
//! offsets. Like systemd-repart's definitions, a layout never moves a partition of a device in the
//! field; a product line ships several *generations* and a build can be checked against all.
//! Type GUIDs follow the Discoverable Partitions Specification; partition and disk GUIDs are
//! derived from the layout and partition names, so the same layout always gives the same table.
//! Reference: docs/layout.md.

use crate::base::yaml::{self, parse_size, InputError};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use uuid::Uuid;

/// The planned layout, recorded on the ESP so inspect, verify and the agent know the slot caps
/// and the layout generation of a disk without the layout file.
pub const RECORD_PATH: &str = "slotforge/layout.json";

/// Partitions start and end on 1 MiB boundaries (what parted, sgdisk and repart do).
pub const ALIGN: u64 = 1 << 20;
/// Logical sector size of the images we write.
pub const SECTOR: u64 = 512;
/// The backup GPT at the end of the disk: 32 sectors of entries + 1 header.
const GPT_BACKUP_SECTORS: u64 = 33;
/// GPT partition names are 36 UTF-16 code units.
const GPT_NAME_MAX: usize = 36;

/// Discoverable Partitions Specification type GUIDs.
pub mod types {
    pub const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
    pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    pub const USR_X86_64: &str = "8484680c-9521-48c6-9c11-b0720656f69e";
    pub const LINUX_DATA: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Esp,
    Rootfs,
    ExternalImages,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    name: Spanned<String>,
    #[serde(default = "one")]
    generation: u32,
    disk: DiskSpec,
    partitions: Vec<PartSpec>,
}
fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskSpec {
    size: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartSpec {
    name: Spanned<String>,
    role: Spanned<Role>,
    slot: Option<Slot>,
    size: Spanned<String>,
    /// Optional fixed start (must be 1 MiB aligned), to describe an existing device exactly.
    start: Option<Spanned<String>>,
    fs_cap: Option<Spanned<String>>,
    /// Override the type GUID: a GUID, or `root`/`usr` for rootfs, `esp`, `linux`.
    #[serde(rename = "type")]
    type_guid: Option<Spanned<String>>,
}

/// A planned disk: every partition at its byte offset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub name: String,
    pub generation: u32,
    pub disk_size: u64,
    pub disk_guid: Uuid,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based GPT entry number.
    pub number: u32,
    pub name: String,
    pub role: Role,
    pub slot: Option<Slot>,
    pub type_guid: Uuid,
    pub guid: Uuid,
    pub start: u64,
    pub size: u64,
    /// The largest filesystem allowed in this partition (rootfs: `fs_cap`, else the size).
    pub fs_cap: u64,
}

impl Partition {
    pub fn first_lba(&self) -> u64 {
        self.start / SECTOR
    }
    pub fn last_lba(&self) -> u64 {
        (self.start + self.size) / SECTOR - 1
    }
}

impl Layout {
    pub fn rootfs(&self, slot: Slot) -> &Partition {
        self.partitions
            .iter()
            .find(|p| p.role == Role::Rootfs && p.slot == Some(slot))
            .expect("planner guarantees both rootfs slots")
    }
    pub fn esp(&self) -> &Partition {
        self.by_role(Role::Esp).expect("planner guarantees an ESP")
    }
    pub fn by_role(&self, role: Role) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.role == role)
    }
}

pub fn load(path: &Path) -> anyhow::Result<Layout> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading layout {}: {e}", path.display()))?;
    Ok(parse(path, &text)?)
}

pub fn parse(file: &Path, text: &str) -> Result<Layout, InputError> {
    let lf: LayoutFile = yaml::parse(file, text)?;
    plan(file, &lf, None)
}

/// Plan the layout for a disk of `disk_size` bytes instead of the one it names (an installer
/// fitting the layout to the target disk: `rest` grows or shrinks, nothing else moves).
pub fn parse_for_disk(file: &Path, text: &str, disk_size: u64) -> Result<Layout, InputError> {
    let lf: LayoutFile = yaml::parse(file, text)?;
    plan(file, &lf, Some(disk_size / ALIGN * ALIGN))
}

/// A GUID derived from names: sha256 of a domain tag and the parts, as an RFC 9562 version-8 UUID.
pub fn derived_guid(parts: &[&str]) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"slotforge-guid-v1");
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    Uuid::new_v8(b)
}

fn size_of(file: &Path, s: &Spanned<String>) -> Result<u64, InputError> {
    parse_size(&s.value).map_err(|e| InputError::spanned(file, s, e))
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn type_guid(file: &Path, spec: &PartSpec) -> Result<Uuid, InputError> {
    let s = match &spec.type_guid {
        None => match spec.role.value {
            Role::Esp => types::ESP,
            Role::Rootfs => types::ROOT_X86_64,
            Role::ExternalImages | Role::Data => types::LINUX_DATA,
        },
        Some(t) => match t.value.as_str() {
            "esp" => types::ESP,
            "root" => types::ROOT_X86_64,
            "usr" => types::USR_X86_64,
            "linux" => types::LINUX_DATA,
            other => {
                return Uuid::parse_str(other).map_err(|_| {
                    InputError::spanned(file, t, format!("type {other:?} is neither a GUID nor one of esp, root, usr, linux"))
                })
            }
        },
    };
    Ok(Uuid::parse_str(s).expect("constant GUIDs parse"))
}

/// The largest disk a layout may describe: 8 PiB. With at most [`MAX_PARTITIONS`] sizes each no
/// larger than the disk, every sum the planner makes stays far below u64's end (a size of 2^64-1
/// used to wrap the running offset to 0 and place a partition inside the GPT).
pub const MAX_DISK: u64 = 1 << 53;
/// The GPT entry array slotforge writes has 128 entries (the UEFI minimum).
pub const MAX_PARTITIONS: usize = 128;

fn plan(file: &Path, lf: &LayoutFile, disk_override: Option<u64>) -> Result<Layout, InputError> {
    let name = &lf.name;
    if name.value.is_empty() || !name.value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(InputError::spanned(file, name, format!("layout name {:?} may hold only [A-Za-z0-9._-]", name.value)));
    }
    let disk_size = match disk_override {
        Some(d) => d,
        None => size_of(file, &lf.disk.size)?,
    };
    if disk_size % ALIGN != 0 {
        return Err(InputError::spanned(file, &lf.disk.size, "disk size must be a whole number of MiB"));
    }
    if disk_size > MAX_DISK {
        return Err(InputError::spanned(file, &lf.disk.size, format!("disk size {disk_size} is over the {MAX_DISK} bytes (8 PiB) slotforge plans for")));
    }
    if lf.partitions.is_empty() {
        return Err(InputError::spanned(file, name, "a layout needs partitions"));
    }
    if lf.partitions.len() > MAX_PARTITIONS {
        return Err(InputError::spanned(file, &lf.partitions[MAX_PARTITIONS].name, format!("{} partitions: a GPT as slotforge writes it holds at most {MAX_PARTITIONS}", lf.partitions.len())));
    }
    // Every size and start is at most the disk, so the sums below cannot wrap.
    let within = |s: &Spanned<String>, what: &str| -> Result<u64, InputError> {
        let v = size_of(file, s)?;
        if v > disk_size {
            return Err(InputError::spanned(file, s, format!("{what} {v} is larger than the {disk_size}-byte disk")));
        }
        Ok(v)
    };
    // Last byte a partition may use: the backup GPT sits at the end, and ends stay aligned.
    let usable_end = (disk_size / SECTOR).saturating_sub(GPT_BACKUP_SECTORS) * SECTOR / ALIGN * ALIGN;

    // Role rules first, so their errors come before sizing ones.
    let count = |r: Role| lf.partitions.iter().filter(|p| p.role.value == r).count();
    let loc = |r: Role, n: usize| lf.partitions.iter().filter(|p| p.role.value == r).nth(n).map(|p| p.role.referenced).unwrap_or(lf.name.referenced);
    if count(Role::Esp) != 1 {
        return Err(InputError::at(file, &loc(Role::Esp, 1), format!("a layout needs exactly one esp partition, this one has {}", count(Role::Esp))));
    }
    if count(Role::ExternalImages) > 1 {
        return Err(InputError::at(file, &loc(Role::ExternalImages, 1), "only one external-images partition is allowed"));
    }
    if count(Role::Rootfs) != 2 {
        let n = if count(Role::Rootfs) > 2 { 2 } else { 0 };
        return Err(InputError::at(file, &loc(Role::Rootfs, n), format!("a layout needs exactly two rootfs partitions (slot a and slot b), this one has {}", count(Role::Rootfs))));
    }
    let mut seen_slots = Vec::new();
    let mut seen_names: Vec<&str> = Vec::new();
    for p in &lf.partitions {
        let n = &p.name.value;
        if n.is_empty() || n.encode_utf16().count() > GPT_NAME_MAX || !n.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InputError::spanned(file, &p.name, format!("partition name {n:?} must be 1-{GPT_NAME_MAX} printable ASCII characters")));
        }
        if seen_names.contains(&n.as_str()) {
            return Err(InputError::spanned(file, &p.name, format!("partition name {n:?} is used twice")));
        }
        seen_names.push(n);
        match (p.role.value, p.slot) {
            (Role::Rootfs, None) => return Err(InputError::spanned(file, &p.role, format!("rootfs partition {n:?} needs `slot: a` or `slot: b`"))),
            (Role::Rootfs, Some(s)) => {
                if seen_slots.contains(&s) {
                    return Err(InputError::spanned(file, &p.name, format!("slot {} is given to two rootfs partitions", s.name())));
                }
                seen_slots.push(s);
            }
            (_, Some(_)) => return Err(InputError::spanned(file, &p.name, format!("only rootfs partitions have a slot ({n:?} is not one)"))),
            _ => {}
        }
        if p.fs_cap.is_some() && p.role.value != Role::Rootfs {
            return Err(InputError::spanned(file, p.fs_cap.as_ref().unwrap(), "fs_cap applies to rootfs partitions only"));
        }
    }
    if lf.partitions.iter().filter(|p| p.size.value == "rest").count() > 1 {
        let second = lf.partitions.iter().filter(|p| p.size.value == "rest").nth(1).unwrap();
        return Err(InputError::spanned(file, &second.size, "only one partition may have `size: rest`"));
    }

    // Fixed sizes first, so `rest` knows what is left.
    let mut sizes = Vec::new();
    for p in &lf.partitions {
        if p.size.value == "rest" {
            sizes.push(None);
            continue;
        }
        let size = within(&p.size, "size")?;
        if size == 0 {
            return Err(InputError::spanned(file, &p.size, format!("partition {}: size 0; give it a size (whole MiB, rounded up) or `rest`", p.name.value)));
        }
        sizes.push(Some(round_up(size, ALIGN)));
    }
    let fixed: u64 = sizes.iter().flatten().sum();
    let mut cursor = ALIGN;
    let mut out = Vec::new();
    for (i, p) in lf.partitions.iter().enumerate() {
        let start = match &p.start {
            Some(s) => {
                let v = within(s, "start")?;
                if v % ALIGN != 0 {
                    return Err(InputError::spanned(file, s, format!("start {v} is not 1 MiB aligned")));
                }
                if v < cursor {
                    let prev = out.last().map(|q: &Partition| q.name.clone()).unwrap_or_else(|| "the GPT header".into());
                    return Err(InputError::spanned(file, s, format!("partition {:?} starting at {v} overlaps {prev} (which ends at {cursor})", p.name.value)));
                }
                v
            }
            None => cursor,
        };
        let size = match sizes[i] {
            Some(s) => s,
            None => {
                let later_fixed: u64 = sizes[i + 1..].iter().flatten().sum();
                let left = usable_end.saturating_sub(start).saturating_sub(later_fixed);
                if left < ALIGN {
                    return Err(InputError::spanned(file, &p.size, format!(
                        "no room left for `rest` partition {:?}: the other partitions take {} MiB of a {} MiB disk",
                        p.name.value, fixed / ALIGN, disk_size / ALIGN)));
                }
                left
            }
        };
        if start + size > usable_end {
            return Err(InputError::spanned(file, &p.size, format!(
                "disk too small: partition {:?} ends at {} MiB but a {} MiB disk leaves {} MiB for partitions (the backup GPT takes the end)",
                p.name.value, (start + size).div_ceil(ALIGN), disk_size / ALIGN, usable_end / ALIGN)));
        }
        let fs_cap = match &p.fs_cap {
            Some(c) => {
                let v = within(c, "fs_cap")?;
                if v > size {
                    return Err(InputError::spanned(file, c, format!("fs_cap {v} is larger than the partition ({size} bytes)")));
                }
                v
            }
            None => size,
        };
        out.push(Partition {
            number: i as u32 + 1,
            name: p.name.value.clone(),
            role: p.role.value,
            slot: p.slot,
            type_guid: type_guid(file, p)?,
            guid: derived_guid(&[&name.value, "partition", &p.name.value]),
            start,
            size,
            fs_cap,
        });
        cursor = start + size;
    }
    Ok(Layout {
        name: name.value.clone(),
        generation: lf.generation,
        disk_size,
        disk_guid: derived_guid(&[&name.value, "disk"]),
        partitions: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = "name: edge
generation: 2
disk: {size: 4GiB}
partitions:
  - {name: esp,      role: esp,      size: 128MiB}
  - {name: rootfs_a, role: rootfs,   slot: a, size: 512MiB, fs_cap: 300MiB}
  - {name: rootfs_b, role: rootfs,   slot: b, size: 512MiB, fs_cap: 300MiB}
  - {name: images,   role: external-images, size: 2GiB}
  - {name: persist,  role: data,     size: rest}
";

    fn p(text: &str) -> Result<Layout, InputError> {
        parse(Path::new("l.yaml"), text)
    }

    #[test]
    fn plans_aligned_partitions_and_rest() {
        let l = p(EDGE).unwrap();
        assert_eq!(l.partitions[0].start, ALIGN);
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].start + w[0].size, w[1].start);
        }
        for q in &l.partitions {
            assert_eq!(q.start % ALIGN, 0);
            assert_eq!(q.size % ALIGN, 0);
        }
        let last = l.partitions.last().unwrap();
        assert_eq!(last.start + last.size, (4u64 << 30) - ALIGN);
        assert_eq!(l.rootfs(Slot::B).fs_cap, 300 << 20);
        assert_eq!(l.esp().type_guid.to_string(), types::ESP);
    }

    #[test]
    fn guids_are_derived_not_random() {
        let a = p(EDGE).unwrap();
        let b = p(EDGE).unwrap();
        assert_eq!(a.disk_guid, b.disk_guid);
        assert_eq!(a.partitions[1].guid, b.partitions[1].guid);
        assert_ne!(a.partitions[1].guid, a.partitions[2].guid);
        let other = p(&EDGE.replace("name: edge", "name: edge2")).unwrap();
        assert_ne!(a.disk_guid, other.disk_guid);
    }

    #[test]
    fn too_small_disk_is_a_located_error() {
        let e = p(&EDGE.replace("size: 4GiB", "size: 2GiB").replace("size: rest", "size: 1GiB")).unwrap_err();
        assert!(e.message.contains("disk too small"), "{e}");
        assert_eq!(e.line, 8, "{e}");
    }

    #[test]
    fn role_errors() {
        let e = p(&EDGE.replace("role: data", "role: esp")).unwrap_err();
        assert!(e.message.contains("exactly one esp"), "{e}");
        assert_eq!(e.line, 9);
        let e = p(&EDGE.replace("slot: b", "slot: a")).unwrap_err();
        assert!(e.message.contains("slot a is given to two"), "{e}");
        let e = p(&EDGE.replace("role: data", "role: external-images")).unwrap_err();
        assert!(e.message.contains("only one external-images"), "{e}");
        let e = p(&EDGE.replace("fs_cap: 300MiB}", "fs_cap: 600MiB}")).unwrap_err();
        assert!(e.message.contains("larger than the partition"), "{e}");
        let e = p(&EDGE.replace("role: espp", "x").replace("role: esp,", "role: boot,")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn overlap_with_fixed_start_is_refused() {
        let e = p(&EDGE.replace("{name: images,   role: external-images,", "{name: images, start: 600MiB, role: external-images,")).unwrap_err();
        assert!(e.message.contains("overlaps rootfs_b"), "{e}");
        assert_eq!(e.line, 8);
    }

    #[test]
    fn unknown_keys_in_layouts_are_errors() {
        let e = p(&EDGE.replace("size: 128MiB}", "size: 128MiB, sise: 1}")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
    }
}
