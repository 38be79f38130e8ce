//! Registry sources against a real registry (Debian's docker-registry on 127.0.0.1, fed by
//! skopeo): pull, cache, lock, offline, auth, and the faults users meet.

mod common;
use common::registry::{CuttingProxy, TestRegistry};
use common::*;
use std::path::Path;
use std::process::{Command, Output};

const IMAGES: [(&str, &str); 6] = [("kernel", "6.1"), ("base", "1"), ("setup", "1"), ("newlogd", "1"), ("edgeview", "1.2"), ("analytics", "3")];

fn push_all(fx: &Fixture, reg: &TestRegistry) {
    for (name, tag) in IMAGES {
        reg.push(&fx.path().join("images").join(name), tag, &format!("{name}:{tag}"));
    }
}

/// Point the fixture manifest at `host` instead of the local layouts.
fn use_registry(fx: &Fixture, host: &str) {
    std::fs::write(fx.manifest(), MANIFEST.replace("oci:images/", &format!("{host}/"))).unwrap();
}

fn sf(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("SOURCE_DATE_EPOCH").env_remove("REGISTRY_AUTH_FILE").env("HOME", "/nonexistent");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn build_args<'a>(fx: &'a Fixture, out: &'a Path, cache: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let l = layouts().join("demo.yaml");
    let mut v: Vec<String> = vec!["build".into(), fx.manifest().display().to_string(), "--layout".into(), l.display().to_string(), "-o".into(), out.display().to_string(), "--cache".into(), cache.display().to_string(), "--json".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(args: &[String], env: &[(&str, &Path)]) -> Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    sf(&a, env)
}

fn blobs_in(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("blobs/sha256")).map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

fn tmp_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("tmp")).map(|r| r.count()).unwrap_or(0)
}

