//! Flattening an image's layers, in order, into a [`Tree`]: OCI whiteouts (`.wh.NAME`,
//! `.wh..wh..opq`) applied, ownership, modes, mtimes, symlinks (stored, never followed), hard
//! links, devices, fifos and PAX `SCHILY.xattr.*` kept. An entry that would land outside the
//! tree is refused with the image, layer and path in the error.

use crate::oci::{open_verified, LayerCompression, ResolvedImage};
use crate::format::tree::{self, components, Kind, Meta, Node, Spill, Tree};
use anyhow::{anyhow, bail, Context};
use std::collections::BTreeMap;
use std::io::Read;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const PAX_XATTR: &str = "SCHILY.xattr.";

/// Where an entry came from, for error messages and opaque-whiteout bookkeeping.
pub struct LayerCtx<'a> {
    pub image: &'a str,
    pub layer: &'a str,
    /// Global layer counter: opaque whiteouts remove nodes with a smaller one.
    pub layer_no: u32,
    pub origin: u32,
}

/// Flatten all layers of `img`, in order, onto `t`. `layer_no` numbers layers across the tree,
/// so an opaque whiteout also hides what earlier images put there.
pub fn flatten_image(t: &mut Tree, img: &ResolvedImage, spill: &mut Spill, origin: u32, layer_no: &mut u32, on_layer: &mut dyn FnMut(u64)) -> anyhow::Result<()> {
    for l in &img.layers {
        *layer_no += 1;
        let what = format!("layer {}", l.digest);
        let mut raw = open_verified(&*img.source, &l.digest, l.size, &what)?;
        {
            let decoded: Box<dyn Read + '_> = match l.compression {
                LayerCompression::None => Box::new(&mut raw),
                LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut raw)),
                LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(&mut raw).with_context(|| format!("{}: {what}: zstd", img.reference))?),
            };
            let ctx = LayerCtx { image: &img.reference, layer: l.digest.as_str(), layer_no: *layer_no, origin };
            apply_layer(t, decoded, &ctx, spill)?;
        }
        raw.finish().map_err(|e| anyhow!("{e}"))?;
        on_layer(l.size);
    }
    Ok(())
}

