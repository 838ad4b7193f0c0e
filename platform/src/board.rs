//! The board description the hypervisor needs, read once from the host DTB.

use arrayvec::ArrayVec;
use fdt::Fdt;

/// Most CPUs the hypervisor drives. QEMU virt's GICv3 takes 123 CPUs with its
/// first redistributor region (512 with the high one), and the DTB and PSCI
/// name CPUs by any MPIDR; the limit here is the hypervisor's own: each VM's
/// set of CPUs that may hold its TLB entries is one 64-bit mask (the local
/// invalidation fast path in `hyp/src/mm/memory.rs`). Per-CPU state costs
/// 64 KiB of stack and a few hundred bytes of tables per CPU.
pub const MAX_CPUS: usize = 64;
/// Most RAM banks we track.
pub const MAX_RAM_BANKS: usize = 8;
/// Most virtio-mmio transports we track: QEMU virt creates 32.
pub const MAX_VIRTIO_MMIO: usize = 32;

/// A physical address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRange {
    /// First byte of the range (physical address).
    pub base: u64,
    /// Length in bytes; `base + size` is one past the last byte.
    pub size: u64,
}

impl MemRange {
    /// One past the last byte: `base + size`.
    pub const fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Whether `addr` lies in `[base, base + size)`.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// One `virtio,mmio` transport: its register window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// The transport's registers (its first `reg` range).
    pub regs: MemRange,
    /// Its GIC INTID (an SPI, `32 + n`), if `interrupts` names one.
    pub intid: Option<u32>,
}

/// PSCI conduit named by the DTB's `/psci` `method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    /// `method = "smc"`: PSCI calls are SMCs to EL3 firmware.
    Smc,
    /// `method = "hvc"`: PSCI calls are HVCs to EL2 (firmware that expects to
    /// be called from EL1 below a hypervisor it trusts).
    Hvc,
}

/// Everything the hypervisor learns from the host DTB.
#[derive(Clone, Debug)]
pub struct Board {
    /// RAM banks: the non-empty `reg` ranges of every `device_type = "memory"`
    /// node, in DTB order; banks past [`MAX_RAM_BANKS`] are dropped.
    pub ram: ArrayVec<MemRange, MAX_RAM_BANKS>,
    /// MPIDR affinity value of each CPU, in DTB order (index = our CPU number).
    pub cpus: ArrayVec<u64, MAX_CPUS>,
    /// Registers of the first `arm,pl011` node (its first `reg` range).
    pub uart: MemRange,
    /// GICv3 distributor registers: the first `reg` range of the `arm,gic-v3`
    /// node.
    pub gicd: MemRange,
    /// GICv3 redistributor region: the second `reg` range of the `arm,gic-v3`
    /// node, holding one [`GICR_STRIDE`](crate::gicv3::GICR_STRIDE)-sized
    /// redistributor per CPU.
    pub gicr: MemRange,
    /// How to call PSCI firmware (CPU_ON, SYSTEM_OFF...), from `/psci`'s `method`.
    pub psci: PsciConduit,
    /// INTID of the EL2 physical timer (CNTHP), a PPI.
    pub hyp_timer_intid: u32,
    /// INTID of the EL1 virtual timer (CNTV), a PPI.
    pub virt_timer_intid: u32,
    /// `/chosen/bootargs`, empty if absent.
    pub bootargs: ArrayVec<u8, 512>,
    /// CPUs listed in the DTB beyond [`MAX_CPUS`], ignored.
    pub cpus_ignored: usize,
    /// Every `virtio,mmio` node with a sized `reg` range, in DTB order
    /// (nodes past [`MAX_VIRTIO_MMIO`] are dropped). Devices the hypervisor
    /// itself may drive; never shown to guests.
    pub virtio_mmio: ArrayVec<VirtioMmio, MAX_VIRTIO_MMIO>,
}

/// Why a DTB could not describe a board we can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoardError {
    /// The blob is not a valid flattened device tree (bad magic, truncated...).
    BadDtb,
    /// No `device_type = "memory"` node with a non-empty `reg` range.
    NoMemory,
    /// No `/cpus` node, or no `cpu@...` child with a one- or two-cell `reg`.
    NoCpus,
    /// No `arm,pl011` node with a sized `reg` range.
    NoUart,
    /// No `arm,gic-v3` node with two sized `reg` ranges (distributor and
    /// redistributors); QEMU needs `-machine gic-version=3`.
    NoGicV3,
    /// No `arm,armv8-timer` node whose `interrupts` lists at least four PPIs
    /// (secure, non-secure, virtual, hypervisor).
    NoTimer,
    /// No PSCI node (`arm,psci`, `-0.2` or `-1.0`) with `method` `smc` or `hvc`.
    NoPsci,
}

