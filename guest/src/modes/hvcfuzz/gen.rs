//! The hypercalls `hvcfuzz` issues: random function ids and arguments biased
//! toward edge values, then made safe for the VM that issues them
//! ([`sanitize`]): the fuzzer must find the hypervisor's bugs, not kill the
//! VM that has to report them.

use platform::abi::{
    HVC_EXIT, HVC_FORK, HVC_MEM_RELEASE, HVC_RESTORE, HVC_SNAPSHOT, HVC_STATS, HVC_VM_ID,
    VENDOR_HYP_BASE,
};

pub const PAGE: u64 = 4096;
pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const PSCI_CPU_SUSPEND: u32 = 0xC400_0001;
pub const PSCI_CPU_OFF: u32 = 0x8400_0002;
pub const PSCI_CPU_ON_64: u32 = 0xC400_0003;
pub const PSCI_CPU_ON_32: u32 = 0x8400_0003;
pub const PSCI_AFFINITY_64: u32 = 0xC400_0004;
pub const PSCI_AFFINITY_32: u32 = 0x8400_0004;
pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
pub const PSCI_SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000A;
pub const SMCCC_VERSION: u32 = 0x8000_0000;

/// xorshift64*: small, and each VM and vCPU gets its own stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.mix(seed);
        r
    }

    /// Stirs `v` in (a vCPU that finds itself in a new VM gets a new stream).
    pub fn mix(&mut self, v: u64) {
        self.0 = (self.0 ^ v.wrapping_mul(0xbf58_476d_1ce4_e5b9)).rotate_left(27) | 1;
        self.next();
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// What the generator knows about the calling VM and vCPU.
pub struct Ctx<'a> {
    pub me: u64,
    pub root: bool,
    pub vcpu: usize,
    /// Guest RAM `[start, end)`.
    pub ram: (u64, u64),
    /// The only area a valid MEM_RELEASE may name.
    pub scratch: (u64, u64),
    /// MPIDR of each vCPU index.
    pub mpidrs: &'a [u64],
    pub secondary_entry: u64,
    /// Switches for known hypervisor bugs (see `mod.rs`).
    pub foreign: bool,
    pub any_vcpu: bool,
    /// A snapshot of this VM it must not resume (mod.rs `record_snapshot`).
    pub avoid: u64,
    /// `norestore=1`: no RESTORE that could succeed (mod.rs).
    pub no_restore: bool,
    /// This VM's own snapshots (0 = none): the root restores them only on
    /// purpose (mod.rs `own_snapshot_work`), else it would spend its run
    /// jumping back to them and never get anywhere.
    pub own: [u64; 8],
}

/// One hypercall: x0 (function id, maybe with garbage in its upper half)
/// and x1..x3.
#[derive(Clone, Copy)]
pub struct Call {
    pub x: [u64; 4],
}

impl Call {
    pub fn fid(&self) -> u32 {
        self.x[0] as u32
    }
}

/// An edge value for an id, address, length or cookie argument.
pub fn edge(rng: &mut Rng, ctx: &Ctx) -> u64 {
    let (lo, hi) = ctx.ram;
    let small = rng.below(7).wrapping_sub(3);
    match rng.below(20) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => PAGE - 1,
        4 => PAGE,
        5 => lo,
        6 => hi,
        7 => lo - PAGE,
        8 => hi - PAGE,
        9 => hi + PAGE,
        10 | 11 => ctx.me.wrapping_add(small),
        12 => (1 << 32) + small,
        13 => 1 << (40 + rng.below(24)),
        14 => lo + rng.below(hi - lo),
        15 => u64::from(u32::MAX),
        16 => i64::MIN as u64,
        17 => rng.below(64),
        18 => (lo + rng.below(hi - lo)) & !(PAGE - 1),
        _ => rng.next(),
    }
}

/// A random call of any kind, arguments not yet made safe.
pub fn raw(rng: &mut Rng, ctx: &Ctx) -> Call {
    let fid = match rng.below(32) {
        0 | 1 => HVC_FORK,
        2 | 3 => HVC_SNAPSHOT,
        4..=8 => HVC_RESTORE,
        9..=13 => HVC_MEM_RELEASE,
        14 | 15 => HVC_STATS,
        // A VM that exits stops fuzzing: rarely.
        16 if rng.one_in(256) => HVC_EXIT,
        16 | 17 => HVC_VM_ID,
        18 | 19 => [PSCI_VERSION, PSCI_FEATURES, SMCCC_VERSION][rng.below(3) as usize],
        20 | 21 => [PSCI_CPU_ON_64, PSCI_CPU_ON_32][rng.below(2) as usize],
        22 | 23 => [PSCI_CPU_OFF, PSCI_AFFINITY_64, PSCI_AFFINITY_32][rng.below(3) as usize],
        _ => random_fid(rng),
    };
    let mut x = [
        u64::from(fid),
        edge(rng, ctx),
        edge(rng, ctx),
        edge(rng, ctx),
    ];
    if rng.one_in(16) {
        // SMCCC: only W0 is the function id; the upper half must not matter.
        x[0] |= rng.next() << 32;
    }
    match fid {
        HVC_MEM_RELEASE => x[1..3].copy_from_slice(&release_range(rng, ctx)),
        HVC_STATS if rng.one_in(2) => x[1] = rng.below(12),
        PSCI_FEATURES if rng.one_in(2) => x[1] = u64::from(random_fid(rng)),
        PSCI_CPU_ON_64 | PSCI_CPU_ON_32 | PSCI_AFFINITY_64 | PSCI_AFFINITY_32 if rng.one_in(2) => {
            x[1] = ctx.mpidrs[rng.below(ctx.mpidrs.len() as u64) as usize];
            x[2] = if fid == PSCI_CPU_ON_64 || fid == PSCI_CPU_ON_32 {
                ctx.secondary_entry
            } else {
                rng.below(2)
            };
        }
        _ => {}
    }
    Call { x }
}

