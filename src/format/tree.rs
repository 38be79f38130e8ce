//! The in-memory model of a filesystem tree that layers are flattened into and the rootfs is
//! written from. Only metadata lives in memory; file contents are spilled to a temporary
//! directory (or point at a host file) and streamed again when the squashfs is written.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Ownership, permissions (including setuid/setgid/sticky), mtime and xattrs of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o7777` mask); the node kind carries the file type.
    pub mode: u16,
    pub mtime: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Meta {
    pub fn new(mode: u16, mtime: u64) -> Self {
        Self { uid: 0, gid: 0, mode: mode & 0o7777, mtime, xattrs: BTreeMap::new() }
    }
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone)]
pub enum Content {
    /// A file in the spill directory or on the host, read when the image is written.
    Path(PathBuf),
    /// Small generated content (metadata JSON, `files:` entries).
    Inline(Arc<Vec<u8>>),
    /// `len` bytes at `offset` of a spill pack: small layer entries share one file, since
    /// creating a file per entry is most of what flattening a tree of small files costs.
    Packed { pack: Arc<std::fs::File>, offset: u64, len: u64 },
}

/// A reader over a byte range of a shared file (positioned reads; no shared cursor).
struct RangeReader {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "spill pack shorter than recorded"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Content {
    pub fn open(&self) -> anyhow::Result<Box<dyn Read + Send + Sync>> {
        Ok(match self {
            Content::Path(p) => Box::new(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?),
            Content::Inline(d) => Box::new(std::io::Cursor::new(d.as_ref().clone())),
            Content::Packed { pack, offset, len } => Box::new(RangeReader { file: pack.clone(), pos: *offset, end: offset + len }),
        })
    }

