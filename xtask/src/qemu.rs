//! `cargo xtask run`: boots the hypervisor under QEMU with the console on
//! this terminal. Ctrl-A belongs to the hypervisor console (it switches
//! between VM consoles), so QEMU's own mux is off: `quit` at the `hyp>`
//! prompt ends the machine.

use qemu_tests::MachineConfig;

fn parse(args: &[String]) -> Result<(MachineConfig, bool), String> {
    // `run` boots Linux unless told otherwise; the test harness defaults to the test guest.
    let mut o = MachineConfig {
        guest: "linux".into(),
        ..MachineConfig::default()
    };
    let mut release = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--smp" => o.smp = val()?.parse().map_err(|_| "--smp takes a number")?,
            "--mem" => o.mem = val()?,
            "--cpu" => o.cpu = val()?,
            "--guest" => o.guest = val()?,
            "--vcpus" => o.vcpus = Some(val()?.parse().map_err(|_| "--vcpus takes a number")?),
            "--guest-mem" => o.guest_mem = Some(val()?),
            "--guest-args" => o.guest_args = Some(val()?),
            "--script" => o.script = Some(val()?),
            "--gdb" => o.gdb = true,
            "--release" => release = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if !(1..=8).contains(&o.smp) {
        return Err("--smp must be 1..=8".into());
    }
    Ok((o, release))
}

pub fn run(args: &[String]) -> Result<(), String> {
    let (o, release) = parse(args)?;
    crate::setup::ensure()?;
    let mut o = o;
    if o.guest == "linux" {
        let linux = crate::linux::ensure()?;
        o.linux = Some((linux.kernel, linux.initrd));
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
