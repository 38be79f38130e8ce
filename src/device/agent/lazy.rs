//! Lazy start of a sealed image missing at boot: instead of fetching it whole before its service
//! may start, the agent finds its sealed artifact in the image's registry (published with
//! `slotforge push --next-to-images`), exposes the sealed blob at once as a network block device
//! served by a small process of its own (`agent lazy-serve`), and opens dm-verity over it under
//! the root hash the verified rootfs pins — so every block the service reads is checked, and a
//! block the network cannot deliver is an I/O error, never unverified data. Blocks are fetched
//! by range on first read and kept on the images partition (`.lazy/`), the rest is filled in the
//! background; once whole and equal to the pinned digest the blob takes its place among the
//! partition's blobs, and the next boot uses it like any other. Protocol: format::nbd.

use crate::base::hash::Digest;
use crate::device::{emit, AgentConfig};
use crate::format::agent::{Event, SealedState};
use crate::format::nbd;
use crate::format::release::ExternalImage;
use crate::format::sealed::Sealed;
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one fetch brings: a read of a block not yet here costs one range request of this size.
pub const BLOCK: u64 = 256 << 10;
/// Where the blocks of images being filled live on the images partition.
pub const LAZY_DIR: &str = ".lazy";

/// What `agent lazy-serve` serves (a JSON file under the run directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    /// The registry and repository holding the sealed blob.
    pub host: String,
    pub repo: String,
    pub insecure: Vec<String>,
    /// The sealed blob (digest and size the rootfs pins).
    pub digest: String,
    pub size: u64,
    pub images: PathBuf,
    /// `/dev/nbdN`.
    pub device: String,
}

fn job_path(cfg: &AgentConfig, name: &str) -> PathBuf {
    cfg.run_dir.join("lazy").join(format!("{name}.json"))
}

fn nbd_index(device: &str) -> Option<&str> {
    device.strip_prefix("/dev/nbd")
}

/// Whether the kernel has a server attached to `device` (`/sys/block/nbdN/pid`).
fn connected(device: &str) -> bool {
    nbd_index(device).is_some_and(|i| Path::new(&format!("/sys/block/nbd{i}/pid")).exists())
}

/// The lazily served image `img`, if its server is running.
pub fn active(cfg: &AgentConfig, img: &ExternalImage) -> Option<Job> {
    let j: Job = serde_json::from_slice(&std::fs::read(job_path(cfg, &img.name)).ok()?).ok()?;
    connected(&j.device).then_some(j)
}

/// A free `/dev/nbdN` (no server attached).
fn free_device() -> anyhow::Result<String> {
    (0..16).map(|i| format!("/dev/nbd{i}")).find(|d| Path::new(d).exists() && !connected(d)).context("no free /dev/nbdN (is the nbd module loaded?)")
}

