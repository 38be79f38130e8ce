//! Human-readable output of each verb (the `--json` forms are the library's reports as they are).

use crate::base::text::mib;
use std::path::Path;

/// The build's devices will take any bundle: say so where a person will see it.
pub fn warn_unsigned(keys: &[String]) {
    if keys.is_empty() {
        eprintln!("warning: the manifest has no `update-keys:`; devices running this build will accept UNSIGNED update bundles");
    }
}

pub fn check(r: &crate::builder::manifest::CheckReport) {
    for c in &r.containers {
        println!("{:<10} {:<20} {}{}", c.section, c.name, c.dir, if c.external { "  (external)" } else { "" });
    }
    for (name, dir, ro) in &r.volumes {
        println!("{:<10} {:<20} {dir}{}", "volume", name, if *ro { "  (read-only)" } else { "" });
    }
    println!("{}: ok", r.manifest.display());
}

pub fn lock(l: &crate::builder::lock::LockFile, path: &Path) {
    for i in &l.images {
        println!("{} -> {}", i.reference, i.digest);
    }
    println!("wrote {}", path.display());
}

pub fn pull(s: &crate::builder::pull::PullStats) {
    println!("{} blobs: {} fetched ({}), {} already cached ({})", s.blobs, s.fetched, mib(s.fetched_bytes), s.blobs - s.fetched, mib(s.cached_bytes));
}

pub fn build(s: &crate::builder::BuildSummary) {
    println!("built {} ({} {}, layout {} generation {})", s.output.display(), s.version, s.build_id, s.layout, s.generation);
    for c in &s.caps {
        println!("  rootfs {} of {} cap on {} gen {} ({}): slack {}", mib(s.rootfs_bytes), mib(c.cap), c.layout, c.generation, c.partition, mib(c.slack.max(0) as u64));
    }
    for e in &s.external_images {
        println!("  external {} {} ({})", e.name, e.digest, mib(e.size));
    }
    if let Some(v) = &s.verity {
        println!("  dm-verity root hash {} (tree {}, {:.2}% of the slot image)", v.root_hash, mib(v.tree_bytes), v.tree_bytes as f64 * 100.0 / s.rootfs_bytes.max(1) as f64);
    }
    println!("  disk {} with {} written", mib(s.disk_size), mib(s.bytes_written));
    if let Some((p, b)) = &s.bmap {
        println!("  bmap {}: {} of {} blocks mapped ({})", p.display(), b.mapped_blocks, b.blocks, mib(b.mapped_bytes));
    }
    if let Some(q) = &s.qcow2 {
        println!("  qcow2 {}", q.display());
    }
}

pub fn bundle(s: &crate::builder::bundle::BundleSummary) {
    let signed = if s.signed_by.is_empty() { String::new() } else { format!(", signed by {}", s.signed_by.join(", ")) };
    println!("bundle {} ({} {}), rootfs {}, {} in all{signed}", s.output.display(), s.version, s.build_id, mib(s.rootfs_bytes), mib(s.bundle_bytes));
    if let Some(d) = &s.delta {
        let bases: Vec<String> = d.bases.iter().map(|b| format!("{} ({})", b.build_id, b.version)).collect();
        println!("delta from {}: {} of {} rootfs chunks shipped ({}), the rest come from the device's slots", bases.join(", "), d.chunks_shipped, d.chunks, mib(d.chunk_bytes_shipped));
    }
}

pub fn installer(s: &crate::builder::installer::InstallerSummary) {
    println!("installer {} ({}): {} payload for a {} target layout; the installer image is {}", s.output.display(), s.build_id, mib(s.payload_bytes), mib(s.target_image_size), mib(s.installer_size));
}

pub fn upgrade(r: &crate::format::agent::ApplyReport) {
    println!("slot {} now holds {} ({}), entry {} (install {}); {} image blobs written ({}), {} already present", r.slot, r.version, r.build_id, r.entry, r.install_number, r.blobs_written, mib(r.image_bytes_written), r.blobs_present);
    match &r.signature {
        crate::format::signature::Decision::Signed { key_id } => println!("signature: good, key {key_id}"),
        crate::format::signature::Decision::Unchecked => eprintln!("warning: the slot that would boot trusts no update key; the bundle was applied without a signature check"),
    }
    if let Some(p) = &r.pulled {
        println!("pulled {} ({}): {} of {} chunks fetched ({}), {} found on the device; {} requests", p.reference, p.manifest_digest, p.chunks_fetched, p.chunks, mib(p.bytes_fetched), p.chunks_local, p.requests);
    }
    if let Some(d) = &r.delta {
        println!("rootfs assembled from {} chunks: {} from the slots, {} from the bundle ({}), {} from an earlier interrupted run", d.chunks, d.from_seeds, d.from_store, mib(d.store_bytes), d.resumed);
    }
}

