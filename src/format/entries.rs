//! A slot's boot entry on the ESP, of either kind the Boot Loader Specification defines:
//! Type #1, `loader/entries/slot-<s>[+LEFT[-DONE]].conf` (a text file naming kernel, initrd and
//! options; ordered by `sort-key` + `version` = install number), or Type #2, a Unified Kernel
//! Image `EFI/Linux/slotforge-<install>-<s>[+LEFT[-DONE]].efi` (its command line inside the
//! signed image; ordered by file name, which carries the install number). Naming, counting and
//! parsing are pure; listing works through [`EspView`], so the disk-image reader (fatfs) and the
//! device (a mounted ESP) read entries with the same code.

use crate::format::layout::Slot;
use serde::Serialize;
use std::io::{Read, Seek};
use std::path::PathBuf;

pub const ENTRIES_DIR: &str = "loader/entries";
pub const UKI_DIR: &str = "EFI/Linux";
/// All Type #1 slotforge entries share this sort-key, so systemd-boot orders them by `version`.
pub const SORT_KEY: &str = "slotforge";
/// Largest `.cmdline`/`.osrel` section read from a UKI.
const MAX_UKI_TEXT: u64 = 64 * 1024;

/// One slot's Type #1 entry, to be written.
#[derive(Debug, Clone, Serialize)]
pub struct BootEntry {
    pub slot: Slot,
    pub title: String,
    /// Monotonic install number (not the OS version): the newest install sorts first.
    pub version: u64,
    pub linux: String,
    pub initrd: Option<String>,
    pub options: String,
    /// Boot-counting tries left, when the entry is on probation.
    pub tries: Option<u32>,
}

fn counter(tries: Option<u32>) -> String {
    tries.map(|n| format!("+{n}")).unwrap_or_default()
}

impl BootEntry {
    pub fn file_name(&self) -> String {
        format!("slot-{}{}.conf", self.slot.name(), counter(self.tries))
    }
    pub fn path(&self) -> String {
        format!("{ENTRIES_DIR}/{}", self.file_name())
    }
    pub fn text(&self) -> String {
        let mut s = format!("title {}\nsort-key {SORT_KEY}\nversion {}\nlinux {}\n", self.title, self.version, self.linux);
        if let Some(i) = &self.initrd {
            s += &format!("initrd {i}\n");
        }
        s += &format!("options {}\n", self.options);
        s
    }
}

/// The path of a slot's UKI entry. The install number leads, so systemd-boot's by-name order
/// (newest version first) boots the latest install first, downgrades included.
pub fn uki_path(slot: Slot, install: u64, tries: Option<u32>) -> String {
    format!("{UKI_DIR}/slotforge-{install}-{}{}.efi", slot.name(), counter(tries))
}

/// An entry read back from an ESP.
#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    /// File name, e.g. `slot-b+2-1.conf` or `slotforge-2-b+2-1.efi`.
    pub file: String,
    /// Path on the ESP.
    pub path: String,
    /// `bls` (Type #1) or `uki` (Type #2).
    pub kind: String,
    pub slot: Option<String>,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    pub title: Option<String>,
    /// The install number (Type #1: `version`; Type #2: from the file name).
    pub version: Option<String>,
    pub sort_key: Option<String>,
    pub linux: Option<String>,
    pub initrd: Option<String>,
    /// The kernel command line (Type #2: the UKI's `.cmdline`).
    pub options: Option<String>,
}

impl EntryReport {
    pub fn install_number(&self) -> u64 {
        self.version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    /// The path this entry has once marked good (its counter dropped).
    pub fn good_path(&self) -> String {
        let (base, _, _) = parse_name(&self.file);
        let ext = if self.kind == "uki" { "efi" } else { "conf" };
        format!("{}/{base}.{ext}", if self.kind == "uki" { UKI_DIR } else { ENTRIES_DIR })
    }
}

/// `slot-a+2-1.conf` → (`slot-a`, Some(2), Some(1)); `.efi` names alike.
pub fn parse_name(file: &str) -> (String, Option<u32>, Option<u32>) {
    let stem = file.strip_suffix(".conf").or_else(|| file.strip_suffix(".efi")).unwrap_or(file);
    match stem.rsplit_once('+') {
        Some((base, c)) => {
            let (left, done) = match c.split_once('-') {
                Some((l, d)) => (l.parse().ok(), d.parse().ok()),
                None => (c.parse().ok(), None),
            };
            if left.is_some() {
                (base.to_string(), left, done.or(Some(0)))
            } else {
                (stem.to_string(), None, None)
            }
        }
        None => (stem.to_string(), None, None),
    }
}

/// A Type #1 entry from its file name and text.
pub fn parse_conf(file: &str, text: &str) -> EntryReport {
    let (base, tries_left, tries_done) = parse_name(file);
    let key = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).filter(|r| r.starts_with(' ')).map(|r| r.trim().to_string()));
    EntryReport {
        file: file.to_string(),
        path: format!("{ENTRIES_DIR}/{file}"),
        kind: "bls".into(),
        slot: base.strip_prefix("slot-").map(str::to_string),
        tries_left,
        tries_done,
        title: key("title"),
        version: key("version"),
        sort_key: key("sort-key"),
        linux: key("linux"),
        initrd: key("initrd"),
        options: key("options"),
    }
}

