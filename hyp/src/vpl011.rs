//! The per-VM emulated PL011 at the usual QEMU virt address. Transmit goes to
//! the physical console a line at a time (labelled by VM when several exist);
//! receive takes bytes the console routes to this VM.
//!
//! Register reads cost no exit while no received byte waits: a read-only
//! image of the registers (a hypervisor frame, not guest RAM, not in the
//! reverse map) is mapped at the UART's address, so a guest polling FR
//! before each character (Linux's console does, twice per character for
//! earlycon) only traps on the write to DR. The image is unmapped while
//! received bytes wait (a DR read must pop one), and refreshed after every
//! trapped write. Stage-2 changes happen only in `sync_image`, called from
//! `vgic::flush` on a vCPU of the VM (so the VM is alive); everything else
//! only asks for it through `Vgic::poke`.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use platform::pl011::{offset, ID_BYTES};
use rmap::{S2Entry, Stage2, Stage2Locked};
use spin::Mutex;

/// Guest-physical base of the emulated UART (as on a bare QEMU virt).
pub const VPL011_BASE: u64 = 0x0900_0000;
pub const VPL011_SIZE: u64 = 0x1000;

const FR_RXFE: u32 = 1 << 4;
const FR_TXFE: u32 = 1 << 7;
const RX_CAPACITY: usize = 256;
const LINE_MAX: usize = 240;

#[derive(Default)]
pub struct Vpl011 {
    line: Vec<u8>,
    rx: VecDeque<u8>,
    cr: u32,
    lcr_h: u32,
    ibrd: u32,
    fbrd: u32,
    ifls: u32,
    imsc: u32,
    /// The level last driven on the interrupt line (None: not yet).
    driven: Option<bool>,
    /// Host PA of the register image (0: none yet), and whether it is
    /// mapped at VPL011_BASE in the VM's stage 2. The frame belongs to the
    /// VM, not to this register state: a fork or restore copies registers
    /// into the VM's UART (`restore_from`) and never replaces the image, and
    /// the frame is freed only by the VM's teardown, after its stage-2 table
    /// was destroyed and the VMID invalidated (`take_image`). Dropping a
    /// `Vpl011` that still has an image leaks the frame rather than free a
    /// frame a stage-2 entry may still map.
    image: u64,
    mapped: bool,
}

/// What a trapped access produced for the console.
pub enum Output {
    None,
    /// A complete line (or a full buffer) to print.
    Line(Vec<u8>),
}

impl Vpl011 {
    pub fn read(&mut self, off: u64) -> u32 {
        match off {
            offset::DR => self.rx.pop_front().map_or(0, u32::from),
            _ => self.peek(off),
        }
    }

    /// What a read of `off` returns, without a read's side effect (DR).
    fn peek(&self, off: u64) -> u32 {
        match off {
            offset::DR => 0,
            offset::FR => FR_TXFE | if self.rx.is_empty() { FR_RXFE } else { 0 },
            offset::CR => self.cr,
            offset::LCR_H => self.lcr_h,
            offset::IBRD => self.ibrd,
            offset::FBRD => self.fbrd,
            offset::IFLS => self.ifls,
            offset::IMSC => self.imsc,
            offset::RIS | offset::MIS => {
                self.raw_interrupts() & if off == offset::MIS { self.imsc } else { !0 }
            }
            o if o >= offset::ID_START => ID_BYTES[((o - offset::ID_START) / 4) as usize % 8],
            _ => 0,
        }
    }

    pub fn write(&mut self, off: u64, value: u32) -> Output {
        match off {
            offset::DR => return self.transmit(value as u8),
            offset::CR => self.cr = value,
            offset::LCR_H => self.lcr_h = value,
            offset::IBRD => self.ibrd = value,
            offset::FBRD => self.fbrd = value,
            offset::IFLS => self.ifls = value,
            offset::IMSC => self.imsc = value,
            _ => {}
        }
        Output::None
    }

    fn transmit(&mut self, b: u8) -> Output {
        if b == b'\r' {
            return Output::None;
        }
        self.line.push(b);
        if b == b'\n' || self.line.len() >= LINE_MAX {
            return Output::Line(core::mem::take(&mut self.line));
        }
        Output::None
    }

    /// A byte typed for this VM; dropped when the guest does not read.
    pub fn push_rx(&mut self, b: u8) {
        if self.rx.len() < RX_CAPACITY {
            self.rx.push_back(b);
        }
    }

    /// TX is always ready (we never stall a guest's output); RX when data waits.
    fn raw_interrupts(&self) -> u32 {
        let rx = if self.rx.is_empty() {
            0
        } else {
            (1 << 4) | (1 << 6)
        };
        rx | (1 << 5)
    }

    /// The interrupt line (SPI 1): any unmasked raw interrupt.
    pub fn irq_level(&self) -> bool {
        self.raw_interrupts() & self.imsc != 0
    }

    /// A partial line waiting for its newline (a shell prompt, an echo).
    pub fn take_partial(&mut self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then(|| core::mem::take(&mut self.line))
    }

    /// Takes `other`'s register state (a fork child from its parent, a VM
    /// restored to its snapshot) and keeps this UART's own image frame and
    /// its mapping, refreshed to the new state. If the new state has received
    /// bytes waiting, `sync_image` unmaps the image before a vCPU of the VM
    /// runs again (the caller pokes the vGIC through `update_irq`).
    pub fn restore_from(&mut self, other: Vpl011) {
        let (image, mapped) = (self.image, self.mapped);
        *self = other;
        self.image = image;
        self.mapped = mapped;
        self.refresh_image();
    }