/// A function id in one of the ranges the hypervisor decodes: PSCI (32 and
/// 64 bit), SMCCC architecture calls, vendor hypervisor (fast and 32 bit),
/// or anything.
fn random_fid(rng: &mut Rng) -> u32 {
    let low = rng.below(0x20) as u32;
    match rng.below(8) {
        0 => 0x8400_0000 | low,
        1 => 0xC400_0000 | low,
        2 => 0x8000_0000 | low,
        3 => 0x8000_8000 | low,
        4 => VENDOR_HYP_BASE | rng.below(0x100) as u32,
        5 => 0x8600_0000 | low,
        6 => VENDOR_HYP_BASE | 0xFF00 | low,
        _ => rng.next() as u32,
    }
}

/// MEM_RELEASE arguments: mostly valid pages of the scratch area, else an
/// edge (which `sanitize` keeps only if the hypervisor must refuse it).
fn release_range(rng: &mut Rng, ctx: &Ctx) -> [u64; 2] {
    let (lo, hi) = ctx.scratch;
    let pages = (hi - lo) / PAGE;
    match rng.below(4) {
        0 | 1 => {
            let first = rng.below(pages);
            let n = 1 + rng.below((pages - first).min(64));
            [lo + first * PAGE, n * PAGE]
        }
        2 => [lo + rng.below(pages) * PAGE + rng.below(PAGE), PAGE],
        _ => [edge(rng, ctx), edge(rng, ctx)],
    }
}

/// Would the hypervisor accept this MEM_RELEASE range (hypercall.rs rules)?
pub fn release_valid(ctx: &Ctx, start: u64, len: u64) -> bool {
    let (lo, hi) = ctx.ram;
    len > 0
        && start.is_multiple_of(PAGE)
        && len.is_multiple_of(PAGE)
        && (lo..hi).contains(&start)
        && start.checked_add(len).is_some_and(|e| e <= hi)
}

/// An id no RESTORE may accept: none, beyond 32 bits, or a running VM.
pub fn surely_no_snapshot(id: u64, me: u64) -> bool {
    id == 0 || id > u64::from(u32::MAX) || id == me
}

/// Makes `call` safe for its VM, or says to skip it (None). Protects: the
/// root (never exits, never powers off vCPU 0, never loses its code, stack
/// or patterns), every VM's boot vCPU (the one that ends it), and the CPU_ON
/// context (a vCPU started with a wrong index would share another's stack).
pub fn sanitize(mut call: Call, ctx: &Ctx, rng: &mut Rng) -> Option<Call> {
    let x = &mut call.x;
    match x[0] as u32 {
        HVC_EXIT | PSCI_SYSTEM_OFF | PSCI_SYSTEM_RESET if ctx.root => return None,
        // Random ids hit SYSTEM_OFF/RESET often: let few of them end a VM.
        PSCI_SYSTEM_OFF | PSCI_SYSTEM_RESET if !rng.one_in(64) => return None,
        HVC_EXIT => x[1] = 0,
        PSCI_CPU_OFF if ctx.vcpu == 0 => return None,
        PSCI_CPU_ON_64 | PSCI_CPU_ON_32 => {
            // CPU_ON_32 takes W registers: judge what the hypervisor will see
            // (the junk above bit 31 stays, to check it is ignored).
            let seen = |v: u64| {
                if x[0] as u32 == PSCI_CPU_ON_32 {
                    v as u32 as u64
                } else {
                    v
                }
            };
            let (target, entry) = (seen(x[1]), seen(x[2]));
            let target = ctx.mpidrs.iter().position(|&m| m == target);
            let entry_ok = entry == ctx.secondary_entry;
            let refused = !(ctx.ram.0..ctx.ram.1).contains(&entry) || entry & 3 != 0;
            match target {
                Some(index) if entry_ok => x[3] = index as u64,
                // Any other entry in RAM would run garbage: only refused ones.
                _ if refused => {}
                _ => x[2] |= 1,
            }
        }
        HVC_MEM_RELEASE if release_valid(ctx, x[1], x[2]) => {
            let (lo, hi) = ctx.scratch;
            if x[1] < lo || x[1] + x[2] > hi {
                x[1] += 1;
            }
        }
        HVC_RESTORE => {
            // The root restores only its own snapshots (mod.rs) unless told
            // to try foreign ones; only vCPU 0 may restore anything real.
            let any = ctx.vcpu == 0 || ctx.any_vcpu;
            let free = any && (!ctx.root || ctx.foreign) && !ctx.no_restore;
            let own = ctx.root && ctx.own.contains(&x[1]);
            let avoid = ctx.avoid != 0 && x[1] == ctx.avoid;
            if (!free && !surely_no_snapshot(x[1], ctx.me)) || avoid || own {
                x[1] |= 1 << 63;
            }
        }
        HVC_SNAPSHOT if ctx.vcpu != 0 && !ctx.any_vcpu => return None,
        PSCI_CPU_SUSPEND => return None,
        _ => {}
    }
    Some(call)
}
