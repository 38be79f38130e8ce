//! Fetching every blob a set of images needs into the cache ahead of use: in parallel, one
//! progress bar per blob in flight, each blob verified before it is kept. Offline, the same walk
//! lists what is missing instead.

use crate::oci::ResolvedImage;
use crate::base::progress::Progress;
use anyhow::bail;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Downloads at once (what skopeo and the docker daemon default to is 3–6).
pub const JOBS: usize = 4;

#[derive(Debug, Default, Serialize)]
pub struct PullStats {
    pub blobs: usize,
    pub fetched: usize,
    pub fetched_bytes: u64,
    pub cached_bytes: u64,
}

struct Job<'a> {
    img: &'a ResolvedImage,
    digest: &'a crate::base::hash::Digest,
    size: u64,
}

fn jobs<'a>(images: &[&'a ResolvedImage]) -> Vec<Job<'a>> {
    let mut seen = BTreeMap::new();
    for img in images {
        for l in &img.layers {
            seen.entry(l.digest.as_str()).or_insert(Job { img, digest: &l.digest, size: l.size });
        }
    }
    seen.into_values().collect()
}

/// Blobs of `images` that are not local, each with the reference that needs it.
pub fn missing(images: &[&ResolvedImage]) -> Vec<String> {
    jobs(images)
        .into_iter()
        .filter(|j| !j.img.source.is_cached(j.digest))
        .map(|j| format!("{} ({} bytes), needed by {}", j.digest, j.size, j.img.reference))
        .collect()
}

/// Fetch every layer of `images` not yet local.
pub fn prefetch(images: &[&ResolvedImage], progress: Progress) -> anyhow::Result<PullStats> {
    let all = jobs(images);
    let mut stats = PullStats { blobs: all.len(), ..Default::default() };
    let todo: Vec<Job> = all
        .into_iter()
        .filter(|j| {
            let cached = j.img.source.is_cached(j.digest);
            if cached {
                stats.cached_bytes += j.size;
            }
            !cached
        })
        .collect();
    stats.fetched = todo.len();
    stats.fetched_bytes = todo.iter().map(|j| j.size).sum();
    let queue = Mutex::new(todo);
    let errors = Mutex::new(Vec::new());
    let multi = progress.multi();
    std::thread::scope(|s| {
        for _ in 0..JOBS {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().pop() else { break };
                let pb = multi.add(progress.bar(&job.digest.hex()[..12], job.size, true));
                let r = job.img.source.prefetch(job.digest, job.size, &|n| pb.inc(n));
                pb.finish_and_clear();
                if let Err(e) = r {
                    errors.lock().unwrap().push(format!("{}: {e:#}", job.img.reference));
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        bail!("fetching blobs failed:\n  {}", errors.join("\n  "));
    }
    Ok(stats)
}
