//! Linux's own copy-on-write fault, timed from user space: the anchor the
//! hypervisor's stage-2 CoW fault is compared with (issue 18).
//!
//! A process maps anonymous memory, writes every page (so each is a real,
//! private frame), and forks. The child only blocks on a pipe, keeping every
//! page shared; the parent writes one byte per page and times the loop, so
//! each write is one stage-1 write-protect fault that copies the page. This
//! is the same side the hypervisor's test guest measures (`cowbench` in
//! guest/src/modes/fork.rs): the VM that took the snapshot writes while the
//! snapshot keeps the frames shared.
//!
//! For context, as the test guest does: a second write loop over the pages
//! just made private (no fault), and a 4 KiB copy (memcpy of half the
//! region into the other half, per page).

use std::io::{Error, Result};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// One measurement, every figure per page.
#[derive(Clone, Copy, Debug)]
pub struct CowResult {
    /// Pages written (the whole mapping).
    pub pages: usize,
    /// A write that takes a CoW fault.
    pub cow_ns: u64,
    /// A write to a page already private (no fault).
    pub private_ns: u64,
    /// A 4 KiB memcpy.
    pub copy_ns: u64,
}

impl CowResult {
    /// The machine-readable line `cargo xtask bench linux` reads.
    pub fn line(&self) -> String {
        format!(
            "cowbench-linux: {} pages: CoW write fault {} ns/page, private write {} ns/page, 4 KiB copy {} ns",
            self.pages, self.cow_ns, self.private_ns, self.copy_ns
        )
    }
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os_error());
        }
        // Base pages only: a transparent huge page would turn the first CoW
        // fault into a split and make the per-page figure a mix. EINVAL (a
        // kernel without THP) is fine.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let base = NonNull::new(p.cast()).ok_or_else(|| Error::other("mmap returned null"))?;
        Ok(Mapping { base, len })
    }

    /// Writes `value` to the first byte of every page; returns the time taken.
    fn write_pages(&self, page: usize, value: u8) -> Duration {
        let start = Instant::now();
        for off in (0..self.len).step_by(page) {
            // SAFETY: `off` is inside the mapping; volatile so every write
            // happens (and faults) in this loop.
            unsafe { self.base.as_ptr().add(off).write_volatile(value) };
        }
        start.elapsed()
    }

    /// Copies the second half of the mapping into the first; returns the time.
    fn copy_half(&self) -> Duration {
        let half = self.len / 2;
        let start = Instant::now();
        // SAFETY: both halves are inside the mapping and do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(half), self.base.as_ptr(), half)
        };
        std::hint::black_box(self.base.as_ptr());
        start.elapsed()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing borrows it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The page size the kernel uses for anonymous memory.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

/// A forked child that holds every page shared until it is released, then
/// checks that it still sees the bytes from before the fork: the parent's
/// writes must have copied, not written through.
struct Holder {
    pid: libc::pid_t,
    release: libc::c_int,
}

impl Holder {
    /// Forks; the child blocks reading a pipe until `finish` closes it, then
    /// exits 0 only if the first byte of every page of `map` is `before`.
    fn fork(map: &Mapping, page: usize, before: u8) -> Result<Holder> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: single-threaded here; the child calls only async-signal-safe
        // functions (close, read, _exit) before exiting.
        match unsafe { libc::fork() } {
            -1 => Err(Error::last_os_error()),
            0 => {
                let mut byte = 0u8;
                // SAFETY: our own descriptors and a one-byte buffer; the child
                // only reads the mapping, after the parent's timed loops, and
                // never returns.
                unsafe {
                    libc::close(fds[1]);
                    while libc::read(fds[0], (&raw mut byte).cast(), 1) > 0 {}
                    let kept = (0..map.len)
                        .step_by(page)
                        .all(|off| map.base.as_ptr().add(off).read_volatile() == before);
                    libc::_exit(if kept { 0 } else { 1 })
                }
            }
            pid => {
                // SAFETY: the parent's copy of the read end is not needed.
                unsafe { libc::close(fds[0]) };
                Ok(Holder {
                    pid,
                    release: fds[1],
                })
            }
        }
    }

    /// Lets the child exit and reaps it; an error if it did not exit cleanly.
    fn finish(self) -> Result<()> {
        let mut status = 0;
        // SAFETY: closing our write end lets the child's read return 0; the
        // pid is our own child.
        let reaped = unsafe {
            libc::close(self.release);
            libc::waitpid(self.pid, &mut status, 0)
        };
        if reaped != self.pid {
            return Err(Error::last_os_error());
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(Error::other(format!("child ended with status {status:#x}")));
        }
        Ok(())
    }
}

/// One round: map `bytes`, touch every page, fork, and time the parent's
/// CoW writes, then private writes and a copy.
pub fn measure(bytes: usize) -> Result<CowResult> {
    let page = page_size();
    let pages = bytes / page;
    if pages < 2 {
        return Err(Error::other("need at least two pages"));
    }
    let map = Mapping::new(pages * page)?;
    map.write_pages(page, 1);
    let child = Holder::fork(&map, page, 1)?;
    let cow = map.write_pages(page, 7);
    let private = map.write_pages(page, 8);
    let copy = map.copy_half();
    child.finish()?;
    let per = |d: Duration, n: usize| (d.as_nanos() / n as u128) as u64;
    Ok(CowResult {
        pages,
        cow_ns: per(cow, pages),
        private_ns: per(private, pages),
        copy_ns: per(copy, pages / 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_on_the_host_measures_plausible_figures() {
        let r = measure(4 << 20).expect("measure");
        assert_eq!(r.pages, (4 << 20) / page_size());
        // A CoW fault enters the kernel and copies a page: it cannot be free,
        // and it costs more than a write that does not fault.
        assert!(r.cow_ns > 0 && r.copy_ns > 0, "{r:?}");
        assert!(r.cow_ns > r.private_ns, "{r:?}");
        let line = r.line();
        assert!(
            line.starts_with("cowbench-linux: 1024 pages: CoW write fault ") || page_size() != 4096
        );
        assert!(
            line.contains(&format!("CoW write fault {} ns/page", r.cow_ns)),
            "{line}"
        );
    }

    #[test]
    fn the_held_child_keeps_its_bytes_and_notices_a_write_through() {
        let page = page_size();
        let map = Mapping::new(4 * page).unwrap();
        map.write_pages(page, 1);
        // The parent's writes copy: the child still reads 1 everywhere.
        let child = Holder::fork(&map, page, 1).unwrap();
        map.write_pages(page, 7);
        child.finish().unwrap();
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { map.base.as_ptr().read_volatile() }, 7);
        // A child expecting bytes it does not have reports it.
        let child = Holder::fork(&map, page, 9).unwrap();
        assert!(child.finish().is_err());
    }

    #[test]
    fn too_small_a_region_is_refused() {
        assert!(measure(page_size()).is_err());
    }
}
