//! The disk of a build, after compose: the external-images partition (its OCI layout staged,
//! then ext4), the ESP (loader, loader.conf, the layout record, slot A's entry with its kernel
//! and initrd, or its UKI), then the GPT disk written sparse next to the output and renamed when
//! complete; bmap and qcow2 copies beside it.

use super::*;

/// The images partition's ext4 file (in the work directory), if the layout has one.
pub(super) fn images_partition(c: &Composed, no_prefill: &[String], progress: Progress) -> anyhow::Result<Option<PathBuf>> {
    let Some(p) = c.layout.by_role(Role::ExternalImages) else { return Ok(None) };
    let parts = &c.parts;
    for name in no_prefill {
        if !parts.external.iter().any(|(e, _)| &e.name == name) {
            bail!("--no-prefill {name}: the manifest has no external image of that name");
        }
    }
    let mut stage = Stage::new()?;
    let ext_bytes: u64 = parts.external.iter().map(|(e, _)| e.size).sum();
    let pb = progress.bar("images", ext_bytes, true);
    let mut pairs = Vec::new();
    for (e, idx) in parts.external.iter().filter(|(e, _)| !no_prefill.contains(&e.name)) {
        let img = &c.resolved.containers[*idx].2;
        stage.add_external(e, img, parts.sealed.get(&e.name), &mut |n| pb.inc(n))?;
        pairs.push((e.clone(), img));
    }
    pb.finish_and_clear();
    stage.add_build(&c.build_id, c.version(), &pairs)?;
    stage.finish(c.epoch)?;
    let f = c.work.path().join("images.ext4");
    let layout = &c.layout;
    images::make_ext4(&stage, &f, p.size, &layout::derived_guid(&[&layout.name, "images-fs"]), "slotforge-images", c.epoch)?;
    Ok(Some(f))
}

/// The ESP's FAT file (in the work directory): slot A installed, with a boot counter when
/// `boot_tries` is given; `extra` appended to its command line.
pub(super) fn esp(c: &Composed, boot_tries: Option<u32>, extra: &str) -> anyhow::Result<PathBuf> {
    let (layout, work) = (&c.layout, &c.work);
    let esp_file = work.path().join("esp.fat");
    let slot = Slot::A;
    let mut files = vec![
        EspFile { path: esp::LOADER_PATH.into(), data: c.loader_for_esp()?.open()? },
        EspFile { path: esp::LOADER_CONF.into(), data: Box::new(esp::LOADER_CONF_TEXT.as_bytes()) },
        EspFile { path: layout::RECORD_PATH.into(), data: Box::new(std::io::Cursor::new(crate::base::text::to_json(&layout))) },
    ];
    if c.uki() {
        // Type #2: one signed image holds kernel, initrd and the command line with its root hash.
        let uki = work.path().join("slot-a.efi");
        c.slot_uki(layout, slot, extra, &uki)?;
        files.push(EspFile { path: crate::format::entries::uki_path(slot, 1, boot_tries), data: Box::new(std::fs::File::open(&uki)?) });
    } else {
        let entry = BootEntry {
            slot,
            title: format!("{} (slot {})", c.version(), slot.name()),
            version: 1,
            linux: format!("/{}/vmlinuz", slot.name()),
            initrd: c.parts.kernel.initrd.as_ref().map(|_| format!("/{}/initrd.img", slot.name())),
            options: c.slot_options(layout, slot, extra)?,
            tries: boot_tries,
        };
        files.push(EspFile { path: entry.path(), data: Box::new(std::io::Cursor::new(entry.text().into_bytes())) });
        files.push(EspFile { path: entry.linux.clone(), data: c.parts.kernel.kernel.0.open()? });
        if let (Some(p), Some((content, _))) = (&entry.initrd, &c.parts.kernel.initrd) {
            files.push(EspFile { path: p.clone(), data: content.open()? });
        }
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&esp_file)?;
    f.set_len(layout.esp().size)?;
    esp::write(f, esp_volume_id(layout), c.epoch, files)?;
    Ok(esp_file)
}

pub(super) struct Written {
    pub bytes_written: u64,
    pub images_partition_bytes: u64,
}

/// The disk: GPT, the ESP, slot A's rootfs and the images partition, into a temporary file
/// beside `output`, renamed over it only when complete.
pub(super) fn write(c: &Composed, output: &Path, esp_file: &Path, images_file: Option<&Path>, progress: Progress) -> anyhow::Result<Written> {
    let layout = &c.layout;
    let mut disk = crate::format::disk::DiskWriter::create(output, layout)?;
    let pb = progress.bar("disk", 3, false);
    disk.put(&mut std::fs::File::open(esp_file)?, layout.esp().start)?;
    pb.inc(1);
    disk.put(&mut std::fs::File::open(&c.rootfs_image)?, layout.rootfs(Slot::A).start)?;
    pb.inc(1);
    let mut images_partition_bytes = 0;
    if let (Some(f), Some(p)) = (images_file, layout.by_role(Role::ExternalImages)) {
        images_partition_bytes = disk.put(&mut std::fs::File::open(f)?, p.start)?;
    }
    pb.inc(1);
    let bytes_written = disk.bytes_written;
    disk.finish(layout)?;
    pb.finish_and_clear();
    Ok(Written { bytes_written, images_partition_bytes })
}

/// `OUTPUT.bmap` (bmaptool) and a qcow2 copy, when asked.
#[allow(clippy::type_complexity)]
pub(super) fn media(output: &Path, bmap: bool, qcow2: bool) -> anyhow::Result<(Option<(PathBuf, crate::format::bmap::BmapSummary)>, Option<PathBuf>)> {
    let mut b = None;
    if bmap {
        let p = PathBuf::from(format!("{}.bmap", output.display()));
        b = Some((p.clone(), crate::format::bmap::write_bmap(output, &p)?));
    }
    let mut q = None;
    if qcow2 {
        let p = output.with_extension("qcow2");
        crate::format::bmap::write_qcow2(output, &p)?;
        q = Some(p);
    }
    Ok((b, q))
}