/// A Type #2 entry from its file name and the UKI's `.cmdline` and `.osrel`.
pub fn parse_uki(file: &str, cmdline: Option<&str>, osrel: Option<&str>) -> EntryReport {
    let (base, tries_left, tries_done) = parse_name(file);
    let (install, slot) = match base.strip_prefix("slotforge-").and_then(|r| r.split_once('-')) {
        Some((n, s)) if n.parse::<u64>().is_ok() => (Some(n.to_string()), Some(s.to_string())),
        _ => (None, None),
    };
    let title = osrel.and_then(|o| o.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string()));
    EntryReport {
        file: file.to_string(),
        path: format!("{UKI_DIR}/{file}"),
        kind: "uki".into(),
        slot,
        tries_left,
        tries_done,
        title,
        version: install,
        sort_key: None,
        linux: None,
        initrd: None,
        options: cmdline.map(|c| c.trim_end_matches(['\0', '\n']).to_string()),
    }
}

/// `.cmdline` and `.osrel` of a UKI (each `None` if absent or unreadable).
pub fn uki_texts(r: &mut (impl Read + Seek)) -> (Option<String>, Option<String>) {
    let mut get = |name: &str| crate::format::uki::read_section(r, name, MAX_UKI_TEXT).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
    let c = get(".cmdline");
    let o = get(".osrel");
    (c, o)
}

/// Read access to an ESP, wherever it is.
pub trait EspView {
    /// Names of the regular files in `dir` (relative to the ESP root); empty if absent.
    fn files(&self, dir: &str) -> Vec<String>;
    fn read_text(&self, path: &str) -> Option<String>;
    /// `.cmdline` and `.osrel` of the UKI at `path`.
    fn uki(&self, path: &str) -> (Option<String>, Option<String>);
}

/// Every entry on the ESP, Type #1 first, each sorted by name.
pub fn list(v: &dyn EspView) -> Vec<EntryReport> {
    let mut out = Vec::new();
    let mut confs: Vec<String> = v.files(ENTRIES_DIR).into_iter().filter(|n| n.ends_with(".conf")).collect();
    confs.sort();
    for n in confs {
        let text = v.read_text(&format!("{ENTRIES_DIR}/{n}")).unwrap_or_default();
        out.push(parse_conf(&n, &text));
    }
    let mut ukis: Vec<String> = v.files(UKI_DIR).into_iter().filter(|n| n.to_ascii_lowercase().ends_with(".efi")).collect();
    ukis.sort();
    for n in ukis {
        let (c, o) = v.uki(&format!("{UKI_DIR}/{n}"));
        out.push(parse_uki(&n, c.as_deref(), o.as_deref()));
    }
    out
}

/// The order in which systemd-boot (252) lists entries, hence which one it starts with
/// `timeout 0` and no `default`: the first. Entries whose counter reached `+0` go last; then
/// entries with a `sort-key` before those without; among those, by sort-key, then `version`
/// newest first; then by name newest first (versions and names compared as version strings).
/// Pure: the crash-state checker asks it which slot a disk would boot.
pub fn boot_order(entries: &[EntryReport]) -> Vec<&EntryReport> {
    let mut v: Vec<&EntryReport> = entries.iter().collect();
    v.sort_by(|a, b| {
        let exhausted = |e: &EntryReport| e.tries_left == Some(0);
        exhausted(a)
            .cmp(&exhausted(b))
            .then(a.sort_key.is_none().cmp(&b.sort_key.is_none()))
            .then_with(|| match (&a.sort_key, &b.sort_key) {
                (Some(x), Some(y)) => x.cmp(y).then_with(|| version_cmp(b.version.as_deref().unwrap_or(""), a.version.as_deref().unwrap_or(""))),
                _ => std::cmp::Ordering::Equal,
            })
            .then_with(|| version_cmp(&parse_name(&b.file).0, &parse_name(&a.file).0))
    });
    v
}

