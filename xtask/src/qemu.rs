//! `cargo xtask run`: boots the hypervisor under QEMU with the console on
//! this terminal. Ctrl-A belongs to the hypervisor console (its prefix key
//! switches between VM consoles, `hypcmd::keys`), so QEMU's own mux is off: `quit` at the `hyp>`
//! prompt ends the machine.

use qemu_tests::{DiskConfig, MachineConfig};
use std::path::PathBuf;

/// A user's own Linux images (`--kernel`, `--initrd`), in place of the
/// fetched Debian ones.
#[derive(Default, Debug, PartialEq)]
struct OwnImages {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<(MachineConfig, bool, OwnImages), String> {
    // `run` boots Linux unless told otherwise; the test harness defaults to the test guest.
    let mut o = MachineConfig {
        guest: "linux".into(),
        ..MachineConfig::default()
    };
    let mut release = false;
    let mut own = OwnImages::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--smp" => o.smp = val()?.parse().map_err(|_| "--smp takes a number")?,
            "--mem" => o.mem = val()?,
            "--cpu" => o.cpu = val()?,
            "--guest" => o.guest = val()?,
            "--vcpus" => o.vcpus = Some(val()?.parse().map_err(|_| "--vcpus takes a number")?),
            "--vms" => match val()?.parse() {
                Ok(n @ 1..=64) => o.vms = Some(n),
                _ => return Err("--vms takes a number, 1..=64".into()),
            },
            "--guest-mem" => o.guest_mem = Some(val()?),
            "--guest-args" | "--cmdline" => o.guest_args = Some(val()?),
            "--kernel" => own.kernel = Some(existing(val()?)?),
            "--initrd" => own.initrd = Some(existing(val()?)?),
            "--script" => o.script = Some(val()?),
            "--gdb" => o.gdb = true,
            "--api" => o.api = Some(val()?.into()),
            "--disk" => o.disk = Some(DiskConfig::parse(&val()?)?),
            "--restore" => o.restore = Some(val()?),
            "--release" => release = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.restore.is_some() {
        if o.disk.is_none() {
            return Err("--restore loads a snapshot from the disk: give --disk FILE".into());
        }
        // The restored VM replaces the default guest: no images to load.
        o.guest = "none".into();
    }
    if !(1..=64).contains(&o.smp) {
        return Err("--smp must be 1..=64".into());
    }
    if (own.kernel.is_some() || own.initrd.is_some()) && o.guest != "linux" {
        return Err("--kernel and --initrd boot a Linux guest (--guest linux)".into());
    }
    Ok((o, release, own))
}

/// `path`, if it names a file.
fn existing(path: String) -> Result<PathBuf, String> {
    let p = PathBuf::from(&path);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{path}: no such file"))
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let (mut o, release, own) = parse(args)?;
    crate::setup::ensure()?;
    if o.guest == "linux" {
        // The fetched Debian kernel and busybox initramfs fill in whatever
        // the user did not bring.
        let (kernel, initrd) = match own {
            OwnImages {
                kernel: Some(k),
                initrd: Some(i),
            } => (k, i),
            OwnImages { kernel, initrd } => {
                let linux = crate::linux::ensure()?;
                (
                    kernel.unwrap_or(linux.kernel),
                    initrd.unwrap_or(linux.initrd),
                )
            }
        };
        o.linux = Some((kernel, initrd));
    }
    if let Some(disk) = &o.disk {
        disk.create_if_missing()
            .map_err(|e| format!("--disk {}: {e}", disk.path.display()))?;
    }
    let images = crate::build::images(release)?;
    let mut cmd = o.command(&images.hyp);
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| {
            let s = s.to_string_lossy();
            if s.contains(' ') {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect();
    println!("xtask: {}", line.join(" "));
    if o.gdb {
        println!(
            "xtask: waiting for gdb: gdb-multiarch {} -ex 'target remote :1234'",
            images.hyp.display()
        );
    }
    let status = cmd
        .status()
        .map_err(|e| format!("qemu-system-aarch64: {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(c) => Err(format!("the hypervisor exited with status {c}")),
        None => Err("QEMU was killed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn own_kernel_initrd_and_cmdline_are_taken() {
        let file = std::env::current_exe().unwrap();
        let f = file.to_str().unwrap();
        let (o, _, own) = parse(&args(&[
            "--kernel",
            f,
            "--initrd",
            f,
            "--cmdline",
            "console=ttyAMA0 quiet",
        ]))
        .unwrap();
        assert_eq!(own.kernel.as_deref(), Some(file.as_path()));
        assert_eq!(own.initrd.as_deref(), Some(file.as_path()));
        assert_eq!(o.guest_args.as_deref(), Some("console=ttyAMA0 quiet"));
    }

    #[test]
    fn disk_option() {
        let (o, _, _) = parse(&args(&["--disk", "/tmp/d.img,size=2G"])).unwrap();
        let disk = o.disk.unwrap();
        assert_eq!((disk.size, disk.readonly), (2 << 30, false));
        assert_eq!(disk.path, std::path::Path::new("/tmp/d.img"));
        assert!(parse(&args(&["--disk", "/tmp/d.img,size=1"])).is_ok());
        assert!(parse(&args(&["--disk", "/tmp/d.img,size=0"])).is_err());
        assert!(parse(&args(&["--disk"])).is_err());
    }

    #[test]
    fn vms_is_a_bootarg_and_grows_ram() {
        let (o, _, _) = parse(&args(&["--vms", "4"])).unwrap();
        assert_eq!(o.vms, Some(4));
        assert!(
            o.bootargs().split(' ').any(|w| w == "vms=4"),
            "{}",
            o.bootargs()
        );
        // Four 256 MiB VMs and 512 MiB for the rest, above the 1 GiB default.
        assert_eq!(o.ram(), "1536M");
        let (o, _, _) = parse(&args(&["--vms", "2", "--mem", "4G"])).unwrap();
        assert_eq!(o.ram(), "4G");
        let (o, _, _) = parse(&args(&[])).unwrap();
        assert_eq!((o.vms, o.ram().as_str()), (None, "1G"));
        assert!(parse(&args(&["--vms", "0"])).is_err());
        assert!(parse(&args(&["--vms", "65"])).is_err());
    }

    #[test]
    fn missing_images_and_other_guests_are_refused() {
        assert!(parse(&args(&["--kernel", "/no/such/Image"])).is_err());
        let file = std::env::current_exe().unwrap();
        let f = file.to_str().unwrap();
        assert!(parse(&args(&["--guest", "test", "--kernel", f])).is_err());
    }
}
