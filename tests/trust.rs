//! The chain of trust on disk images, read back with independent tools: the rootfs slots'
//! dm-verity trees against `veritysetup` (verify, and a tree `veritysetup format` makes from the
//! same data and parameters), `slotforge verify` catching a flipped byte, and bundles signed
//! with minisign keys: `minisign -V` accepts the signature, `upgrade` refuses an unsigned, a
//! foreign-key and a tampered bundle with the disk byte-identical.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn build(fx: &Fixture, out: &Path) -> serde_json::Value {
    let l = layouts().join("demo.yaml");
    serde_json::from_str(&ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]))).unwrap()
}

fn bundle(fx: &Fixture, out: &Path, sign: &[&Path]) -> std::process::Output {
    let l = layouts().join("demo.yaml");
    let mut args = vec!["bundle".to_string(), fx.manifest().display().to_string(), "--layout".into(), l.display().to_string(), "-o".into(), out.display().to_string(), "--json".into()];
    for k in sign {
        args.push("--sign".into());
        args.push(k.display().to_string());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    slotforge(&a)
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let j: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["key", "generate", name, "-o", dir.to_str().unwrap(), "--json"]))).unwrap();
    (j["secret_key"].as_str().unwrap().into(), j["public_key"].as_str().unwrap().into(), j["key_id"].as_str().unwrap().into())
}

/// The manifest with `update-keys:` naming `pubs` (relative to the fixture).
fn trust(fx: &Fixture, pubs: &[&str], version: &str) {
    let keys: String = pubs.iter().map(|p| format!("  - {p}\n")).collect();
    std::fs::write(fx.manifest(), format!("{}update-keys:\n{keys}", MANIFEST.replace("version: 1.4.0", &format!("version: {version}")))).unwrap();
}

