//! The agent's event lines: `@slotforge {"event": NAME, ...}`, one per line on the console,
//! among firmware output (ANSI escapes, `\r`) and kernel messages. [`Event`] is every event
//! this version knows — the agent's and the reference init's — with its fields; [`parse`]
//! reads a serial log into [`Received`] lines, typed where known and kept whole where not (a
//! newer agent's event is not dropped). Parsed as JSON, never grepped as prose.

use super::status::{ApplyReport, ApplyStep, GcReport, ImageStatus, SealedState, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

pub const MARKER: &str = "@slotforge ";

/// Every event of protocol version [`super::API_VERSION`] (docs/agent.md#events). `Kind` is the
/// same list without fields, for asking "is there an X?".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::EnumDiscriminants)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[strum_discriminants(name(Kind), derive(strum::EnumString, strum::IntoStaticStr, strum::VariantArray, Hash))]
#[strum_discriminants(strum(serialize_all = "kebab-case"))]
pub enum Event {
    // -- agent boot --
    /// The agent began its boot sequence on `slot`.
    AgentStart { slot: Option<String>, version: String, build_id: String, images: usize },
    /// The other slot's entry ran out of tries: systemd-boot fell back to this one.
    RolledBack { from_slot: String, from_build: Option<String>, entry: Option<String>, to_slot: Option<String> },
    /// One external image checked against the digests the rootfs pins.
    ImageCheck { name: String, digest: String, state: ImageStatus, detail: Option<String>, bytes: u64, seconds: f64 },
    /// A missing or corrupt image fetched (or rebuilt) and checked again.
    ImagePulled { name: String, digest: String, bytes: u64, state: ImageStatus, sealed: Option<String> },
    /// Offline: not fetched.
    ImagePullSkipped { name: String, reason: String, error: String },
    ImagePullFailed { name: String, digest: String, error: String },
    /// A sealed image rebuilt from layers the device holds (no network).
    ImageResealed { name: String, root_hash: String, bytes: u64, from: String },
    ImageResealFailed { name: String, error: String },
    /// A missing sealed image exposed at once from its registry (`from`: `HOST/REPO`) as the
    /// network block device `device`, opened with dm-verity under the pinned root hash: blocks
    /// are fetched as they are read and kept, and the rest is filled in the background.
    ImageLazy { name: String, device: String, from: String, seconds: f64 },
    /// A missing sealed image could not be started lazily (no registry has its sealed artifact,
    /// no NBD device, ...): it is fetched whole before its service starts.
    ImageLazyUnavailable { name: String, error: String },
    /// A lazily started image is complete on the images partition (whole digest checked):
    /// `bytes_fetched` over the whole fill, `seconds` since it was exposed.
    ImageFilled { name: String, bytes_fetched: u64, seconds: f64 },
    /// The background fill stopped (the image stays exposed; what arrived is kept).
    ImageFillFailed { name: String, error: String },
    /// Made ready for its container: a sealed image opened and mounted, an unsealed one unpacked.
    ImageReady { name: String, path: PathBuf, sealed: Option<SealedState>, seconds: f64 },
    ImagePrepareFailed { name: String, error: String },
    /// Every image checked, fetched and made ready (or given up on).
    ImagesReady { images: usize, ready: usize, seconds: f64 },
    /// The booted entry's boot counter dropped (`entry`: its new name; none if it had none).
    MarkedGood { entry: Option<String> },
    MarkGoodFailed { error: String },
    /// Image sets no slot needs were dropped.
    Gc(GcReport),
    GcFailed { error: String },
    /// These images are not available: their services will not start.
    Degraded { unavailable: Vec<String> },
    /// The final status of `agent boot` (or after a scrub that repaired something).
    Status(Status),
    // -- containers --
    /// A LinuxKit volume made ready at `/containers/volumes/NAME/merged` before the onboot
    /// `agent run` began: its onboot containers and services to start.
    RunStart { onboot: usize, services: usize },
    /// containers: an overlay with a tmpfs upper layer, or (read-only) its contents bound read-only.
    VolumeMounted { name: String, readonly: bool },
    VolumeFailed { name: String, error: String },
    ImageMountFailed { name: String, error: String },
    OnbootExited { name: String, external: bool, status: Option<i32>, stdout: String, stderr: String },
    OnbootFailed { name: String, external: bool, error: String },
    OnbootSkipped { name: String, external: bool, reason: String },
    OnshutdownExited { name: String, external: bool, status: Option<i32>, stdout: String, stderr: String },
    OnshutdownFailed { name: String, external: bool, error: String },
    ServiceStarted {
        name: String,
        external: bool,
        pid: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart: Option<String>,
    },
    ServiceFailed { name: String, external: bool, error: String },
    ServiceSkipped { name: String, external: bool, reason: String },
    /// Still running when the settle window ended.
    ServiceRunning { name: String, external: bool, pid: i32 },
    /// A service that finished within the settle window.
    ServiceExited { name: String, external: bool, status: Option<i32>, stdout: String, stderr: String },
    /// A sealed image read end to end through dm-verity.
    ImageScrubbed { name: String, ok: bool, bytes: Option<u64>, error: Option<String>, seconds: f64 },
    /// dm-verity refused a read of this sealed image.
    ImageCorrupt { name: String, root_hash: String, device: String },
    /// Rebuilt, reopened under the pinned root hash.
    ImageRepaired { name: String, root_hash: String },
    /// `agent shutdown`: services stopped, images unbound, sealed images closed.
    Released { sealed_still_open: Vec<String> },
    // -- updates --
    ApplyStart { build_id: String, version: String },
    ApplyStep { step: ApplyStep },
    /// A test hook held the apply at `step` (`--pause-at`).
    Paused { step: ApplyStep },
    Applied(ApplyReport),
    ApplyFailed { error: String },
    // -- installer --
    InstallRefused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        error: String,
    },
    InstallStart { target: PathBuf, size: u64, build_id: String, bytes: u64 },
    InstallProgress { percent: u64, bytes: u64 },
    Installed { target: PathBuf, bytes: u64, disk_size: u64, seconds: f64 },
    // -- the reference initramfs and init (shell; docs/boot.md) --
    /// The initramfs found the slot's root device.
    Initramfs { root: String, device: String },
    InitramfsFailed { root: String, why: String },
    /// dm-verity opened over the root (veritysetup's status line).
    Verity { root_hash: String, hash_offset: String, status: String },
    /// `fsck.fat -a` repaired the ESP before it was mounted.
    EspRepaired { fsck_exit: i32, lines: u64 },
    /// tmpfs use after the agent ran (KiB), and how many sealed images are mounted.
    Memory { run_kb: u64, shmem_kb: u64, sealed_mounts: u64 },
    /// The init's own namespaces (a container must not share them unless asked).
    HostNs {
        net: String,
        pid: String,
        uts: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    Poweroff,
    Reboot,
}

impl Event {
    /// The event's name on the wire.
    pub fn name(&self) -> &'static str {
        Kind::from(self).name()
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// One event line as read: typed when this version knows it, and its JSON kept either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// `None`: an event (or a form of one) this version does not know, from a newer agent.
    pub event: Option<Event>,
    pub json: Value,
}

impl Received {
    pub fn from_json(json: Value) -> Self {
        let event = serde_json::from_value(json.clone()).ok();
        Self { event, json }
    }
    /// The name on the wire, known or not.
    pub fn name(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }
    pub fn is(&self, k: Kind) -> bool {
        self.event.as_ref().is_some_and(|e| Kind::from(e) == k)
    }
}

/// A field of the event's JSON (`Value::Null` if absent).
impl std::ops::Index<&str> for Received {
    type Output = Value;
    fn index(&self, k: &str) -> &Value {
        &self.json[k]
    }
}

impl std::fmt::Display for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.json)
    }
}

