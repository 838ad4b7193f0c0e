//! Trapped accesses to the vGIC: SGI generation (ICC_SGI1R_EL1 and
//! friends, trapped by HCR_EL2.IMO) and the distributor and redistributor
//! MMIO frames. Accesses arrive decoded; the caller moves the value to or
//! from the vCPU's register and steps its PC.

use super::*;
use crate::arch::esr::size_mask;

impl Vgic {
    /// An SGI register written by vCPU `from` with `value`.
    /// ICC_SGI1R_EL1: INTID [27:24], Aff1 [23:16], TargetList [15:0], Aff2
    /// [39:32], IRM [40], RS [47:44], Aff3 [55:48].
    pub fn send_sgi(&self, from: usize, value: u64) {
        let intid = ((value >> 24) & 0xf) as usize;
        let all_others = value & (1 << 40) != 0;
        let aff1 = ((value >> 16) & 0xff) as usize;
        let rs = ((value >> 44) & 0xf) as usize;
        let higher_aff = (value >> 32) & 0xff | (value >> 48) & 0xff;
        let mut st = self.state.lock();
        for target in 0..st.cpus.len() {
            let listed = !all_others
                && higher_aff == 0
                && target / 16 == aff1
                && rs == 0
                && (value >> (target % 16)) & 1 != 0;
            if (all_others && target != from) || listed {
                st.cpus[target].private[intid].pending = true;
                st.touch(target);
                st.kick(target);
            }
        }
    }

    /// A load (`store` None) or store of `size` bytes at `ipa`, if `ipa` is
    /// in this vGIC's frames: returns what a load reads (0 for a store).
    /// None: not the vGIC's address.
    pub fn mmio(&self, ipa: u64, size: u64, store: Option<u64>) -> Option<u64> {
        let mut st = self.state.lock();
        let region = frame(st.cpus.len(), ipa)?;
        let value = match (region, store) {
            (Frame::Dist(off), Some(v)) => {
                dist_write(&mut st, off, size, v);
                0
            }
            (Frame::Redist(cpu, off), Some(v)) => {
                redist_write(&mut st, cpu, off, size, v);
                0
            }
            (Frame::Dist(off), None) => dist_read(&mut st, off, size),
            (Frame::Redist(cpu, off), None) => redist_read(&mut st, cpu, off, size),
        };
        Some(value & size_mask(size))
    }

    /// Whether `ipa` is in this vGIC's distributor or redistributor frames.
    pub fn claims(&self, ipa: u64) -> bool {
        frame(self.flags.len(), ipa).is_some()
    }
}

/// The frame `ipa` is in, for a vGIC with `nr_cpus` redistributors.
fn frame(nr_cpus: usize, ipa: u64) -> Option<Frame> {
    let redists = GICR_BASE..GICR_BASE + nr_cpus as u64 * GICR_STRIDE;
    if (GICD_BASE..GICD_BASE + GICD_SIZE).contains(&ipa) {
        Some(Frame::Dist(ipa - GICD_BASE))
    } else if redists.contains(&ipa) {
        let off = ipa - GICR_BASE;
        Some(Frame::Redist(
            (off / GICR_STRIDE) as usize,
            off % GICR_STRIDE,
        ))
    } else {
        None
    }
}

#[derive(Clone, Copy)]
enum Frame {
    Dist(u64),
    Redist(usize, u64),
}

/// The part of a 64-bit register an access of `size` at `off` (relative
/// to the register) sees.
fn part_of(reg: u64, off: u64, size: u64) -> u64 {
    (reg >> ((off & 7) * 8)) & size_mask(size)
}

/// The per-interrupt registers shared by GICD (SPIs) and the redistributor's
/// SGI frame (SGIs and PPIs), at the same offsets in both.
#[derive(Clone, Copy)]
enum Field {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
    Priority,
    Config,
}

/// The field and first INTID an offset addresses.
fn decode(off: u64) -> Option<(Field, u32)> {
    let bits = |base: u64| (((off - base) / 4) * 32) as u32;
    Some(match off {
        0x080..0x100 => (Field::Group, bits(0x080)),
        0x100..0x180 => (Field::SetEnable, bits(0x100)),
        0x180..0x200 => (Field::ClearEnable, bits(0x180)),
        0x200..0x280 => (Field::SetPending, bits(0x200)),
        0x280..0x300 => (Field::ClearPending, bits(0x280)),
        0x300..0x380 => (Field::SetActive, bits(0x300)),
        0x380..0x400 => (Field::ClearActive, bits(0x380)),
        0x400..0x800 => (Field::Priority, (off - 0x400) as u32),
        0xc00..0xd00 => (Field::Config, (((off - 0xc00) / 4) * 16) as u32),
        _ => return None,
    })
}

/// Which INTIDs a frame may touch: the distributor only SPIs, a
/// redistributor only its SGIs and PPIs.
fn in_frame(intid: u32, private: bool) -> bool {
    if private {
        intid < 32
    } else {
        (32..NR_INTIDS).contains(&intid)
    }
}