#[test]
fn slot_tree_is_what_veritysetup_format_makes_and_verify_catches_a_flipped_byte() {
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    let s = build(&fx, &disk);
    let v = &s["verity"];
    let (root, off, blocks) = (v["root_hash"].as_str().unwrap(), v["hash_offset"].as_u64().unwrap(), v["data_blocks"].as_u64().unwrap());
    assert_eq!(off, blocks * 4096);
    assert_eq!(s["rootfs_bytes"].as_u64().unwrap(), off + v["tree_bytes"].as_u64().unwrap());
    assert!(s["squashfs_bytes"].as_u64().unwrap() <= off);
    assert_eq!(s["caps"][0]["verity_bytes"], v["tree_bytes"]);

    let slot = fx.path().join("slot.img");
    extract_partition(&disk, "rootfs_a", &slot);
    // An independent tree: veritysetup format over the same data blocks with the same salt and
    // UUID, into a separate hash file, must give the same root hash and the same bytes.
    let data = fx.path().join("data.img");
    {
        use std::io::Read;
        let mut d = std::fs::File::create(&data).unwrap();
        std::io::copy(&mut std::fs::File::open(&slot).unwrap().take(off), &mut d).unwrap();
    }
    let hashf = fx.path().join("hash.img");
    let out = tool(
        "veritysetup",
        &["format", data.to_str().unwrap(), hashf.to_str().unwrap(), &format!("--salt={}", v["salt"].as_str().unwrap()), &format!("--uuid={}", v["uuid"].as_str().unwrap()), &format!("--data-blocks={blocks}")],
    );
    assert!(out.contains(&format!("Root hash:      \t{root}")), "veritysetup format gave another root hash:\n{out}");
    let theirs = std::fs::read(&hashf).unwrap();
    let ours = std::fs::read(&slot).unwrap()[off as usize..off as usize + theirs.len()].to_vec();
    assert!(ours == theirs, "hash area differs from veritysetup's ({} bytes)", theirs.len());
    tool("veritysetup", &["verify", slot.to_str().unwrap(), slot.to_str().unwrap(), root, &format!("--hash-offset={off}")]);
    // unsquashfs still reads the slot: the tree sits after the squashfs.
    tool("unsquashfs", &["-s", slot.to_str().unwrap()]);

    let insp: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(insp["slots"][0]["verity"]["root_hash"], root);
    assert_eq!(insp["slots"][0]["verity"]["hash_offset"], off);
    let ver: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["verify", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert!(ver["checks"].as_array().unwrap().iter().any(|c| c["name"] == "slot a verity" && c["ok"] == true), "{ver}");

    // One flipped byte deep in the squashfs data: the squashfs superblock still parses, the
    // verity check does not.
    let start = {
        let mut f = std::fs::File::open(&disk).unwrap();
        slotforge::format::disk::read_gpt(&mut f).unwrap().partitions.iter().find(|p| p.name == "rootfs_a").unwrap().start
    };
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[(start + off / 2) as usize] ^= 0x01;
    std::fs::write(&disk, bytes).unwrap();
    let o = slotforge(&["verify", disk.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let ver: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = ver["checks"].as_array().unwrap().iter().find(|c| c["name"] == "slot a verity").unwrap().clone();
    assert_eq!(c["ok"], false, "{c}");
    assert!(c["detail"].as_str().unwrap().contains("corrupt"), "{c}");
    extract_partition(&disk, "rootfs_a", &slot);
    let o = std::process::Command::new("veritysetup").args(["verify", slot.to_str().unwrap(), slot.to_str().unwrap(), root, &format!("--hash-offset={off}")]).output().unwrap();
    assert!(!o.status.success(), "veritysetup accepted the flipped byte");
}

#[test]
fn verity_false_opts_out() {
    let fx = fixture();
    std::fs::write(fx.manifest(), format!("{MANIFEST}verity: false\n")).unwrap();
    let disk = fx.path().join("disk.img");
    let s = build(&fx, &disk);
    assert!(s.get("verity").is_none(), "{s}");
    assert_eq!(s["rootfs_bytes"], s["squashfs_bytes"]);
    let insp: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap();
    assert!(insp["slots"][0]["verity"].is_null());
    let opts = insp["esp"]["entries"][0]["options"].as_str().unwrap();
    assert!(opts.starts_with("root=PARTLABEL=rootfs_a ro ") && !opts.contains("roothash"), "{opts}");
    ok(&slotforge(&["verify", disk.to_str().unwrap()]));
}

#[test]
fn a_newline_in_the_cmdline_is_refused() {
    let fx = fixture();
    std::fs::write(fx.manifest(), MANIFEST.replace("cmdline: console=ttyS0", "cmdline: \"console=ttyS0\\nlinux /evil.efi\"")).unwrap();
    let disk = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", disk.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("control character"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!disk.exists());
}

#[test]
fn only_bundles_signed_by_a_trusted_key_are_applied() {
    let fx = fixture();
    let keys = fx.path().join("keys");
    let (release_key, release_pub, release_id) = keygen(&keys, "release");
    let (rogue_key, _, rogue_id) = keygen(&keys, "rogue");
    assert_ne!(release_id, rogue_id);
    // The key file is minisign's format: minisign itself signs with it... and refuses to
    // overwrite it through us.
    let again = slotforge(&["key", "generate", "release", "-o", keys.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&release_key).unwrap().permissions().mode() & 0o777, 0o600);

    trust(&fx, &["keys/release.pub"], "1.4.0");
    let disk = fx.path().join("disk.img");
    let s = build(&fx, &disk);
    assert_eq!(s["update_keys"], serde_json::json!([release_id]));
    // The key is in the rootfs, where the device reads it.
    let slot = fx.path().join("slot.img");
    extract_partition(&disk, "rootfs_a", &slot);
    let listed = tool("unsquashfs", &["-l", slot.to_str().unwrap()]);
    assert!(listed.contains(&format!("squashfs-root/etc/slotforge/update-keys/{release_id}.pub")), "{listed}");
    let before = sha256_file(&disk);

    trust(&fx, &["keys/release.pub"], "1.5.0");
    // Unsigned: refused, naming the trusted key; not one byte changes.
    let unsigned = fx.path().join("unsigned.tar");
    let o = bundle(&fx, &unsigned, &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("the bundle is unsigned"));
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), unsigned.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unsigned") && err.contains(&release_id) && err.contains("nothing was changed"), "{err}");
    assert_eq!(sha256_file(&disk), before);
    // Signed by a key the device does not trust: refused, naming both keys.
    let rogue = fx.path().join("rogue.tar");
    ok(&bundle(&fx, &rogue, &[&rogue_key]));
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), rogue.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("signed by key {rogue_id}, which this device does not trust")) && err.contains(&release_id), "{err}");
    assert_eq!(sha256_file(&disk), before);

    // Signed by the release key: minisign -V, an independent reader, accepts the signature over
    // the config blob, which pins every other blob.
    let good = fx.path().join("good");
    let j: serde_json::Value = serde_json::from_slice(&bundle(&fx, &good, &[&release_key]).stdout).unwrap();
    assert_eq!(j["signed_by"], serde_json::json!([release_id]));
    let (config, sig) = config_and_signature(&good);
    let out = tool("minisign", &["-V", "-p", release_pub.to_str().unwrap(), "-m", config.to_str().unwrap(), "-x", sig.to_str().unwrap()]);
    assert!(out.contains("Signature and comment signature verified"), "{out}");
    // `slotforge key verify` decides as the device would, without a disk.
    ok(&slotforge(&["key", "verify", good.to_str().unwrap(), "--key", release_pub.to_str().unwrap()]));
    let o = slotforge(&["key", "verify", unsigned.to_str().unwrap(), "--key", release_pub.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
    // skopeo reads the signed bundle as an OCI layout.
    tool("skopeo", &["inspect", "--raw", &format!("oci:{}:{}", good.display(), j["build_id"].as_str().unwrap())]);

    // Tampered: the config changed (another version) and the manifest and index re-linked to it
    // with valid digests; the old signature no longer matches the config. Refused.
    let tampered = fx.path().join("tampered");
    tool("cp", &["-a", good.to_str().unwrap(), tampered.to_str().unwrap()]);
    retarget_config(&tampered, |c| c["version"] = "6.6.6".into());
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), tampered.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("does not match the bundle"), "{err}");
    assert_eq!(sha256_file(&disk), before);

    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), good.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["signature"], serde_json::json!({"state": "signed", "key_id": release_id}));
    assert_eq!(r["slot"], "b");
    ok(&slotforge(&["verify", disk.to_str().unwrap()]));
}

