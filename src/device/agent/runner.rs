//! Running the containers on the device as LinuxKit's init does, with runc: each bundle's
//! `runtime.json` applied around `runc create`/`runc start` (mkdir, a read-only root bound onto
//! itself or a writable one as an overlay on a tmpfs, cgroups, interfaces, namespace binds);
//! LinuxKit's volumes mounted first; `onboot` entries in directory order, each to completion; `services` all started, none
//! waiting for another; `onshutdown` in order at shutdown. External images (`ondisk: false`)
//! are bound into their bundle first, only when verified. Reference: docs/agent.md.

use crate::device::{emit, AgentConfig};
use crate::linuxkit::oci::RuntimeJson;
use crate::linuxkit::spec::Section;
use crate::format::release::ExternalImage;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use super::mount::{mount, mount_options, umount, umount_all};
use crate::format::agent::Event;
use crate::format::agent::ImageStatus;

/// Debian's runc (`/usr/sbin/runc`), or `runc` on the PATH.
fn runc() -> PathBuf {
    ["/usr/sbin/runc", "/usr/bin/runc"].iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| "runc".into())
}


/// Containers of one section, in the order LinuxKit runs them (directory names sorted).
pub fn bundles(root: &Path, section: Section) -> Vec<(String, PathBuf)> {
    let base = root.join("containers").join(section.dir());
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&base)
        .map(|r| r.filter_map(|e| e.ok()).filter(|e| e.path().join("config.json").is_file()).map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn read_runtime(dir: &Path) -> anyhow::Result<Option<RuntimeJson>> {
    match std::fs::read(dir.join("runtime.json")) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{}/runtime.json", dir.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Before `runc create`, as LinuxKit's init: runtime.json's mounts in order (the root first:
/// `rootfs/` bound onto itself, or a tmpfs at `tmp/` and an overlay of `lower/` at `rootfs/`),
/// each destination (and overlay upper/work dir) made first; then `mkdir`; then cgroups.
/// Relative paths are inside the container's `rootfs/`.
fn prepare_fs(dir: &Path, rt: Option<&RuntimeJson>) -> anyhow::Result<()> {
    let Some(rt) = rt else { return Ok(()) };
    let rootfs = dir.join("rootfs");
    let abs = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { rootfs.join(p) };
    for m in &rt.mounts {
        let dest = abs(&m.destination);
        std::fs::create_dir_all(&dest).with_context(|| format!("mount point {}", dest.display()))?;
        for o in m.options.iter().flatten() {
            if let Some((k, v)) = o.split_once('=') {
                if k == "upperdir" || k == "workdir" {
                    std::fs::create_dir_all(v).with_context(|| format!("overlay {k}={v}"))?;
                }
            }
        }
        let (flags, data) = mount_options(m.options.as_deref().unwrap_or_default());
        let kind = Some(m.kind.as_str()).filter(|k| !k.is_empty());
        mount(Path::new(&m.source), &dest, kind, flags, Some(data.as_str()).filter(|d| !d.is_empty()))?;
    }
    for d in &rt.mkdir {
        std::fs::create_dir_all(abs(d)).with_context(|| format!("runtime mkdir {d}"))?;
    }
    for cg in &rt.cgroups {
        std::fs::create_dir_all(Path::new("/sys/fs/cgroup").join(cg.trim_start_matches('/'))).with_context(|| format!("runtime cgroup {cg}"))?;
    }
    Ok(())
}

/// Best effort, as LinuxKit: the root mount goes (a writable root's tmpfs stays until reboot).
fn cleanup(dir: &Path) {
    umount(&dir.join("rootfs"));
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("ip").args(args).status().context("running ip")?;
    if !st.success() {
        bail!("ip {}: {st}", args.join(" "));
    }
    Ok(())
}

/// After `runc create`, before `runc start`: interfaces moved into (or made for) the
/// container's network namespace, and its namespaces bound at the requested paths.
fn prepare_process(pid: i32, rt: &RuntimeJson) -> anyhow::Result<()> {
    let p = pid.to_string();
    for i in &rt.interfaces {
        if i.name.is_empty() {
            bail!("runtime interface requires a name");
        }
        let add = if !i.peer.is_empty() && i.add.is_empty() { "veth" } else { i.add.as_str() };
        match add {
            "" => {}
            "veth" if i.peer.is_empty() => bail!("creating a veth pair {} requires a peer", i.name),
            "veth" => ip(&["link", "add", &i.name, "type", "veth", "peer", "name", &i.peer])?,
            kind => ip(&["link", "add", &i.name, "type", kind])?,
        }
        // Made in the root namespace (or already there), then moved into the container's.
        ip(&["link", "set", &i.name, "netns", &p])?;
    }
    let b = &rt.bind_ns;
    for (ns, path) in [("cgroup", &b.cgroup), ("ipc", &b.ipc), ("mnt", &b.mnt), ("net", &b.net), ("pid", &b.pid), ("user", &b.user), ("uts", &b.uts)] {
        if path.is_empty() {
            continue;
        }
        let path = Path::new(path);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::File::create(path).with_context(|| format!("namespace bind point {}", path.display()))?;
        mount(&PathBuf::from(format!("/proc/{pid}/ns/{ns}")), path, None, libc::MS_BIND, None)?;
    }
    Ok(())
}

/// Log files of one container: `/run/log/<section>/<name>.{out,err}`.
fn logs(section: Section, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let d = PathBuf::from("/run/log").join(section.dir());
    std::fs::create_dir_all(&d)?;
    Ok((d.join(format!("{name}.out")), d.join(format!("{name}.err"))))
}

/// Whether the container's process needs work between `runc create` and `runc start`.
fn needs_process_prep(rt: Option<&RuntimeJson>) -> bool {
    let Some(rt) = rt else { return false };
    let b = &rt.bind_ns;
    !rt.interfaces.is_empty() || [&b.cgroup, &b.ipc, &b.mnt, &b.net, &b.pid, &b.user, &b.uts].iter().any(|p| !p.is_empty())
}

/// Prepare, create and start one container; returns its init's pid. A container whose process
/// needs nothing between create and start is started with one `runc run --detach` (the same
/// container; under TCG a Go process start is a few hundred milliseconds).
fn start(section: Section, name: &str, dir: &Path, pid_dir: &Path) -> anyhow::Result<i32> {
    let rt = read_runtime(dir)?;
    prepare_fs(dir, rt.as_ref()).context("preparing the root filesystem")?;
    let (out, err) = logs(section, name)?;
    let pidfile = pid_dir.join(name);
    let prep = needs_process_prep(rt.as_ref());
    let how: &[&str] = if prep { &["create", "--bundle"] } else { &["run", "--detach", "--bundle"] };
    let st = Command::new(runc())
        .args(how)
        .arg(dir)
        .arg("--pid-file")
        .arg(&pidfile)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .status()
        .context("running runc (Debian package runc)")?;
    if !st.success() {
        bail!("runc {}: {st}: {}", if prep { "create" } else { "run" }, std::fs::read_to_string(&err).unwrap_or_default().trim());
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse().context("runc pid file")?;
    let Some(rt) = rt.filter(|_| prep) else { return Ok(pid) };
    prepare_process(pid, &rt).context("preparing the process")?;
    let st = Command::new(runc()).args(["start", name]).stdin(Stdio::null()).status()?;
    if !st.success() {
        bail!("runc start: {st}");
    }
    Ok(pid)
}

/// Wait for `pid` (we are a subreaper, so a container's init becomes our child when runc
/// exits); `None` when `deadline` passes first.
fn wait(pid: i32, deadline: Option<Instant>) -> Option<i32> {
    loop {
        let mut status = 0;
        let flags = if deadline.is_some() { libc::WNOHANG } else { 0 };
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Some(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) });
        }
        if r < 0 {
            // Not our child (already reaped, or never reparented): poll for it to vanish.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Some(-1);
            }
        }
        match deadline {
            Some(d) if Instant::now() >= d => return None,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn output(section: Section, name: &str) -> (String, String) {
    let (o, e) = logs(section, name).unwrap_or_default();
    (std::fs::read_to_string(o).unwrap_or_default(), std::fs::read_to_string(e).unwrap_or_default())
}

/// An onboot or onshutdown container: started, waited for, reported (`<section>-exited` or
/// `-failed`), its root unmounted and its runc state deleted.
fn to_completion(section: Section, name: &str, dir: &Path, pid_dir: &Path, external: bool) {
    match start(section, name, dir, pid_dir) {
        Ok(pid) => {
            let status = wait(pid, None);
            let (stdout, stderr) = output(section, name);
            let name = name.to_string();
            emit(match section {
                Section::Onboot => Event::OnbootExited { name, external, status, stdout, stderr },
                Section::Onshutdown => Event::OnshutdownExited { name, external, status, stdout, stderr },
                Section::Services => Event::ServiceExited { name, external, status, stdout, stderr },
            });
        }
        Err(e) => {
            let (name, error) = (name.to_string(), format!("{e:#}"));
            emit(match section {
                Section::Onboot => Event::OnbootFailed { name, external, error },
                Section::Onshutdown => Event::OnshutdownFailed { name, external, error },
                Section::Services => Event::ServiceFailed { name, external, error },
            })
        }
    }
    cleanup(dir);
    let _ = Command::new(runc()).args(["delete", "--force", name]).stderr(Stdio::null()).status();
}

/// Bind each verified, prepared external image into its bundle (`rootfs/` or `lower/`).
/// Returns the bundle directories that have their image.
fn mount_external(cfg: &AgentConfig) -> anyhow::Result<Vec<PathBuf>> {
    let (_, ext) = super::status::read_release(&cfg.root)?;
    let mut ready = Vec::new();
    for img in &ext.images {
        if img.bundle.is_empty() {
            continue; // written by a build before bundles were recorded: not run by this agent
        }
        let dir = cfg.root.join(&img.bundle);
        match bind_image(cfg, img) {
            Ok(true) => ready.push(dir),
            Ok(false) => {}
            Err(e) => emit(Event::ImageMountFailed { name: img.name.clone(), error: format!("{e:#}") }),
        }
    }
    Ok(ready)
}

/// Bind one image's ready root (the mounted sealed filesystem, or the unpacked tree) into its
/// bundle. `false` when the image is not ready.
fn bind_image(cfg: &AgentConfig, img: &ExternalImage) -> anyhow::Result<bool> {
    let prepared = cfg.run_dir.join("containers").join(&img.name).join("rootfs");
    let is_ready = match &img.sealed {
        Some(_) => super::sealed::is_mounted(cfg, img),
        None => prepared.is_dir(),
    };
    if !is_ready {
        return Ok(false);
    }
    let at = cfg.root.join(&img.bundle).join(if img.readonly { "rootfs" } else { "lower" });
    mount(&prepared, &at, None, libc::MS_BIND | libc::MS_REC, None)?;
    Ok(true)
}

/// Report the services that exit before `deadline`; returns those still running.
fn settle(running: Vec<(String, PathBuf, i32)>, deadline: Instant) -> Vec<(String, PathBuf, i32)> {
    let external = |dir: &Path| dir.join("image.json").exists();
    let mut running = running;
    while !running.is_empty() {
        running.retain(|(name, dir, pid)| match wait(*pid, Some(Instant::now())) {
            Some(status) => {
                let (stdout, stderr) = output(Section::Services, name);
                emit(Event::ServiceExited { name: name.clone(), external: external(dir), status: Some(status), stdout, stderr });
                false
            }
            None => true,
        });
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    running
}

/// Read every open sealed image through dm-verity (`image-scrubbed` per image).
fn scrub_all(cfg: &AgentConfig) -> anyhow::Result<()> {
    let (_, ext) = super::status::read_release(&cfg.root)?;
    // A lazily served image is checked block by block as it is read and filled; a scrub would
    // fetch all of it before the boot could go on.
    for img in ext.images.iter().filter(|i| i.sealed.is_some() && super::lazy::active(cfg, i).is_none()) {
        let t = Instant::now();
        let r = super::sealed::scrub(img);
        emit(Event::ImageScrubbed { name: img.name.clone(), ok: r.is_ok(), bytes: r.as_ref().ok().copied(), error: r.as_ref().err().map(|e| format!("{e:#}")), seconds: t.elapsed().as_secs_f64() });
    }
    Ok(())
}

/// `agent scrub`: read every sealed image through dm-verity and repair what is corrupt (the
/// services using it are restarted), then report the status.
pub fn scrub(cfg: &AgentConfig) -> anyhow::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let pid_dir = cfg.run_dir.join("pids");
    std::fs::create_dir_all(&pid_dir)?;
    scrub_all(cfg)?;
    repair_corrupt(cfg, &mut Vec::new(), &pid_dir, Duration::from_secs(10))
}

/// Sealed images that dm-verity found corrupt on read while the containers ran: the services
/// using them are stopped, the image is rebuilt (from kept layers, or pulled by digest) and must
/// come out bit-identical to the pinned one, is reopened, and its services restart. Offline or
/// unrepairable: reported, left closed (`degraded`).
fn repair_corrupt(cfg: &AgentConfig, running: &mut Vec<(String, PathBuf, i32)>, pid_dir: &Path, settle_for: Duration) -> anyhow::Result<()> {
    let (rel, ext) = super::status::read_release(&cfg.root)?;
    let mut restarted = Vec::new();
    let mut found = false;
    for img in &ext.images {
        let Some(s) = &img.sealed else { continue };
        if super::sealed::verity_status(&super::sealed::dm_name(img)).as_deref() != Some("corrupted") {
            continue;
        }
        found = true;
        emit(Event::ImageCorrupt { name: img.name.clone(), root_hash: s.root_hash.clone(), device: format!("/dev/mapper/{}", super::sealed::dm_name(img)) });
        let dir = cfg.root.join(&img.bundle);
        let service = bundles(&cfg.root, Section::Services).into_iter().find(|(_, d)| *d == dir).map(|(n, _)| n);
        if let Some(pos) = running.iter().position(|(_, d, _)| *d == dir) {
            let (name, _, pid) = running.remove(pos);
            let _ = Command::new(runc()).args(["kill", &name, "KILL"]).stderr(Stdio::null()).status();
            wait(pid, Some(Instant::now() + Duration::from_secs(5)));
        }
        if let Some(n) = &service {
            let _ = Command::new(runc()).args(["delete", "--force", n]).stderr(Stdio::null()).status();
        }
        cleanup(&dir);
        umount(&dir.join(if img.readonly { "rootfs" } else { "lower" }));
        super::sealed::close(cfg, img);
        let st = super::status::ImageState { state: ImageStatus::Corrupt, bad_blobs: vec![s.digest.clone()], ..super::status::check_image(&cfg.images, &ext.build_id, img) };
        let st = super::fetch::fix(cfg, &ext.build_id, &rel.version, img, st);
        let reopened = st.state == ImageStatus::Verified && match super::sealed::open(cfg, img, s).and_then(|_| bind_image(cfg, img)) {
            Ok(b) => b,
            Err(e) => {
                emit(Event::ImagePrepareFailed { name: img.name.clone(), error: format!("{e:#}") });
                false
            }
        };
        super::sealed::mark_corrupt(cfg, img, !reopened);
        if !reopened {
            emit(Event::Degraded { unavailable: vec![img.name.clone()] });
            continue;
        }
        emit(Event::ImageRepaired { name: img.name.clone(), root_hash: s.root_hash.clone() });
        if let Some(n) = service {
            match start(Section::Services, &n, &dir, pid_dir) {
                Ok(pid) => {
                    emit(Event::ServiceStarted { name: n.clone(), external: true, pid, restart: Some("image repaired".into()) });
                    restarted.push((n, dir, pid));
                }
                Err(e) => emit(Event::ServiceFailed { name: n, external: true, error: format!("{e:#}") }),
            }
        }
    }
    if !restarted.is_empty() {
        running.extend(settle(restarted, Instant::now() + settle_for));
    }
    if found {
        // The state changed since `agent boot` reported it.
        emit(Event::Status(super::status::status(cfg)?));
    }
    Ok(())
}

/// `agent run`: onboot containers in order, each to completion, then every service started.
/// Waits up to `settle` for services that finish (their output is reported); the rest keep
/// running and are reported as running.
pub fn run(cfg: &AgentConfig, settle: Duration, scrub_images: bool) -> anyhow::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    emit(Event::RunStart { onboot: bundles(&cfg.root, Section::Onboot).len(), services: bundles(&cfg.root, Section::Services).len() });
    let ready = mount_external(cfg)?;
    super::volumes::mount_all(&cfg.root);
    let pid_dir = cfg.run_dir.join("pids");
    std::fs::create_dir_all(&pid_dir)?;
    let external = |dir: &Path| dir.join("image.json").exists();
    let runnable = |dir: &Path| !external(dir) || ready.iter().any(|r| r == dir);
    for (name, dir) in bundles(&cfg.root, Section::Onboot) {
        if !runnable(&dir) {
            emit(Event::OnbootSkipped { name, external: true, reason: "image not verified and prepared".into() });
            continue;
        }
        to_completion(Section::Onboot, &name, &dir, &pid_dir, external(&dir));
    }
    let mut running = Vec::new();
    for (name, dir) in bundles(&cfg.root, Section::Services) {
        if !runnable(&dir) {
            emit(Event::ServiceSkipped { name, external: true, reason: "image not verified and prepared".into() });
            continue;
        }
        match start(Section::Services, &name, &dir, &pid_dir) {
            Ok(pid) => {
                emit(Event::ServiceStarted { name: name.clone(), external: external(&dir), pid, restart: None });
                running.push((name, dir, pid));
            }
            Err(e) => emit(Event::ServiceFailed { name, external: external(&dir), error: format!("{e:#}") }),
        }
    }
    let mut running = self::settle(running, Instant::now() + settle);
    if scrub_images {
        scrub_all(cfg)?;
    }
    repair_corrupt(cfg, &mut running, &pid_dir, settle)?;
    for (name, dir, pid) in &running {
        emit(Event::ServiceRunning { name: name.clone(), external: external(dir), pid: *pid });
    }
    Ok(())
}

/// `agent shutdown`: the onshutdown containers in order, each to completion.
pub fn shutdown(cfg: &AgentConfig) -> anyhow::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let pid_dir = cfg.run_dir.join("pids");
    std::fs::create_dir_all(&pid_dir)?;
    for (name, dir) in bundles(&cfg.root, Section::Onshutdown) {
        to_completion(Section::Onshutdown, &name, &dir, &pid_dir, false);
    }
    release(cfg);
    Ok(())
}