/// Apply one uncompressed tar layer to `t`.
pub fn apply_layer(t: &mut Tree, r: impl Read, ctx: &LayerCtx, spill: &mut Spill) -> anyhow::Result<()> {
    let fail = |path: &[u8], msg: &str| anyhow!("{}: {}: entry {:?}: {msg}", ctx.image, ctx.layer, String::from_utf8_lossy(path));
    let mut ar = tar::Archive::new(r);
    let entries = ar.entries().map_err(|e| anyhow!("{}: {}: not a tar layer: {e}", ctx.image, ctx.layer))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| anyhow!("{}: {}: reading layer: {e}", ctx.image, ctx.layer))?;
        let raw_path = entry.path_bytes().into_owned();
        let comps = components(&raw_path, false).map_err(|e| fail(&raw_path, &format!("{e} would land outside the tree; refusing the layer")))?;
        for c in &comps {
            tree::check_name(c).map_err(|e| fail(&raw_path, &e.to_string()))?;
        }
        tree::check_depth(&comps).map_err(|e| fail(&raw_path, &e.to_string()))?;
        // Whiteouts.
        if let Some((name, parent)) = comps.split_last() {
            if name.as_slice() == OPAQUE {
                if t.get(parent).is_some_and(|n| !n.is_dir()) {
                    return Err(fail(&raw_path, "opaque whiteout under a non-directory"));
                }
                if let Some(dir) = t.get_mut(parent) {
                    if let Kind::Dir(ch) = &mut dir.kind {
                        ch.retain(|_, n| n.layer >= ctx.layer_no);
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let mut target = parent.to_vec();
                target.push(hidden.to_vec());
                if t.get(parent).is_some_and(|n| !n.is_dir()) {
                    return Err(fail(&raw_path, "whiteout under a non-directory"));
                }
                t.remove(&target);
                continue;
            }
        }
        let header = entry.header().clone();
        // Permission bits only: the type comes from the entry type. Owners must fit squashfs's
        // 32-bit ids — never truncated, or uid 2^32 would become root.
        let mode = header.mode().map_err(|e| fail(&raw_path, &e.to_string()))?;
        let mut meta = Meta::new((mode & 0o7777) as u16, header.mtime().unwrap_or(0));
        let pax = pax_records(&mut entry).map_err(|e| fail(&raw_path, &e.to_string()))?;
        let id = |what: &str, ustar: u64| -> anyhow::Result<u32> {
            let v = match pax.ids.get(what) {
                Some(v) => v.parse::<u64>().map_err(|_| fail(&raw_path, &format!("PAX {what} {v:?} is not a number")))?,
                None => ustar,
            };
            u32::try_from(v).map_err(|_| fail(&raw_path, &format!("{what} {v} does not fit a 32-bit id; refusing the layer")))
        };
        meta.uid = id("uid", header.uid().map_err(|e| fail(&raw_path, &e.to_string()))?)?;
        meta.gid = id("gid", header.gid().map_err(|e| fail(&raw_path, &e.to_string()))?)?;
        let total: usize = pax.xattrs.iter().map(|(k, v)| k.len() + 1 + v.len()).sum();
        if let Some((k, v)) = pax.xattrs.iter().find(|(k, v)| k.len() > tree::limits::MAX_XATTR_NAME || v.len() > tree::limits::MAX_XATTR_VALUE) {
            return Err(fail(&raw_path, &format!("extended attribute {k} ({} bytes) is over the kernel's limits ({} bytes of name, {} of value)", v.len(), tree::limits::MAX_XATTR_NAME, tree::limits::MAX_XATTR_VALUE)));
        }
        if total > tree::limits::MAX_XATTR_TOTAL {
            return Err(fail(&raw_path, &format!("extended attributes of {total} bytes in all, over the kernel's {}", tree::limits::MAX_XATTR_TOTAL)));
        }
        meta.xattrs = pax.xattrs;
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let (content, size) = spill.store(&mut entry).map_err(|e| fail(&raw_path, &format!("reading content: {e}")))?;
                Kind::File { content, size, link: None }
            }
            tar::EntryType::Directory => Kind::Dir(BTreeMap::new()),
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| fail(&raw_path, "symlink without a target"))?;
                if target.len() > tree::limits::MAX_SYMLINK || target.is_empty() {
                    return Err(fail(&raw_path, &format!("symlink target of {} bytes (1 to {} allowed)", target.len(), tree::limits::MAX_SYMLINK)));
                }
                Kind::Symlink(target.into_owned())
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                if header.entry_type() == tar::EntryType::Char {
                    Kind::CharDev(major, minor)
                } else {
                    Kind::BlockDev(major, minor)
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| fail(&raw_path, "hard link without a target"))?;
                let tcomps = components(&target, true).map_err(|e| fail(&raw_path, &format!("hard link target {e} would land outside the tree; refusing the layer")))?;
                let link_id = match t.get(&tcomps).map(|n| &n.kind) {
                    Some(Kind::File { link: Some(l), .. }) => *l,
                    Some(Kind::File { link: None, .. }) => t.new_link_id(),
                    Some(_) => return Err(fail(&raw_path, "hard link to something that is not a regular file")),
                    None => return Err(fail(&raw_path, &format!("hard link to {} which the layer has not created", String::from_utf8_lossy(&target)))),
                };
                let node = t.get_mut(&tcomps).expect("checked above");
                let Kind::File { link, .. } = &mut node.kind else { unreachable!() };
                *link = Some(link_id);
                // A hard link shares the inode: same content and metadata.
                let mut linked = node.clone();
                linked.layer = ctx.layer_no;
                t.insert(&comps, linked).map_err(|e| fail(&raw_path, &e))?;
                continue;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink => continue,
            other => bail!("{}: {}: entry {:?}: unsupported tar entry type {other:?}", ctx.image, ctx.layer, String::from_utf8_lossy(&raw_path)),
        };
        t.insert(&comps, Node { meta, kind, layer: ctx.layer_no, origin: ctx.origin }).map_err(|e| fail(&raw_path, &e))?;
    }
    Ok(())
}

/// The PAX records we use: `SCHILY.xattr.*` and the `uid`/`gid` overrides.
#[derive(Default)]
struct Pax {
    xattrs: BTreeMap<String, Vec<u8>>,
    ids: BTreeMap<&'static str, String>,
}

fn pax_records<R: Read>(entry: &mut tar::Entry<R>) -> std::io::Result<Pax> {
    let mut out = Pax::default();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix(PAX_XATTR) {
                    out.xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
                } else if key == "uid" || key == "gid" {
                    out.ids.insert(if key == "uid" { "uid" } else { "gid" }, String::from_utf8_lossy(ext.value_bytes()).into_owned());
                }
            }
        }
    }
    Ok(out)
}