fn irq_read(st: &mut State, cpu: usize, off: u64, size: u64, private: bool) -> u64 {
    let Some((field, first)) = decode(off) else {
        return 0;
    };
    let active = |st: &State, intid: u32, irq: &Irq| {
        irq.lr != NO_LR
            && st
                .cpus
                .get(if intid < 32 { cpu } else { irq.target })
                .is_some_and(|c| lr_active(c.lrs[irq.lr as usize]))
    };
    match field {
        Field::Priority => (0..size.min(8) as u32).fold(0, |acc, i| {
            let p = if in_frame(first + i, private) {
                st.irq(cpu, first + i).map_or(0, |q| q.priority)
            } else {
                0
            };
            acc | (u64::from(p) << (i * 8))
        }),
        Field::Config => (0..16).fold(0, |acc, i| {
            let edge =
                in_frame(first + i, private) && st.irq(cpu, first + i).is_some_and(|q| q.edge);
            acc | (u64::from(edge) << (i * 2 + 1))
        }),
        _ if size != 4 => 0,
        _ => (0..32).fold(0, |acc, i| {
            let intid = first + i;
            if !in_frame(intid, private) {
                return acc;
            }
            let Some(irq) = st.irq(cpu, intid).copied() else {
                return acc;
            };
            let bit = match field {
                Field::Group => irq.group1,
                Field::SetEnable | Field::ClearEnable => irq.enabled,
                Field::SetPending | Field::ClearPending => irq.pending || irq.level,
                _ => active(st, intid, &irq),
            };
            acc | (u64::from(bit) << i)
        }),
    }
}

fn irq_write(st: &mut State, cpu: usize, off: u64, size: u64, value: u64, private: bool) {
    let Some((field, first)) = decode(off) else {
        return;
    };
    let count = match field {
        Field::Priority => size.min(8) as u32,
        Field::Config if size == 4 => 16,
        _ if size == 4 => 32,
        _ => return,
    };
    for i in 0..count {
        let intid = first + i;
        if !in_frame(intid, private) {
            continue;
        }
        let Some(irq) = st.irq(cpu, intid) else {
            continue;
        };
        let bit = (value >> i) & 1 != 0;
        match field {
            Field::Group => irq.group1 = bit,
            Field::SetEnable if bit => irq.enabled = true,
            Field::ClearEnable if bit => irq.enabled = false,
            Field::SetPending if bit => irq.pending = true,
            Field::ClearPending if bit => irq.pending = false,
            Field::Priority => irq.priority = (value >> (i * 8)) as u8,
            // SGIs are always edge-triggered.
            Field::Config if intid >= 16 => irq.edge = (value >> (i * 2 + 1)) & 1 != 0,
            _ => {}
        }
    }
    // Something may have become deliverable somewhere: let the vCPUs look.
    st.touch_all();
    (0..st.cpus.len()).for_each(|c| st.kick(c));
}

fn dist_read(st: &mut State, off: u64, size: u64) -> u64 {
    match off {
        0x0000 => u64::from(st.ctlr | CTLR_RAO),
        // ITLinesNumber, IDbits = 9 (10-bit INTIDs), no LPIs, no security extension.
        0x0004 => ((NR_INTIDS as u64 / 32) - 1) | (9 << 19),
        0x0008 => IIDR,
        0x6100..0x8000 => {
            let intid = ((off - 0x6000) / 8) as u32;
            st.irq(0, intid)
                .filter(|_| intid >= 32)
                .map_or(0, |q| part_of(q.route, off, size))
        }
        PIDR2 => PIDR2_GICV3,
        _ => irq_read(st, 0, off, size, false),
    }
}

fn dist_write(st: &mut State, off: u64, size: u64, value: u64) {
    match off {
        0x0000 => {
            st.ctlr = value as u32 & (CTLR_GRP0 | CTLR_GRP1);
            st.touch_all();
            (0..st.cpus.len()).for_each(|c| st.kick(c));
        }
        0x6100..0x8000 => {
            let intid = ((off - 0x6000) / 8) as u32;
            let nr_cpus = st.cpus.len();
            let Some(irq) = st.irq(0, intid).filter(|_| intid >= 32) else {
                return;
            };
            let shift = (off & 7) * 8;
            let mask = size_mask(size) << shift;
            irq.route = (irq.route & !mask) | ((value << shift) & mask);
            irq.target = route_target(irq.route, nr_cpus);
            let target = irq.target;
            st.touch_all();
            st.kick(target);
        }
        _ => irq_write(st, 0, off, size, value, false),
    }
}

/// The vCPU an IROUTER value names (Vcpu::mpidr: Aff0 = index % 16, Aff1 =
/// index / 16); "any CPU" (IRM) and unknown affinities go to vCPU 0.
fn route_target(route: u64, nr_cpus: usize) -> usize {
    if route & (1 << 31) != 0 || route & 0xff_00ff_0000 != 0 {
        return 0;
    }
    let index = ((route >> 8) & 0xff) as usize * 16 + (route & 0xff) as usize;
    if route & 0xff < 16 && index < nr_cpus {
        index
    } else {
        0
    }
}

fn redist_read(st: &mut State, cpu: usize, off: u64, size: u64) -> u64 {
    if off >= GICR_SGI_FRAME {
        return irq_read(st, cpu, off - GICR_SGI_FRAME, size, true);
    }
    let nr_cpus = st.cpus.len();
    let Some(c) = st.cpus.get(cpu) else { return 0 };
    match off {
        0x0004 => IIDR,
        0x0008..0x0010 => {
            // Affinity [63:32], processor number [23:8], Last [4].
            let aff = ((cpu as u64 / 16) << 8) | (cpu as u64 % 16);
            let last = if cpu + 1 == nr_cpus { 1 << 4 } else { 0 };
            part_of((aff << 32) | ((cpu as u64) << 8) | last, off, size)
        }
        // WAKER: ChildrenAsleep follows ProcessorSleep at once.
        0x0014 if c.sleeping => 0b110,
        PIDR2 => PIDR2_GICV3,
        _ => 0,
    }
}

fn redist_write(st: &mut State, cpu: usize, off: u64, size: u64, value: u64) {
    if off >= GICR_SGI_FRAME {
        return irq_write(st, cpu, off - GICR_SGI_FRAME, size, value, true);
    }
    if off == 0x0014 {
        if let Some(c) = st.cpus.get_mut(cpu) {
            c.sleeping = value & 0b10 != 0;
        }
    }
}
