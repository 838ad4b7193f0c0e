//! linuxbench's `/bin/cowbench` in the Linux guest's initramfs (images from
//! `cargo xtask test`, MHV_LINUX_DIR): the static arm64 program runs under
//! the hypervisor, prints its result line with plausible figures, exits 0,
//! and the guest's shell keeps answering.

use qemu_tests::{linux_config, number_after, Machine};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);

#[test]
fn linux_cowbench_times_its_cow_faults_and_the_guest_keeps_running() {
    let mut m = Machine::boot("linux-cowbench", &linux_config());
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    // The exit status is computed by the shell, so the typed line's echo
    // never matches it; only the result line has "cowbench-linux: ".
    m.send("cowbench; echo cowbench-rc=$((100+$?))\n");
    m.expect("cowbench-linux warm-up: ", REPLY);
    m.expect("cowbench-linux: ", REPLY);
    let line = m.expect("\n", REPLY);
    let field =
        |key: &str| number_after(&line, key).unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    // 16 MiB of 4 KiB pages (Debian's arm64 kernel).
    assert!(line.starts_with("4096 pages: "), "{line:?}");
    let (cow, private, copy) = (
        field("CoW write fault "),
        field("private write "),
        field("4 KiB copy "),
    );
    // A CoW fault enters the kernel, allocates and copies a page: it costs
    // more than a write to a private page and more than the copy alone.
    // Under TCG it is microseconds, not seconds.
    assert!(cow > private && cow > copy, "{line:?}");
    assert!(copy > 0 && cow < 10_000_000, "{line:?}");
    m.expect("cowbench-rc=100", REPLY);
    // A bad argument is refused with the usage and status 2.
    m.send("cowbench lots; echo cowbench-rc=$((100+$?))\n");
    m.expect("usage: cowbench [MiB]", REPLY);
    m.expect("cowbench-rc=102", REPLY);
    m.send("echo answer=$((6*7))\n");
    m.expect("answer=42", REPLY);
    m.assert_no_hyp_fault();
}