impl core::fmt::Display for BoardError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let what = match self {
            BoardError::BadDtb => "the DTB does not parse",
            BoardError::NoMemory => "no /memory node with a usable range",
            BoardError::NoCpus => "no CPUs under /cpus",
            BoardError::NoUart => "no arm,pl011 UART",
            BoardError::NoGicV3 => "no arm,gic-v3 interrupt controller (use gic-version=3)",
            BoardError::NoTimer => "no arm,armv8-timer node",
            BoardError::NoPsci => "no PSCI node",
        };
        f.write_str(what)
    }
}

/// Offset of the PPI range in GIC INTIDs (a DTB PPI number `n` is INTID `16 + n`).
const PPI_BASE: u32 = 16;
/// Offset of the SPI range in GIC INTIDs (a DTB SPI number `n` is INTID `32 + n`).
const SPI_BASE: u32 = 32;

impl Board {
    /// Parses a flattened device tree blob.
    pub fn from_dtb(blob: &[u8]) -> Result<Board, BoardError> {
        let fdt = Fdt::new(blob).map_err(|_| BoardError::BadDtb)?;
        let (cpus, cpus_ignored) = cpus(&fdt)?;
        let (gicd, gicr) = gic(&fdt)?;
        let (hyp_timer_intid, virt_timer_intid) = timer(&fdt)?;
        Ok(Board {
            ram: ram(&fdt)?,
            cpus,
            uart: first_reg(&fdt, "arm,pl011").ok_or(BoardError::NoUart)?,
            gicd,
            gicr,
            psci: psci(&fdt)?,
            hyp_timer_intid,
            virt_timer_intid,
            bootargs: bootargs(&fdt),
            cpus_ignored,
            virtio_mmio: virtio_mmio(&fdt),
        })
    }

    /// `/chosen/bootargs` as text (lossy: invalid UTF-8 gives an empty string).
    pub fn bootargs(&self) -> &str {
        core::str::from_utf8(&self.bootargs).unwrap_or("")
    }

    /// Index of the CPU with this MPIDR affinity, if listed.
    pub fn cpu_index(&self, mpidr_aff: u64) -> Option<usize> {
        self.cpus.iter().position(|&m| m == mpidr_aff)
    }
}

fn ram(fdt: &Fdt) -> Result<ArrayVec<MemRange, MAX_RAM_BANKS>, BoardError> {
    let mut ram = ArrayVec::new();
    for node in fdt.all_nodes() {
        let is_memory = node
            .property("device_type")
            .and_then(|p| p.as_str())
            .is_some_and(|s| s == "memory");
        if !is_memory {
            continue;
        }
        for reg in node.reg().into_iter().flatten() {
            let size = reg.size.unwrap_or(0) as u64;
            if size != 0 && !ram.is_full() {
                ram.push(MemRange {
                    base: reg.starting_address as u64,
                    size,
                });
            }
        }
    }
    if ram.is_empty() {
        return Err(BoardError::NoMemory);
    }
    Ok(ram)
}

fn cpus(fdt: &Fdt) -> Result<(ArrayVec<u64, MAX_CPUS>, usize), BoardError> {
    // fdt's own `cpus()` panics on a malformed tree; walk /cpus by hand.
    let parent = fdt.find_node("/cpus").ok_or(BoardError::NoCpus)?;
    let mut cpus = ArrayVec::new();
    let mut ignored = 0;
    for node in parent.children() {
        if node.name.split('@').next() != Some("cpu") {
            continue;
        }
        let Some(id) = node.property("reg").and_then(|p| be_cells(p.value)) else {
            continue;
        };
        if cpus.try_push(id).is_err() {
            ignored += 1;
        }
    }
    if cpus.is_empty() {
        return Err(BoardError::NoCpus);
    }
    Ok((cpus, ignored))
}

/// A one- or two-cell big-endian value.
fn be_cells(v: &[u8]) -> Option<u64> {
    match v.len() {
        4 => Some(u32::from_be_bytes(v.try_into().ok()?) as u64),
        8 => Some(u64::from_be_bytes(v.try_into().ok()?)),
        _ => None,
    }
}

fn first_reg(fdt: &Fdt, compatible: &str) -> Option<MemRange> {
    let node = fdt.find_compatible(&[compatible])?;
    let reg = node.reg()?.next()?;
    Some(MemRange {
        base: reg.starting_address as u64,
        size: reg.size? as u64,
    })
}

fn gic(fdt: &Fdt) -> Result<(MemRange, MemRange), BoardError> {
    let node = fdt
        .find_compatible(&["arm,gic-v3"])
        .ok_or(BoardError::NoGicV3)?;
    let mut regs = node.reg().ok_or(BoardError::NoGicV3)?;
    let mut next = || {
        let r = regs.next()?;
        Some(MemRange {
            base: r.starting_address as u64,
            size: r.size? as u64,
        })
    };
    let gicd = next().ok_or(BoardError::NoGicV3)?;
    let gicr = next().ok_or(BoardError::NoGicV3)?;
    Ok((gicd, gicr))
}

