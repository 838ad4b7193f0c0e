//! `persist`: VM snapshots that outlive the machine (issue 17). May use
//! `arch`, `mm`, `dev`, `vdev` and `vm`; only `console` and `main` use it.
//!
//! The disk (`dev::blk`) holds a `snapfile` store (docs/SNAPSHOT-FORMAT.md);
//! `disk` adapts the driver to snapfile's `BlockDevice` and opens the store,
//! formatting an unformatted disk. `state` is the VM-state blob an image
//! carries (vCPUs, vGIC, virtual timer, UART, shape). `save` writes a VM
//! through a frozen copy-on-write snapshot of it, so the VM pauses only for
//! the fork; `load` creates a VM whose every saved page is to be a swap
//! entry naming its image page (`mm::diskpages`, written per 2 MiB chunk on
//! first touch), so the ordinary stage-2 fault path reads pages from the
//! disk as the guest touches them, records the order it touched them in
//! (saved with its next image, REAP's working set), and `prefetch` loads
//! the rest in the background, on idle CPUs, in that order (`ahead`: its
//! read-ahead). `images` lists the store and deletes from it.

mod ahead;
pub mod disk;
mod helper;
pub mod images;
pub mod load;
mod lz4judge;
pub mod prefetch;
mod reap;
pub mod save;
pub mod state;
mod walk;

use core::fmt;

/// Why a save or load did not happen. Each leaves every running VM as it
/// was (a load that fails after creating its VM stops that VM).
#[derive(Debug)]
pub enum PersistError {
    /// No disk was attached at boot.
    NoDisk,
    /// The disk is read-only.
    ReadOnly,
    /// The store refused or failed (checksums, versions, space, names).
    Store(snapfile::Error),
    /// The image's VM state is not one this hypervisor restores.
    BadState(&'static str),
    /// The VM cannot be saved or loaded as asked.
    Refused(&'static str),
    /// A diff was asked for against another save than the VM's dirty log
    /// is relative to.
    NotParent {
        /// The parent asked for.
        asked: alloc::string::String,
        /// The save the log is relative to, if any.
        last: Option<alloc::string::String>,
    },
    /// Forking the VM for its snapshot failed.
    Fork(crate::vm::fork::ForkError),
    /// Creating the VM failed.
    Vm(crate::vm::VmError),
    /// A page could not be read back from a VM being saved.
    Page(&'static str),
    /// A VM loaded from the image still reads pages from it.
    InUse {
        /// The VM.
        vm: u32,
    },
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::NoDisk => f.write_str(
                "no disk: none was attached at boot (`cargo xtask run --disk FILE`)",
            ),
            PersistError::ReadOnly => f.write_str("the disk is read-only"),
            PersistError::Store(e) => write!(f, "snapshot store: {e}"),
            PersistError::BadState(why) => write!(f, "the image's VM state is refused: {why}"),
            PersistError::Refused(why) => f.write_str(why),
            PersistError::NotParent { asked, last } => match last {
                Some(l) => write!(
                    f,
                    "the VM's dirty log is relative to its save '{l}', not '{asked}': save it in full, or diff against '{l}'"
                ),
                None => write!(
                    f,
                    "the VM's dirty log is relative to no save of it ('{asked}' is not its last save): save it in full first"
                ),
            },
            PersistError::Fork(e) => write!(f, "{e}"),
            PersistError::Vm(e) => write!(f, "{e}"),
            PersistError::Page(why) => f.write_str(why),
            PersistError::InUse { vm } => write!(
                f,
                "vm {vm} was loaded from this image and still reads pages from it (it lets go once every page is in, or when the VM and its forks are gone)"
            ),
        }
    }
}

impl From<snapfile::Error> for PersistError {
    fn from(e: snapfile::Error) -> Self {
        PersistError::Store(e)
    }
}

impl From<crate::vm::fork::ForkError> for PersistError {
    fn from(e: crate::vm::fork::ForkError) -> Self {
        PersistError::Fork(e)
    }
}

impl From<crate::vm::VmError> for PersistError {
    fn from(e: crate::vm::VmError) -> Self {
        PersistError::Vm(e)
    }
}
