//! QEMU harness: placeholder crate until the harness issue lands.
