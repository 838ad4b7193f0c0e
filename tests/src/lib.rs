//! A QEMU `virt` machine running the hypervisor, with its console captured:
//! the command line (shared with `cargo xtask run`) and the helpers the
//! integration tests use to wait for output with a timeout and to report what
//! was seen when a test fails.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

pub mod api;
pub mod disk;
pub mod hvcfuzz;

pub use disk::DiskConfig;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to boot the machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Host CPUs QEMU gives the machine (`-smp`).
    pub smp: u32,
    /// Host RAM in QEMU's `-m` syntax (`1G`, `512M`, plain MiB).
    pub mem: String,
    /// `cortex-a72` (8-bit VMIDs, no hardware AF) or `max` (16-bit VMIDs, HAFDBS).
    pub cpu: String,
    /// The default VM (bootargs `guest=`): `test`, `linux` or `none`.
    pub guest: String,
    /// vCPUs of the default VM (bootargs `vcpus=`); `None`: one per host CPU.
    pub vcpus: Option<u32>,
    /// RAM of the default VM (bootargs `mem=`, e.g. `256M`); `None`: the
    /// hypervisor's default, 256 MiB.
    pub guest_mem: Option<String>,
    /// The guest's command line, passed verbatim after `--` (for the test guest,
    /// its mode and options, e.g. `hvcfuzz secs=30`).
    pub guest_args: Option<String>,
    /// Console commands the hypervisor runs at boot, separated by `;` (spaces
    /// may be used; they are sent as `,`).
    pub script: Option<String>,
    /// Start QEMU halted with a gdb server on tcp::1234 (`-s -S`).
    pub gdb: bool,
    /// Linux `Image` and initramfs for `guest: "linux"`, put in RAM by
    /// QEMU's generic loader.
    pub linux: Option<(PathBuf, PathBuf)>,
    /// The control channel (issue 19): a virtio-console the hypervisor
    /// drives, which QEMU serves as a unix socket at this path ([`api`]).
    pub api: Option<PathBuf>,
    /// The hypervisor's disk (issue 17): a raw image on a virtio-blk
    /// device, created first if missing ([`Machine::boot`]).
    pub disk: Option<DiskConfig>,
    /// Default VMs booted each on its own (bootargs `vms=`, issue 16); `None`:
    /// one. QEMU's RAM grows to hold them ([`MachineConfig::ram`]).
    pub vms: Option<u32>,
    /// Load this snapshot from the disk at boot instead of the default
    /// guest (bootargs `restore=`, issue 17).
    pub restore: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            smp: 2,
            mem: "1G".into(),
            cpu: "cortex-a72".into(),
            guest: "test".into(),
            vcpus: None,
            guest_mem: None,
            guest_args: None,
            script: None,
            gdb: false,
            linux: None,
            api: None,
            disk: None,
            vms: None,
            restore: None,
        }
    }
}

impl MachineConfig {
    /// The hypervisor's bootargs (hypcmd/src/bootargs.rs): a space inside a value becomes ','.
    pub fn bootargs(&self) -> String {
        let mut words = vec![format!("guest={}", self.guest)];
        if let Some(v) = self.vcpus {
            words.push(format!("vcpus={v}"));
        }
        if let Some(m) = &self.guest_mem {
            words.push(format!("mem={m}"));
        }
        if let Some(s) = &self.script {
            words.push(format!("script={}", s.replace(' ', ",")));
        }
        if let Some(n) = self.vms {
            words.push(format!("vms={n}"));
        }
        if let Some(r) = &self.restore {
            words.push(format!("restore={r}"));
        }
        for (key, addr, path) in self.linux_loads() {
            words.push(format!("{key}={addr:#x}:{}", file_size(&path)));
        }
        // The guest's command line goes last, verbatim (Linux's has ',' and '=').
        if let Some(a) = &self.guest_args {
            words.push(format!("-- {a}"));
        }
        words.join(" ")
    }