/// Compare version strings the way systemd does for entries, in the part that matters here:
/// runs of digits compare as numbers, other runs as text.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for ((da, xa), (db, xb)) in ra.iter().zip(&rb) {
        let o = match (da, db) {
            (true, true) => {
                let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
                ta.len().cmp(&tb.len()).then(ta.cmp(tb))
            }
            _ => xa.cmp(xb),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    ra.len().cmp(&rb.len())
}

/// A mounted ESP (the device).
pub struct DirView(pub PathBuf);

impl EspView for DirView {
    fn files(&self, dir: &str) -> Vec<String> {
        std::fs::read_dir(self.0.join(dir))
            .map(|r| r.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_file())).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
    fn read_text(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.0.join(path)).ok()
    }
    fn uki(&self, path: &str) -> (Option<String>, Option<String>) {
        match std::fs::File::open(self.0.join(path)) {
            Ok(mut f) => uki_texts(&mut f),
            Err(_) => (None, None),
        }
    }
}

/// A FAT file system read with fatfs (a disk image).
pub struct FatView<'a, 'b, T: fatfs::ReadWriteSeek>(pub &'a fatfs::Dir<'b, T>);

impl<T: fatfs::ReadWriteSeek> EspView for FatView<'_, '_, T> {
    fn files(&self, dir: &str) -> Vec<String> {
        match self.0.open_dir(dir) {
            Ok(d) => d.iter().filter_map(|e| e.ok()).filter(|e| e.is_file()).map(|e| e.file_name()).collect(),
            Err(_) => vec![],
        }
    }
    fn read_text(&self, path: &str) -> Option<String> {
        let mut f = self.0.open_file(path).ok()?;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        Some(s)
    }
    fn uki(&self, path: &str) -> (Option<String>, Option<String>) {
        match self.0.open_file(path) {
            Ok(mut f) => uki_texts(&mut f),
            Err(_) => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_counters() {
        assert_eq!(parse_name("slot-b+3.conf"), ("slot-b".into(), Some(3), Some(0)));
        assert_eq!(parse_name("slot-b+2-1.conf"), ("slot-b".into(), Some(2), Some(1)));
        assert_eq!(parse_name("slot-a.conf"), ("slot-a".into(), None, None));
        assert_eq!(uki_path(Slot::B, 12, Some(3)), "EFI/Linux/slotforge-12-b+3.efi");
        let e = parse_uki("slotforge-12-b+2-1.efi", Some("root=x slotforge.slot=b\n"), Some("PRETTY_NAME=\"2.0 (slot b)\"\n"));
        assert_eq!((e.slot.as_deref(), e.install_number(), e.tries_left, e.tries_done), (Some("b"), 12, Some(2), Some(1)));
        assert_eq!(e.options.as_deref(), Some("root=x slotforge.slot=b"));
        assert_eq!(e.title.as_deref(), Some("2.0 (slot b)"));
        assert_eq!(e.good_path(), "EFI/Linux/slotforge-12-b.efi");
        let c = parse_conf("slot-a+1-2.conf", "title t\nversion 4\noptions x\n");
        assert_eq!((c.install_number(), c.good_path()), (4, "loader/entries/slot-a.conf".to_string()));
        assert_eq!(parse_uki("other.efi", None, None).slot, None);
    }

    #[test]
    fn systemd_boot_order_newest_install_first_exhausted_last() {
        let conf = |file: &str, v: u64| parse_conf(file, &format!("title t\nsort-key {SORT_KEY}\nversion {v}\n"));
        let names = |es: &[EntryReport]| boot_order(es).iter().map(|e| e.file.clone()).collect::<Vec<_>>();
        // A fresh install on b (probation) goes before the good a; 10 sorts after 9 as a number.
        assert_eq!(names(&[conf("slot-a.conf", 9), conf("slot-b+3.conf", 10)]), ["slot-b+3.conf", "slot-a.conf"]);
        assert_eq!(names(&[conf("slot-a.conf", 9), conf("slot-b+2-1.conf", 10)])[0], "slot-b+2-1.conf");
        // Tries used up: the older good entry boots.
        assert_eq!(names(&[conf("slot-a.conf", 9), conf("slot-b+0-3.conf", 10)])[0], "slot-a.conf");
        // An entry without sort-key goes after those with one, whatever its version.
        let old = parse_conf("slot-b.conf", "title t\nversion 99\n");
        assert_eq!(names(&[old, conf("slot-a.conf", 1)])[0], "slot-a.conf");
        // UKIs (no sort-key here): by name, the install number compared as a number.
        let u = |f: &str| parse_uki(f, None, None);
        assert_eq!(names(&[u("slotforge-9-a.efi"), u("slotforge-10-b+3.efi")])[0], "slotforge-10-b+3.efi");
        assert_eq!(version_cmp("1.10", "1.9"), std::cmp::Ordering::Greater);
    }
}
