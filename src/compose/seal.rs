//! Sealing an external image: the one recipe the build and the device share (the device
//! rebuilds a missing or corrupt sealed image from the pulled image, bit-identically). The
//! format of the result — what the rootfs pins, the artifact manifest, the checks — is
//! `format::sealed`; this module only runs the recipe.

use crate::base::hash::{digest_reader, Digest};
use crate::format::sealed::{add_mount_points, artifact_manifest, seed, Sealed};
use crate::format::tree::{Spill, Tree};
use crate::oci::ResolvedImage;
use std::path::Path;

/// Seal `img` into `out` (created or truncated): flatten its layers, apply LinuxKit's image
/// fix-ups, add `mkdirs`, write squashfs with every time pinned to 0, append the verity tree
/// made with `salt` (the build: [`crate::format::sealed::salt`] of the service; the device: the
/// pinned one).
/// File contents are spilled to `spill` (on disk), never held in memory. `blocks` (the build
/// cache) may supply compressed blocks an earlier seal made; the bytes are the same without it.
pub fn seal(img: &ResolvedImage, mkdirs: &[String], salt: [u8; 32], out: &Path, spill: &mut Spill, on_layer: &mut dyn FnMut(u64), blocks: Option<&dyn crate::format::squashfs::writer::BlockStore>) -> anyhow::Result<(Sealed, Vec<u8>)> {
    let mut t = Tree::new(0);
    crate::compose::flatten::flatten_image(&mut t, img, spill, 0, &mut 0, on_layer)?;
    crate::linuxkit::bundle::fixups(&mut t, None, 0, 0).map_err(|e| anyhow::anyhow!("{}: {e}", img.reference))?;
    add_mount_points(&mut t, mkdirs, 0, 0)?;
    crate::format::squashfs::writer::write(&t, out, 0, blocks, &mut || {})?;
    let uuid_seed = seed(img.manifest_digest.as_str(), mkdirs);
    let v = crate::format::verity::append_with(out, |len| crate::format::verity::Params::derived(len, &uuid_seed).with_salt(salt))?;
    let (digest, size) = digest_reader(std::fs::File::open(out)?)?;
    let manifest = artifact_manifest((img.manifest_digest.as_str(), img.manifest_bytes.len() as u64, &img.manifest_media_type), (digest.as_str(), size), &v, mkdirs);
    let sealed = Sealed {
        format: crate::format::sealed::FORMAT,
        filesystem: crate::format::sealed::FILESYSTEM.into(),
        digest: digest.to_string(),
        size,
        artifact: Digest::of_bytes(&manifest).to_string(),
        artifact_size: manifest.len() as u64,
        root_hash: v.root_hash,
        salt: v.salt,
        hash_offset: v.hash_offset,
        data_blocks: v.data_blocks,
        data_block_size: v.data_block_size,
        hash_block_size: v.hash_block_size,
        mkdirs: mkdirs.to_vec(),
    };
    Ok((sealed, manifest))
}