/// Find `img`'s sealed artifact in its registry (mirrors first, as for pulls), store the small
/// blobs it needs (manifest, config, artifact) in the images partition, start the server, open
/// dm-verity over the device and mount it. Returns the mounted state and `HOST/REPO` it
/// comes from. Nothing is left running if it fails.
pub fn start(cfg: &AgentConfig, build_id: &str, version: &str, img: &ExternalImage, s: &Sealed) -> anyhow::Result<(SealedState, String)> {
    let t = Instant::now();
    let ImageRef::Registry { host, repo, .. } = ImageRef::parse(&img.reference, Path::new("/")).map_err(|e| anyhow::anyhow!(e))? else {
        bail!("{} names no registry", img.reference);
    };
    let mut errors = Vec::new();
    let mut found = None;
    for ep in cfg.endpoints(&host, &repo, true)? {
        let mut insecure = cfg.insecure.clone();
        if ep.insecure {
            insecure.push(ep.host.clone());
        }
        let reg = Registry::new(&ep.host, &insecure)?;
        match reg.manifest(&ep.repo, &s.artifact) {
            Ok((b, _)) if Digest::of_bytes(&b).as_str() == s.artifact => {
                found = Some((reg, ep, insecure, b));
                break;
            }
            Ok(_) => errors.push(format!("{}/{}: the sealed artifact does not match its pinned digest", ep.host, ep.repo)),
            Err(e) => errors.push(format!("{}/{}: {e:#}", ep.host, ep.repo)),
        }
    }
    let Some((reg, ep, insecure, artifact)) = found else { bail!("no registry has the sealed artifact of {}: {}", img.name, errors.join("; ")) };
    let a = crate::format::sealed::parse_artifact(&artifact).context("sealed artifact")?;
    if a.blob != s.digest || a.blob_size != s.size || a.subject != img.digest {
        bail!("{}/{}: the sealed artifact of {} names another blob or image", ep.host, ep.repo, img.name);
    }
    // The small blobs, checked by digest, so only the sealed blob is pending.
    let store = crate::base::cache::Cache::open_layout(&cfg.images)?;
    let md = Digest::parse(&img.digest).map_err(|e| anyhow::anyhow!(e))?;
    let (manifest, _) = reg.manifest(&ep.repo, md.as_str())?;
    if Digest::of_bytes(&manifest) != md {
        bail!("{}/{}: the manifest of {} does not match its pinned digest", ep.host, ep.repo, img.name);
    }
    let mv: serde_json::Value = serde_json::from_slice(&manifest)?;
    let cd = Digest::parse(mv["config"]["digest"].as_str().unwrap_or("")).map_err(|e| anyhow::anyhow!(e))?;
    if !store.has(&cd) {
        reg.fetch_blob(&ep.repo, &cd, mv["config"]["size"].as_u64().unwrap_or(0), &store, &|_| {})?;
    }
    store.put(&manifest[..], &md, manifest.len() as u64, "manifest")?;
    let ad = Digest::of_bytes(&artifact);
    store.put(&artifact[..], &ad, artifact.len() as u64, "sealed artifact")?;
    let empty = crate::format::sealed::EMPTY_JSON;
    store.put(empty, &Digest::of_bytes(empty), empty.len() as u64, "empty")?;
    // The server, then dm-verity over its device.
    let device = free_device()?;
    let job = Job { name: img.name.clone(), host: ep.host.clone(), repo: ep.repo.clone(), insecure, digest: s.digest.clone(), size: s.size, images: cfg.images.clone(), device: device.clone() };
    let jp = job_path(cfg, &img.name);
    std::fs::create_dir_all(jp.parent().unwrap())?;
    std::fs::write(&jp, serde_json::to_vec(&job)?)?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(std::env::current_exe()?).args(["agent", "lazy-serve"]).arg(&jp).stdin(std::process::Stdio::null()).process_group(0).spawn().context("starting the lazy image server")?
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !connected(&device) {
        if let Some(st) = child.try_wait()? {
            bail!("the lazy image server of {} exited ({st})", img.name);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the lazy image server of {} did not attach {device}", img.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match super::sealed::open_on(cfg, img, s, Path::new(&device)) {
        Ok(st) => {
            crate::device::images::add_to_build(&cfg.images, build_id, version, crate::format::images::IndexEntry::pinned(img, manifest.len() as u64)?)?;
            emit(Event::ImageLazy { name: img.name.clone(), device: device.clone(), from: format!("{}/{}", ep.host, ep.repo), seconds: t.elapsed().as_secs_f64() });
            Ok((st, format!("{}/{}", ep.host, ep.repo)))
        }
        Err(e) => {
            disconnect(&device);
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Stop every lazily served image's server (after its mount and dm-verity device are closed):
/// the kernel disconnects, the server sees the end and exits.
pub fn stop_all(cfg: &AgentConfig) {
    let Ok(rd) = std::fs::read_dir(cfg.run_dir.join("lazy")) else { return };
    for e in rd.flatten() {
        let Ok(j) = serde_json::from_slice::<Job>(&std::fs::read(e.path()).unwrap_or_default()) else { continue };
        let deadline = Instant::now() + Duration::from_secs(10);
        if connected(&j.device) {
            disconnect(&j.device);
            while connected(&j.device) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A server whose image has every block finishes it (hash, put in place) before it
        // exits: wait for it, within the same bound.
        while server_running(&e.path()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// Whether an `agent lazy-serve` of the job file `job` is running (its command line names it).
fn server_running(job: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    let want = job.as_os_str().as_encoded_bytes();
    rd.flatten().filter(|e| e.file_name().to_string_lossy().bytes().all(|c| c.is_ascii_digit())).any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == want)))
}

fn ioctl(fd: &impl AsRawFd, req: u64, arg: u64) -> std::io::Result<()> {
    // SAFETY: an NBD ioctl on an open /dev/nbdN with an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn disconnect(device: &str) {
    if let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open(device) {
        let _ = ioctl(&f, nbd::NBD_DISCONNECT, 0);
    }
}

/// Blocks fetched between two syncs of the cache (the map records them after the sync).
const SYNC_EVERY: usize = 16;
/// The background fill fetches up to this many missing blocks (4 MiB) in one request: under TCG
/// a request costs more than its bytes.
const FILL_RUN: u64 = 16;

/// The blocks of one image: the cache file, which blocks it holds (in memory as soon as they are
/// written; in the map file, one byte each, only once their data is durable), and the registry
/// they come from.
struct Blocks {
    file: std::fs::File,
    map_file: std::fs::File,
    present: Mutex<Vec<u8>>,
    /// Written but not yet synced (not yet in the map file).
    unsynced: Mutex<Vec<u64>>,
    reg: Registry,
    repo: String,
    digest: Digest,
    size: u64,
    fetched: std::sync::atomic::AtomicU64,
}

impl Blocks {
    fn count(&self) -> u64 {
        self.size.div_ceil(BLOCK)
    }

    /// Block `b` here, fetched if it is not (one range request, retried). The lock is not held
    /// while fetching: a read the kernel is waiting for must not wait for the background fill
    /// (which runs at SCHED_IDLE: holding the lock there would make the service wait for idle
    /// time). Both may fetch the same block; the second write is the same bytes.
    fn ensure(&self, b: u64) -> anyhow::Result<()> {
        self.ensure_run(b, 1)
    }

    /// Blocks `b..b + n` here: the missing ones from `b` on, up to the first present one,
    /// fetched in one range request (retried).
    fn ensure_run(&self, b: u64, n: u64) -> anyhow::Result<()> {
        let n = {
            let present = self.present.lock().unwrap();
            (b..(b + n).min(self.count())).take_while(|&i| present[i as usize] == 0).count() as u64
        };
        if n == 0 {
            return Ok(());
        }
        let (start, end) = (b * BLOCK, ((b + n) * BLOCK).min(self.size));
        let mut buf = vec![0u8; (end - start) as usize];
        let mut last = None;
        for attempt in 0..3u32 {
            match self.reg.blob_range(&self.repo, &self.digest, start, end).and_then(|mut r| Ok(r.read_exact(&mut buf)?)) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        let mut present = self.present.lock().unwrap();
        for i in b..b + n {
            if present[i as usize] == 1 {
                continue;
            }
            let at = (i - b) * BLOCK;
            let block = &buf[at as usize..((at + BLOCK) as usize).min(buf.len())];
            self.file.write_all_at(block, i * BLOCK)?;
            present[i as usize] = 1;
            self.unsynced.lock().unwrap().push(i);
            self.fetched.fetch_add(block.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Make the blocks written so far durable, then record them in the map file (a cut before
    /// that costs their fetch again, never a block the map claims but the file lacks).
    fn persist(&self) -> anyhow::Result<()> {
        let blocks: Vec<u64> = std::mem::take(&mut *self.unsynced.lock().unwrap());
        if blocks.is_empty() {
            return Ok(());
        }
        self.file.sync_data()?;
        for b in blocks {
            self.map_file.write_all_at(&[1], b)?;
        }
        Ok(())
    }

    /// Answer one read.
    fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let Some(range) = nbd::blocks(offset, length as u64, BLOCK, self.size) else { return Err(nbd::EINVAL) };
        for b in range {
            self.ensure(b).map_err(|_| nbd::EIO)?;
        }
        let mut out = vec![0u8; length as usize];
        self.file.read_exact_at(&mut out, offset).map_err(|_| nbd::EIO)?;
        Ok(out)
    }
}

/// `agent lazy-serve JOB`: attach a socket to the job's `/dev/nbdN`, answer the kernel's reads
/// from the cache, fetching what is missing, fill the rest in the background, and when whole and
/// equal to the pinned digest, put the blob in place. Exits when the kernel disconnects.
pub fn serve(job: &Path) -> anyhow::Result<()> {
    let j: Job = serde_json::from_slice(&std::fs::read(job)?).with_context(|| format!("{}", job.display()))?;
    let t = Instant::now();
    let digest = Digest::parse(&j.digest).map_err(|e| anyhow::anyhow!(e))?;
    let dir = j.images.join(LAZY_DIR);
    std::fs::create_dir_all(&dir)?;
    let part = dir.join(format!("{}.part", digest.hex()));
    let map = dir.join(format!("{}.map", digest.hex()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&part)?;
    if file.metadata()?.len() != j.size {
        file.set_len(j.size)?;
    }
    let n = j.size.div_ceil(BLOCK) as usize;
    let mut present = std::fs::read(&map).unwrap_or_default();
    present.resize(n, 0);
    let map_file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&map)?;
    let blocks = std::sync::Arc::new(Blocks { file, map_file, present: Mutex::new(present), unsynced: Default::default(), reg: Registry::new(&j.host, &j.insecure)?, repo: j.repo.clone(), digest: digest.clone(), size: j.size, fetched: Default::default() });

    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let dev = std::fs::OpenOptions::new().read(true).write(true).open(&j.device).with_context(|| j.device.clone())?;
    ioctl(&dev, nbd::NBD_SET_BLKSIZE, 4096)?;
    ioctl(&dev, nbd::NBD_SET_SIZE, j.size)?;
    ioctl(&dev, nbd::NBD_SET_TIMEOUT, 600)?;
    ioctl(&dev, nbd::NBD_SET_FLAGS, nbd::FLAG_HAS_FLAGS | nbd::FLAG_READ_ONLY)?;
    ioctl(&dev, nbd::NBD_SET_SOCK, theirs.as_raw_fd() as u64)?;
    // NBD_DO_IT returns when the device is disconnected.
    std::thread::spawn(move || {
        let _ = ioctl(&dev, nbd::NBD_DO_IT, 0);
        let _ = ioctl(&dev, nbd::NBD_CLEAR_SOCK, 0);
        drop(theirs);
    });
    // The background fill, then the blob put in place.
    let fill = {
        let b = blocks.clone();
        let (name, images) = (j.name.clone(), j.images.clone());
        std::thread::spawn(move || {
            // The fill yields to everything else on the device (SCHED_IDLE): the services the
            // boot is starting, and the reads they make through the server.
            // SAFETY: sched_setscheduler on the calling thread (0) with a valid sched_param.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &libc::sched_param { sched_priority: 0 }) };
            let r = (|| -> anyhow::Result<()> {
                // Runs of up to FILL_RUN missing blocks, one request each.
                for i in 0..b.count() {
                    b.ensure_run(i, FILL_RUN)?;
                    if b.unsynced.lock().unwrap().len() >= SYNC_EVERY {
                        b.persist()?;
                    }
                }
                b.persist()?;
                // Every block is here: finishing it is short, and a shutdown waits for it.
                // SAFETY: sched_setscheduler on the calling thread (0) with a valid sched_param.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &libc::sched_param { sched_priority: 0 }) };
                let (got, _) = crate::base::hash::digest_reader(std::fs::File::open(&part)?)?;
                if got != b.digest {
                    // Served blocks were checked by dm-verity as they were read; the cache as a
                    // whole is not the image: start over at the next boot.
                    let _ = std::fs::remove_file(&map);
                    bail!("the filled image is {got}, not {}; discarded", b.digest);
                }
                let dest = images.join("blobs/sha256").join(b.digest.hex());
                if !dest.exists() {
                    std::fs::hard_link(&part, &dest)?;
                }
                crate::base::durable::sync_fs(&images)?;
                let _ = std::fs::remove_file(&map);
                let _ = std::fs::remove_file(&part);
                Ok(())
            })();
            match r {
                Ok(()) => emit(Event::ImageFilled { name, bytes_fetched: b.fetched.load(std::sync::atomic::Ordering::Relaxed), seconds: t.elapsed().as_secs_f64() }),
                Err(e) => emit(Event::ImageFillFailed { name, error: format!("{e:#}") }),
            }
        })
    };
    // The kernel's requests, one at a time.
    let mut req = [0u8; nbd::REQUEST_LEN];
    while ours.read_exact(&mut req).is_ok() {
        let r = match nbd::parse_request(&req) {
            Ok(r) => r,
            Err(_) => break,
        };
        match r.command {
            nbd::CMD_READ => match blocks.read(r.offset, r.length) {
                Ok(data) => {
                    ours.write_all(&nbd::reply(r.handle, 0))?;
                    ours.write_all(&data)?;
                }
                Err(e) => ours.write_all(&nbd::reply(r.handle, e))?,
            },
            nbd::CMD_DISC => break,
            nbd::CMD_FLUSH => ours.write_all(&nbd::reply(r.handle, 0))?,
            nbd::CMD_WRITE => {
                std::io::copy(&mut (&mut ours).take(r.length as u64), &mut std::io::sink())?;
                ours.write_all(&nbd::reply(r.handle, nbd::EPERM))?;
            }
            _ => ours.write_all(&nbd::reply(r.handle, nbd::EINVAL))?,
        }
    }
    // Disconnected (shutdown): what the reads fetched is kept for the next boot; an image whose
    // blocks are all here is finished first (`agent shutdown` waits for this process).
    blocks.persist()?;
    if blocks.present.lock().unwrap().iter().all(|&p| p == 1) {
        let _ = fill.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A registry that has nothing: every request answered 404.
    fn empty_registry() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        port
    }

    #[test]
    fn a_block_the_registry_cannot_deliver_is_an_io_error_and_one_here_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("part")).unwrap();
        file.set_len(size).unwrap();
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        let map_file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("map")).unwrap();
        let port = empty_registry();
        let b = Blocks { file, map_file, present: Mutex::new(vec![1, 0]), unsynced: Default::default(), reg: Registry::new(&format!("127.0.0.1:{port}"), &[]).unwrap(), repo: "r".into(), digest: Digest::of_bytes(b"x"), size, fetched: Default::default() };
        assert_eq!(b.read(4096, 4096).unwrap(), data[4096..8192], "a block here is served from the cache");
        assert_eq!(b.read(BLOCK, 4096), Err(nbd::EIO), "a block the registry cannot deliver is an I/O error");
        assert_eq!(b.present.lock().unwrap()[1], 0, "and is not marked present");
        assert_eq!(b.read(size - 4096, 8192), Err(nbd::EINVAL), "past the end");
    }
}
