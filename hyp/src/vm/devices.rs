//! The emulated devices wired into a VM: what needs both a device model
//! (`vdev`) and the VM around it. The UART's interrupt line goes to the
//! VM's vGIC; its register image is mapped in the VM's stage 2; its output
//! goes to the physical console labelled by VM; a trapped device access is
//! moved between the device and the vCPU's registers.

use crate::arch::esr::DataAccess;
use crate::vdev::vgic::UART_INTID;
use crate::vdev::vpl011::{Output, VPL011_BASE, VPL011_SIZE};
use crate::vm::exit::{stop, Action};
use crate::vm::vcpu::Vcpu;
use crate::vm::Vm;
use core::sync::atomic::Ordering;
use rmap::{CasError, PageState, Stage2, Stage2Locked};
use spin::Mutex;

/// Drives the VM's UART interrupt line from the device state; called after
/// anything that can change it (a guest access, typed input). The vGIC is
/// told only of changes, under the UART lock so two CPUs cannot leave it a
/// stale level.
pub fn update_irq(vm: &Vm) {
    let mut uart = vm.uart.lock();
    if let Some(level) = uart.line_change() {
        vm.vgic.set_spi_level(UART_INTID, level);
    }
    uart.refresh_image();
    if uart.image_change().is_some() {
        // The image must be mapped or unmapped: by a vCPU of this VM, and
        // before a vCPU of it reads the UART again.
        vm.vgic.poke();
    }
}

/// Maps the UART's register image while no received byte waits, unmaps it
/// while one does. Called on a vCPU of `vm` before it enters the guest, so
/// the VM's stage 2 is alive; takes the UART lock, then the stage-2 lock.
pub fn sync_image(vm: &Vm) {
    let mut uart = vm.uart.lock();
    let Some(want) = uart.image_change() else {
        return;
    };
    if want && uart.image() == 0 {
        let Some(pa) = crate::mm::frames::get().alloc_contiguous_zeroed_unmovable(1) else {
            return; // no frame: reads keep trapping
        };
        uart.set_image(pa);
    }
    uart.refresh_image();
    let page = PageState::Mapped {
        pfn: rmap::Pa::new(uart.image()).pfn(),
        writable: false,
    };
    let (old, new) = if want {
        (PageState::Invalid, page)
    } else {
        (page, PageState::Invalid)
    };
    let result = vm
        .mem
        .lock()
        .compare_exchange(rmap::Ipa::new(VPL011_BASE), old, new);
    match result {
        Ok(()) => uart.set_mapped(want),
        // No table page for the entry: it stays unmapped and reads keep
        // trapping, which is correct, only slower (not the fault path's OOM).
        Err(CasError::NoMemory) if want => uart.set_mapped(false),
        Err(e) => {
            let found = match e {
                CasError::Changed(found) => found,
                CasError::NoMemory => old,
            };
            // An entry this UART did not make: a hypervisor bug. Say so and
            // never treat it as ours.
            uart.set_mapped(found == page);
            drop(uart);
            crate::println!(
                "[hyp] vm {}: UART image not {}: found {found:?} at {VPL011_BASE:#x}",
                vm.id,
                if want { "mapped" } else { "unmapped" }
            );
        }
    }
}

/// Brings device state up to date and fills the list registers before
/// vCPU `vcpu` enters the guest.
pub fn flush(vcpu: &Vcpu) {
    if vcpu.vm.vgic.needs_flush(vcpu.index) {
        sync_image(&vcpu.vm);
    }
    vcpu.vm.vgic.flush(vcpu.index);
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
pub fn print_output(vm: &Vm, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let labelled = crate::vm::count() > 1 || crate::vm::CREATED.load(Ordering::Relaxed) > 1;
    let mut open = OPEN_LINE.lock();
    if *open != vm.id {
        if *open != 0 {
            crate::arch::uart::write_bytes(b"\n");
        }
        if labelled {
            crate::print!("[vm{}] ", vm.id);
        }
    }
    crate::arch::uart::write_bytes(bytes);
    *open = if bytes.ends_with(b"\n") { 0 } else { vm.id };
}

/// Prints what the guest wrote without a newline yet: it is idle now, so a
/// prompt or an echoed key must reach the console.
pub fn flush_partial_line(vcpu: &Vcpu) {
    // Printed under the UART lock: another vCPU of the VM writing meanwhile
    // cannot take and print later bytes before these (its output would
    // leave out of order).
    let mut uart = vcpu.vm.uart.lock();
    if let Some(line) = uart.take_partial() {
        print_output(&vcpu.vm, &line);
    }
}

/// A trapped load or store at `ipa` on an emulated device: the UART or the
/// vGIC. None if no device is there.
pub fn mmio(vcpu: &mut Vcpu, access: DataAccess, ipa: u64) -> Option<Action> {
    let store = access.write.then(|| {
        if access.srt == 31 {
            0
        } else {
            vcpu.regs.x[access.srt]
        }
    });
    let loaded = if (VPL011_BASE..VPL011_BASE + VPL011_SIZE).contains(&ipa) {
        uart_access(vcpu, ipa - VPL011_BASE, store)
    } else {
        vcpu.vm.vgic.mmio(ipa, access.size, store)?
    };
    if !access.write && access.srt != 31 {
        vcpu.regs.x[access.srt] = loaded & crate::arch::esr::size_mask(access.size);
    }
    vcpu.regs.pc += 4;
    Some(Action::Continue)
}

fn uart_access(vcpu: &Vcpu, off: u64, store: Option<u64>) -> u64 {
    let loaded = match store {
        Some(value) => {
            // Under the UART lock, as in `flush_partial_line`: the VM's
            // bytes reach the console in the order it wrote them.
            let mut uart = vcpu.vm.uart.lock();
            if let Output::Line(line) = uart.write(off, value as u32) {
                print_output(&vcpu.vm, &line);
            }
            0
        }
        None => u64::from(vcpu.vm.uart.lock().read(off)),
    };
    update_irq(&vcpu.vm);
    loaded
}

/// Whether `ipa` is in an emulated device's frames (for an access the
/// syndrome does not describe: ISV = 0).
pub fn is_device(vm: &Vm, ipa: u64) -> bool {
    (VPL011_BASE..VPL011_BASE + VPL011_SIZE).contains(&ipa) || vm.vgic.claims(ipa)
}

/// A device access the hypervisor cannot emulate (ISV = 0: a load/store
/// pair, writeback addressing, ...): the VM is stopped with a message.
pub fn unemulatable(vcpu: &mut Vcpu) -> Action {
    stop(
        vcpu,
        "accessed an emulated device with an instruction we cannot emulate (ISV=0)",
    )
}
