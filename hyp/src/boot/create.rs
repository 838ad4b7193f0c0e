//! Independent VMs (issue 16): each loaded and booted on its own, never
//! forked, so they share no memory until a merger finds identical pages.
//! The bootargs' `vms=N` boots N default VMs this way, and the console's
//! `create linux|test` one more at any time. Each starts in a fresh trust
//! group (`Vm::group`).
//!
//! Linux VMs are copied from the kernel and initramfs QEMU's loader put in
//! RAM, which stay reserved as their read-only source (`linux::images`); the
//! test guest from the image embedded in the hypervisor.

use crate::boot::bootargs::BootArgs;
use crate::boot::{linux, loader};
use crate::vm::{Vm, VmError};
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use hypcmd::{Create, Guest};

/// The embedded test guest (xtask passes its path at build time; empty when
/// the hypervisor was built without one).
pub static GUEST_IMAGE: &[u8] = include_bytes!(env!("HYP_GUEST_IMAGE_PATH"));

/// What to boot: a `create` with the machine's defaults filled in.
pub struct Spec {
    pub guest: Guest,
    /// Guest RAM in bytes.
    pub mem: u64,
    pub vcpus: usize,
    /// Linux's command line, or the test guest's arguments (spaces, not `,`).
    pub cmdline: String,
}

impl Spec {
    /// `c` with what it leaves out taken from the bootargs (`mem=`, `vcpus=`,
    /// and the guest command line when the boot guest is of the same kind)
    /// or the guest's default.
    pub fn from_create(c: &Create, args: &BootArgs) -> Spec {
        let cpus = crate::arch::el2::board().cpus.len();
        let boot_guest = match c.guest {
            Guest::Linux => "linux",
            Guest::Test => "test",
        };
        let cmdline = match &c.cmdline {
            Some(words) => String::from(words.as_str()),
            None if args.guest == boot_guest => default_cmdline(c.guest, args),
            None => default_cmdline(c.guest, &BootArgs::parse("")),
        };
        Spec {
            guest: c.guest,
            mem: c.mem_mib.map_or(args.mem, |m| m << 20),
            vcpus: c.vcpus.or(args.vcpus).unwrap_or(cpus),
            cmdline,
        }
    }
}

/// The boot guest's command line as the bootargs give it, else the guest's
/// own default.
fn default_cmdline(guest: Guest, args: &BootArgs) -> String {
    match guest {
        Guest::Linux if args.guest_args.is_empty() => String::from(linux::DEFAULT_CMDLINE),
        Guest::Linux => String::from(args.guest_args),
        // On the command line a ',' stands for a space.
        Guest::Test => args.guest_args.replace(',', " "),
    }
}

/// Boots a new VM as `spec` says. Refuses RAM the machine does not have
/// free (guest RAM is allocated as it is touched, so this is no
/// reservation: it only keeps an absurd size from failing later, inside a
/// booting guest).
pub fn boot(spec: &Spec) -> Result<Arc<Vm>, VmError> {
    let free_mib = (crate::mm::frames::get().free_count() as u64) >> 8;
    let mib = spec.mem >> 20;
    if spec.mem < 1 << 20 {
        return Err(VmError::BadConfig(
            "guest RAM must be at least 1 MiB (mem=)",
        ));
    }
    if mib > free_mib {
        return Err(VmError::TooBig { mib, free_mib });
    }
    match spec.guest {
        Guest::Linux => linux::boot(linux::images()?, &spec.cmdline, spec.mem, spec.vcpus),
        Guest::Test if GUEST_IMAGE.is_empty() => Err(VmError::BadConfig(
            "this build embeds no test guest (build with `cargo xtask`)",
        )),
        Guest::Test => {
            let vm = Vm::create("test", spec.vcpus, spec.mem)?;
            if let Err(e) = loader::boot(&vm, GUEST_IMAGE, &spec.cmdline) {
                // Never ran: as in `linux::boot`, the caller reports it.
                vm.stop(0);
                return Err(e);
            }
            Ok(vm)
        }
    }
}

/// Boots the bootargs' default VMs (`guest=`, `vms=N` of them, each on its
/// own) and says so on the console. Returns the first Linux VM's id, which
/// gets the keyboard.
pub fn start_default(args: &BootArgs) -> Option<u32> {
    let guest = match args.guest {
        "none" => {
            crate::println!("[hyp] no default guest");
            return None;
        }
        "linux" => Guest::Linux,
        "test" => Guest::Test,
        other => {
            crate::println!("[hyp] unknown guest '{other}' (known: test, linux, none)");
            return None;
        }
    };
    let create = Create {
        guest,
        mem_mib: None,
        vcpus: None,
        cmdline: None,
    };
    let spec = Spec::from_create(&create, args);
    let mut first = None;
    for _ in 0..args.vms {
        match boot(&spec) {
            Ok(vm) => {
                announce(&vm, &spec, first.is_none());
                first = first.or(Some(vm.id));
            }
            Err(e) => {
                crate::println!("[hyp] cannot start the {} guest: {e}", guest_name(guest));
                // A default VM that cannot start fails the machine.
                crate::vm::WORST_STATUS.fetch_max(crate::vm::STATUS_FAULT, Ordering::Relaxed);
            }
        }
    }
    first.filter(|_| guest == Guest::Linux)
}

fn guest_name(guest: Guest) -> &'static str {
    match guest {
        Guest::Linux => "Linux",
        Guest::Test => "test",
    }
}

/// The boot line for a default VM (tests and people read it).
fn announce(vm: &Vm, spec: &Spec, first: bool) {
    let (id, vcpus, mib) = (vm.id, spec.vcpus, spec.mem >> 20);
    match spec.guest {
        Guest::Test => crate::println!(
            "[hyp] vm {id} (test): {vcpus} vCPUs, {mib} MiB, args '{}'",
            spec.cmdline
        ),
        Guest::Linux if first => crate::println!(
            "[hyp] vm {id} (linux): {vcpus} vCPUs, {mib} MiB; console input goes to it (Ctrl-A h: hypervisor console)"
        ),
        Guest::Linux => crate::println!(
            "[hyp] vm {id} (linux): {vcpus} vCPUs, {mib} MiB; Ctrl-A {id} Enter for its console"
        ),
    }
}
