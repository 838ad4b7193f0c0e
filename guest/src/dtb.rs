//! What the guest learns from the DTB, copied out once at boot (with the MMU
//! off) so nothing reads the DTB later and the memory test may run anywhere.

use platform::abi::{DT_HYPERVISOR_COMPATIBLE, DT_HYPERVISOR_NODE};

use crate::console::DEFAULT_UART;
use crate::cpu;
use crate::fdt::{read_cells, Fdt, Node};
use crate::sync::SetOnce;

pub const MAX_RAM_RANGES: usize = 4;
pub const MAX_DT_CPUS: usize = 64;
const MAX_BOOTARGS: usize = 512;
/// Deeper nodes are ignored (QEMU virt's tree is 3 levels deep).
const MAX_DEPTH: usize = 8;
/// QEMU virt RAM, assumed when there is no usable DTB.
const DEFAULT_RAM: MemRange = MemRange {
    start: 0x4000_0000,
    size: 128 << 20,
};

pub static PLATFORM: SetOnce<Platform> = SetOnce::new();

#[derive(Clone, Copy, Debug, Default)]
pub struct MemRange {
    pub start: usize,
    pub size: usize,
}

impl MemRange {
    pub fn end(&self) -> usize {
        self.start + self.size
    }

    pub fn contains(&self, addr: usize) -> bool {
        (self.start..self.end()).contains(&addr)
    }
}

/// The machine as the DTB describes it.
pub struct Platform {
    /// Where the DTB is (size 0 if none), so the memory test avoids it.
    pub dtb: MemRange,
    /// Why there is no usable DTB, if so (defaults are used instead).
    pub dtb_error: Option<&'static str>,
    pub uart: usize,
    /// PSCI conduit: the DTB's /psci `method` ("hvc" unless it says "smc").
    pub psci_smc: bool,
    /// The DTB has `/hypervisor` compatible with `mhv,hypervisor`.
    pub hypervisor: bool,
    ram: [MemRange; MAX_RAM_RANGES],
    ram_len: usize,
    /// MPIDR affinity of each /cpus/cpu node, in DTB order.
    cpus: [u64; MAX_DT_CPUS],
    cpus_len: usize,
    bootargs: [u8; MAX_BOOTARGS],
    bootargs_len: usize,
}

impl Platform {
    /// Reads the DTB at `addr`. Runs with the MMU off: plain code only.
    pub fn probe(addr: usize) -> Self {
        let mut plat = Self::defaults();
        if addr == 0 || !addr.is_multiple_of(8) {
            plat.dtb_error = Some("x0 is not a DTB address");
            return plat;
        }
        clean_before_reading(addr);
        // SAFETY: the boot protocol passes a DTB in x0; `from_ptr` reads the
        // 8-byte header first and checks the magic before trusting the size.
        match unsafe { Fdt::from_ptr(addr as *const u8) } {
            Some(fdt) => plat.fill(&fdt, addr),
            None => plat.dtb_error = Some("bad DTB header"),
        }
        plat
    }

    fn defaults() -> Self {
        let mut ram = [MemRange::default(); MAX_RAM_RANGES];
        ram[0] = DEFAULT_RAM;
        Self {
            dtb: MemRange::default(),
            dtb_error: None,
            uart: DEFAULT_UART,
            psci_smc: false,
            hypervisor: false,
            ram,
            ram_len: 0,
            cpus: [0; MAX_DT_CPUS],
            cpus_len: 0,
            bootargs: [0; MAX_BOOTARGS],
            bootargs_len: 0,
        }
    }

