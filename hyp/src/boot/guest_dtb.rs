//! The device tree each VM boots with: its memory, vCPUs, PSCI (HVC), the
//! vGICv3, the virtual timer, the emulated PL011, and a /hypervisor node
//! naming us. For Linux, /chosen also names the initrd.

use crate::vdev::vpl011::{VPL011_BASE, VPL011_SIZE};
use crate::vm::{Vm, VmError};
use alloc::vec::Vec;
use vm_fdt::FdtWriter;

const PHANDLE_CLOCK: u32 = 1;
const PHANDLE_GIC: u32 = 2;
/// Interrupt specifier cells: type (0 SPI, 1 PPI), number, flags (4 = level high).
const SPI: u32 = 0;
const PPI: u32 = 1;
const LEVEL_HIGH: u32 = 4;

fn build_inner(
    vm: &Vm,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", bootargs)?;
    if let Some((start, end)) = initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property_string("stdout-path", "/pl011@9000000")?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node("memory@40000000")?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[vm.mem.ram.base, vm.mem.ram.size])?;
    fdt.end_node(memory)?;

    cpus(&mut fdt, vm.nr_vcpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        alloc::vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    uart(&mut fdt)?;
    gic(&mut fdt, vm.nr_vcpus)?;
    timer(&mut fdt)?;

    let hyp = fdt.begin_node("hypervisor")?;
    fdt.property_string("compatible", platform::abi::DT_HYPERVISOR_COMPATIBLE)?;
    fdt.property_u32("vm-id", vm.id)?;
    fdt.end_node(hyp)?;

    fdt.end_node(root)?;
    fdt.finish()
}

/// The emulated PL011 and the fixed clock its binding needs.
fn uart(fdt: &mut FdtWriter) -> Result<(), vm_fdt::Error> {
    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", 24_000_000)?;
    fdt.property_phandle(PHANDLE_CLOCK)?;
    fdt.end_node(clock)?;

    let uart = fdt.begin_node("pl011@9000000")?;
    fdt.property_string_list(
        "compatible",
        alloc::vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[VPL011_BASE, VPL011_SIZE])?;
    fdt.property_array_u32("clocks", &[PHANDLE_CLOCK, PHANDLE_CLOCK])?;
    fdt.property_string_list(
        "clock-names",
        alloc::vec!["uartclk".into(), "apb_pclk".into()],
    )?;
    fdt.property_array_u32(
        "interrupts",
        &[SPI, crate::vdev::vgic::UART_INTID - 32, LEVEL_HIGH],
    )?;
    fdt.end_node(uart)
}

fn gic(fdt: &mut FdtWriter, nr_vcpus: usize) -> Result<(), vm_fdt::Error> {
    use crate::vdev::vgic::{GICD_BASE, GICD_SIZE, GICR_BASE, GICR_STRIDE};
    let gic = fdt.begin_node(&alloc::format!("intc@{GICD_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_array_u64(
        "reg",
        &[
            GICD_BASE,
            GICD_SIZE,
            GICR_BASE,
            GICR_STRIDE * nr_vcpus as u64,
        ],
    )?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(gic)
}

/// The architected timer's PPIs as on QEMU virt: secure and non-secure
/// physical, virtual, hypervisor (INTIDs 29, 30, 27, 26).
fn timer(fdt: &mut FdtWriter) -> Result<(), vm_fdt::Error> {
    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let ppis: Vec<u32> = [13, 14, 11, 10]
        .iter()
        .flat_map(|&n| [PPI, n, LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &ppis)?;
    fdt.property_null("always-on")?;
    fdt.end_node(timer)
}

fn cpus(fdt: &mut FdtWriter, n: usize) -> Result<(), vm_fdt::Error> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for i in 0..n {
        let aff = ((i / 16) << 8 | (i % 16)) as u32;
        let cpu = fdt.begin_node(&alloc::format!("cpu@{aff:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,armv8")?;
        fdt.property_u32("reg", aff)?;
        fdt.property_string("enable-method", "psci")?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)
}

pub fn build(vm: &Vm, bootargs: &str) -> Result<Vec<u8>, VmError> {
    build_with_initrd(vm, bootargs, None)
}

/// A DTB whose /chosen names an initrd at guest-physical [start, end).
pub fn build_with_initrd(
    vm: &Vm,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
) -> Result<Vec<u8>, VmError> {
    build_inner(vm, bootargs, initrd)
        .map_err(|_| VmError::BadConfig("guest DTB could not be built"))
}