#[test]
fn registry_build_then_pull_and_offline_build_give_the_same_disk() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    use_registry(&fx, &reg.host());
    let cache = fx.path().join("cache");
    let online = fx.path().join("online.img");
    let s: serde_json::Value = serde_json::from_slice(&ok(&run(&build_args(&fx, &online, &cache, &[]), &[])).into_bytes()).unwrap();
    // External images are recorded by the digest the registry serves (what skopeo sees).
    let ext: Vec<&serde_json::Value> = s["external_images"].as_array().unwrap().iter().collect();
    let ev = ext.iter().find(|e| e["name"] == "edgeview").unwrap();
    assert_eq!(ev["digest"], reg.digest("edgeview:1.2").as_str());
    assert_eq!(ev["reference"], format!("{}/edgeview:1.2", reg.host()));
    assert_eq!(tmp_files(&cache), 0);
    ok(&slotforge(&["verify", online.to_str().unwrap()]));

    // pull into a fresh cache, then build offline: identical disk.
    let cache2 = fx.path().join("cache2");
    let p = run(&["pull".into(), fx.manifest().display().to_string(), "--cache".into(), cache2.display().to_string(), "--json".into()], &[]);
    let stats: serde_json::Value = serde_json::from_str(&ok(&p)).unwrap();
    assert_eq!(stats["fetched"], stats["blobs"]);
    let p = run(&["pull".into(), fx.manifest().display().to_string(), "--cache".into(), cache2.display().to_string(), "--json".into()], &[]);
    let stats: serde_json::Value = serde_json::from_str(&ok(&p)).unwrap();
    assert_eq!(stats["fetched"], 0, "a warm cache fetches nothing: {stats}");
    let mut reg = reg;
    reg.stop();
    let offline = fx.path().join("offline.img");
    ok(&run(&build_args(&fx, &offline, &cache2, &["--offline"]), &[]));
    assert_eq!(sha256_file(&online), sha256_file(&offline));

    // Offline with an empty cache: one error listing every reference that is missing.
    let empty = fx.path().join("empty");
    let o = run(&build_args(&fx, &fx.path().join("x.img"), &empty, &["--offline"]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    for (name, tag) in IMAGES {
        assert!(err.contains(&format!("{}/{name}:{tag}", reg.host())), "{name} not listed: {err}");
    }
    assert!(!fx.path().join("x.img").exists());
}

#[test]
fn offline_lists_missing_layer_blobs_with_their_references() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    use_registry(&fx, &reg.host());
    let cache = fx.path().join("cache");
    // `lock` resolves manifests only: the cache then has manifests and configs, no layers.
    ok(&run(&["lock".into(), fx.manifest().display().to_string(), "--cache".into(), cache.display().to_string()], &[]));
    let o = run(&build_args(&fx, &fx.path().join("x.img"), &cache, &["--offline", "--locked"]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("blobs are not in the cache"), "{err}");
    assert!(err.contains(&format!("needed by {}/edgeview:1.2", reg.host())), "{err}");
}

#[test]
fn basic_auth_from_the_auth_file_and_clear_errors_without_it() {
    let fx = fixture();
    let reg = TestRegistry::start(Some(("builder", "s3cret")));
    push_all(&fx, &reg);
    use_registry(&fx, &reg.host());
    let auth = fx.path().join("auth.json");
    let write_auth = |pass: &str| {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("builder:{pass}"));
        std::fs::write(&auth, format!(r#"{{"auths":{{"{}":{{"auth":"{b}"}}}}}}"#, reg.host())).unwrap();
    };
    write_auth("s3cret");
    let cache = fx.path().join("cache");
    let out = fx.path().join("disk.img");
    ok(&run(&build_args(&fx, &out, &cache, &[]), &[("REGISTRY_AUTH_FILE", &auth)]));

    write_auth("wrong");
    let o = run(&build_args(&fx, &fx.path().join("w.img"), &fx.path().join("c2"), &[]), &[("REGISTRY_AUTH_FILE", &auth)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("refused the credentials for user \"builder\"") && err.contains("auth.json"), "{err}");

    let o = run(&build_args(&fx, &fx.path().join("n.img"), &fx.path().join("c3"), &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs credentials"), "{err}");
}

#[test]
fn a_corrupted_blob_in_the_registry_is_refused_and_never_cached() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    use_registry(&fx, &reg.host());
    // The edgeview image's biggest layer, corrupted in the registry's own storage.
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.path().join("images/edgeview/index.json")).unwrap()).unwrap();
    let md = idx["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let man: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.path().join("images/edgeview/blobs/sha256").join(md)).unwrap()).unwrap();
    let layer = man["layers"].as_array().unwrap().iter().max_by_key(|l| l["size"].as_u64().unwrap()).unwrap()["digest"].as_str().unwrap().to_string();
    let f = reg.blob_file(&layer);
    let mut data = std::fs::read(&f).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&f, data).unwrap();
    let cache = fx.path().join("cache");
    let o = run(&build_args(&fx, &fx.path().join("x.img"), &cache, &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("corrupt blob") && err.contains(&layer), "{err}");
    assert!(!blobs_in(&cache).contains(&layer.trim_start_matches("sha256:").to_string()));
    assert_eq!(tmp_files(&cache), 0);
    assert!(!fx.path().join("x.img").exists());
}

#[test]
fn a_stopped_registry_is_a_clear_error() {
    let fx = fixture();
    let mut reg = TestRegistry::start(None);
    use_registry(&fx, &reg.host());
    reg.stop();
    let o = run(&build_args(&fx, &fx.path().join("x.img"), &fx.path().join("cache"), &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("cannot reach registry {}", reg.host())), "{err}");
}

#[test]
fn downloads_cut_mid_blob_leave_no_partial_blob_and_are_retried() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    // Every connection cut after 100 KiB: the 600 KB layers can never arrive.
    let proxy = CuttingProxy::start(reg.port, usize::MAX, 100 << 10);
    use_registry(&fx, &format!("127.0.0.1:{}", proxy.port));
    let cache = fx.path().join("cache");
    let o = run(&build_args(&fx, &fx.path().join("x.img"), &cache, &[]), &[]);
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let big: Vec<String> = blobs_in(&cache).into_iter().filter(|b| std::fs::metadata(cache.join("blobs/sha256").join(b)).unwrap().len() >= 100 << 10).collect();
    assert!(big.is_empty(), "blobs over the cut size in the cache: {big:?}");
    for b in blobs_in(&cache) {
        let data = std::fs::read(cache.join("blobs/sha256").join(&b)).unwrap();
        assert_eq!(sha256_hex(&data), b, "a cached blob does not match its name");
    }
    assert_eq!(tmp_files(&cache), 0);

    // Only the first two connections cut: the retries get everything through.
    let proxy = CuttingProxy::start(reg.port, 2, 100 << 10);
    use_registry(&fx, &format!("127.0.0.1:{}", proxy.port));
    let cache = fx.path().join("cache-retry");
    ok(&run(&build_args(&fx, &fx.path().join("y.img"), &cache, &[]), &[]));
}

#[test]
fn a_tag_moved_after_lock_still_builds_the_locked_digest() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    use_registry(&fx, &reg.host());
    let cache = fx.path().join("cache");
    let l = ok(&run(&["lock".into(), fx.manifest().display().to_string(), "--cache".into(), cache.display().to_string(), "--json".into()], &[]));
    let lock: serde_json::Value = serde_json::from_str(&l).unwrap();
    assert_eq!(lock["images"].as_array().unwrap().len(), 6);
    let locked = reg.digest("edgeview:1.2");
    assert!(std::fs::read_to_string(fx.path().join("system.lock")).unwrap().contains(&locked));
    // Move the tag: push another image as edgeview:1.2.
    reg.push(&fx.path().join("images/analytics"), "3", "edgeview:1.2");
    assert_ne!(reg.digest("edgeview:1.2"), locked);
    let digest_of_edgeview = |s: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["external_images"].as_array().unwrap().iter().find(|e| e["name"] == "edgeview").unwrap()["digest"].as_str().unwrap().to_string()
    };
    let fresh = fx.path().join("fresh-cache");
    let s = ok(&run(&build_args(&fx, &fx.path().join("locked.img"), &fresh, &["--locked"]), &[]));
    assert_eq!(digest_of_edgeview(&s), locked);
    let s = ok(&run(&build_args(&fx, &fx.path().join("floating.img"), &fresh, &[]), &[]));
    assert_eq!(digest_of_edgeview(&s), reg.digest("edgeview:1.2"));
    // A manifest that no longer matches its lock is refused under --locked.
    std::fs::write(fx.manifest(), std::fs::read_to_string(fx.manifest()).unwrap().replace("newlogd:1", "newlogd:2")).unwrap();
    let o = run(&build_args(&fx, &fx.path().join("z.img"), &fresh, &["--locked"]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("newlogd:2 is in the manifest but not in the lock") && err.contains("newlogd:1 is in the lock but no longer"), "{err}");
}

#[test]
fn docker_archive_sources_build() {
    let fx = fixture();
    let tar = fx.path().join("newlogd.docker.tar");
    tool("skopeo", &["copy", "-q", &format!("oci:{}:1", fx.path().join("images/newlogd").display()), &format!("docker-archive:{}:example/newlogd:1", tar.display())]);
    std::fs::write(fx.manifest(), MANIFEST.replace("oci:images/newlogd:1", "docker-archive:newlogd.docker.tar:example/newlogd:1")).unwrap();
    let out = fx.path().join("disk.img");
    ok(&run(&build_args(&fx, &out, &fx.path().join("cache"), &[]), &[]));
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let l = tool("unsquashfs", &["-lln", sq.to_str().unwrap()]);
    assert!(l.contains("/containers/services/newlogd/lower/usr/bin/newlogd"), "{l}");
}

#[test]
fn bearer_token_challenge_with_basic_credentials_for_the_token() {
    use common::registry::BearerGate;
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    let gate = BearerGate::start(reg.port, "builder", "tokenpass");
    use_registry(&fx, &format!("127.0.0.1:{}", gate.port));
    let auth = fx.path().join("auth.json");
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode("builder:tokenpass");
    std::fs::write(&auth, format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{b}"}}}}}}"#, gate.port)).unwrap();
    let out = fx.path().join("disk.img");
    ok(&run(&build_args(&fx, &out, &fx.path().join("cache"), &[]), &[("REGISTRY_AUTH_FILE", &auth)]));
    assert!(gate.token_requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // Without credentials the token service says no, and the error says where we looked.
    let o = run(&build_args(&fx, &fx.path().join("n.img"), &fx.path().join("c2"), &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs credentials"), "{err}");
}

#[test]
fn docker_schema2_manifests_and_multi_platform_indexes_from_a_registry() {
    let fx = fixture();
    let reg = TestRegistry::start(None);
    push_all(&fx, &reg);
    // newlogd as a Docker schema-2 image; setup as an OCI index with amd64 and arm64.
    reg.push_with(&fx.path().join("images/newlogd"), "1", "newlogd:1", &["--format", "v2s2"]);
    let setup = fx.path().join("images/setup");
    let arm = oci_image(&setup, "arm", vec![(layer(&[E::File("arch", b"arm64".to_vec(), 0o644)]), Comp::Gzip)], &[]);
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(setup.join("index.json")).unwrap()).unwrap();
    let amd = idx["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "1").unwrap().clone();
    let size_of = |d: &str| std::fs::metadata(setup.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap().len();
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": size_of(&arm), "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd["digest"], "size": amd["size"], "platform": {"os": "linux", "architecture": "amd64"}}]})).unwrap();
    let hex = sha256_hex(&index);
    std::fs::write(setup.join("blobs/sha256").join(&hex), &index).unwrap();
    std::fs::write(setup.join("index.json"), serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{hex}"), "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]})).unwrap()).unwrap();
    reg.push_with(&setup, "multi", "setup:1", &["--all"]);
    assert_eq!(reg.digest("setup:1"), format!("sha256:{hex}"), "the registry serves the index");
    use_registry(&fx, &reg.host());
    let cache = fx.path().join("cache");
    let l = ok(&run(&["lock".into(), fx.manifest().display().to_string(), "--cache".into(), cache.display().to_string(), "--json".into()], &[]));
    let lock: serde_json::Value = serde_json::from_str(&l).unwrap();
    let setup_lock = lock["images"].as_array().unwrap().iter().find(|i| i["reference"].as_str().unwrap().ends_with("/setup:1")).unwrap();
    assert_eq!(setup_lock["digest"], format!("sha256:{hex}"), "the lock pins the index");
    assert_eq!(setup_lock["manifest"], amd["digest"], "and records the amd64 manifest in it");
    let newlogd_lock = lock["images"].as_array().unwrap().iter().find(|i| i["reference"].as_str().unwrap().ends_with("/newlogd:1")).unwrap();
    assert_eq!(newlogd_lock["digest"], reg.digest("newlogd:1").as_str());
    let out = fx.path().join("disk.img");
    ok(&run(&build_args(&fx, &out, &cache, &["--locked"]), &[]));
    let sq = fx.path().join("a.sqfs");
    extract_partition(&out, "rootfs_a", &sq);
    let list = tool("unsquashfs", &["-lln", sq.to_str().unwrap()]);
    assert!(list.contains("/containers/services/newlogd/lower/usr/bin/newlogd"), "{list}");
    assert!(list.contains("/containers/onboot/000-setup/lower/bin/setup") && !list.contains("/containers/onboot/000-setup/lower/arch"), "{list}");
}
