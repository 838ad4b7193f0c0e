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

pub struct BootArgs<'a> {
    pub guest: &'a str,
    pub vcpus: Option<usize>,
    pub mem: u64,
    pub guest_args: &'a str,
    pub script: &'a str,
    pub stay: bool,
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
                _ => false,
            };
            if !ok {
                crate::println!("[hyp] ignoring boot argument '{word}'");
            }
        }
        args
    }
}
