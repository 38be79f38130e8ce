//! LinuxKit's container model: the keys of a yml entry and of an image's
//! `org.mobyproject.config` label (`spec`), and how LinuxKit turns them into each container's
//! `config.json` and `runtime.json` (`oci`), and its named volumes (`volume`). Pure: the build writes the results into the
//! rootfs, the agent reads them back on the device.

pub mod bundle;
pub mod oci;
pub mod spec;
pub mod volume;

#[cfg(test)]
mod tests;
