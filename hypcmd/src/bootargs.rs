//! The hypervisor's own command line (`/chosen/bootargs`, from QEMU's
//! `-append`): space-separated `key=value` words. Parsing is total: a bad
//! word is listed in [`BootArgs::ignored`] for the hypervisor to report.
//!
//! | key      | meaning                                              | default |
//! |----------|------------------------------------------------------|---------|
//! | `guest`  | `test` (the embedded test guest), `linux` or `none`  | `test`  |
//! | `vcpus`  | vCPUs of the default VM                              | CPUs    |
//! | `mem`    | RAM of the default VM, e.g. `256M`, `1G`             | `256M`  |
//! | `args`   | the guest's bootargs, `,` standing for a space       | empty   |
//! | `script` | console commands run at boot, separated by `;`       | none    |
//! | `stay`   | `1`: keep running when no VM is left                 | `0`     |
//! | `kernel` | `ADDR:SIZE` of a Linux Image QEMU's loader put in RAM | none    |
//! | `initrd` | `ADDR:SIZE` of its initramfs, likewise               | none    |
//! | `vms`    | how many default VMs to boot, each on its own, 1..=64 | `1`     |
//!
//! Everything after a lone `--` is the guest's command line verbatim (it may
//! contain `,` and `=`, as Linux's does); it overrides `args`.

use alloc::vec::Vec;

/// Bytes at `base..base + size` (the sum is known not to overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRange {
    /// Physical address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The hypervisor's boot options, parsed from its command line by
/// [`BootArgs::parse`]. String fields borrow from that line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootArgs<'a> {
    /// `guest=`: which default VM to start; the hypervisor knows `test`, `linux`
    /// and `none` (any other word is kept here and reported there).
    pub guest: &'a str,
    /// `vcpus=`: vCPUs of the default VM; `None` means one per host CPU.
    pub vcpus: Option<usize>,
    /// `mem=`: RAM of the default VM in bytes (256 MiB when not given).
    pub mem: u64,
    /// `args=`, or everything after a lone `--`: the guest's command line, as
    /// typed. For the test guest the hypervisor turns each `,` into a space; the
    /// `--` tail is meant for Linux, whose command line may hold `,` and `=`.
    pub guest_args: &'a str,
    /// `script=`: console commands to run at boot, separated by `;`, with
    /// `,` standing for a space (the hypervisor turns it back); empty: none.
    pub script: &'a str,
    /// `stay=1`: keep the hypervisor running when no VM is left, instead of
    /// exiting QEMU. Any other value means no.
    pub stay: bool,
    /// `kernel=ADDR:SIZE`: where QEMU's loader put a Linux Image in RAM.
    pub kernel: Option<ImageRange>,
    /// `initrd=ADDR:SIZE`: where QEMU's loader put the Linux initramfs.
    pub initrd: Option<ImageRange>,
    /// `vms=N`: boot N default VMs, each loaded and booted on its own (not
    /// forked), 1..=[`MAX_VMS`].
    pub vms: usize,
    /// `restore=NAME`: instead of the default guest, load the snapshot saved
    /// on the disk as NAME (issue 17); the name is checked as `load`'s.
    pub restore: Option<crate::SnapName>,
    /// Words with an unknown key or a bad value, in order; the rest of the
    /// line still counts.
    pub ignored: Vec<&'a str>,
}

/// The most default VMs `vms=` boots.
pub const MAX_VMS: usize = 64;

/// Parses `ADDR:SIZE` (numbers in hex with `0x`, or decimal); `None` if
/// either is malformed or `ADDR + SIZE` overflows.
pub fn parse_range(s: &str) -> Option<ImageRange> {
    let num = |n: &str| match n.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => n.parse().ok(),
    };
    let (base, size) = s.split_once(':')?;
    let (base, size) = (num(base)?, num(size)?);
    base.checked_add(size)?;
    Some(ImageRange { base, size })
}

/// Parses a size like `256M`, `1G`, `65536K` or plain bytes; `None` if
/// malformed or above `u64::MAX` bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let units: [(&[char], u64); 3] = [
        (&['K', 'k'], 1 << 10),
        (&['M', 'm'], 1 << 20),
        (&['G', 'g'], 1 << 30),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|&(suffix, mult)| s.strip_suffix(suffix).map(|n| (n, mult)))
        .unwrap_or((s, 1));
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The head of the line (before a lone `--`) and the guest's verbatim tail.
fn split_tail(line: &str) -> (&str, Option<&str>) {
    match line.split_once(" -- ") {
        Some((head, tail)) => (head, Some(tail.trim())),
        None => (line.strip_suffix(" --").unwrap_or(line), None),
    }
}

impl<'a> BootArgs<'a> {
    /// Unknown keys and bad values go to `ignored`.
    pub fn parse(line: &'a str) -> BootArgs<'a> {
        let mut args = BootArgs {
            guest: "test",
            vcpus: None,
            mem: 256 << 20,
            guest_args: "",
            script: "",
            stay: false,
            kernel: None,
            initrd: None,
            vms: 1,
            restore: None,
            ignored: Vec::new(),
        };
        let (head, tail) = split_tail(line);
        for word in head.split_whitespace() {
            if !args.word(word) {
                args.ignored.push(word);
            }
        }
        if let Some(tail) = tail {
            args.guest_args = tail;
        }
        args
    }

    /// Applies one `key=value` word; false if the key or value is bad.
    fn word(&mut self, word: &'a str) -> bool {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "guest" => self.guest = value,
            "vcpus" => match value.parse() {
                Ok(n) => self.vcpus = Some(n),
                Err(_) => return false,
            },
            "mem" => match parse_size(value) {
                Some(m) => self.mem = m,
                None => return false,
            },
            "args" => self.guest_args = value,
            "script" => self.script = value,
            "stay" => self.stay = value == "1",
            "kernel" => match parse_range(value) {
                Some(r) => self.kernel = Some(r),
                None => return false,
            },
            "initrd" => match parse_range(value) {
                Some(r) => self.initrd = Some(r),
                None => return false,
            },
            "vms" => match value.parse() {
                Ok(n) if (1..=MAX_VMS).contains(&n) => self.vms = n,
                _ => return false,
            },
            "restore" => match crate::SnapName::new(value) {
                Some(n) => self.restore = Some(n),
                None => return false,
            },
            _ => return false,
        }
        true
    }

    /// RAM holding images QEMU loaded for a guest (`[kernel, initrd]`), to
    /// keep out of the frame allocator until they are copied: the ranges
    /// `parse` finds, without allocating (a bad word is `parse`'s to report).
    pub fn image_ranges(line: &str) -> [Option<ImageRange>; 2] {
        let (head, _) = split_tail(line);
        // The last good word wins, as in `parse`.
        let find = |key: &str| {
            head.split_whitespace()
                .filter_map(|w| w.strip_prefix(key).and_then(parse_range))
                .next_back()
        };
        [find("kernel="), find("initrd=")]
    }
}
