//! In-hypervisor benchmarks run from the console (`bench fork <MiB>`), so
//! that the compared operations run side by side on the same machine:
//! fork of a VM with N MiB resident next to an eager copy of the same frames.

use crate::arch::timer::ticks_to_us as us;
use crate::console::error::CmdError;
use crate::mm::frames::{self, PAGE_SIZE};
use crate::vm::Vm;
use alloc::vec::Vec;
use rmap::Ipa;

/// Forks a VM with `mib` MiB of touched RAM and copies the same frames
/// eagerly; prints both times and their ratio.
pub fn fork(mib: u64) -> Result<(), CmdError> {
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let vm = Vm::create("bench", 1, mib << 20)?;
    let result = fork_vs_copy(&vm, pages);
    vm.stop(0);
    result
}

fn fork_vs_copy(vm: &alloc::sync::Arc<Vm>, pages: u64) -> Result<(), CmdError> {
    let page = [0x5au8; PAGE_SIZE as usize];
    for i in 0..pages {
        crate::mm::glue::write_guest(&vm.mem, Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE, &page)
            .map_err(|_| CmdError::Bench("out of memory filling the VM"))?;
    }
    let t0 = crate::arch::timer::now();
    let child = crate::vm::fork::fork(vm, None, crate::vm::fork::ForkKind::Snapshot)?;
    let fork_ticks = crate::arch::timer::now() - t0;
    child.stop(0);

    let t0 = crate::arch::timer::now();
    let mut copies = Vec::with_capacity(pages as usize);
    for i in 0..pages {
        let src = vm
            .mem
            .memory
            .lock()
            .pa_of(Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE)
            .ok_or(CmdError::Bench("unmapped page"))?;
        let Some(dst) = frames::get().alloc() else {
            break;
        };
        // SAFETY: `src` is a frame of the quiet bench VM (nothing writes
        // it), `dst` a frame we just allocated; the same copy as a CoW fault
        // or a migration does.
        unsafe { frames::copy_frame(dst, src) };
        copies.push(dst);
    }
    let copy_ticks = crate::arch::timer::now() - t0;
    let copied = copies.len();
    copies.into_iter().for_each(|pa| frames::get().free(pa));
    if copied as u64 != pages {
        return Err(CmdError::BenchShort {
            what: "frames free for the eager copy:",
            done: copied as u64,
            of: pages,
        });
    }
    crate::println!(
        "bench fork: {} MiB: fork {} us, eager copy {} us, copy/fork = {}x",
        (pages * PAGE_SIZE) >> 20,
        us(fork_ticks),
        us(copy_ticks),
        copy_ticks / fork_ticks.max(1)
    );
    Ok(())
}