    /// The QEMU command line. Ctrl-A belongs to the hypervisor console, so
    /// QEMU's monitor mux is off.
    pub fn command(&self, hyp: &Path) -> Command {
        let qemu = std::env::var("MHV_QEMU").unwrap_or_else(|_| "qemu-system-aarch64".into());
        let mut cmd = Command::new(qemu);
        let cpu = if self.cpu == "max" {
            "max,pauth=off".to_string()
        } else {
            self.cpu.clone()
        };
        // RAM from a backend that reserves nothing: QEMU then maps host
        // memory as the guest touches it, so a 64 GiB machine boots on a
        // smaller host (a plain `-m 32G` is refused under the kernel's
        // overcommit heuristic).
        let mem = self.ram();
        let ram = format!("memory-backend-ram,id=ram,size={mem},reserve=off");
        cmd.args([
            "-M",
            "virt,virtualization=on,gic-version=3,memory-backend=ram",
            "-cpu",
            &cpu,
        ])
        .args(["-object", &ram])
        .args(["-smp", &self.smp.to_string(), "-m", &mem])
        .args(["-display", "none", "-monitor", "none"])
        .args([
            "-chardev",
            "stdio,id=con,signal=off",
            "-serial",
            "chardev:con",
        ])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(hyp)
        .args(["-append", &self.bootargs()]);
        for (_, addr, path) in self.linux_loads() {
            cmd.arg("-device").arg(format!(
                "loader,file={},addr={addr:#x},force-raw=on",
                path.display()
            ));
        }
        if let Some(path) = &self.api {
            // A virtio-serial device on a virtio-mmio transport, its port 0 a
            // console port; QEMU listens on the socket and does not wait for
            // a client (output with no client connected is dropped).
            let chardev = format!("socket,id=api,path={},server=on,wait=off", path.display());
            cmd.args(["-device", "virtio-serial-device"])
                .args(["-chardev", &chardev])
                .args(["-device", "virtconsole,chardev=api"]);
        }
        if let Some(disk) = &self.disk {
            cmd.args(disk.qemu_args());
        }
        if self.gdb {
            cmd.args(["-s", "-S"]);
        }
        cmd
    }
}

impl MachineConfig {
    /// QEMU's RAM (`-m`): `mem`, grown for `vms` default VMs to their RAM
    /// plus 512 MiB for the hypervisor, the Linux images and forks (guest
    /// RAM is allocated as touched, but `create` refuses more than is free).
    pub fn ram(&self) -> String {
        let Some(vms) = self.vms else {
            return self.mem.clone();
        };
        let asked = parse_size(&self.mem).unwrap_or(1 << 30);
        let per_vm = self
            .guest_mem
            .as_deref()
            .and_then(parse_size)
            .unwrap_or(256 << 20);
        let need = u64::from(vms) * per_vm + (512 << 20);
        if need > asked {
            format!("{}M", need >> 20)
        } else {
            self.mem.clone()
        }
    }

    /// Where QEMU's loader puts the Linux images in host RAM: from the
    /// middle of RAM up, 2 MiB aligned, clear of the hypervisor at its start.
    fn linux_loads(&self) -> Vec<(&'static str, u64, PathBuf)> {
        let Some((kernel, initrd)) = &self.linux else {
            return Vec::new();
        };
        let align = |x: u64| (x + 0x1f_ffff) & !0x1f_ffff;
        let kernel_at = align(RAM_BASE + parse_size(&self.ram()).unwrap_or(1 << 30) / 2);
        let initrd_at = align(kernel_at + file_size(kernel));
        vec![
            ("kernel", kernel_at, kernel.clone()),
            ("initrd", initrd_at, initrd.clone()),
        ]
    }
}

const RAM_BASE: u64 = 0x4000_0000;

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// QEMU's `-m` sizes: `1G`, `512M`, plain MiB.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.chars().last()? {
        'G' | 'g' => (&s[..s.len() - 1], 30),
        'M' | 'm' => (&s[..s.len() - 1], 20),
        'K' | 'k' => (&s[..s.len() - 1], 10),
        _ => (s, 20),
    };
    num.parse::<u64>().ok().map(|n| n << shift)
}

/// The Linux images `cargo xtask test` prepared (MHV_LINUX_DIR).
/// Debian's Linux on 2 vCPUs (the images `cargo xtask test` fetched).
pub fn linux_config() -> MachineConfig {
    let images =
        linux_images().expect("MHV_LINUX_DIR is not set: run these tests with `cargo xtask test`");
    MachineConfig {
        guest: "linux".into(),
        linux: Some(images),
        vcpus: Some(2),
        ..MachineConfig::default()
    }
}

/// The decimal number right after the first `key` in `text` (a counter in `stats`).
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The kernel `Image` and `initramfs.cpio` in `$MHV_LINUX_DIR`, or `None`
/// when that variable is unset (the files themselves are not checked).
pub fn linux_images() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(std::env::var_os("MHV_LINUX_DIR")?);
    Some((dir.join("Image"), dir.join("initramfs.cpio")))
}

