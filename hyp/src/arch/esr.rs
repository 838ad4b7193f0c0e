//! ESR_EL2 syndromes of the guest exits the hypervisor handles, decoded in
//! one place (Arm ARM D24.2.43, "ESR_EL2"). Everything above works on these
//! typed views, never on raw ISS bits.

/// Exception classes (ESR_EL2.EC) the exit handler dispatches on.
pub const EC_WFX: u64 = 0x01;
pub const EC_HVC64: u64 = 0x16;
pub const EC_SMC64: u64 = 0x17;
pub const EC_SYSREG: u64 = 0x18;
pub const EC_IABT_LOW: u64 = 0x20;
pub const EC_DABT_LOW: u64 = 0x24;

/// ESR_ELx.IL: the trapped instruction was 32 bits.
pub const ESR_IL: u64 = 1 << 25;
/// Data/instruction fault status code of a synchronous external abort, not
/// on a table walk (what the hypervisor injects for a wild access).
pub const FSC_SEA: u64 = 0x10;

const ISS_MASK: u64 = 0x1ff_ffff;
const ISS_ISV: u64 = 1 << 24;
const ISS_WNR: u64 = 1 << 6;
const ISS_S1PTW: u64 = 1 << 7;
/// Fault status class (FSC[5:2]) of a translation fault at any level.
const FSC_TRANSLATION: u64 = 0b0001;
/// Fault status class of an Access flag fault at any level.
const FSC_ACCESS_FLAG: u64 = 0b0010;
/// ESR_EL2.ISS.TI of a trapped WFx: 1 = WFE.
const ISS_WFE: u64 = 1;

/// The exception class.
pub fn ec(esr: u64) -> u64 {
    esr >> 26
}

/// A trapped WFx was a WFE (not a WFI).
pub fn is_wfe(esr: u64) -> bool {
    esr & ISS_WFE != 0
}

/// A stage-2 instruction or data abort from the guest.
#[derive(Clone, Copy, Debug)]
pub struct Abort {
    /// A data access (not an instruction fetch).
    pub is_data: bool,
    /// The access writes. A stage-1 table walk may write (hardware access
    /// and dirty flags), so a fault on a walk counts as a write, as KVM
    /// treats it.
    pub write: bool,
    /// The fault was on the guest's own stage-1 table walk.
    pub s1ptw: bool,
    /// A translation fault (the entry was invalid), not a permission or
    /// access-flag fault.
    pub translation: bool,
    /// An Access flag fault: the entry is valid but its AF is clear (the
    /// reclaim clock's software ageing, on CPUs without hardware AF).
    pub access_flag: bool,
    /// The load or store, when the syndrome describes it (ISV = 1).
    pub access: Option<DataAccess>,
}

/// A single load or store described by a data abort's syndrome (ISV = 1):
/// what an MMIO emulation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAccess {
    /// The transfer register (31 = XZR/WZR).
    pub srt: usize,
    /// Bytes: 1, 2, 4 or 8.
    pub size: u64,
    /// A store (else a load).
    pub write: bool,
}

impl Abort {
    /// Decodes an abort syndrome (EC 0x20 or 0x24).
    pub fn decode(esr: u64) -> Abort {
        let is_data = ec(esr) != EC_IABT_LOW;
        let s1ptw = esr & ISS_S1PTW != 0;
        let wnr = is_data && esr & ISS_WNR != 0;
        let access = (is_data && esr & ISS_ISV != 0).then(|| DataAccess {
            srt: ((esr >> 16) & 0x1f) as usize,
            size: 1 << ((esr >> 22) & 3),
            write: wnr,
        });
        Abort {
            is_data,
            write: wnr || s1ptw,
            s1ptw,
            translation: (esr & 0x3f) >> 2 == FSC_TRANSLATION,
            access_flag: (esr & 0x3f) >> 2 == FSC_ACCESS_FLAG,
            access,
        }
    }
}

/// A trapped MSR/MRS or system instruction (EC 0x18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysregAccess {
    pub op0: u64,
    pub op1: u64,
    pub crn: u64,
    pub crm: u64,
    pub op2: u64,
    /// The transfer register (31 = XZR).
    pub rt: usize,
    /// MRS (a read); else MSR or a system instruction.
    pub read: bool,
}

impl SysregAccess {
    pub fn decode(esr: u64) -> SysregAccess {
        let iss = esr & ISS_MASK;
        SysregAccess {
            op0: (iss >> 20) & 3,
            op1: (iss >> 14) & 7,
            crn: (iss >> 10) & 0xf,
            crm: (iss >> 1) & 0xf,
            op2: (iss >> 17) & 7,
            rt: ((iss >> 5) & 0x1f) as usize,
            read: iss & 1 != 0,
        }
    }

    /// DC ISW, DC CSW or DC CISW: set/way cache maintenance.
    pub fn is_dc_set_way(&self) -> bool {
        self.op0 == 1
            && self.op1 == 0
            && self.crn == 7
            && matches!((self.crm, self.op2), (6, 2) | (10, 2) | (14, 2))
    }

    /// ICC_SGI1R_EL1, ICC_ASGI1R_EL1 or ICC_SGI0R_EL1 (SGI generation).
    pub fn is_gic_sgi(&self) -> bool {
        self.op0 == 3
            && self.crn == 12
            && self.crm == 11
            && matches!((self.op1, self.op2), (0, 5) | (1, 6) | (2, 7))
    }
}

/// The mask of an access of `size` bytes.
pub fn size_mask(size: u64) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1 << (size * 8)) - 1
    }
}
