//! The hypervisor's own command line (`/chosen/bootargs`, from QEMU's
//! `-append`): space-separated `key=value` words.
//!
//! | key      | meaning                                              | default |
//! |----------|------------------------------------------------------|---------|
//! | `guest`  | `test` (the embedded test guest) or `none`           | `test`  |
//! | `vcpus`  | vCPUs of the default VM                              | CPUs    |
//! | `mem`    | RAM of the default VM, e.g. `256M`, `1G`             | `256M`  |
//! | `args`   | the guest's bootargs, `,` standing for a space       | empty   |
//! | `script` | console commands run at boot, separated by `;`       | none    |
//! | `stay`   | `1`: keep running when no VM is left                 | `0`     |
//! | `kernel` | `ADDR:SIZE` of a Linux Image QEMU's loader put in RAM | none    |
//! | `initrd` | `ADDR:SIZE` of its initramfs, likewise               | none    |
//!
//! Everything after a lone `--` is the guest's command line verbatim (it may
//! contain `,` and `=`, as Linux's does); it overrides `args`.

pub struct BootArgs<'a> {
    pub guest: &'a str,
    pub vcpus: Option<usize>,
    pub mem: u64,
    pub guest_args: &'a str,
    pub script: &'a str,
    pub stay: bool,
    pub kernel: Option<platform::MemRange>,
    pub initrd: Option<platform::MemRange>,
}

/// Parses `ADDR:SIZE` (numbers in hex with `0x`, or decimal).
fn parse_range(s: &str) -> Option<platform::MemRange> {
    let num = |n: &str| match n.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => n.parse().ok(),
    };
    let (base, size) = s.split_once(':')?;
    let (base, size) = (num(base)?, num(size)?);
    base.checked_add(size)?;
    Some(platform::MemRange { base, size })
}

/// Parses a size like `256M`, `1G`, `65536K` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl<'a> BootArgs<'a> {
    /// Unknown keys and bad values are reported and ignored.
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
        };
        let (line, tail) = match line.split_once(" -- ") {
            Some((head, tail)) => (head, Some(tail.trim())),
            None => (line.strip_suffix(" --").unwrap_or(line), None),
        };
        for word in line.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let ok = match key {
                "guest" => {
                    args.guest = value;
                    true
                }
                "vcpus" => value.parse().map(|n| args.vcpus = Some(n)).is_ok(),
                "mem" => parse_size(value).map(|m| args.mem = m).is_some(),
                "args" => {
                    args.guest_args = value;
                    true
                }
                "script" => {
                    args.script = value;
                    true
                }
                "stay" => {
                    args.stay = value == "1";
                    true
                }
                "kernel" => parse_range(value).map(|r| args.kernel = Some(r)).is_some(),
                "initrd" => parse_range(value).map(|r| args.initrd = Some(r)).is_some(),
                _ => false,
            };
            if !ok {
                crate::println!("[hyp] ignoring boot argument '{word}'");
            }
        }
        if let Some(tail) = tail {
            args.guest_args = tail;
        }
        args
    }

    /// RAM holding images QEMU loaded for a guest, to keep out of the frame
    /// allocator until they are copied (parsed quietly: `parse` reports).
    pub fn image_ranges(line: &str) -> [Option<platform::MemRange>; 2] {
        let head = line.split(" -- ").next().unwrap_or(line);
        let find = |key: &str| {
            head.split_whitespace()
                .find_map(|w| w.strip_prefix(key).and_then(parse_range))
        };
        [find("kernel="), find("initrd=")]
    }
}