fn blob(dir: &Path, d: &str) -> PathBuf {
    dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"))
}

/// The bundle manifest's config blob and the first signature's .minisig blob.
fn config_and_signature(dir: &Path) -> (PathBuf, PathBuf) {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = &idx["manifests"][0];
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(dir, m["digest"].as_str().unwrap())).unwrap()).unwrap();
    let s = idx["manifests"].as_array().unwrap().iter().find(|d| d["artifactType"] == "application/vnd.slotforge.bundle.signature.v1").unwrap();
    let sm: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(dir, s["digest"].as_str().unwrap())).unwrap()).unwrap();
    assert_eq!(sm["subject"]["digest"], m["digest"]);
    (blob(dir, man["config"]["digest"].as_str().unwrap()), blob(dir, sm["layers"][0]["digest"].as_str().unwrap()))
}

/// Change the bundle's config and re-link manifest and index to it (valid digests, old signature).
fn retarget_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let put = |bytes: Vec<u8>| -> (String, usize) {
        let d = format!("sha256:{}", sha256_hex(&bytes));
        std::fs::write(blob(dir, &d), &bytes).unwrap();
        (d, bytes.len())
    };
    let ip = dir.join("index.json");
    let mut idx: serde_json::Value = serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
    let mut man: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(dir, idx["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(dir, man["config"]["digest"].as_str().unwrap())).unwrap()).unwrap();
    f(&mut cfg);
    let (cd, cs) = put(serde_json::to_vec(&cfg).unwrap());
    man["config"]["digest"] = cd.into();
    man["config"]["size"] = cs.into();
    let (md, ms) = put(serde_json::to_vec(&man).unwrap());
    idx["manifests"][0]["digest"] = md.clone().into();
    idx["manifests"][0]["size"] = ms.into();
    // Keep the signature artifact pointing at the new manifest, as an attacker would.
    for d in idx["manifests"].as_array_mut().unwrap().iter_mut().filter(|d| d["artifactType"] == "application/vnd.slotforge.bundle.signature.v1") {
        let mut sm: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(dir, d["digest"].as_str().unwrap())).unwrap()).unwrap();
        sm["subject"]["digest"] = md.clone().into();
        sm["subject"]["size"] = ms.into();
        let (sd, ss) = put(serde_json::to_vec(&sm).unwrap());
        d["digest"] = sd.into();
        d["size"] = ss.into();
    }
    std::fs::write(&ip, serde_json::to_vec(&idx).unwrap()).unwrap();
}

