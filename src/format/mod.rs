//! On-disk and on-wire formats, each a reader and a writer over plain data with no policy of
//! when or where: the disk layout and GPT, FAT and the ESP, boot entries and UKIs, the kernel
//! command line, filesystem trees and squashfs, dm-verity, sealed images, the images partition's
//! OCI layout, the rootfs's own metadata, update bundles and their signatures, the installer
//! payload, bmap, dm-log-writes logs, device-mapper's verity requests and the loop driver's attach request, the NBD transmission protocol, and the agent's event protocol. `inspect` reads a whole
//! disk back through them. Formats import only `base` and the `oci` library — never a wing.

pub mod bmap;
pub mod bundle;
pub mod casync;
pub mod cmdline;
pub mod disk;
pub mod dm;
pub mod entries;
pub mod esp;
pub mod agent;
pub mod fat;
pub mod images;
pub mod inspect;
pub mod installer;
pub mod layout;
pub mod logwrites;
pub mod loopdev;
pub mod nbd;
pub mod packs;
pub mod published;
pub mod release;
pub mod sealed;
pub mod signature;
pub mod squashfs;
pub mod tree;
pub mod uki;
pub mod verity;
