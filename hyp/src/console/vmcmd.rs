//! `create` and `merge group` (issue 16): independent VMs and trust groups.
//! How a VM is booted is `boot::create`'s; this file fills in the machine's
//! defaults and answers.

use crate::boot::create::{self, Spec};
use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::vm::Vm;
use alloc::sync::Arc;

/// `create linux|test [--mem MiB] [--vcpus N] [--cmdline ...]`: boots a new
/// VM on its own (not a fork), in a fresh trust group. A failure stops
/// nothing else: the half-made VM, if any, is already gone.
pub fn create(c: &hypcmd::Create, r: &mut Reply) -> Result<(), CmdError> {
    let args = hypcmd::bootargs::BootArgs::parse(crate::arch::el2::board().bootargs());
    let spec = Spec::from_create(c, &args);
    let start = crate::arch::timer::now();
    let vm = create::boot(&spec).map_err(CmdError::Vm)?;
    let us = crate::arch::timer::ticks_to_us(crate::arch::timer::now().wrapping_sub(start));
    crate::say!(
        r,
        "vm {} ({}) created: {} vCPUs, {} MiB, group {}, loaded in {us} us; Ctrl-A {} Enter or `console {}` for its console",
        vm.id,
        c.guest,
        spec.vcpus,
        spec.mem >> 20,
        vm.group(),
        vm.id,
        vm.id
    );
    r.set("vm", vm.id);
    r.set("group", vm.group());
    r.set("us", us);
    Ok(())
}

/// `merge group <vm> <group>`: which VMs may share merged pages.
pub fn merge_group(vm: Arc<Vm>, group: u32, r: &mut Reply) -> Result<(), CmdError> {
    let old = vm.group();
    vm.set_group(group);
    crate::say!(r, "vm {} moved from trust group {old} to {group}", vm.id);
    r.set("vm", vm.id);
    r.set("group", group);
    Ok(())
}
