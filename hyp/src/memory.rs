//! A VM's guest memory: its stage-2 table (the `stage2` crate) and the frames
//! mapped in it, guarded together by the VM's stage-2 lock. Demand-zero
//! faults, writes by the loader, and teardown live here.

use crate::frames::{self, PAGE_SIZE};
use crate::vm::VmError;
use platform::MemRange;
use spin::{Mutex, Once};
use stage2::memory::TablePage;
use stage2::{Aarch64Tlb, Leaf, Perm, S2Attrs, S2Config, Stage2Table, TableMemory, TlbMaintenance, VmidBits};

/// Table pages come from the frame allocator and are reached through the
/// hypervisor's identity map.
pub struct FrameTables;

impl TableMemory for FrameTables {
    fn alloc_zeroed_table(&self) -> Option<u64> {
        frames::get().alloc_zeroed()
    }

    fn free_table(&self, pa: u64) {
        frames::get().free(pa)
    }

    fn alloc_zeroed_root(&self, pages: usize) -> Option<u64> {
        frames::get().alloc_contiguous_zeroed(pages)
    }

    fn free_root(&self, pa: u64, pages: usize) {
        for i in 0..pages as u64 {
            frames::get().free(pa + i * PAGE_SIZE);
        }
    }

    fn table(&self, pa: u64) -> &TablePage {
        // SAFETY: `pa` is a table page this memory handed out (a RAM frame
        // owned by the table until freed), identity mapped at EL2; table
        // entries are only accessed atomically.
        unsafe { &*(pa as *const TablePage) }
    }
}

static CONFIG: Once<S2Config> = Once::new();
static VMIDS: Mutex<VmidAllocator> = Mutex::new(VmidAllocator { used: [0; 1024], max: 0 });
// SAFETY: the hypervisor runs at EL2 without VHE, identity mapped, with
// interrupts masked at EL2, so nothing re-enters an invalidation that has
// switched VTTBR_EL2.
static TLB: Aarch64Tlb = unsafe { Aarch64Tlb::new() };

/// VMIDs in use, one bit each (up to 16-bit VMIDs). VMID 0 is never given
/// to a guest. A VMID is reused only after the VMID-wide invalidation done
/// when its VM's table was destroyed.
struct VmidAllocator {
    used: [u64; 1024],
    max: u16,
}

impl VmidAllocator {
    fn alloc(&mut self) -> Option<u16> {
        (1..=self.max).find(|&v| self.used[v as usize / 64] & (1 << (v % 64)) == 0).inspect(|&v| {
            self.used[v as usize / 64] |= 1 << (v % 64);
        })
    }

    fn free(&mut self, v: u16) {
        self.used[v as usize / 64] &= !(1 << (v % 64));
    }
}

/// Chooses the stage-2 configuration from this CPU's ID registers.
pub fn init() {
    let mmfr0 = crate::arch::read_sysreg!("id_aa64mmfr0_el1");
    let mmfr1 = crate::arch::read_sysreg!("id_aa64mmfr1_el1");
    let parange = (mmfr0 & 0xf) as u8;
    let vmid_bits = if (mmfr1 >> 4) & 0xf == 2 { VmidBits::Sixteen } else { VmidBits::Eight };
    let hw_af = mmfr1 & 0xf != 0;
    let pa_bits = [32u8, 36, 40, 42, 44, 48, 52][(parange as usize).min(6)];
    let cfg = S2Config::new(parange, pa_bits.min(40), vmid_bits).expect("stage-2 configuration").with_hw_access_flag(hw_af);
    VMIDS.lock().max = cfg.max_vmid();
    crate::println!(
        "[hyp] stage 2: {}-bit IPA, {}-bit PA, {:?} VMIDs, hardware access flag {}",
        cfg.ipa_bits(),
        cfg.pa_bits(),
        vmid_bits,
        if hw_af { "on" } else { "off" }
    );
    CONFIG.call_once(|| cfg);
}

pub fn vtcr() -> u64 {
    CONFIG.get().expect("stage-2 config").vtcr()
}

