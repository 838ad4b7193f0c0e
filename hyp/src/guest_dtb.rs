//! The device tree each VM boots with: its memory, vCPUs, PSCI (HVC), the
//! emulated PL011, and a /hypervisor node naming us.

use crate::vm::{Vm, VmError};
use crate::vpl011::{VPL011_BASE, VPL011_SIZE};
use alloc::vec::Vec;
use vm_fdt::FdtWriter;

const PHANDLE_CLOCK: u32 = 1;

fn build_inner(vm: &Vm, bootargs: &str) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", bootargs)?;
    fdt.property_string("stdout-path", "/pl011@9000000")?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node("memory@40000000")?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[vm.ram.base, vm.ram.size])?;
    fdt.end_node(memory)?;

    cpus(&mut fdt, vm.nr_vcpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        alloc::vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

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
    fdt.end_node(uart)?;

    let hyp = fdt.begin_node("hypervisor")?;
    fdt.property_string("compatible", platform::abi::DT_HYPERVISOR_COMPATIBLE)?;
    fdt.property_u32("vm-id", vm.id)?;
    fdt.end_node(hyp)?;

    fdt.end_node(root)?;
    fdt.finish()
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
    build_inner(vm, bootargs).map_err(|_| VmError::BadConfig("guest DTB could not be built"))
}