pub fn push(s: &crate::builder::push::PushSummary) {
    println!("pushed {} ({}) to {} as {}: {} chunks in {} packs, {} new packs uploaded ({} in all), {} signature(s) as referrers ({})", s.version, s.build_id, s.reference, s.manifest_digest, s.chunks, s.packs, s.packs_uploaded, mib(s.bytes_uploaded), s.signatures, s.referrers);
    println!("  {} chunks found in {} earlier release(s) in the repository, {} new", s.chunks_reused, s.releases_seen, s.chunks_new);
    if s.sealed_images > 0 {
        println!("  {} sealed image(s) with the release, {} new to the registry", s.sealed_images, s.sealed_uploaded);
    }
    if !s.next_to_images.is_empty() {
        println!("  sealed images next to their images: {}", s.next_to_images.join(", "));
    }
}

pub fn key(v: &serde_json::Value) {
    println!("key {}: secret {} (keep it off the devices), public {} (list it under update-keys:)", v["key_id"].as_str().unwrap_or(""), v["secret_key"].as_str().unwrap_or(""), v["public_key"].as_str().unwrap_or(""));
}

pub fn key_check(r: &crate::format::bundle::KeyCheck) {
    match (&r.decision, &r.error) {
        (Some(crate::format::signature::Decision::Signed { key_id }), _) => println!("bundle {}: good signature by key {key_id}", r.build_id),
        (Some(crate::format::signature::Decision::Unchecked), _) => println!("bundle {}: no key given", r.build_id),
        (None, e) => println!("bundle {}: would be refused: {}", r.build_id, e.as_deref().unwrap_or("")),
    }
}

pub fn inspect(r: &crate::format::inspect::InspectReport, image: &Path) {
    println!("disk {} ({}), GUID {}", image.display(), mib(r.gpt.disk_size), r.gpt.disk_guid);
    if let Some(l) = &r.layout {
        println!("layout {} generation {}", l.name, l.generation);
    }
    for p in &r.gpt.partitions {
        println!("  {:>2} {:<16} {:>12} at {:>12}  type {}", p.number, p.name, mib(p.size), p.start, p.type_guid);
    }
    for s in &r.slots {
        match &s.release {
            Some(rel) => println!("slot {}: {} build {}, rootfs {} of cap {}, slack {}", s.slot, rel.version, rel.build_id, mib(s.rootfs_bytes.unwrap_or(0)), s.cap.map(mib).unwrap_or("?".into()), s.slack.map(|x| format!("{x} bytes")).unwrap_or("?".into())),
            None => println!("slot {}: {}{}", s.slot, s.state, s.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()),
        }
        if let Some(v) = &s.verity {
            println!("  dm-verity: tree {} at byte {}, root hash {}", mib(v.tree_bytes), v.hash_offset, v.root_hash.as_deref().unwrap_or("(no entry names it)"));
        }
    }
    if let Some(e) = &r.esp {
        for en in &e.entries {
            println!("boot entry {}: {} version {} tries {}", en.file, en.title.clone().unwrap_or_default(), en.version.clone().unwrap_or_default(), en.tries_left.map(|t| t.to_string()).unwrap_or("-".into()));
        }
    }
    if let Some(i) = &r.images {
        for b in &i.builds {
            println!("images for build {} ({}):", b.build_id, mib(b.bytes));
            for im in &b.images {
                println!("  {} {} {}", im.name, im.digest, mib(im.bytes));
            }
        }
    }
    for e in &r.errors {
        println!("error: {e}");
    }
}

pub fn verify(r: &crate::format::inspect::VerifyReport) {
    for c in &r.checks {
        println!("{} {:<28} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
    }
    println!("{}", if r.ok { "verify: all checks passed" } else { "verify: FAILED" });
}

/// `slotforge test`'s line per finished step, above the progress bar (or on stderr without one).
pub fn step_line(pb: indicatif::ProgressBar) -> Box<dyn Fn(&crate::harness::run::StepResult) + Sync> {
    Box::new(move |r| {
        pb.inc(1);
        let line = format!("{:<7} {}/{} ({:.0} s)", r.result, r.path, r.label, r.seconds);
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    })
}

pub fn cache_stats(s: &crate::builder::buildcache::Stats) {
    println!("cache {}", s.dir.display());
    println!("  blobs: {} ({} bytes)", s.blobs, s.blob_bytes);
    println!("  build cache: {} sealed images ({} bytes of them), {} compressed block entries ({} bytes), bound {} bytes", s.sealed_entries, s.sealed_bytes, s.block_entries, s.block_bytes, s.max_bytes);
}
