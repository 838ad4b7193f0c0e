//! The hypervisor's disk (issue 17): a raw image file QEMU attaches as a
//! virtio-blk device on a virtio-mmio transport (`MachineConfig::disk`,
//! `cargo xtask run --disk FILE[,size=SIZE][,readonly]`).

use std::path::PathBuf;

/// The size of a disk file created when none exists (sparse: it costs the
/// host only what is written).
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// A disk image and how to attach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// The size it is created at if it does not exist (an existing file is
    /// used as it is).
    pub size: u64,
    /// Attach it read-only (QEMU `readonly=on`).
    pub readonly: bool,
}

impl DiskConfig {
    /// `path`, created at [`DEFAULT_DISK_SIZE`] if missing, read-write.
    pub fn new(path: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            size: DEFAULT_DISK_SIZE,
            readonly: false,
        }
    }

    /// `FILE[,size=SIZE][,readonly]`: SIZE as for `--mem` (`K`, `M`, `G`
    /// suffixes; a plain number is MiB), a non-zero multiple of 512 bytes.
    pub fn parse(spec: &str) -> Result<DiskConfig, String> {
        let mut parts = spec.split(',');
        let path = parts.next().filter(|p| !p.is_empty());
        let mut disk = DiskConfig::new(path.ok_or("--disk needs a file name")?);
        for opt in parts {
            match opt.split_once('=') {
                Some(("size", s)) => {
                    disk.size = crate::parse_size(s)
                        .filter(|&n| n > 0 && n % 512 == 0)
                        .ok_or(format!(
                            "--disk: bad size '{s}' (a multiple of 512 bytes, e.g. 2G)"
                        ))?;
                }
                None if opt == "readonly" => disk.readonly = true,
                _ => {
                    return Err(format!(
                        "--disk: unknown option '{opt}' (size=SIZE, readonly)"
                    ))
                }
            }
        }
        Ok(disk)
    }

    /// Creates the file at `size` (sparse) if it does not exist.
    pub fn create_if_missing(&self) -> std::io::Result<()> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.path)
        {
            Ok(f) => f.set_len(self.size),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// QEMU's arguments for it: a raw drive on a virtio-blk device on a
    /// virtio-mmio transport (the `-device` takes the next free transport;
    /// the hypervisor finds it by device type, whatever the order).
    pub fn qemu_args(&self) -> Vec<String> {
        // QEMU's option syntax doubles a comma inside a value.
        let file = self.path.display().to_string().replace(',', ",,");
        let ro = if self.readonly { ",readonly=on" } else { "" };
        vec![
            "-drive".into(),
            format!("if=none,format=raw,file={file},id=hd0{ro}"),
            "-device".into(),
            "virtio-blk-device,drive=hd0".into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            DiskConfig::parse("d.img").unwrap(),
            DiskConfig::new("d.img")
        );
        let d = DiskConfig::parse("d.img,size=2G,readonly").unwrap();
        assert_eq!((d.size, d.readonly), (2 << 30, true));
        assert_eq!(DiskConfig::parse("d.img,size=64").unwrap().size, 64 << 20);
        for bad in ["", ",size=1G", "d.img,size=0", "d.img,size=x", "d.img,frob"] {
            assert!(DiskConfig::parse(bad).is_err(), "{bad}");
        }
        let args = DiskConfig::parse("a,b.img").unwrap_err();
        assert!(args.contains("unknown option 'b.img'"), "{args}");
    }

    #[test]
    fn qemu_args_escape_commas() {
        let mut d = DiskConfig::new("/tmp/x,y.img");
        d.readonly = true;
        assert_eq!(
            d.qemu_args()[1],
            "if=none,format=raw,file=/tmp/x,,y.img,id=hd0,readonly=on"
        );
    }
}