/// Debian's snakeoil Secure Boot key (the one OVMF_VARS_4M.snakeoil.fd enrols), decrypted.
fn snakeoil(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("db.key");
    tool("openssl", &["rsa", "-passin", "pass:snakeoil", "-in", "/usr/share/ovmf/PkKek-1-snakeoil.key", "-out", key.to_str().unwrap()]);
    (key, "/usr/share/ovmf/PkKek-1-snakeoil.pem".into())
}

fn uki_manifest(fx: &Fixture, version: &str) {
    let (key, cert) = snakeoil(fx.path());
    let m = MANIFEST.replace("version: 1.4.0", &format!("version: {version}")).replace(
        "boot:\n  loader: file:loader.efi\n",
        &format!("boot:\n  loader: file:/usr/lib/systemd/boot/efi/systemd-bootx64.efi\n  uki: true\n  secure-boot:\n    key: {}\n    cert: {}\n", key.display(), cert.display()),
    );
    std::fs::write(fx.manifest(), m).unwrap();
}

#[test]
fn signed_ukis_carry_the_root_hash_and_upgrades_write_the_other_slots_signed_uki() {
    let fx = fixture();
    uki_manifest(&fx, "1.4.0");
    let disk = fx.path().join("disk.img");
    let s = build(&fx, &disk);
    let root = s["verity"]["root_hash"].as_str().unwrap().to_string();
    let esp = fx.path().join("esp.img");
    extract_partition(&disk, "esp", &esp);
    tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    let dir = tool("mdir", &["-/", "-b", "-i", esp.to_str().unwrap(), "::"]);
    assert!(dir.contains("::/EFI/Linux/slotforge-1-a.efi") && !dir.contains("::/loader/entries/slot-a.conf") && !dir.contains("::/a/vmlinuz"), "{dir}");
    // sbverify, an independent reader, checks both signatures against the snakeoil certificate.
    let x = fx.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    for (src, name) in [("::/EFI/Linux/slotforge-1-a.efi", "uki.efi"), ("::/EFI/BOOT/BOOTX64.EFI", "boot.efi")] {
        tool("mcopy", &["-i", esp.to_str().unwrap(), src, x.join(name).to_str().unwrap()]);
        let v = tool("sbverify", &["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", x.join(name).to_str().unwrap()]);
        assert!(v.contains("Signature verification OK"), "{name}: {v}");
    }
    // The command line, with the root hash, is inside the signed image.
    let sect = tool("objdump", &["-h", x.join("uki.efi").to_str().unwrap()]);
    for s in [".osrel", ".cmdline", ".linux", ".initrd"] {
        assert!(sect.contains(s), "{s} missing:\n{sect}");
    }
    let cmdline = fx.path().join("cmdline");
    tool("objcopy", &["-O", "binary", "--only-section=.cmdline", x.join("uki.efi").to_str().unwrap(), cmdline.to_str().unwrap()]);
    let cmdline = std::fs::read_to_string(&cmdline).unwrap();
    assert!(cmdline.starts_with(&format!("root=/dev/mapper/root roothash={root} ")) && cmdline.contains("slotforge.slot=a"), "{cmdline}");
    let insp: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap();
    let e = &insp["esp"]["entries"][0];
    assert_eq!((e["kind"].as_str(), e["slot"].as_str(), e["options"].as_str()), (Some("uki"), Some("a"), Some(cmdline.as_str())));
    assert_eq!(insp["slots"][0]["verity"]["root_hash"], root.as_str());
    ok(&slotforge(&["verify", disk.to_str().unwrap()]));
    // Reproducible, signatures included (sbsign runs under faketime at SOURCE_DATE_EPOCH).
    let again = fx.path().join("again.img");
    build(&fx, &again);
    assert_eq!(sha256_file(&disk), sha256_file(&again), "two signed UKI builds differ");

    // An update: the bundle carries one signed UKI per slot; slot b's lands as the newest entry.
    uki_manifest(&fx, "1.5.0");
    let b = fx.path().join("b.tar");
    ok(&bundle(&fx, &b, &[]));
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), b.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["entry"], "slotforge-2-b+3.efi", "{r}");
    extract_partition(&disk, "esp", &esp);
    tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    tool("mcopy", &["-o", "-i", esp.to_str().unwrap(), "::/EFI/Linux/slotforge-2-b+3.efi", x.join("b.efi").to_str().unwrap()]);
    assert!(tool("sbverify", &["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", x.join("b.efi").to_str().unwrap()]).contains("Signature verification OK"));
    let insp: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["inspect", disk.to_str().unwrap(), "--json"]))).unwrap();
    let eb = insp["esp"]["entries"].as_array().unwrap().iter().find(|e| e["slot"] == "b").unwrap().clone();
    assert_eq!((eb["kind"].as_str(), eb["tries_left"].as_u64()), (Some("uki"), Some(3)));
    assert_eq!(slotforge::format::cmdline::value(eb["options"].as_str().unwrap(), "roothash").as_deref(), insp["slots"][1]["verity"]["root_hash"].as_str());
    ok(&slotforge(&["verify", disk.to_str().unwrap()]));
    // A bundle whose UKIs were built for other partition names cannot be applied: the image
    // embeds the wrong command line. And a BLS bundle cannot switch a UKI device's boot mode.
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.6.0")).unwrap();
    let bls = fx.path().join("bls.tar");
    ok(&bundle(&fx, &bls, &[]));
    let before = sha256_file(&disk);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), bls.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("switching boot mode") && err.contains("nothing was changed"), "{err}");
    assert_eq!(sha256_file(&disk), before);
}

