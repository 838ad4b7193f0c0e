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
//! trapped write. Stage-2 changes happen only in `vm::devices::sync_image`,
//! called before `Vgic::flush` on a vCPU of the VM (so the VM is alive);
//! everything else only asks for it through `Vgic::poke`. This file is the
//! device model only; the VM-level wiring is in `vm::devices`.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use platform::pl011::{offset, ID_BYTES};

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

    /// The level the interrupt line must be driven to, if it changed since
    /// it was last driven (most accesses change nothing).
    pub fn line_change(&mut self) -> Option<bool> {
        let level = self.irq_level();
        (self.driven != Some(level)).then(|| {
            self.driven = Some(level);
            level
        })
    }

    /// Whether the register image must be mapped (`Some(true)`: no received
    /// byte waits) or unmapped (`Some(false)`), if that differs from now.
    pub fn image_change(&self) -> Option<bool> {
        let want = self.rx.is_empty();
        (self.mapped != want).then_some(want)
    }

    /// The image frame's PA (0: none yet).
    pub fn image(&self) -> u64 {
        self.image
    }

    /// Gives the UART its image frame (once; the VM's teardown frees it).
    pub fn set_image(&mut self, pa: rmap::Pa) {
        debug_assert_eq!(self.image, 0);
        // Offsets outside IMAGE_REGS read this frame's zeroes: clean it whole
        // once (`refresh_image` cleans only the registers it rewrites).
        crate::mm::memory::publish(pa, VPL011_SIZE);
        self.image = pa.raw();
        self.refresh_image();
    }

    /// Records whether the image is mapped at `VPL011_BASE` now.
    pub fn set_mapped(&mut self, mapped: bool) {
        self.mapped = mapped;
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

/// Page offsets the image holds (everything else reads zero).
const IMAGE_REGS: [core::ops::Range<u64>; 2] = [0..0x48, offset::ID_START..VPL011_SIZE];

impl Vpl011 {
    /// Writes what reads return now into the image (while it may be mapped
    /// only the trapped writes change these, and this runs after each).
    pub fn refresh_image(&self) {
        if self.image == 0 {
            return;
        }
        for off in IMAGE_REGS.into_iter().flatten().step_by(4) {
            let value = self.peek(off);
            // SAFETY: `image` is a frame this UART owns, identity mapped at
            // EL2; the guest only reads it (read-only at stage 2).
            unsafe { core::ptr::write_volatile((self.image + off) as *mut u32, value) };
        }
        // Linux maps the UART as Device: without FWB its reads of the image
        // are non-cacheable and see DRAM, not our cached writes. Owed after
        // every refresh, since the image stays mapped while it changes.
        for r in IMAGE_REGS {
            crate::mm::memory::publish(rmap::Pa::new(self.image) + r.start, r.end - r.start);
        }
    }
}

impl Vpl011 {
    /// Appends the register state (issue 17's saved VM; the image frame is
    /// the VM's, not saved).
    pub fn save(&self, e: &mut crate::vdev::wire::Enc) {
        e.bytes(&self.line);
        let (a, b) = self.rx.as_slices();
        e.u32((a.len() + b.len()) as u32);
        e.0.extend_from_slice(a);
        e.0.extend_from_slice(b);
        for v in [
            self.cr, self.lcr_h, self.ibrd, self.fbrd, self.ifls, self.imsc,
        ] {
            e.u32(v);
        }
        e.u8(self.driven.map_or(0, |l| 1 + u8::from(l)));
    }

    /// The state `save` wrote, for `restore_from` (no image); `None` if the
    /// bytes are not one.
    pub fn load(d: &mut crate::vdev::wire::Dec) -> Option<Vpl011> {
        let line = d.bytes(LINE_MAX + 1)?.to_vec();
        let rx = d.bytes(RX_CAPACITY)?.iter().copied().collect();
        let mut regs = [0u32; 6];
        for r in regs.iter_mut() {
            *r = d.u32()?;
        }
        let driven = match d.u8()? {
            0 => None,
            1 => Some(false),
            2 => Some(true),
            _ => return None,
        };
        let [cr, lcr_h, ibrd, fbrd, ifls, imsc] = regs;
        Some(Vpl011 {
            line,
            rx,
            cr,
            lcr_h,
            ibrd,
            fbrd,
            ifls,
            imsc,
            driven,
            image: 0,
            mapped: false,
        })
    }
}