    /// The image frame, for the VM's teardown to free once no stage-2 table
    /// or TLB can reach it (0: none).
    pub fn take_image(&mut self) -> u64 {
        self.mapped = false;
        core::mem::take(&mut self.image)
    }

    /// Copies device state for a forked VM: a partial line and typed bytes
    /// the guest has not read yet go with it, so the copy's interrupt line
    /// (copied with the vGIC) matches its state.
    pub fn clone_state(&self) -> Vpl011 {
        Vpl011 {
            line: self.line.clone(),
            rx: self.rx.clone(),
            cr: self.cr,
            lcr_h: self.lcr_h,
            ibrd: self.ibrd,
            fbrd: self.fbrd,
            ifls: self.ifls,
            imsc: self.imsc,
            driven: self.driven,
            // The copy maps its own image on its first access.
            image: 0,
            mapped: false,
        }
    }
}

/// Drives the VM's UART interrupt line from the device state; called after
/// anything that can change it (a guest access, typed input).
/// The vGIC is told only of changes (most accesses change nothing), under
/// the UART lock so two CPUs cannot leave it a stale level.
pub fn update_irq(vm: &crate::vm::Vm) {
    let mut uart = vm.uart.lock();
    let level = uart.irq_level();
    if uart.driven != Some(level) {
        uart.driven = Some(level);
        vm.vgic.set_spi_level(crate::vgic::UART_INTID, level);
    }
    uart.refresh_image();
    if uart.mapped != uart.rx.is_empty() {
        // The image must be mapped or unmapped: by a vCPU of this VM, and
        // before a vCPU of it reads the UART again.
        vm.vgic.poke();
    }
}

/// Page offsets the image holds (everything else reads zero).
const IMAGE_REGS: [core::ops::Range<u64>; 2] = [0..0x48, offset::ID_START..VPL011_SIZE];

impl Vpl011 {
    /// Writes what reads return now into the image (while it may be mapped
    /// only the trapped writes change these, and this runs after each).
    fn refresh_image(&self) {
        if self.image == 0 {
            return;
        }
        for off in IMAGE_REGS.into_iter().flatten().step_by(4) {
            let value = self.peek(off);
            // SAFETY: `image` is a frame this UART owns, identity mapped at
            // EL2; the guest only reads it (read-only at stage 2).
            unsafe { core::ptr::write_volatile((self.image + off) as *mut u32, value) };
        }
    }
}

/// Maps the register image while no received byte waits, unmaps it while
/// one does. Called on a vCPU of `vm` before it enters the guest, so the VM's
/// stage 2 is alive; takes the UART lock, then the stage-2 lock.
pub fn sync_image(vm: &crate::vm::Vm) {
    let mut uart = vm.uart.lock();
    let want = uart.rx.is_empty();
    if uart.mapped == want {
        return;
    }
    if want && uart.image == 0 {
        let Some(pa) = crate::frames::get().alloc_contiguous_zeroed_unmovable(1) else {
            return; // no frame: reads keep trapping
        };
        uart.image = pa;
    }
    uart.refresh_image();
    let page = S2Entry::Page {
        pfn: uart.image / crate::frames::PAGE_SIZE,
        writable: false,
    };
    let (old, new) = if want {
        (S2Entry::Invalid, page)
    } else {
        (page, S2Entry::Invalid)
    };
    let result = {
        let mut s2 = vm.lock();
        let r = s2.compare_exchange(VPL011_BASE, old, new);
        // No table page for the entry: it stays unmapped and reads keep
        // trapping, which is correct, only slower (not the fault path's OOM).
        s2.take_out_of_memory();
        r
    };
    match result {
        Ok(()) => uart.mapped = want,
        Err(found) if found == old && want => uart.mapped = false,
        Err(found) => {
            // An entry this UART did not make: a hypervisor bug. Say so and
            // never treat it as ours.
            uart.mapped = found == page;
            drop(uart);
            crate::println!(
                "[hyp] vm {}: UART image not {}: found {found:?} at {VPL011_BASE:#x}",
                vm.id,
                if want { "mapped" } else { "unmapped" }
            );
        }
    }
}

/// The VM whose unfinished line (a prompt, an echo) is the last thing on the
/// physical console, or 0. Guarded by its lock, which is taken before (never
/// inside) the console lock and never encloses a memory-manager lock.
static OPEN_LINE: Mutex<u32> = Mutex::new(0);

/// A piece of a VM's console output on the physical console, labelled
/// `[vmN] ` at the start of each of its lines once several VMs exist. A
/// line printed in pieces (a prompt, then the echo of each typed key) gets
/// one label; if another VM's output comes in between, the open line is
/// ended first so every label starts a line.
pub fn print_output(vm: &crate::vm::Vm, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let labelled = crate::vm::count() > 1 || crate::vm::CREATED.load(Ordering::Relaxed) > 1;
    let mut open = OPEN_LINE.lock();
    if *open != vm.id {
        if *open != 0 {
            crate::console::write_bytes(b"\n");
        }
        if labelled {
            crate::print!("[vm{}] ", vm.id);
        }
    }
    crate::console::write_bytes(bytes);
    *open = if bytes.ends_with(b"\n") { 0 } else { vm.id };
}

/// Prints what the guest wrote without a newline yet: it is idle now, so a
/// prompt or an echoed key must reach the console.
pub fn flush_partial_line(vcpu: &crate::vcpu::Vcpu) {
    let line = vcpu.vm.uart.lock().take_partial();
    if let Some(line) = line {
        crate::fault::print_guest_line(vcpu, &line);
    }
}
