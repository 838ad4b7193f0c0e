//! What `hvcfuzz` knows each answer must be, whatever else races with it.
//! Only answers that cannot depend on timing are checked: a refusal the
//! hypervisor owes an argument it must reject, an identity, a counter range.

use super::gen::{self, Call, Ctx, PSCI_VERSION};
use platform::abi::{
    HVC_FORK, HVC_MEM_RELEASE, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS, HVC_VM_ID,
    SMCCC_INVALID_PARAMETER, SMCCC_NOT_SUPPORTED, SMCCC_NO_MEMORY, VENDOR_HYP_BASE,
};

/// The answer `call` got is impossible: what it should have been.
pub fn check(call: &Call, r: i64, ctx: &Ctx) -> Option<&'static str> {
    let x = &call.x;
    let fid = call.fid();
    let ok = match fid {
        HVC_VM_ID => r as u64 == ctx.me || r as u64 == super::vm_id(),
        HVC_STATS if x[1] <= 8 => r >= 0,
        HVC_STATS => r == SMCCC_INVALID_PARAMETER,
        HVC_RESTORE if gen::surely_no_snapshot(x[1], ctx.me) => r == SMCCC_INVALID_PARAMETER,
        HVC_RESTORE => r == SMCCC_INVALID_PARAMETER || r == SMCCC_NO_MEMORY,
        HVC_MEM_RELEASE if gen::release_valid(ctx, x[1], x[2]) => r == 0 || r == SMCCC_NO_MEMORY,
        HVC_MEM_RELEASE => r == SMCCC_INVALID_PARAMETER,
        HVC_FORK | HVC_SNAPSHOT => r >= 0 || r == SMCCC_NO_MEMORY,
        PSCI_VERSION => r == 0x1_0000,
        f if f & 0xFFFF_FF00 == VENDOR_HYP_BASE && !(1..=7).contains(&(f & 0xff)) => {
            r == SMCCC_NOT_SUPPORTED
        }
        _ => true,
    };
    (!ok).then(|| expected(fid, x[1], ctx))
}

fn expected(fid: u32, a1: u64, ctx: &Ctx) -> &'static str {
    match fid {
        HVC_VM_ID => "the caller's VM id",
        HVC_STATS if a1 <= 8 => "a counter value (>= 0)",
        HVC_RESTORE if gen::surely_no_snapshot(a1, ctx.me) => {
            "INVALID_PARAMETER (no such snapshot)"
        }
        HVC_RESTORE => "INVALID_PARAMETER or NO_MEMORY",
        HVC_MEM_RELEASE => "0/NO_MEMORY for a valid range, else INVALID_PARAMETER",
        HVC_FORK | HVC_SNAPSHOT => "an id or NO_MEMORY",
        PSCI_VERSION => "PSCI 1.0",
        _ => "INVALID_PARAMETER / NOT_SUPPORTED",
    }
}
