//! What a console command can fail with, as values: the dispatcher prints
//! them (`error: ...`), and the control channel to come can map each to a
//! code instead of parsing text.

use crate::dev::blk::DiskError;
use crate::vm::fork::ForkError;
use crate::vm::VmError;
use core::fmt;
use hypcmd::{Command, ParseError, VmId};

/// A console command's failure.
#[derive(Debug)]
pub enum CmdError {
    /// The line does not parse.
    Parse(ParseError),
    /// No VM has this id.
    NoVm(VmId),
    /// The VM is not in the state the command needs (`pause` of a paused
    /// VM, `resume` of a running one).
    WrongState {
        /// The VM.
        vm: VmId,
        /// What it is not.
        not: &'static str,
    },
    /// Creating a VM failed.
    Vm(VmError),
    /// A fork, snapshot or restore was refused or failed.
    Fork(ForkError),
    /// The address is not a RAM frame the hypervisor manages.
    NotRamFrame(u64),
    /// The physical range is not all RAM.
    NotRam {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The IPA range is not inside the VM's RAM.
    OutsideVmRam {
        /// The VM.
        vm: u32,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A command reached a dispatcher that does not run it (a bug in the
    /// dispatch, reported rather than panicking).
    NotHere(Command),
    /// A benchmark could not set itself up or finish its work (it measures
    /// nothing then).
    Bench(&'static str),
    /// A benchmark's batch did only part of its work.
    BenchShort {
        /// What was short.
        what: &'static str,
        /// How much was done.
        done: u64,
        /// Out of how much.
        of: u64,
    },
    /// No disk was attached at boot.
    NoDisk,
    /// A disk request failed.
    Disk(DiskError),
    /// A snapshot save or load failed (issue 17).
    Persist(crate::persist::PersistError),
    /// `bench disk` read back other bytes than it wrote.
    DiskVerify {
        /// The first sector that differed.
        lba: u64,
    },
    /// A `disk fill` or `bench disk` range holds part of an image a loaded
    /// VM still reads pages from.
    DiskInUse {
        /// The VM.
        vm: u32,
        /// The snapshot it was loaded from.
        name: alloc::string::String,
    },
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::Parse(e) => write!(f, "{e}"),
            CmdError::NoVm(id) => write!(f, "no VM {id} (see `vms`)"),
            CmdError::WrongState { vm, not } => write!(f, "vm {vm} is {not}"),
            CmdError::Vm(e) => write!(f, "{e}"),
            CmdError::Fork(e) => write!(f, "{e}"),
            CmdError::NotRamFrame(pa) => write!(f, "{pa:#x} is not a RAM frame"),
            CmdError::NotRam { start, end } => write!(f, "{start:#x}..{end:#x} is not RAM"),
            CmdError::OutsideVmRam { vm, start, end } => {
                write!(f, "{start:#x}..{end:#x} is outside vm {vm}'s RAM")
            }
            CmdError::NotHere(cmd) => write!(f, "`{cmd}` is not a memory command"),
            CmdError::Bench(why) => f.write_str(why),
            CmdError::BenchShort { what, done, of } => write!(f, "{what} only {done} of {of}"),
            CmdError::NoDisk => {
                f.write_str("no disk: none was attached at boot (`cargo xtask run --disk FILE`)")
            }
            CmdError::Disk(e) => write!(f, "{e}"),
            CmdError::Persist(e) => write!(f, "{e}"),
            CmdError::DiskVerify { lba } => {
                write!(
                    f,
                    "disk: sector {lba} read back other bytes than were written"
                )
            }
            CmdError::DiskInUse { vm, name } => write!(
                f,
                "those sectors hold snapshot '{name}' (or its parents), which vm {vm} was loaded from and still reads pages from: writing them would stop it"
            ),
        }
    }
}

impl From<ForkError> for CmdError {
    fn from(e: ForkError) -> Self {
        CmdError::Fork(e)
    }
}

impl From<VmError> for CmdError {
    fn from(e: VmError) -> Self {
        CmdError::Vm(e)
    }
}

impl From<DiskError> for CmdError {
    fn from(e: DiskError) -> Self {
        CmdError::Disk(e)
    }
}

impl From<ParseError> for CmdError {
    fn from(e: ParseError) -> Self {
        CmdError::Parse(e)
    }
}
