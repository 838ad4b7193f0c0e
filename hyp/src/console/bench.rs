//! `bench fork <MiB>`: fork of a VM with N MiB resident next to an eager copy
//! of the same frames, in interleaved pairs (`pairs`), on the same machine in
//! the same run. `bench fork <MiB> <n>` only forks, n times, and keeps the
//! snapshots: the workload of `cargo xtask profile fork`.

use crate::arch::timer::ticks_to_us as us;
use crate::console::error::CmdError;
use crate::console::pairs::{interleave, median, PAIRS};
use crate::console::reply::Reply;
use crate::mm::frames::{self, PAGE_SIZE};
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rmap::{Ipa, Pa};

/// Forks a VM with `mib` MiB of touched RAM and copies the same frames
/// eagerly, [`PAIRS`] times each; prints the medians and the ratio. With
/// `forks`, only forks that many times and prints the total.
pub fn fork(mib: u64, forks: Option<u32>, r: &mut Reply) -> Result<(), CmdError> {
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let vm = Vm::create("bench", 1, mib << 20)?;
    let result = fill(&vm, pages).and_then(|()| match forks {
        None => fork_vs_copy(&vm, pages, r),
        Some(n) => only_forks(&vm, mib, n, r),
    });
    // The snapshots of `only_forks` stay, each with its own reference to
    // every frame, once the bench VM is gone.
    vm.stop(0);
    result
}

/// `n` snapshots of `vm`, kept (they go with `destroy` or when the machine
/// ends): `cargo xtask profile fork` counts the forks, not their teardown.
fn only_forks(vm: &Arc<Vm>, mib: u64, n: u32, r: &mut Reply) -> Result<(), CmdError> {
    let mut ticks = 0;
    for _ in 0..n {
        let t0 = crate::arch::timer::now();
        // Registered in the VM table, which keeps it.
        crate::vm::fork::fork(vm, None, crate::vm::fork::ForkKind::Snapshot)?;
        ticks += crate::arch::timer::now() - t0;
    }
    crate::say!(r, "bench fork: {mib} MiB: {n} forks in {} us", us(ticks));
    r.set("forks_us", us(ticks));
    Ok(())
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

/// `pages` frames for the eager copy, each written once before any timing:
/// a frame the host (QEMU) has never touched costs a host page fault on its
/// first write, which a baseline must not measure (it made the same copy
/// take 29 ms in one run and 577 ms in another). Freed by [`free_all`].
fn warm_frames(pages: u64) -> Result<Vec<Pa>, CmdError> {
    let mut dst = Vec::new();
    dst.try_reserve_exact(pages as usize)
        .map_err(|_| CmdError::Bench("no heap for the copy's frame list"))?;
    while (dst.len() as u64) < pages {
        let Some(pa) = frames::get().alloc() else {
            let done = dst.len() as u64;
            free_all(dst);
            return Err(CmdError::BenchShort {
                what: "frames free for the eager copy:",
                done,
                of: pages,
            });
        };
        // SAFETY: a frame we just allocated; nothing else can reach it.
        unsafe { frames::zero_frame(pa) };
        dst.push(pa);
    }
    Ok(dst)
}

fn free_all(dst: Vec<Pa>) {
    dst.into_iter().for_each(|pa| frames::get().free(pa));
}

/// Ticks of an eager copy of the VM's pages into `dst` (the copy a CoW
/// fault or a migration does: a lookup and a 4 KiB copy per page).
fn time_eager_copy(vm: &Arc<Vm>, dst: &[Pa]) -> Result<u64, CmdError> {
    let t0 = crate::arch::timer::now();
    for (i, &to) in dst.iter().enumerate() {
        let src = vm
            .mem
            .memory
            .lock()
            .pa_of(Ipa::new(vm.mem.ram.base) + i as u64 * PAGE_SIZE)
            .ok_or(CmdError::Bench("unmapped page"))?;
        // SAFETY: `src` is a frame of the quiet bench VM (nothing writes
        // it), `to` one of ours that nothing maps.
        unsafe { frames::copy_frame(to, src) };
    }
    Ok(crate::arch::timer::now() - t0)
}

fn fork_vs_copy(vm: &Arc<Vm>, pages: u64, r: &mut Reply) -> Result<(), CmdError> {
    let dst = warm_frames(pages)?;
    let p = interleave(PAIRS, || time_eager_copy(vm, &dst), || time_fork(vm));
    free_all(dst);
    let p = p?;
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