/// The same kernel and initramfs booted bare at EL1 by QEMU, with the CPU,
/// CPUs and guest memory of `cfg` (the benchmark's baseline).
pub fn bare_linux_command(cfg: &MachineConfig) -> Command {
    let qemu = std::env::var("MHV_QEMU").unwrap_or_else(|_| "qemu-system-aarch64".into());
    let (kernel, initrd) = cfg
        .linux
        .clone()
        .expect("bare_linux_command needs linux images");
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "virt,gic-version=3", "-cpu", &cfg.cpu])
        .args(["-smp", &cfg.vcpus.unwrap_or(cfg.smp).to_string()])
        .args(["-m", cfg.guest_mem.as_deref().unwrap_or("256M")])
        .args(["-display", "none", "-monitor", "none"])
        .args([
            "-chardev",
            "stdio,id=con,signal=off",
            "-serial",
            "chardev:con",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            cfg.guest_args.as_deref().unwrap_or(LINUX_CMDLINE),
        ]);
    cmd
}

/// The hypervisor's default Linux command line (hyp/src/boot/linux.rs).
pub const LINUX_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x09000000 rdinit=/init";

/// The hypervisor ELF under test, from `HYP_ELF` (set by `cargo xtask test`).
pub fn hyp_elf() -> PathBuf {
    match std::env::var("HYP_ELF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => panic!("HYP_ELF is not set: run these tests with `cargo xtask test`"),
    }
}

/// A running machine whose console output is collected in the background.
pub struct Machine {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<Vec<u8>>>,
    /// Byte offset up to which `expect` has consumed the console.
    cursor: usize,
    /// Label for this machine in failure messages (`[name] ...`).
    pub name: String,
}

impl Machine {
    /// Boots the hypervisor ELF from `HYP_ELF` (see [`hyp_elf`]) with `config`
    /// (creating its disk file if missing); panics if QEMU cannot be started.
    pub fn boot(name: &str, config: &MachineConfig) -> Machine {
        if let Some(disk) = &config.disk {
            disk.create_if_missing()
                .unwrap_or_else(|e| panic!("[{name}] disk {}: {e}", disk.path.display()));
        }
        Machine::spawn(name, &mut config.command(&hyp_elf()))
    }

    /// Starts any QEMU command line with its console captured.
    pub fn spawn(name: &str, cmd: &mut Command) -> Machine {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start qemu-system-aarch64");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = output.clone();
            std::thread::spawn(move || pump(stream, out));
        }
        let stdin = child.stdin.take();
        Machine {
            child,
            stdin,
            output,
            cursor: 0,
            name: name.into(),
        }
    }

    /// Everything the console printed so far.
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "[{}] {why}\n----- console -----\n{}\n-------------------",
            self.name,
            self.transcript()
        );
    }

    /// Waits until `needle` appears after what earlier `expect`s consumed;
    /// returns the console text up to and including it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_expect(needle, timeout) {
            Ok(seen) => seen,
            Err(why) => self.fail(&why),
        }
    }

    /// Where the next `expect` starts looking: a mark for [`Machine::expect_since`].
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Waits until `needle` appears anywhere after byte `from` of the
    /// transcript, leaving the cursor where it is: for a line another CPU
    /// prints, which may come before or after the reply an `expect` moved
    /// past.
    pub fn expect_since(&mut self, from: usize, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self
            .transcript()
            .get(from..)
            .is_some_and(|t| t.contains(needle))
        {
            if Instant::now() > deadline {
                self.fail(&format!(
                    "timed out after {timeout:?} waiting for {needle:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `expect` that reports a timeout or an exit instead of failing the test.
    pub fn try_expect(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.transcript();
            if let Some(pos) = text.get(self.cursor..).and_then(|t| t.find(needle)) {
                let end = self.cursor + pos + needle.len();
                let seen = text[self.cursor..end].to_string();
                self.cursor = end;
                return Ok(seen);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {needle:?}"
                ));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if self
                    .transcript()
                    .get(self.cursor..)
                    .is_some_and(|t| t.contains(needle))
                {
                    continue;
                }
                return Err(format!(
                    "machine exited ({status}) before printing {needle:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `line` (and Enter) at the console that has the keyboard, and
    /// waits for `answer`.
    pub fn command(&mut self, line: &str, answer: &str, timeout: Duration) -> String {
        self.send(&format!("{line}\n"));
        self.expect(answer, timeout)
    }

    /// Types `text` on the console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(text.as_bytes())
            .and_then(|_| stdin.flush())
            .expect("console input");
    }

    /// Waits for QEMU to exit and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                self.fail(&format!("machine still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails the test if the console shows a hypervisor fault or panic.
    pub fn assert_no_hyp_fault(&mut self) {
        let t = self.transcript();
        if t.contains("*** HYPERVISOR") {
            self.fail("the hypervisor faulted");
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(mut stream: Box<dyn Read + Send>, out: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}
