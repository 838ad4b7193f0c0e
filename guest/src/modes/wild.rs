//! `wild`: read an IPA that is neither RAM nor a device and expect the abort.
//!
//! Stage 1 maps every address outside RAM as Device memory (`mmu.rs`), so the
//! read reaches stage 2. The hypervisor should inject a synchronous external
//! abort (data abort, EC 0x25, DFSC 0x10); bare QEMU raises the same for an
//! address nothing decodes. A translation fault (DFSC 0x04-0x07) is accepted
//! too, as some hypervisors report an unbacked IPA that way; anything else
//! FAILs. If the hypervisor stops the VM instead, we never get to say so.

use crate::args::Args;
use crate::dtb::Platform;
use crate::exceptions::{self, Fault, EC_DATA_ABORT_SAME_EL};
use crate::report::{reason, Reason};

const GIB: u64 = 1 << 30;
/// Default address: 4 GiB, or the first GiB boundary past RAM if higher.
const DEFAULT_WILD: u64 = 0x1_0000_0000;
const DFSC_EXTERNAL_ABORT: u64 = 0x10;

pub fn run(plat: &Platform, args: &Args) -> Result<(), Reason> {
    let addr = args.wild.unwrap_or_else(|| default_address(plat));
    println!("GUEST: wild read at {addr:#x}");
    match exceptions::probe_read(addr) {
        Ok(value) => Err(reason!(
            "wild access at {addr:#x} was not caught (read {value:#x})"
        )),
        Err(fault) => {
            println!(
                "GUEST: wild access at {addr:#x} caught: ESR={:#x} FAR={:#x}",
                fault.esr, fault.far
            );
            check(addr, &fault)
        }
    }
}

fn default_address(plat: &Platform) -> u64 {
    let ram_end = plat.ram().iter().map(|r| r.end() as u64).max().unwrap_or(0);
    DEFAULT_WILD.max(ram_end.next_multiple_of(GIB))
}

fn check(addr: u64, fault: &Fault) -> Result<(), Reason> {
    let (ec, fsc) = (fault.ec(), fault.fsc());
    if ec != EC_DATA_ABORT_SAME_EL {
        return Err(reason!(
            "wild access gave EC={ec:#x} ({}), not a data abort",
            exceptions::ec_name(ec)
        ));
    }
    if fsc != DFSC_EXTERNAL_ABORT && !(0x04..=0x07).contains(&fsc) {
        return Err(reason!(
            "wild access gave DFSC={fsc:#x} ({})",
            exceptions::fsc_name(fsc)
        ));
    }
    if fault.far_valid() && fault.far != addr {
        return Err(reason!(
            "wild access at {addr:#x} reported FAR={:#x}",
            fault.far
        ));
    }
    println!(
        "GUEST: wild access: {} (DFSC {fsc:#x})",
        exceptions::fsc_name(fsc)
    );
    Ok(())
}
