//! Image sources: `oci-archive:` tars and multi-platform indexes with `--platform`.

mod common;
use common::*;

#[test]
fn oci_archive_source_builds_like_the_directory() {
    let fx = fixture();
    // Tar the newlogd layout (as `skopeo copy … oci-archive:` would) and reference the archive.
    let dir = fx.path().join("images/newlogd");
    let tar_path = fx.path().join("images/newlogd.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    b.append_dir_all(".", &dir).unwrap();
    b.finish().unwrap();
    drop(b);
    std::fs::write(fx.manifest(), MANIFEST.replace("oci:images/newlogd:1", "oci-archive:images/newlogd.tar:1")).unwrap();
    let out = fx.path().join("disk.img");
    let l = layouts().join("demo.yaml");
    let s: serde_json::Value = serde_json::from_str(&ok(&slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]))).unwrap();
    let c = s["contributors"].as_array().unwrap().iter().find(|c| c["name"] == "newlogd").unwrap().clone();
    assert_eq!(c["reference"], "oci-archive:images/newlogd.tar:1");
    // The 200 000-byte binary plus its config.json.
    let bytes = c["bytes"].as_u64().unwrap();
    assert!((200_000..205_000).contains(&bytes), "{bytes}");
    // skopeo reads the same archive: the digests agree.
    let raw = tool("skopeo", &["inspect", &format!("oci-archive:{}:1", tar_path.display())]);
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(v["Digest"], idx["manifests"][0]["digest"]);
}

/// Turn the layout's single image at `tag` into an index with amd64 and arm64 manifests.
fn make_multiplatform(dir: &std::path::Path, tag: &str, arm_payload: &[u8]) {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let amd = idx["manifests"][0].clone();
    let arm_md = oci_image(dir, "arm-tmp", vec![(layer(&[E::File("arch", arm_payload.to_vec(), 0o644)]), Comp::Gzip)], &[]);
    let arm_size = std::fs::metadata(dir.join("blobs/sha256").join(arm_md.trim_start_matches("sha256:"))).unwrap().len();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_md, "size": arm_size, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": amd["mediaType"], "digest": amd["digest"], "size": amd["size"], "platform": {"os": "linux", "architecture": "amd64"}}
        ]
    }))
    .unwrap();
    let hex = sha256_hex(&index);
    std::fs::write(dir.join("blobs/sha256").join(&hex), &index).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{hex}"), "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

#[test]
fn platform_selects_the_manifest_from_an_index() {
    let fx = fixture();
    make_multiplatform(&fx.path().join("images/setup"), "1", b"arm64 payload");
    let l = layouts().join("demo.yaml");
    let build = |platform: &str, out: &str| {
        let out = fx.path().join(out);
        let o = slotforge(&["build", fx.manifest().to_str().unwrap(), "--layout", l.to_str().unwrap(), "-o", out.to_str().unwrap(), "--platform", platform]);
        (o, out)
    };
    let (o, out) = build("linux/amd64", "amd.img");
    ok(&o);
    let sq = fx.path().join("amd.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let list = tool("unsquashfs", &["-lln", sq.to_str().unwrap()]);
    assert!(list.contains("/containers/onboot/000-setup/lower/bin/setup") && !list.contains("/containers/onboot/000-setup/lower/arch"), "{list}");
    // No other image offers riscv64: a clear error naming what the index has.
    let (o, out) = build("linux/riscv64", "rv.img");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no linux/riscv64 image") && err.contains("linux/arm64"), "{err}");
    assert!(!out.exists());
}