/// The line the agent prints for `e`.
pub fn line(e: &Event) -> String {
    format!("{MARKER}{}\n", serde_json::to_string(e).expect("serialisable"))
}

/// [`line`] with `uptime`: the device's seconds since boot when it was emitted (readers that
/// time a boot — lazy start — use it; the others ignore it).
pub fn line_at(e: &Event, uptime: f64) -> String {
    let mut v = serde_json::to_value(e).expect("serialisable");
    if let Some(o) = v.as_object_mut() {
        o.insert("uptime".into(), serde_json::json!((uptime * 1000.0).round() / 1000.0));
    }
    format!("{MARKER}{v}\n")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Every event in `serial`, in order. Lines a kernel message broke are skipped.
pub fn parse(serial: &str) -> Vec<Received> {
    let clean = strip_ansi(serial);
    clean
        .lines()
        .filter_map(|l| l.find(MARKER).map(|i| &l[i + MARKER.len()..]))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .filter(|v| v.get("event").and_then(Value::as_str).is_some())
        .map(Received::from_json)
        .collect()
}

/// Events of kind `k`.
pub fn named(events: &[Received], k: Kind) -> Vec<&Received> {
    events.iter().filter(|e| e.is(k)).collect()
}

/// The typed events of `events` (unknown ones left out).
pub fn known(events: &[Received]) -> impl Iterator<Item = &Event> {
    events.iter().filter_map(|e| e.event.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::agent::status::*;
    use crate::format::signature::Decision;

    #[test]
    fn events_among_firmware_noise_typed_and_unknown_kept() {
        let s = "\u{1b}[2J\u{1b}[01;01HBdsDxe: loading\r\n[    2.1] EXT4-fs mounted\r\n@slotforge {\"event\":\"marked-good\",\"entry\":\"slot-b.conf\"}\r\nnoise @slotforge {\"event\":\"from-the-future\",\"x\":1}\r\n@slotforge {\"event\":\"broken\"[  3.0] oops\r\n@slotforge {\"event\":\"reboot\"}\n";
        let e = parse(s);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].event, Some(Event::MarkedGood { entry: Some("slot-b.conf".into()) }));
        assert_eq!(e[1].event, None, "unknown to this version");
        assert_eq!((e[1].name(), &e[1]["x"]), ("from-the-future", &Value::from(1)), "but kept");
        assert!(e[2].is(Kind::Reboot));
        assert_eq!(named(&e, Kind::MarkedGood).len(), 1);
    }

    #[test]
    fn every_kind_names_a_serde_variant() {
        use strum::VariantArray;
        for k in Kind::VARIANTS {
            // serde knows the name (an error about a missing field, not an unknown variant)...
            let err = serde_json::from_value::<Event>(serde_json::json!({"event": k.name()})).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!err.contains("unknown variant"), "{}: {err}", k.name());
            // ...and the name parses back to the same kind.
            assert_eq!(k.name().parse::<Kind>().unwrap(), *k);
        }
        assert!(serde_json::from_value::<Event>(serde_json::json!({"event": "no-such-event"})).unwrap_err().to_string().contains("unknown variant"));
    }

    #[test]
    fn every_event_round_trips_under_its_wire_name() {
        let status = Status { slot: Some("a".into()), version: "1".into(), build_id: "b".into(), state: StatusState::Degraded, slots: vec![SlotState { slot: "b".into(), entry: Some("slot-b+0-3.conf".into()), boot: BootState::Bad, tries_left: Some(0), tries_done: Some(3) }], images: vec![ImageState { name: "x".into(), digest: "sha256:1".into(), state: ImageStatus::Missing, detail: None, bad_blobs: vec![], bytes: 0, sealed: None }], root_device: None, secure_boot: None };
        let samples = vec![
            Event::Status(status),
            Event::ApplyStep { step: ApplyStep::SlotWritten },
            Event::Applied(ApplyReport { slot: "b".into(), build_id: "x".into(), version: "2".into(), install_number: 2, entry: "slot-b+3.conf".into(), blobs_present: 1, blobs_written: 2, image_bytes_written: 3, rootfs_bytes: 4, images_to_pull: vec![], signature: Decision::Unchecked, root_hash: None, delta: None, pulled: None }),
            Event::Gc(GcReport::default()),
            Event::ServiceStarted { name: "s".into(), external: true, pid: 7, restart: None },
            Event::ImageLazy { name: "s".into(), device: "/dev/nbd0".into(), from: "r/s".into(), seconds: 0.5 },
            Event::ImageFilled { name: "s".into(), bytes_fetched: 9, seconds: 3.0 },
            Event::Poweroff,
        ];
        for e in samples {
            let l = line(&e);
            let v: Value = serde_json::from_str(l.trim_start_matches(MARKER).trim()).unwrap();
            assert_eq!(v["event"], e.name(), "{l}");
            assert_eq!(parse(&l)[0].event.as_ref(), Some(&e), "{l}");
            // As the device emits it: with its uptime, which readers of the event ignore.
            let at = parse(&line_at(&e, 12.3456));
            assert_eq!((at[0].event.as_ref(), &at[0].json["uptime"]), (Some(&e), &serde_json::json!(12.346)));
        }
        // The wire forms the docs show.
        assert_eq!(Kind::ApplyFailed.name(), "apply-failed");
        assert_eq!(serde_json::to_value(Event::ApplyStep { step: ApplyStep::EntryWritten }).unwrap(), serde_json::json!({"event": "apply-step", "step": "entry-written"}));
        assert_eq!(serde_json::to_value(Event::Status(Status { slot: None, version: String::new(), build_id: String::new(), state: StatusState::Ok, slots: vec![], images: vec![], root_device: None, secure_boot: None })).unwrap()["state"], "ok");
    }
}
