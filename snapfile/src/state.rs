//! The byte layout of the hypervisor's VM-state blob (docs/SNAPSHOT-STATE.md): magic,
//! version, shape, name, the guest's virtual count and every vCPU's registers, followed by
//! the device state (vGIC, UART), which the hypervisor encodes and decodes itself and this
//! layer carries as opaque bytes. The store stores the blob as is (and checksums it); it
//! lives here, beside the image format, so that its encoding and its checks are tested on
//! the host. Decoding is total: any bytes give a value or an error, never a panic, a read
//! past the end or an allocation larger than the blob.

use alloc::string::String;
use alloc::vec::Vec;

/// The blob's first bytes.
pub const STATE_MAGIC: [u8; 8] = *b"MHVSTATE";
/// The layout version this code writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The longest VM name kept, in bytes (a longer one is cut at a character boundary).
pub const STATE_NAME_MAX: usize = 64;
/// Bytes of one vCPU record with `el1` EL1 registers.
pub const fn vcpu_len(el1: usize) -> usize {
    4 + 1 + 31 * 8 + 8 + 8 + 4 + el1 * 8 + 32 * 16 + 8 + 8
}

/// What a blob says a VM looks like (read before the VM is created).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateHeader {
    /// The VM's name.
    pub name: String,
    /// Guest RAM base (IPA) and size in bytes.
    pub ram_base: u64,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// One vCPU's registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// Its index (records are in index order: it must be its position).
    pub index: u32,
    /// Powered on (PSCI).
    pub on: bool,
    /// x0..x30.
    pub x: [u64; 31],
    /// PC and PSTATE.
    pub pc: u64,
    /// PSTATE (SPSR_EL2 as saved).
    pub pstate: u64,
    /// The EL1 system registers, in the hypervisor's order (`vm/vcpu.rs`'s `el1_state!`).
    pub el1: Vec<u64>,
    /// V0..V31.
    pub q: [u128; 32],
    /// FPSR.
    pub fpsr: u64,
    /// FPCR.
    pub fpcr: u64,
}

/// A whole blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// Shape and name (its `vcpus` is the number of records in `vcpus`).
    pub header: StateHeader,
    /// The guest's virtual count (CNTVCT_EL0) when the state was captured.
    pub virtual_count: u64,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The device state that follows (vGIC, UART), the hypervisor's to decode.
    pub devices: Vec<u8>,
}

/// Why a blob was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// It does not start with [`STATE_MAGIC`].
    NoMagic,
    /// Another layout version than [`STATE_VERSION`].
    Version(u32),
    /// It ends inside a field.
    Short,
    /// The name is longer than [`STATE_NAME_MAX`] or not UTF-8.
    BadName,
    /// vCPU record `n` is malformed (index not its position, a flag neither 0 nor 1).
    BadVcpu(u32),
    /// The EL1 register count differs from this build's.
    El1Count(u32),
}

impl StateError {
    /// A sentence for the operator.
    pub fn what(self) -> &'static str {
        match self {
            StateError::NoMagic => "no VM-state magic",
            StateError::Version(_) => "the VM state has another version than this hypervisor's",
            StateError::Short => "the VM state is cut short",
            StateError::BadName => "bad VM name",
            StateError::BadVcpu(_) => "a vCPU's state is malformed",
            StateError::El1Count(_) => "the VM state has another EL1 register set than this build",
        }
    }
}