    fn fill(&mut self, fdt: &Fdt, addr: usize) {
        self.dtb = MemRange {
            start: addr,
            size: fdt.total_size(),
        };
        let mut uart = None;
        // Path names and (#address-cells, #size-cells) of the current node's
        // ancestors, indexed by depth; a node's reg uses its parent's cells.
        let mut path = [""; MAX_DEPTH];
        let mut cells = [(2, 1); MAX_DEPTH];
        for node in fdt.nodes().filter(|n| n.depth < MAX_DEPTH) {
            let d = node.depth;
            path[d] = node.base_name();
            cells[d] = (
                node.prop_u32("#address-cells").map_or(2, |c| c as usize),
                node.prop_u32("#size-cells").map_or(1, |c| c as usize),
            );
            let parent_cells = if d == 0 { (2, 1) } else { cells[d - 1] };
            let in_cpus = d == 2 && path[1] == "cpus";
            match (d, node.base_name(), node.prop_str("device_type")) {
                (_, _, Some("memory")) => self.add_memory(&node, parent_cells),
                (2, _, Some("cpu")) | (2, "cpu", None) if in_cpus => {
                    self.add_cpu(&node, parent_cells.0)
                }
                (1, "chosen", _) => self.set_bootargs(node.prop_str("bootargs").unwrap_or("")),
                (1, "psci", _) => self.psci_smc = node.prop_str("method") == Some("smc"),
                (1, name, _) if DT_HYPERVISOR_NODE.strip_prefix('/') == Some(name) => {
                    self.hypervisor = node.is_compatible(DT_HYPERVISOR_COMPATIBLE)
                }
                _ if uart.is_none() && node.is_compatible("arm,pl011") => {
                    uart = node.prop("reg").and_then(|r| read_cells(r, parent_cells.0));
                }
                _ => {}
            }
        }
        if let Some(uart) = uart {
            self.uart = uart as usize;
        }
    }

    fn add_memory(&mut self, node: &Node, (ac, sc): (usize, usize)) {
        let reg = node.prop("reg").unwrap_or(&[]);
        let entry = 4 * (ac + sc);
        for e in reg.chunks_exact(entry.max(4)) {
            let (Some(start), Some(size)) = (read_cells(e, ac), read_cells(&e[4 * ac..], sc))
            else {
                return;
            };
            if size != 0 && self.ram_len < MAX_RAM_RANGES {
                self.ram[self.ram_len] = MemRange {
                    start: start as usize,
                    size: size as usize,
                };
                self.ram_len += 1;
            }
        }
    }

    fn add_cpu(&mut self, node: &Node, address_cells: usize) {
        let mpidr = node.prop("reg").and_then(|r| read_cells(r, address_cells));
        if let Some(mpidr) = mpidr.filter(|_| self.cpus_len < MAX_DT_CPUS) {
            self.cpus[self.cpus_len] = mpidr;
            self.cpus_len += 1;
        }
    }

    fn set_bootargs(&mut self, args: &str) {
        // Truncate on a char boundary so the copy stays valid UTF-8.
        let mut len = args.len().min(MAX_BOOTARGS);
        while !args.is_char_boundary(len) {
            len -= 1;
        }
        self.bootargs[..len].copy_from_slice(&args.as_bytes()[..len]);
        self.bootargs_len = len;
    }

    pub fn ram(&self) -> &[MemRange] {
        match self.ram_len {
            0 => core::slice::from_ref(&self.ram[0]), // DEFAULT_RAM
            n => &self.ram[..n],
        }
    }

    pub fn cpus(&self) -> &[u64] {
        &self.cpus[..self.cpus_len]
    }

    pub fn bootargs(&self) -> &str {
        core::str::from_utf8(&self.bootargs[..self.bootargs_len]).unwrap_or("")
    }
}

/// We read the DTB with the MMU off, straight from memory, but booting.rst
/// asks the loader to clean only the kernel image to the PoC: a loader that
/// wrote the DTB with its caches on may have left it in dirty lines. Clean
/// them out first (by VA, which works with the MMU off): the header, then the
/// size it gives, bounded as `Fdt::from_ptr` bounds it.
fn clean_before_reading(addr: usize) {
    cpu::clean_dcache(addr..addr + 8);
    // SAFETY: the boot protocol passes a DTB in x0 (8-byte aligned, checked
    // by the caller), so its 8-byte header is readable: the big-endian magic
    // and `totalsize`.
    let word =
        |off: usize| u32::from_be(unsafe { core::ptr::read_volatile((addr + off) as *const u32) });
    if word(0) == crate::fdt::MAGIC {
        let size = (word(4) as usize).min(crate::fdt::MAX_SIZE);
        cpu::clean_dcache(addr..addr + size);
    }
}
