//! Semihosting exit, so the hypervisor's status becomes QEMU's exit status
//! (`-semihosting-config enable=on,target=native`).

/// SYS_EXIT_EXTENDED.
const SYS_EXIT_EXTENDED: u64 = 0x20;
/// ADP_Stopped_ApplicationExit.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// Ends the machine with `code`. Falls back to PSCI SYSTEM_OFF (exit status
/// 0 from QEMU) if semihosting is disabled, so never call this with a failure
/// without having printed why.
pub fn exit(code: u32) -> ! {
    let block = [ADP_STOPPED_APPLICATION_EXIT, code as u64];
    // SAFETY: the semihosting trap reads the two-word parameter block, which
    // lives on this stack for the duration of the call.
    unsafe {
        core::arch::asm!("hlt #0xf000", in("x0") SYS_EXIT_EXTENDED, in("x1") block.as_ptr(), options(nostack));
    }
    let _ = smccc::psci::system_off::<smccc::Smc>();
    loop {
        crate::arch::wfi();
    }
}