/// After the onshutdown containers: stop the services still running, unbind every external
/// image from its bundle, close each sealed image (its mount, its dm-verity device and with it
/// the loop device over its file). Then nothing holds the images partition and the init can
/// unmount it cleanly — else every cut or power-off leaves its journal to replay
/// (docs/upgrade-protocol.md#crash-states). Emits `released` with what is still open.
fn release(cfg: &AgentConfig) {
    for (name, dir) in bundles(&cfg.root, Section::Services) {
        let _ = Command::new(runc()).args(["kill", &name, "KILL"]).stderr(Stdio::null()).status();
        let _ = Command::new(runc()).args(["delete", "--force", &name]).stderr(Stdio::null()).status();
        umount_all(&dir.join("rootfs"));
    }
    let Ok((_, ext)) = super::status::read_release(&cfg.root) else { return };
    for img in ext.images.iter().filter(|i| !i.bundle.is_empty()) {
        let b = cfg.root.join(&img.bundle);
        umount_all(&b.join("rootfs"));
        umount_all(&b.join("lower"));
    }
    let mut open = Vec::new();
    for img in ext.images.iter().filter(|i| i.sealed.is_some()) {
        super::sealed::close(cfg, img);
        if Path::new("/dev/mapper").join(super::sealed::dm_name(img)).exists() {
            open.push(img.name.clone());
        }
    }
    // The servers of lazily started images hold files on the images partition.
    super::lazy::stop_all(cfg);
    emit(Event::Released { sealed_still_open: open });
}