/// Appends little-endian fields.
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// Takes little-endian fields from the front; `None` when the bytes run out.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(StateError::Short)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        self.take().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Result<u128, StateError> {
        self.take().map(u128::from_le_bytes)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.0.len() {
            return Err(StateError::Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// `name` cut to at most [`STATE_NAME_MAX`] bytes, at a character boundary.
fn kept_name(name: &str) -> &str {
    let mut end = name.len().min(STATE_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The blob of `s`. The header's vCPU count is written as `s.vcpus.len()`, and the name
/// cut to [`STATE_NAME_MAX`] bytes.
pub fn encode_state(s: &VmState) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(
        64 + s.vcpus.len() * vcpu_len(26) + s.devices.len(),
    ));
    e.0.extend_from_slice(&STATE_MAGIC);
    e.u32(STATE_VERSION);
    e.u64(s.header.ram_base);
    e.u64(s.header.ram_size);
    e.u32(s.vcpus.len() as u32);
    let name = kept_name(&s.header.name);
    e.u32(name.len() as u32);
    e.0.extend_from_slice(name.as_bytes());
    e.u64(s.virtual_count);
    for v in &s.vcpus {
        put_vcpu(&mut e, v);
    }
    e.0.extend_from_slice(&s.devices);
    e.0
}

fn put_vcpu(e: &mut Enc, v: &VcpuState) {
    e.u32(v.index);
    e.0.push(u8::from(v.on));
    v.x.iter().for_each(|&x| e.u64(x));
    e.u64(v.pc);
    e.u64(v.pstate);
    e.u32(v.el1.len() as u32);
    v.el1.iter().for_each(|&w| e.u64(w));
    v.q.iter().for_each(|&q| e.u128(q));
    e.u64(v.fpsr);
    e.u64(v.fpcr);
}

/// The blob's header, and the bytes after it (from the virtual count on).
pub fn decode_header(blob: &[u8]) -> Result<(StateHeader, &[u8]), StateError> {
    let rest = blob.strip_prefix(&STATE_MAGIC).ok_or(StateError::NoMagic)?;
    let mut d = Dec(rest);
    let version = d.u32()?;
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let (ram_base, ram_size, vcpus) = (d.u64()?, d.u64()?, d.u32()?);
    let len = d.u32()? as usize;
    if len > STATE_NAME_MAX {
        return Err(StateError::BadName);
    }
    let name = core::str::from_utf8(d.bytes(len)?).map_err(|_| StateError::BadName)?;
    let h = StateHeader {
        name: String::from(name),
        ram_base,
        ram_size,
        vcpus,
    };
    Ok((h, d.0))
}

/// The whole blob, for a build whose vCPUs have `el1_count` EL1 registers.
pub fn decode_state(blob: &[u8], el1_count: usize) -> Result<VmState, StateError> {
    let (header, rest) = decode_header(blob)?;
    let mut d = Dec(rest);
    let virtual_count = d.u64()?;
    // Never more records reserved than the bytes could hold.
    let fit = d.0.len() / vcpu_len(el1_count);
    let mut vcpus = Vec::with_capacity((header.vcpus as usize).min(fit));
    for i in 0..header.vcpus {
        vcpus.push(get_vcpu(&mut d, i, el1_count)?);
    }
    Ok(VmState {
        header,
        virtual_count,
        vcpus,
        devices: d.0.to_vec(),
    })
}

fn get_vcpu(d: &mut Dec, index: u32, el1_count: usize) -> Result<VcpuState, StateError> {
    if d.u32()? != index {
        return Err(StateError::BadVcpu(index));
    }
    let on = match d.take::<1>()?[0] {
        0 => false,
        1 => true,
        _ => return Err(StateError::BadVcpu(index)),
    };
    let mut x = [0u64; 31];
    for r in x.iter_mut() {
        *r = d.u64()?;
    }
    let (pc, pstate) = (d.u64()?, d.u64()?);
    let count = d.u32()?;
    if count as usize != el1_count {
        return Err(StateError::El1Count(count));
    }
    let el1 = (0..el1_count).map(|_| d.u64()).collect::<Result<_, _>>()?;
    let mut q = [0u128; 32];
    for r in q.iter_mut() {
        *r = d.u128()?;
    }
    Ok(VcpuState {
        index,
        on,
        x,
        pc,
        pstate,
        el1,
        q,
        fpsr: d.u64()?,
        fpcr: d.u64()?,
    })
}
