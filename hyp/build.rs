//! Links the EL2 image with the workspace's QEMU virt link map and embeds the
//! default guest image, whose path xtask passes in `HYP_GUEST_IMAGE`.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let ld = root
        .join("qemu-virt.ld")
        .canonicalize()
        .expect("qemu-virt.ld");
    println!("cargo:rustc-link-arg-bins=-T{}", ld.display());
    println!("cargo:rerun-if-changed={}", ld.display());

    let guest = std::env::var("HYP_GUEST_IMAGE").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=HYP_GUEST_IMAGE");
    let guest = if guest.is_empty() {
        // Without an image (e.g. a plain `cargo clippy`), embed an empty one;
        // the hypervisor then says it has no default guest.
        let empty = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("no-guest.bin");
        std::fs::write(&empty, []).unwrap();
        empty
    } else {
        println!("cargo:rerun-if-changed={guest}");
        PathBuf::from(guest)
    };
    println!("cargo:rustc-env=HYP_GUEST_IMAGE_PATH={}", guest.display());
}