    /// Read `buf.len()` bytes at `offset` of the content.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        match self {
            Content::Path(p) => {
                let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(buf).with_context(|| format!("reading {}", p.display()))?;
            }
            Content::Inline(d) => buf.copy_from_slice(d.get(offset as usize..offset as usize + buf.len()).context("inline content shorter than its size")?),
            Content::Packed { pack, offset: base, len } => {
                anyhow::ensure!(offset + buf.len() as u64 <= *len, "read past a packed spill entry");
                pack.read_exact_at(buf, base + offset).context("reading a spill pack")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir(BTreeMap<Vec<u8>, Node>),
    /// `link` groups hard links: nodes with the same id become one inode.
    File { content: Content, size: u64, link: Option<u64> },
    Symlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Meta,
    pub kind: Kind,
    /// Which layer (counting across the whole build) created it; opaque whiteouts remove only
    /// what lower layers made.
    pub layer: u32,
    /// Index of the contributor (image, `files:`…) it came from, for size reports.
    pub origin: u32,
}

impl Node {
    pub fn dir(meta: Meta, layer: u32, origin: u32) -> Self {
        Node { meta, kind: Kind::Dir(BTreeMap::new()), layer, origin }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
    pub fn children(&self) -> Option<&BTreeMap<Vec<u8>, Node>> {
        match &self.kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }
}

/// Split a path into its components; refuses `..`, and (unless `allow_abs`) a leading `/`.
/// `.` and empty components are dropped, so `./a//b/` is `[a, b]`.
pub fn components(path: &[u8], allow_abs: bool) -> Result<Vec<Vec<u8>>, String> {
    if path.first() == Some(&b'/') && !allow_abs {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` component".into()),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

pub fn display(comps: &[Vec<u8>]) -> String {
    let parts: Vec<String> = comps.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    format!("/{}", parts.join("/"))
}

/// A whole tree: the root directory and a store for spilled file contents.
pub struct Tree {
    pub root: Node,
    next_link: u64,
}

impl Tree {
    pub fn new(mtime: u64) -> Self {
        Tree { root: Node::dir(Meta::new(0o755, mtime), 0, 0), next_link: 1 }
    }

    pub fn new_link_id(&mut self) -> u64 {
        self.next_link += 1;
        self.next_link
    }

    /// The directory at `comps`, creating missing ones with `0755 root` and `parent_meta`'s mtime.
    /// Fails when a component exists and is not a directory: symlinks are never followed.
    pub fn dir_mut(&mut self, comps: &[Vec<u8>], mtime: u64, layer: u32, origin: u32) -> Result<&mut BTreeMap<Vec<u8>, Node>, String> {
        let mut cur = &mut self.root;
        for (i, c) in comps.iter().enumerate() {
            let Kind::Dir(children) = &mut cur.kind else { unreachable!() };
            let next = children.entry(c.clone()).or_insert_with(|| Node::dir(Meta::new(0o755, mtime), layer, origin));
            match next.kind {
                Kind::Dir(_) => {}
                Kind::Symlink(_) => return Err(format!("{} is a symlink; refusing to write through it", display(&comps[..=i]))),
                _ => return Err(format!("{} is not a directory", display(&comps[..=i]))),
            }
            cur = next;
        }
        let Kind::Dir(children) = &mut cur.kind else { unreachable!() };
        Ok(children)
    }

    pub fn get(&self, comps: &[Vec<u8>]) -> Option<&Node> {
        let mut cur = &self.root;
        for c in comps {
            cur = cur.children()?.get(c)?;
        }
        Some(cur)
    }

    pub fn get_mut(&mut self, comps: &[Vec<u8>]) -> Option<&mut Node> {
        let mut cur = &mut self.root;
        for c in comps {
            cur = match &mut cur.kind {
                Kind::Dir(ch) => ch.get_mut(c)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Put `node` at `comps`. A directory replacing a directory keeps the children (tar
    /// semantics: a later layer's dir entry only changes metadata); anything else replaces.
    pub fn insert(&mut self, comps: &[Vec<u8>], mut node: Node) -> Result<(), String> {
        let Some((name, parent)) = comps.split_last() else {
            // The root itself: take metadata only.
            self.root.meta = node.meta;
            return Ok(());
        };
        let (layer, origin, mtime) = (node.layer, node.origin, node.meta.mtime);
        let dir = self.dir_mut(parent, mtime, layer, origin)?;
        if let Some(existing) = dir.get_mut(name) {
            if let (Kind::Dir(old), Kind::Dir(_)) = (&mut existing.kind, &node.kind) {
                node.kind = Kind::Dir(std::mem::take(old));
            }
        }
        dir.insert(name.clone(), node);
        Ok(())
    }

    pub fn remove(&mut self, comps: &[Vec<u8>]) -> Option<Node> {
        let (name, parent) = comps.split_last()?;
        match &mut self.get_mut(parent)?.kind {
            Kind::Dir(ch) => ch.remove(name),
            _ => None,
        }
    }

    /// Graft a whole subtree (another image's flattened tree) at `comps`.
    pub fn graft(&mut self, comps: &[Vec<u8>], mut sub: Tree, origin: u32) -> Result<(), String> {
        fn retag(n: &mut Node, origin: u32) {
            n.origin = origin;
            if let Kind::Dir(ch) = &mut n.kind {
                ch.values_mut().for_each(|c| retag(c, origin));
            }
        }
        retag(&mut sub.root, origin);
        // Keep hard-link ids unique across trees.
        let offset = self.next_link;
        fn relink(n: &mut Node, offset: u64, max: &mut u64) {
            match &mut n.kind {
                Kind::File { link: Some(l), .. } => {
                    *l += offset;
                    *max = (*max).max(*l);
                }
                Kind::Dir(ch) => ch.values_mut().for_each(|c| relink(c, offset, max)),
                _ => {}
            }
        }
        let mut max = self.next_link;
        relink(&mut sub.root, offset, &mut max);
        self.next_link = max + 1;
        self.insert(comps, sub.root)
    }

    /// Visit every node depth-first with its path.
    pub fn walk(&self, f: &mut dyn FnMut(&[Vec<u8>], &Node)) {
        fn go(path: &mut Vec<Vec<u8>>, n: &Node, f: &mut dyn FnMut(&[Vec<u8>], &Node)) {
            f(path, n);
            if let Kind::Dir(ch) = &n.kind {
                for (name, c) in ch {
                    path.push(name.clone());
                    go(path, c, f);
                    path.pop();
                }
            }
        }
        go(&mut Vec::new(), &self.root, f);
    }

    /// Number of nodes, for progress.
    pub fn count(&self) -> u64 {
        let mut n = 0;
        self.walk(&mut |_, _| n += 1);
        n
    }

    /// Bytes of file content per origin, hard links counted once.
    pub fn bytes_by_origin(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        self.walk(&mut |_, n| {
            if let Kind::File { size, link, .. } = &n.kind {
                if link.is_none_or(|l| seen.insert(l)) {
                    *out.entry(n.origin).or_insert(0) += size;
                }
            }
        });
        out
    }
}

/// Spilled file contents: one file per regular file of the flattened layers. The bytes spilled
/// are counted while they are written against a budget, so a compression bomb or a GNU sparse
/// entry claiming a terabyte stops at the budget instead of filling the disk.
pub struct Spill {
    dir: tempfile::TempDir,
    next: u64,
    used: u64,
    budget: u64,
    /// The pack small entries are appended to, and its length.
    pack: Option<(Arc<std::fs::File>, u64)>,
}

/// Entries up to this size go into the spill pack; larger ones get a file of their own (which
/// the agent can then rename into place).
const PACK_MAX: usize = 256 << 10;

/// Overrides the unpack budget (bytes).
pub const BUDGET_ENV: &str = "SLOTFORGE_UNPACK_BUDGET";
/// Free space left untouched on the spill file system: 512 MiB, or an eighth of what is free
/// when that is less (a device's tmpfs may hold only a few hundred MiB in all).
const RESERVE: u64 = 512 << 20;

/// What may be written under `dir`: its file system's free space less a reserve.
pub fn disk_budget(dir: &Path) -> u64 {
    let free = free_bytes(dir);
    free.saturating_sub(RESERVE.min(free / 8))
}

/// Free bytes on the file system holding `p` (statvfs).
fn free_bytes(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return u64::MAX };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed statvfs we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return u64::MAX;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
}

impl Spill {
    pub fn new() -> anyhow::Result<Self> {
        Self::with(tempfile::Builder::new().prefix("slotforge-spill-").tempdir()?, u64::MAX)
    }
    /// A spill directory under `parent` (same file system as where the files will end up).
    pub fn new_in(parent: &Path) -> anyhow::Result<Self> {
        Self::with(tempfile::Builder::new().prefix("spill-").tempdir_in(parent)?, u64::MAX)
    }
    /// A spill directory whose contents may not exceed `limit` bytes (besides the free space).
    pub fn with_limit(limit: u64) -> anyhow::Result<Self> {
        Self::with(tempfile::Builder::new().prefix("slotforge-spill-").tempdir()?, limit)
    }
    /// The budget: `$SLOTFORGE_UNPACK_BUDGET` if set, else `limit`, and never more than the
    /// spill file system's free space less a reserve.
    fn with(dir: tempfile::TempDir, limit: u64) -> anyhow::Result<Self> {
        let env = match std::env::var(BUDGET_ENV) {
            Ok(v) => Some(v.trim().parse::<u64>().map_err(|_| anyhow::anyhow!("{BUDGET_ENV}={v:?} is not a number of bytes"))?),
            Err(_) => None,
        };
        let budget = env.unwrap_or(limit).min(disk_budget(dir.path()));
        Ok(Self { dir, next: 0, used: 0, budget, pack: None })
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Copy `r` into a new spill file, counting against the budget as it goes.
    pub fn store(&mut self, r: &mut dyn Read) -> std::io::Result<(Content, u64)> {
        // Small entries: read up to PACK_MAX + 1 bytes; if that is all, append to the pack.
        let mut head = Vec::new();
        let left = self.budget.saturating_sub(self.used);
        r.take((PACK_MAX as u64 + 1).min(left.saturating_add(1))).read_to_end(&mut head)?;
        if head.len() <= PACK_MAX && (head.len() as u64) <= left {
            use std::os::unix::fs::FileExt;
            if self.pack.is_none() {
                let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(self.dir.path().join("pack"))?;
                self.pack = Some((Arc::new(f), 0));
            }
            let (pack, end) = self.pack.as_mut().expect("pack opened above");
            pack.write_all_at(&head, *end)?;
            let c = Content::Packed { pack: pack.clone(), offset: *end, len: head.len() as u64 };
            *end += head.len() as u64;
            self.used += head.len() as u64;
            return Ok((c, head.len() as u64));
        }
        let mut r = std::io::Cursor::new(head).chain(r);
        let r: &mut dyn Read = &mut r;
        self.next += 1;
        let p = self.dir.path().join(self.next.to_string());
        let mut f = std::fs::File::create(&p)?;
        let left = self.budget.saturating_sub(self.used);
        let n = std::io::copy(&mut r.take(left.saturating_add(1)), &mut f)?;
        if n > left {
            drop(f);
            let _ = std::fs::remove_file(&p);
            return Err(std::io::Error::other(format!(
                "unpacking would take more than the {}-byte budget (free space on {} less a reserve, or ${BUDGET_ENV}); a compression bomb or a huge sparse entry?",
                self.budget,
                self.dir.path().display()
            )));
        }
        self.used += n;
        Ok((Content::Path(p), n))
    }
}

/// Write `t` out as a real directory tree at `dest` (the agent: an external image made ready for
/// the runtime). Spilled contents are moved into place when on the same file system.
/// Ownership and device nodes need root; without it they are skipped, not faked.
pub fn materialize(t: &Tree, dest: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let mut links: std::collections::HashMap<u64, PathBuf> = std::collections::HashMap::new();
    let mut dirs = Vec::new();
    let mut err = None;
    t.walk(&mut |comps, n| {
        if err.is_some() {
            return;
        }
        let p = comps.iter().fold(dest.to_path_buf(), |p, c| p.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(c)));
        let r: anyhow::Result<()> = (|| {
            match &n.kind {
                Kind::Dir(_) => {
                    std::fs::create_dir_all(&p)?;
                    dirs.push((p.clone(), n.meta.clone()));
                    return Ok(());
                }
                Kind::File { content, link, .. } => {
                    if let Some(first) = link.and_then(|l| links.get(&l)) {
                        std::fs::hard_link(first, &p)?;
                        return Ok(());
                    }
                    match content {
                        Content::Path(src) if std::fs::rename(src, &p).is_ok() => {}
                        _ => {
                            let mut r = content.open()?;
                            std::io::copy(&mut r, &mut std::fs::File::create(&p)?)?;
                        }
                    }
                    if let Some(l) = link {
                        links.insert(*l, p.clone());
                    }
                }
                Kind::Symlink(target) => {
                    symlink(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(target), &p)?;
                    return Ok(());
                }
                Kind::CharDev(..) | Kind::BlockDev(..) | Kind::Fifo => {
                    let (kind, dev) = match n.kind {
                        Kind::CharDev(ma, mi) => (libc::S_IFCHR, libc::makedev(ma, mi)),
                        Kind::BlockDev(ma, mi) => (libc::S_IFBLK, libc::makedev(ma, mi)),
                        _ => (libc::S_IFIFO, 0),
                    };
                    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
                    // SAFETY: a valid NUL-terminated path; failure (not root) is tolerated.
                    unsafe { libc::mknod(c.as_ptr(), kind | n.meta.mode as libc::mode_t, dev) };
                    return Ok(());
                }
            }
            let _ = std::os::unix::fs::chown(&p, Some(n.meta.uid), Some(n.meta.gid));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(n.meta.mode as u32))?;
            Ok(())
        })();
        if let Err(e) = r {
            err = Some(anyhow::anyhow!("{}: {e:#}", p.display()));
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    // Directory modes last, deepest first, so a read-only directory does not block its children.
    for (p, m) in dirs.iter().rev() {
        let _ = std::os::unix::fs::chown(p, Some(m.uid), Some(m.gid));
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m.mode as u32))?;
    }
    Ok(())
}

/// Fail with a clear message if a node kind cannot be represented.
/// Limits of what a tree may hold, checked as entries arrive (never truncated): the kernel's and
/// squashfs's own limits, so every tree we accept is one the kernel and unsquashfs can read.
pub mod limits {
    /// Path components below the root. Linux's PATH_MAX is 4096 bytes, so no real path has
    /// more than 2048 components; 1024 keeps every recursive walk of the tree far from the
    /// stack's end (100,000 nested directories overflowed it).
    pub const MAX_DEPTH: usize = 1024;
    /// A symlink target: PATH_MAX - 1 (the kernel refuses longer ones; unsquashfs cannot
    /// read a squashfs holding a 64 KiB target).
    pub const MAX_SYMLINK: usize = 4095;
    /// One extended attribute's value: XATTR_SIZE_MAX.
    pub const MAX_XATTR_VALUE: usize = 65_536;
    /// One extended attribute's name: XATTR_NAME_MAX.
    pub const MAX_XATTR_NAME: usize = 255;
    /// All extended attributes of one file: XATTR_LIST_MAX.
    pub const MAX_XATTR_TOTAL: usize = 65_536;
}

/// Check a path's depth against [`limits::MAX_DEPTH`].
pub fn check_depth(comps: &[Vec<u8>]) -> anyhow::Result<()> {
    if comps.len() > limits::MAX_DEPTH {
        bail!("path is {} directories deep, more than the {} slotforge accepts", comps.len(), limits::MAX_DEPTH);
    }
    Ok(())
}

pub fn check_name(name: &[u8]) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains(&0) {
        bail!("file name {:?} cannot be stored (empty, over 255 bytes or with a NUL)", String::from_utf8_lossy(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Vec<Vec<u8>> {
        components(p.as_bytes(), false).unwrap()
    }

    #[test]
    fn small_entries_share_a_pack_large_ones_get_a_file_and_the_budget_holds() {
        let mut sp = Spill::with_limit(PACK_MAX as u64 * 3).unwrap();
        let small: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let big: Vec<u8> = (0..PACK_MAX as u32 + 1).map(|i| (i % 253) as u8).collect();
        let (a, na) = sp.store(&mut &small[..]).unwrap();
        let (b, nb) = sp.store(&mut &b"second"[..]).unwrap();
        let (c, nc) = sp.store(&mut &big[..]).unwrap();
        assert_eq!((na, nb, nc), (5000, 6, PACK_MAX as u64 + 1));
        assert!(matches!(a, Content::Packed { offset: 0, .. }) && matches!(b, Content::Packed { offset: 5000, len: 6, .. }), "{a:?} {b:?}");
        assert!(matches!(c, Content::Path(_)), "{c:?}");
        let read = |c: &Content| { let mut v = Vec::new(); c.open().unwrap().read_to_end(&mut v).unwrap(); v };
        assert_eq!((read(&a), read(&b), read(&c)), (small.clone(), b"second".to_vec(), big.clone()));
        let mut part = [0u8; 3];
        b.read_at(2, &mut part).unwrap();
        assert_eq!(&part, b"con");
        assert!(b.read_at(4, &mut part).is_err(), "a read past the entry reaches the next one");
        // The budget counts packed bytes too: 5006 + 2 big entries used, a third does not fit.
        sp.store(&mut &big[..]).unwrap();
        sp.store(&mut &big[..]).unwrap_err();
        let e = sp.store(&mut &small[..]);
        assert!(e.is_ok(), "what fits still fits");
    }

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(c("./a//b/"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(components(b"a/../../etc", false).is_err());
        assert!(components(b"/etc/passwd", false).is_err());
        assert_eq!(components(b"/etc", true).unwrap(), vec![b"etc".to_vec()]);
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let mut t = Tree::new(0);
        let link = Node { meta: Meta::new(0o777, 0), kind: Kind::Symlink(b"/etc".to_vec()), layer: 0, origin: 0 };
        t.insert(&c("x"), link).unwrap();
        let f = Node { meta: Meta::new(0o644, 0), kind: Kind::Fifo, layer: 0, origin: 0 };
        let e = t.insert(&c("x/passwd"), f).unwrap_err();
        assert!(e.contains("/x is a symlink"), "{e}");
    }

    #[test]
    fn dir_over_dir_keeps_children() {
        let mut t = Tree::new(0);
        t.insert(&c("d/f"), Node { meta: Meta::new(0o644, 0), kind: Kind::Fifo, layer: 0, origin: 0 }).unwrap();
        t.insert(&c("d"), Node::dir(Meta::new(0o700, 5), 1, 0)).unwrap();
        assert!(t.get(&c("d/f")).is_some());
        assert_eq!(t.get(&c("d")).unwrap().meta.mode, 0o700);
    }
}
