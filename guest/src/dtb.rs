//! What the guest learns from the DTB, copied out once at boot (with the MMU
//! off) so nothing reads the DTB later and the memory test may run anywhere.

use fdt::Fdt;
use platform::abi::{DT_HYPERVISOR_COMPATIBLE, DT_HYPERVISOR_NODE};

use crate::console::DEFAULT_UART;
use crate::sync::SetOnce;

pub const MAX_RAM_RANGES: usize = 4;
pub const MAX_DT_CPUS: usize = 64;
const MAX_BOOTARGS: usize = 512;
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
        // SAFETY: the boot protocol passes a DTB in x0; `from_ptr` reads the
        // header first and rejects a bad magic before trusting the size.
        match unsafe { Fdt::from_ptr(addr as *const u8) } {
            Ok(fdt) => plat.fill(&fdt, addr),
            Err(_) => plat.dtb_error = Some("bad DTB header"),
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
            ram_len: 1,
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
        self.read_memory(fdt);
        self.read_cpus(fdt);
        if let Some(uart) = fdt
            .find_compatible(&["arm,pl011"])
            .and_then(|n| n.reg()?.next())
        {
            self.uart = uart.starting_address as usize;
        }
        if let Some(method) = fdt.find_node("/psci").and_then(|n| n.property("method")) {
            self.psci_smc = method.as_str() == Some("smc");
        }
        self.hypervisor = fdt
            .find_node(DT_HYPERVISOR_NODE)
            .and_then(|n| n.compatible())
            .is_some_and(|c| c.all().any(|s| s == DT_HYPERVISOR_COMPATIBLE));
        let args = fdt
            .find_node("/chosen")
            .and_then(|n| n.property("bootargs")?.as_str());
        let args = args.unwrap_or("").as_bytes();
        self.bootargs_len = args.len().min(MAX_BOOTARGS);
        self.bootargs[..self.bootargs_len].copy_from_slice(&args[..self.bootargs_len]);
    }

    fn read_memory(&mut self, fdt: &Fdt) {
        let mut len = 0;
        let memory_nodes = fdt
            .all_nodes()
            .filter(|n| n.property("device_type").and_then(|p| p.as_str()) == Some("memory"));
        for node in memory_nodes {
            for region in node.reg().into_iter().flatten() {
                let size = region.size.unwrap_or(0);
                if size != 0 && len < MAX_RAM_RANGES {
                    self.ram[len] = MemRange {
                        start: region.starting_address as usize,
                        size,
                    };
                    len += 1;
                }
            }
        }
        if len != 0 {
            self.ram_len = len;
        }
    }

    fn read_cpus(&mut self, fdt: &Fdt) {
        let Some(cpus) = fdt.find_node("/cpus") else {
            return;
        };
        let address_cells = cpus.cell_sizes().address_cells;
        let is_cpu = |n: &fdt::node::FdtNode| {
            n.property("device_type").and_then(|p| p.as_str()) == Some("cpu")
                || n.name.split('@').next() == Some("cpu")
        };
        for node in cpus.children().filter(is_cpu) {
            let Some(reg) = node.property("reg") else {
                continue;
            };
            let mpidr = match address_cells {
                1 => reg
                    .value
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u64::from(u32::from_be_bytes(b))),
                2 => reg
                    .value
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
                _ => None,
            };
            let Some(mpidr) = mpidr else { continue };
            if self.cpus_len < MAX_DT_CPUS {
                self.cpus[self.cpus_len] = mpidr;
                self.cpus_len += 1;
            }
        }
    }

    pub fn ram(&self) -> &[MemRange] {
        &self.ram[..self.ram_len]
    }

    pub fn cpus(&self) -> &[u64] {
        &self.cpus[..self.cpus_len]
    }

    pub fn bootargs(&self) -> &str {
        core::str::from_utf8(&self.bootargs[..self.bootargs_len]).unwrap_or("")
    }
}
