//! The per-VM emulated PL011 at the usual QEMU virt address. Transmit goes to
//! the physical console a line at a time (labelled by VM when several exist);
//! receive takes bytes the console routes to this VM.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use platform::pl011::{offset, ID_BYTES};
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