/// The arch timer node lists (secure phys, non-secure phys, virtual, hyp) PPIs.
fn timer(fdt: &Fdt) -> Result<(u32, u32), BoardError> {
    let node = fdt
        .find_compatible(&["arm,armv8-timer"])
        .ok_or(BoardError::NoTimer)?;
    let prop = node.property("interrupts").ok_or(BoardError::NoTimer)?;
    // Each interrupt is three big-endian cells: type, number, flags.
    let ppi = |i: usize| -> Option<u32> {
        let off = i * 12 + 4;
        let bytes = prop.value.get(off..off + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?) + PPI_BASE)
    };
    match (ppi(3), ppi(2)) {
        (Some(hyp), Some(virt)) => Ok((hyp, virt)),
        _ => Err(BoardError::NoTimer),
    }
}

fn psci(fdt: &Fdt) -> Result<PsciConduit, BoardError> {
    let node = fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]);
    let method = node
        .and_then(|n| n.property("method"))
        .and_then(|p| p.as_str());
    match method {
        Some("smc") => Ok(PsciConduit::Smc),
        Some("hvc") => Ok(PsciConduit::Hvc),
        _ => Err(BoardError::NoPsci),
    }
}

/// Every `virtio,mmio` node, in DTB order. A node without a sized `reg` is
/// skipped (nothing to drive); one without a GIC SPI keeps `intid: None`.
fn virtio_mmio(fdt: &Fdt) -> ArrayVec<VirtioMmio, MAX_VIRTIO_MMIO> {
    let mut out = ArrayVec::new();
    for node in fdt.all_nodes() {
        let is_virtio = node
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == "virtio,mmio"));
        let Some(reg) = node.reg().and_then(|mut r| r.next()) else {
            continue;
        };
        let (true, Some(size)) = (is_virtio, reg.size) else {
            continue;
        };
        // GIC interrupt specifiers are three cells: type (0 = SPI), number, flags.
        let intid = node.property("interrupts").and_then(|p| {
            let cell = |i: usize| {
                Some(u32::from_be_bytes(
                    p.value.get(i * 4..i * 4 + 4)?.try_into().ok()?,
                ))
            };
            (cell(0)? == 0).then_some(cell(1)? + SPI_BASE)
        });
        let dev = VirtioMmio {
            regs: MemRange {
                base: reg.starting_address as u64,
                size: size as u64,
            },
            intid,
        };
        if out.try_push(dev).is_err() {
            break;
        }
    }
    out
}

fn bootargs(fdt: &Fdt) -> ArrayVec<u8, 512> {
    let mut out = ArrayVec::new();
    if let Some(args) = fdt.chosen().bootargs() {
        let n = args.len().min(out.capacity());
        out.try_extend_from_slice(&args.as_bytes()[..n]).ok();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIRT_SMP4: &[u8] = include_bytes!("../tests/data/virt-smp4.dtb");

    #[test]
    fn parses_qemu_virt_with_gicv3() {
        let b = Board::from_dtb(VIRT_SMP4).unwrap();
        assert_eq!(
            b.ram.as_slice(),
            &[MemRange {
                base: 0x4000_0000,
                size: 0x4000_0000
            }]
        );
        assert_eq!(b.cpus.as_slice(), &[0, 1, 2, 3]);
        assert_eq!(
            b.uart,
            MemRange {
                base: 0x0900_0000,
                size: 0x1000
            }
        );
        assert_eq!(b.gicd.base, 0x0800_0000);
        assert_eq!(b.gicr.base, 0x080a_0000);
        assert_eq!(b.psci, PsciConduit::Smc);
        assert_eq!(b.hyp_timer_intid, 26);
        assert_eq!(b.virt_timer_intid, 27);
        assert_eq!(b.cpu_index(2), Some(2));
        assert_eq!(b.bootargs(), "");
    }

    #[test]
    fn lists_qemu_virts_32_virtio_mmio_transports_in_dtb_order() {
        let b = Board::from_dtb(VIRT_SMP4).unwrap();
        assert_eq!(b.virtio_mmio.len(), MAX_VIRTIO_MMIO);
        // QEMU virt: transport i at 0x0a000000 + 0x200 i, on SPI 16 + i.
        for (i, d) in b.virtio_mmio.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                d.regs,
                MemRange {
                    base: 0x0a00_0000 + 0x200 * i,
                    size: 0x200
                }
            );
            assert_eq!(d.intid, Some(32 + 16 + i as u32));
        }
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        assert_eq!(Board::from_dtb(&[0u8; 64]).unwrap_err(), BoardError::BadDtb);
        assert_eq!(
            Board::from_dtb(&VIRT_SMP4[..100]).unwrap_err(),
            BoardError::BadDtb
        );
    }
}
