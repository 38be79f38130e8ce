//! Which crash states to rebuild from a write log — pure. A power cut leaves on stable storage
//! every write that completed before the last completed flush; of the writes since, a disk with a
//! volatile write cache may have persisted any subset, and a multi-sector write only some of its
//! sectors (sectors are atomic, requests are not). So the states are: the disk at every flush
//! boundary (all of them), and between two flushes a prefix of the writes (the last one possibly
//! torn) and random subsets of them — all, or a seeded sample.

use crate::format::logwrites::Log;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Everything up to a flush (or the whole log, or nothing of it).
    Flush,
    /// The first writes since the last flush, in order.
    Prefix,
    /// A prefix whose last write persisted only its first sectors.
    Torn,
    /// Any subset of the writes since the last flush (reordered by the write cache).
    Subset,
}

/// One crash state: entries `0..base` in full, then `extra` (indices ≥ base, in log order), the
/// last of them cut to `torn` sectors when set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct State {
    pub kind: Kind,
    pub base: usize,
    pub extra: Vec<usize>,
    pub torn: Option<u64>,
    /// Flush boundaries passed (0: before the first flush).
    pub interval: usize,
}

impl State {
    /// `flush 3`, `prefix 3+5`, `torn 3+5@2`, `subset 3+{1,4}` — interval, writes since, sectors.
    pub fn label(&self) -> String {
        match self.kind {
            Kind::Flush => format!("flush {} (entry {})", self.interval, self.base),
            Kind::Prefix => format!("prefix {}+{}", self.interval, self.extra.len()),
            Kind::Torn => format!("torn {}+{}@{}", self.interval, self.extra.len(), self.torn.unwrap_or(0)),
            Kind::Subset => format!("subset {}+{{{}}}", self.interval, self.extra.iter().map(|i| (i - self.base).to_string()).collect::<Vec<_>>().join(",")),
        }
    }
}

/// How many states to take between two flushes.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Prefixes per interval (`None`: every one); each also torn at a random sector when its
    /// last write spans more than one.
    pub prefixes: Option<usize>,
    /// Random subsets per interval.
    pub subsets: usize,
    pub seed: u64,
    /// The medium's atomic write unit, in log sectors: a write tears only at a multiple of it
    /// (8 = 4 KiB, what flash and 4Kn/512e disks persist whole; 1 = a 512-byte-sector disk).
    pub atomic: u64,
    /// Tear each prefix's last write at every atomic-unit boundary (up to [`MAX_TEARS`] per
    /// write, evenly spaced, the first and last always), instead of at one random boundary.
    pub every_tear: bool,
}

/// Tear points per write in a full run: every boundary of a write up to 64 atomic units
/// (256 KiB at 4 KiB), 64 evenly spaced ones — the first and the last included — beyond.
pub const MAX_TEARS: usize = 64;

/// The tear points a full run takes of `at` (every atomic boundary of one write, ascending).
pub fn spread(at: &[u64]) -> Vec<u64> {
    if at.len() <= MAX_TEARS {
        return at.to_vec();
    }
    let mut v: Vec<u64> = (0..MAX_TEARS).map(|k| at[k * (at.len() - 1) / (MAX_TEARS - 1)]).collect();
    v.dedup();
    v
}

impl Sampling {
    /// Every prefix, each torn at every atomic boundary of its last write (see [`MAX_TEARS`]),
    /// 8 subsets per interval: the full run.
    pub fn full(seed: u64) -> Self {
        Sampling { prefixes: None, subsets: 8, seed, atomic: 8, every_tear: true }
    }
    /// A bounded sample (CI): 2 prefixes and 2 subsets per interval.
    pub fn sample(seed: u64) -> Self {
        Sampling { prefixes: Some(2), subsets: 2, seed, atomic: 8, every_tear: false }
    }
}

