//! The agent's protocol, as types: the event lines it prints (`@slotforge {...}`), the status
//! document (`agent status`, the `status` event), the states inside them, the apply steps and
//! the reports of apply and GC. The agent (device wing) emits them, the harness and the tests
//! parse them — one definition. Schema and its version: docs/agent.md#protocol.

pub mod events;
pub mod status;

/// Version of the protocol. Additions (a new event, a new optional field) keep the version; a
/// reader keeps what it does not know (`Received::event` is `None`, the JSON is kept). A change
/// of meaning or a removed field bumps it.
pub const API_VERSION: u32 = 1;

pub use events::{Event, Kind, Received};
pub use status::{ApplyReport, ApplyStep, PullReport, PulledImage, BootState, GcReport, ImageState, ImageStatus, RootDevice, SealedState, SlotState, Status, StatusState};
