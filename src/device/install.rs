//! Installing from the offline USB installer, on the device: the payload's layout fitted to the
//! target disk (`rest` grows; too small or a partition that would move → refused, nothing
//! written), the extents copied, a fresh GPT, the fitted layout recorded on the target's ESP,
//! everything read back. The payload format is `format::installer`.

use crate::base::hash::{digest_reader, Digest};
use crate::format::installer::PayloadHeader;
use crate::format::layout::Layout;
use anyhow::{bail, Context};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use crate::device::{emit, AgentConfig};
use crate::format::agent::Event;

/// Fit the payload's layout to a target of `size` bytes; the partitions written must not move.
pub fn fit(header: &PayloadHeader, size: u64) -> anyhow::Result<Layout> {
    let orig = crate::format::layout::parse(Path::new("payload layout"), &header.layout_yaml)?;
    let fitted = crate::format::layout::parse_for_disk(Path::new("payload layout"), &header.layout_yaml, size)
        .map_err(|e| anyhow::anyhow!("the target disk ({size} bytes) is too small for layout {}: {}", header.layout_name, e.message))?;
    for (a, b) in orig.partitions.iter().zip(&fitted.partitions).take(orig.partitions.len() - 1) {
        if a.start != b.start || a.size != b.size {
            bail!("layout {} cannot be fitted without moving partition {}", header.layout_name, a.name);
        }
    }
    Ok(fitted)
}

/// Copy the extents from the payload to `target`, GPT for `layout`, read back and verify.
pub fn write_payload(payload: &mut File, data_start: u64, header: &PayloadHeader, target: &Path, layout: &Layout, progress: &dyn Fn(u64, u64)) -> anyhow::Result<u64> {
    let total: u64 = header.extents.iter().map(|e| e.len).sum();
    let mut t = std::fs::OpenOptions::new().read(true).write(true).open(target).with_context(|| format!("opening {}", target.display()))?;
    let mut pos = data_start;
    let mut done = 0;
    for e in &header.extents {
        payload.seek(SeekFrom::Start(pos))?;
        t.seek(SeekFrom::Start(e.offset))?;
        std::io::copy(&mut (&mut *payload).take(e.len), &mut t)?;
        pos += e.len;
        done += e.len;
        progress(done, total);
    }
    crate::format::disk::write_gpt(&mut t, layout)?;
    t.sync_all()?;
    // The fitted layout goes on the target's ESP, so inspect/verify/agent see the real disk.
    {
        use crate::device::upgrade::Target;
        let mut ft = crate::device::upgrade::file::FileTarget::open_as(target, Some(layout.clone()))?;
        ft.esp_write(crate::format::layout::RECORD_PATH, &mut std::io::Cursor::new(crate::base::text::to_json(layout)))?;
        ft.finish()?;
    }
    // Read back every extent written into a partition the fix-up did not touch.
    let esp = layout.esp();
    let mut t = File::open(target)?;
    for e in &header.extents {
        if e.offset >= esp.start && e.offset < esp.start + esp.size {
            continue; // the ESP was changed on purpose (layout record); fsck-level check is verify's
        }
        t.seek(SeekFrom::Start(e.offset))?;
        let (d, _) = digest_reader((&mut t).take(e.len))?;
        if d != Digest::parse(&format!("sha256:{}", e.sha256)).map_err(|x| anyhow::anyhow!(x))? {
            bail!("read-back of {} at {} does not match: the target disk is faulty", target.display(), e.offset);
        }
    }
    Ok(total)
}

/// `agent install`, booted from an installer: the payload partition's disk is this one; the
/// target is the first other disk. Too small → `install-refused`, nothing written.
pub fn install_to_other_disk(cfg: &AgentConfig) -> anyhow::Result<()> {
    let payload = crate::device::upgrade::device::partition_device(cfg, crate::format::installer::PAYLOAD_LABEL)?;
    let part = payload.file_name().unwrap().to_string_lossy().into_owned();
    let own = std::fs::canonicalize(format!("/sys/class/block/{part}"))?.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ["vd", "sd", "nvme", "mmcblk", "hd"].iter().any(|p| n.starts_with(p)) && *n != own)
        .collect();
    disks.sort();
    let Some(target) = disks.first().cloned() else {
        emit(Event::InstallRefused { target: None, size: None, error: "no target disk besides the installer".into() });
        bail!("no target disk besides the installer ({own})");
    };
    let size = std::fs::read_to_string(format!("/sys/block/{target}/size"))?.trim().parse::<u64>()? * 512;
    let dev = PathBuf::from(format!("/dev/{target}"));
    let mut pf = std::fs::File::open(&payload)?;
    let (header, data_start) = crate::format::installer::read_header(&mut pf)?;
    let layout = match fit(&header, size) {
        Ok(l) => l,
        Err(e) => {
            emit(Event::InstallRefused { target: Some(dev.clone()), size: Some(size), error: format!("{e:#}") });
            return Err(e);
        }
    };
    emit(Event::InstallStart { target: dev.clone(), size, build_id: header.build_id.clone(), bytes: header.extents.iter().map(|e| e.len).sum::<u64>() });
    let last = std::cell::Cell::new(0u64);
    let t = std::time::Instant::now();
    let bytes = write_payload(&mut pf, data_start, &header, &dev, &layout, &|done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= last.get() + 25 || done == total {
            last.set(pct);
            emit(Event::InstallProgress { percent: pct, bytes: done });
        }
    })?;
    emit(Event::Installed { target: dev.clone(), bytes, disk_size: layout.disk_size, seconds: t.elapsed().as_secs_f64() });
    Ok(())
}