/// splitmix64: a seeded, dependency-free stream for choosing samples reproducibly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every state to check, in log order (a state's base never decreases), each distinct.
pub fn plan(log: &Log, s: &Sampling) -> Vec<State> {
    let mut rng = Rng(s.seed);
    let n = log.entries.len();
    // Boundaries: before the log, after each flush, after the whole log.
    let mut bounds = vec![0];
    bounds.extend(log.entries.iter().enumerate().filter(|(_, e)| e.is_flush()).map(|(i, _)| i + 1));
    bounds.push(n);
    bounds.dedup();
    let writes_in = |a: usize, b: usize| -> Vec<usize> { (a..b).filter(|&i| log.entries[i].is_write()).collect() };
    let mut out: Vec<State> = Vec::new();
    let mut last_writes = usize::MAX;
    for (k, &b) in bounds.iter().enumerate() {
        // A boundary with no write since the previous one is the same disk: listed once.
        let total = writes_in(0, b).len();
        if total != last_writes {
            out.push(State { kind: Kind::Flush, base: b, extra: vec![], torn: None, interval: k });
            last_writes = total;
        }
        let Some(&next) = bounds.get(k + 1) else {
            break;
        };
        let w = writes_in(b, next);
        // Where a write can tear: after t sectors, 0 < t < its length, at an atomic boundary.
        let tears = |i: usize| -> Vec<u64> {
            let e = &log.entries[i];
            let a = s.atomic.max(1);
            (1..e.sectors).filter(|t| (e.sector + t) % a == 0).collect()
        };
        if w.len() < 2 && !w.first().is_some_and(|&i| !tears(i).is_empty()) {
            continue;
        }
        // Prefixes of 1..len writes; the full one only torn (untorn it is the next boundary).
        let mut lens: Vec<usize> = (1..=w.len()).collect();
        if let Some(p) = s.prefixes {
            let mut pick = Vec::new();
            while pick.len() < p.min(lens.len()) {
                let l = lens[rng.below(lens.len() as u64) as usize];
                if !pick.contains(&l) {
                    pick.push(l);
                }
            }
            pick.sort();
            lens = pick;
        }
        for l in lens {
            if l < w.len() {
                out.push(State { kind: Kind::Prefix, base: b, extra: w[..l].to_vec(), torn: None, interval: k });
            }
            let at = tears(w[l - 1]);
            let points = if s.every_tear {
                spread(&at)
            } else if at.is_empty() {
                vec![]
            } else {
                vec![at[rng.below(at.len() as u64) as usize]]
            };
            for t in points {
                out.push(State { kind: Kind::Torn, base: b, extra: w[..l].to_vec(), torn: Some(t), interval: k });
            }
        }
        // Subsets that are neither empty, whole, nor a prefix (those are listed already).
        let mut seen: Vec<Vec<usize>> = Vec::new();
        let mut tries = 0;
        while seen.len() < s.subsets && tries < s.subsets * 8 && w.len() >= 2 {
            tries += 1;
            let sub: Vec<usize> = w.iter().copied().filter(|_| rng.below(2) == 1).collect();
            let is_prefix = w.starts_with(&sub);
            if sub.is_empty() || sub.len() == w.len() || is_prefix || seen.contains(&sub) {
                continue;
            }
            seen.push(sub.clone());
            out.push(State { kind: Kind::Subset, base: b, extra: sub, torn: None, interval: k });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::logwrites::{Entry, FLUSH};

    fn log(spec: &str) -> Log {
        // `w` a one-sector write, `W` an eight-sector one, `f` a flush.
        let entries = spec
            .chars()
            .map(|c| match c {
                'w' => Entry { sector: 0, sectors: 1, flags: 0, data_at: 0, mark: None },
                'W' => Entry { sector: 0, sectors: 8, flags: 0, data_at: 0, mark: None },
                _ => Entry { sector: 0, sectors: 0, flags: FLUSH, data_at: 0, mark: None },
            })
            .collect();
        Log { sector_size: 512, entries }
    }

    #[test]
    fn every_flush_boundary_once_and_every_prefix_in_a_full_run() {
        let l = log("wwfwwwffw");
        let p = plan(&l, &Sampling { prefixes: None, subsets: 0, seed: 1, atomic: 1, every_tear: true });
        let flush: Vec<usize> = p.iter().filter(|s| s.kind == Kind::Flush).map(|s| s.base).collect();
        // Before anything, after each flush (the third adds nothing), after the log.
        assert_eq!(flush, vec![0, 3, 7, 9]);
        let prefixes: Vec<(usize, usize)> = p.iter().filter(|s| s.kind == Kind::Prefix).map(|s| (s.base, s.extra.len())).collect();
        assert_eq!(prefixes, vec![(0, 1), (3, 1), (3, 2)]);
        assert!(p.windows(2).all(|w| w[0].base <= w[1].base), "log order");
        assert!(p.iter().all(|s| s.torn.is_none()), "one-sector writes cannot tear");
    }

    #[test]
    fn torn_writes_and_subsets_are_distinct_and_reproducible() {
        let l = log("WwWwwWf");
        let full = Sampling { atomic: 1, ..Sampling::full(7) };
        let a = plan(&l, &full);
        assert_eq!(a, plan(&l, &full), "same seed, same states");
        let torn: Vec<&State> = a.iter().filter(|s| s.kind == Kind::Torn).collect();
        // Three prefixes end in an eight-sector write (the whole interval included), each torn
        // at every one of its 7 inner sector boundaries.
        assert_eq!(torn.len(), 3 * 7, "every tear point of every prefix");
        for len in [1, 3, 6] {
            let at: Vec<u64> = torn.iter().filter(|s| s.extra.len() == len).map(|s| s.torn.unwrap()).collect();
            assert_eq!(at, (1..8).collect::<Vec<u64>>(), "prefix of {len}");
        }
        // The sample tears each prefix once, at a random boundary.
        let one = plan(&l, &Sampling { atomic: 1, ..Sampling::sample(7) });
        assert!(one.iter().filter(|s| s.kind == Kind::Torn).count() <= 2);
        // 4 KiB atomic: an aligned eight-sector write never tears, a misaligned one at the boundary.
        assert!(plan(&l, &Sampling::full(7)).iter().all(|s| s.kind != Kind::Torn));
        let mut m = log("Wf");
        m.entries[0].sector = 5;
        let t: Vec<Option<u64>> = plan(&m, &Sampling::full(7)).iter().filter(|s| s.kind == Kind::Torn).map(|s| s.torn).collect();
        assert_eq!(t, vec![Some(3)], "sector 5 + 3 = 8");
        let subs: Vec<&Vec<usize>> = a.iter().filter(|s| s.kind == Kind::Subset).map(|s| &s.extra).collect();
        assert!(!subs.is_empty() && subs.len() <= 8);
        for (i, s) in subs.iter().enumerate() {
            assert!(!s.is_empty() && s.len() < 6 && !(0..6).collect::<Vec<_>>().starts_with(s));
            assert!(!subs[..i].contains(s), "distinct");
        }
        let sample = plan(&l, &Sampling { atomic: 1, ..Sampling::sample(7) });
        assert_eq!(sample.iter().filter(|s| s.kind == Kind::Prefix).count(), 2);
        assert!(sample.len() < a.len());
    }

    #[test]
    fn a_long_write_is_torn_at_64_spread_points_first_and_last_included() {
        let at: Vec<u64> = (1..1000).collect();
        let v = spread(&at);
        assert_eq!(v.len(), MAX_TEARS);
        assert_eq!((v[0], v[MAX_TEARS - 1]), (1, 999));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(spread(&at[..64]), at[..64].to_vec(), "up to 64: every one");
    }
}
