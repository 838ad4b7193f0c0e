//! The control channel's transport (issue 19): with a virtio-console attached
//! (`MachineConfig::api`), the hypervisor finds and takes it at boot, and a
//! Linux guest sees no virtio device at all: the guest DTB lists none and a
//! guest access to a virtio-mmio window is an injected abort, not the device.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{linux_config, Machine, MachineConfig};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);

#[test]
fn linux_sees_no_virtio_device_while_the_hypervisor_owns_the_control_channel() {
    let sock = socket_path("control-linux");
    let cfg = MachineConfig {
        api: Some(sock.clone()),
        ..linux_config()
    };
    let mut m = Machine::boot("control-linux", &cfg);
    m.expect("[hyp] control channel: virtio-console at 0x", BOOT);
    // A client may connect (and send garbage) without disturbing anything.
    let mut client = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    client
        .send_bytes(b"\xff\xfe not json\n")
        .expect("write to the api socket");
    m.expect("MHV-LINUX-READY", BOOT);
    m.expect("# ", BOOT);
    // No virtio bus devices, and (the Debian kernel's virtio-mmio driver is
    // a module, absent from the initramfs, so the bus alone proves little) no
    // virtio node in the guest's device tree nor platform device from one.
    // Bare QEMU with the same device prints `virtio=0 dt=32 plat=32`.
    m.send(concat!(
        "echo virtio=$(ls /sys/bus/virtio/devices | wc -l)",
        " dt=$(ls /proc/device-tree | grep -c virtio)",
        " plat=$(ls /sys/bus/platform/devices | grep -c virtio)\n"
    ));
    m.expect("virtio=0 dt=0 plat=0", REPLY);
    // The first transport's registers, read from the guest: an unmapped IPA,
    // so an injected external abort (SIGBUS for devmem), never the device.
    m.send("devmem 0x0a000000 32; echo devmem-done\n");
    m.expect("access to IPA 0xa000000 outside its memory", REPLY);
    m.expect("devmem-done", REPLY);
    // The VM's exit event is written with no client connected: QEMU drops
    // it, and the hypervisor must not wait for a reader.
    drop(client);
    m.send("poweroff -f\n");
    m.expect("[hyp] vm 1 (linux) stopped", REPLY);
    // With a channel attached the machine stays up for its client, which
    // ends it.
    let mut client = ApiClient::connect(&sock, REPLY).expect("reconnect to the api socket");
    let stats = client.stats(REPLY).expect("stats with no VM left");
    assert_eq!(stats["vms"], 0, "{stats}");
    client.send_line(r#"{"id":"q","cmd":"quit"}"#).unwrap();
    let status = m.wait_exit(REPLY);
    m.assert_no_hyp_fault();
    assert_eq!(status, 0, "exit status\n{}", m.transcript());
    let _ = std::fs::remove_file(&sock);
}
