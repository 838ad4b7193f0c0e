//! `bench fork <MiB>`: fork of a VM with N MiB resident next to an eager copy
//! of the same frames, in interleaved pairs (`pairs`), on the same machine in
//! the same run.

use crate::arch::timer::ticks_to_us as us;
use crate::console::error::CmdError;
use crate::console::pairs::{interleave, median, PAIRS};
use crate::console::reply::Reply;
use crate::mm::frames::{self, PAGE_SIZE};
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rmap::Ipa;

/// Forks a VM with `mib` MiB of touched RAM and copies the same frames
/// eagerly, [`PAIRS`] times each; prints the medians and the ratio.
pub fn fork(mib: u64, r: &mut Reply) -> Result<(), CmdError> {
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let vm = Vm::create("bench", 1, mib << 20)?;
    let result = fill(&vm, pages).and_then(|()| fork_vs_copy(&vm, pages, r));
    vm.stop(0);
    result
}

fn fill(vm: &Arc<Vm>, pages: u64) -> Result<(), CmdError> {
    let page = [0x5au8; PAGE_SIZE as usize];
    for i in 0..pages {
        crate::mm::glue::write_guest(&vm.mem, Ipa::new(vm.mem.ram.base) + i * PAGE_SIZE, &page)
            .map_err(|_| CmdError::Bench("out of memory filling the VM"))?;
    }
    Ok(())
}

/// Ticks of one fork (a snapshot: it never runs), destroyed again.
fn time_fork(vm: &Arc<Vm>) -> Result<u64, CmdError> {
    let t0 = crate::arch::timer::now();
    let child = crate::vm::fork::fork(vm, None, crate::vm::fork::ForkKind::Snapshot)?;
    let ticks = crate::arch::timer::now() - t0;
    child.stop(0);
    Ok(ticks)
}

/// Ticks of an eager copy of the VM's `pages` into fresh frames (the copy a
/// CoW fault or a migration does), freed again.
fn time_eager_copy(vm: &Arc<Vm>, pages: u64) -> Result<u64, CmdError> {
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
        // it), `dst` a frame we just allocated.
        unsafe { frames::copy_frame(dst, src) };
        copies.push(dst);
    }
    let ticks = crate::arch::timer::now() - t0;
    let copied = copies.len() as u64;
    copies.into_iter().for_each(|pa| frames::get().free(pa));
    if copied != pages {
        return Err(CmdError::BenchShort {
            what: "frames free for the eager copy:",
            done: copied,
            of: pages,
        });
    }
    Ok(ticks)
}

fn fork_vs_copy(vm: &Arc<Vm>, pages: u64, r: &mut Reply) -> Result<(), CmdError> {
    let p = interleave(PAIRS, || time_eager_copy(vm, pages), || time_fork(vm))?;
    let (fork_us, copy_us) = (us(median(&p.subject)), us(median(&p.base)));
    let ratio = p.ratio();
    crate::say!(
        r,
        "bench fork: {} MiB: fork {fork_us} us, eager copy {copy_us} us (medians), copy/fork = {ratio}",
        (pages * PAGE_SIZE) >> 20,
    );
    r.set("fork_us", fork_us);
    r.set("copy_us", copy_us);
    r.set("ratio_x100", ratio.median);
    Ok(())
}