/// Why a stage-2 fault could not be resolved.
pub enum FaultError {
    NoMemory,
    Unsupported(&'static str),
}

const RAM_ATTRS: S2Attrs = S2Attrs::normal(Perm::RWX);

pub struct GuestMemory {
    /// None once torn down (no vCPU of the VM can run any more).
    table: Option<Stage2Table<FrameTables>>,
    vmid: u16,
    ram: MemRange,
    resident: usize,
}

impl GuestMemory {
    pub fn new(ram: MemRange) -> Result<GuestMemory, VmError> {
        let cfg = *CONFIG.get().expect("stage-2 config");
        let vmid = VMIDS.lock().alloc().ok_or(VmError::NoVmid)?;
        match Stage2Table::new(cfg, vmid, FrameTables) {
            Ok(table) => Ok(GuestMemory { table: Some(table), vmid, ram, resident: 0 }),
            Err(_) => {
                VMIDS.lock().free(vmid);
                Err(VmError::NoMemory)
            }
        }
    }

    fn table(&self) -> &Stage2Table<FrameTables> {
        self.table.as_ref().expect("guest memory used after teardown")
    }

    pub fn vttbr(&self) -> u64 {
        self.table().vttbr().raw()
    }

    pub fn resident_pages(&self) -> usize {
        self.resident
    }

    /// Resolves a fault on guest RAM: a zeroed frame where nothing is mapped.
    /// Another vCPU may have resolved the same fault already: then nothing to do.
    pub fn fault_in(&mut self, ipa: u64, _write: bool) -> Result<(), FaultError> {
        let page = ipa & !(PAGE_SIZE - 1);
        if self.table().lookup(page).is_some() {
            return Ok(());
        }
        self.map_zeroed(page).map(|_| ())
    }

    fn map_zeroed(&mut self, page: u64) -> Result<u64, FaultError> {
        let pa = frames::get().alloc_zeroed().ok_or(FaultError::NoMemory)?;
        if let Err(e) = self.table().map(page, pa, PAGE_SIZE, RAM_ATTRS, &TLB) {
            frames::get().free(pa);
            return Err(match e {
                stage2::Error::NoMemory => FaultError::NoMemory,
                _ => FaultError::Unsupported("hit a stage-2 entry it cannot resolve"),
            });
        }
        self.resident += 1;
        Ok(pa)
    }

    /// Host PA backing guest page `page`, mapping a zeroed frame if needed.
    fn backing(&mut self, page: u64) -> Result<u64, FaultError> {
        match self.table().lookup(page) {
            Some(leaf) => leaf.pa_of(page).ok_or(FaultError::Unsupported("hit a software stage-2 entry")),
            None => self.map_zeroed(page),
        }
    }

    /// Copies `data` into guest RAM at `ipa` (the loader).
    pub fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), FaultError> {
        if !self.ram.contains(ipa) || ipa + data.len() as u64 > self.ram.end() {
            return Err(FaultError::Unsupported("write outside guest RAM"));
        }
        let mut done = 0usize;
        while done < data.len() {
            let addr = ipa + done as u64;
            let off = (addr % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let pa = self.backing(addr - off as u64)?;
            // SAFETY: `pa` is a frame mapped into this VM, owned by its
            // memory (we hold the stage-2 lock), identity mapped at EL2.
            unsafe { core::ptr::copy_nonoverlapping(data[done..].as_ptr(), (pa as usize + off) as *mut u8, n) };
            TLB.invalidate_icache(pa + off as u64, n as u64);
            done += n;
        }
        Ok(())
    }

    /// Unmaps all guest RAM, frees its frames, then the tables and the VMID.
    /// Called once no vCPU of the VM can run.
    pub fn teardown(&mut self) {
        let Some(table) = self.table.take() else { return };
        let mut freed = 0;
        let _ = table.unmap(self.ram.base, self.ram.size, &TLB, |leaf| {
            if let Leaf::Mapped(m) = leaf.leaf {
                let pages = leaf.size() / PAGE_SIZE;
                (0..pages).for_each(|i| frames::get().free(m.pa + i * PAGE_SIZE));
                freed += pages as usize;
            }
        });
        self.resident -= freed.min(self.resident);
        table.destroy(&TLB);
        VMIDS.lock().free(self.vmid);
    }
}