#[test]
fn keys_rotate_through_a_release_that_trusts_both() {
    let fx = fixture();
    let keys = fx.path().join("keys");
    let (k1, _, id1) = keygen(&keys, "old");
    let (k2, _, id2) = keygen(&keys, "new");
    trust(&fx, &["keys/old.pub"], "1.0.0");
    let disk = fx.path().join("disk.img");
    build(&fx, &disk);
    // A bundle signed only by the new key is refused while the device runs a K1-only release.
    trust(&fx, &["keys/new.pub"], "3.0.0");
    let early = fx.path().join("early.tar");
    ok(&bundle(&fx, &early, &[&k2]));
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), early.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(&format!("signed by key {id2}, which this device does not trust")));
    // The bridge release trusts both and is signed by the old key.
    trust(&fx, &["keys/old.pub", "keys/new.pub"], "2.0.0");
    let bridge = fx.path().join("bridge.tar");
    ok(&bundle(&fx, &bridge, &[&k1]));
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), bridge.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(r["signature"]["key_id"], id1.as_str());
    // Now the slot that would boot trusts K2: the new-key-only release goes in.
    let r: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["upgrade", disk.to_str().unwrap(), early.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!((r["signature"]["key_id"].as_str(), r["slot"].as_str()), (Some(id2.as_str()), Some("a")));
    // And the old key alone no longer opens it.
    trust(&fx, &["keys/old.pub"], "4.0.0");
    let stale = fx.path().join("stale.tar");
    ok(&bundle(&fx, &stale, &[&k1]));
    let before = sha256_file(&disk);
    let o = slotforge(&["upgrade", disk.to_str().unwrap(), stale.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(&format!("signed by key {id1}, which this device does not trust")), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&disk), before);
}

#[test]
fn a_bundle_cannot_inject_lines_into_a_boot_entry() {
    let fx = fixture();
    let disk = fx.path().join("disk.img");
    build(&fx, &disk);
    let before = sha256_file(&disk);
    std::fs::write(fx.manifest(), MANIFEST.replace("version: 1.4.0", "version: 1.5.0")).unwrap();
    for (field, value) in [("version", "1.5.0\nlinux /evil.efi"), ("cmdline", "quiet\ninitrd /evil.img")] {
        let dir = fx.path().join(format!("b-{field}"));
        ok(&bundle(&fx, &dir, &[]));
        retarget_config(&dir, |c| c[field] = value.into());
        let o = slotforge(&["upgrade", disk.to_str().unwrap(), dir.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("nothing was changed"), "{field}: {err}");
        assert_eq!(sha256_file(&disk), before, "{field}");
    }
}
