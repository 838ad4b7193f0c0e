//! The guest-facing hypercall ABI, shared by the hypervisor and the test guest.
//!
//! Calls follow SMCCC: the function ID in `x0`, arguments in `x1..x5`, results
//! in `x0..x3`. Ours live in the Vendor Specific Hypervisor Service range
//! (owning entity 6), fast calls, SMC64 convention.

/// Base of the vendor-hypervisor fast SMC64 range.
pub const VENDOR_HYP_BASE: u32 = 0xC600_0000;
/// Fork the calling VM: returns the child's id to the parent, 0 to the child.
pub const HVC_FORK: u32 = VENDOR_HYP_BASE | 0x01;
/// Take a snapshot (a frozen fork) of the calling VM; returns its id (and 0
/// when execution later resumes there through HVC_RESTORE).
pub const HVC_SNAPSHOT: u32 = VENDOR_HYP_BASE | 0x02;
/// Reset the calling VM to snapshot `x1` (one taken of the calling VM; any
/// other id gets SMCCC_INVALID_PARAMETER): on success the vCPU that took the
/// snapshot continues after its SNAPSHOT call with x0 = 0 and x1 = the cookie
/// in `x2`; every other vCPU (the caller too, if it is another) continues
/// where the snapshot found it. The call itself does not return.
pub const HVC_RESTORE: u32 = VENDOR_HYP_BASE | 0x03;
/// Return guest RAM `[x1, x1 + x2)` (page aligned) to the hypervisor.
pub const HVC_MEM_RELEASE: u32 = VENDOR_HYP_BASE | 0x04;
/// Statistics: `x1` selects a counter (see [`Stat`]).
pub const HVC_STATS: u32 = VENDOR_HYP_BASE | 0x05;
/// Power the calling VM off with exit status `x1` (0 = success).
pub const HVC_EXIT: u32 = VENDOR_HYP_BASE | 0x06;
/// Returns the calling VM's id.
pub const HVC_VM_ID: u32 = VENDOR_HYP_BASE | 0x07;

/// SMCCC return codes.
pub const SMCCC_SUCCESS: i64 = 0;
/// SMCCC: the function ID is not implemented.
pub const SMCCC_NOT_SUPPORTED: i64 = -1;
/// SMCCC: the call is implemented but has nothing to do on this system.
pub const SMCCC_NOT_REQUIRED: i64 = -2;
/// SMCCC: an argument is out of range or names nothing the caller may use.
pub const SMCCC_INVALID_PARAMETER: i64 = -3;
/// Ours (outside the SMCCC-defined set): the hypervisor lacks memory or ids.
pub const SMCCC_NO_MEMORY: i64 = -4;

/// Counters readable with [`HVC_STATS`].
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// 4 KiB host frames free in the hypervisor's frame allocator.
    FreeFrames = 0,
    /// 4 KiB host frames allocated: guest memory, stage-2 tables and other
    /// hypervisor metadata (total frames minus [`Stat::FreeFrames`]).
    UsedFrames = 1,
    /// Host frames mapped by more than one stage-2 entry (shared copy-on-write
    /// since a fork or snapshot).
    SharedFrames = 2,
    /// Pages mapped in the calling VM's stage 2.
    VmPages = 3,
    /// VMs alive (including snapshots).
    LiveVms = 4,
    /// anon_vmas in use in the reverse map.
    AnonVmas = 5,
    /// anon_vma chains in use in the reverse map.
    Chains = 6,
    /// Successful restores of the calling VM since it was created.
    Restores = 7,
    /// Nanoseconds the hypervisor spent in those restores, from taking the
    /// call to the vCPU's reload (the restore alone, without the guest's own
    /// work between restores).
    RestoreNanos = 8,
}

impl Stat {
    /// The counter with selector `v` (the value a guest passes in `x1`), or
    /// `None` for an unknown selector.
    pub fn from_u64(v: u64) -> Option<Stat> {
        Some(match v {
            0 => Stat::FreeFrames,
            1 => Stat::UsedFrames,
            2 => Stat::SharedFrames,
            3 => Stat::VmPages,
            4 => Stat::LiveVms,
            5 => Stat::AnonVmas,
            6 => Stat::Chains,
            7 => Stat::Restores,
            8 => Stat::RestoreNanos,
            _ => return None,
        })
    }
}

/// The guest DTB carries this node so a guest knows it runs under this
/// hypervisor (and may use the vendor calls above), like Xen's `/hypervisor`.
pub const DT_HYPERVISOR_NODE: &str = "/hypervisor";
/// The `compatible` string of [`DT_HYPERVISOR_NODE`].
pub const DT_HYPERVISOR_COMPATIBLE: &str = "mhv,hypervisor";
