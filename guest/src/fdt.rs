//! A minimal flattened device tree reader: depth-first nodes and their
//! properties, bounds-checked, never panicking, and skipping FDT_NOP tokens
//! wherever they occur.
//!
//! Not the `fdt` crate: its 0.1.5 `find_node` stops at an FDT_NOP between
//! sibling nodes (and `skip_current_node` panics on one inside a subtree), so
//! it misses `/cpus` and `/chosen` in a DTB that libfdt has edited in place,
//! e.g. QEMU's `-dtb` plus `-append`.

/// A DTB header's first word (big-endian).
pub const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
/// More than any DTB we expect; bounds what we read from an untrusted header.
pub const MAX_SIZE: usize = 1 << 20;

pub struct Fdt<'a> {
    structs: &'a [u8],
    strings: &'a [u8],
    total_size: usize,
}

/// A node met in a depth-first walk (the root has depth 0).
#[derive(Clone, Copy)]
pub struct Node<'f, 'a> {
    pub name: &'a str,
    pub depth: usize,
    fdt: &'f Fdt<'a>,
    /// Offset in the structure block of the node's first property.
    props: usize,
}

fn be32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// `cells` big-endian 32-bit cells (1 or 2) as one number.
pub fn read_cells(data: &[u8], cells: usize) -> Option<u64> {
    match cells {
        1 => be32(data, 0).map(u64::from),
        2 => Some(u64::from(be32(data, 0)?) << 32 | u64::from(be32(data, 4)?)),
        _ => None,
    }
}

impl<'a> Fdt<'a> {
    /// Reads the DTB at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be readable for the 8-byte header, and for the DTB's total
    /// size (up to 1 MiB) if the header has the DTB magic.
    pub unsafe fn from_ptr(ptr: *const u8) -> Option<Self> {
        // SAFETY: the caller guarantees the header is readable.
        let header = unsafe { core::slice::from_raw_parts(ptr, 8) };
        let size = be32(header, 4)? as usize;
        if be32(header, 0)? != MAGIC || !(40..=MAX_SIZE).contains(&size) {
            return None;
        }
        // SAFETY: the caller guarantees a DTB with this magic is readable for
        // its total size, which we bounded above.
        Self::new(unsafe { core::slice::from_raw_parts(ptr, size) })
    }

    pub fn new(data: &'a [u8]) -> Option<Self> {
        let block = |off_at: usize, size_at: usize| {
            let off = be32(data, off_at)? as usize;
            data.get(off..off.checked_add(be32(data, size_at)? as usize)?)
        };
        Some(Self {
            structs: block(8, 36)?,
            strings: block(12, 32)?,
            total_size: data.len(),
        })
    }

    pub fn total_size(&self) -> usize {
        self.total_size
    }

    /// All nodes, depth first.
    pub fn nodes(&self) -> impl Iterator<Item = Node<'_, 'a>> {
        let mut pos = 0;
        let mut depth = 0;
        core::iter::from_fn(move || loop {
            match be32(self.structs, pos)? {
                BEGIN_NODE => {
                    let (name, next) = self.node_name(pos + 4)?;
                    let node = Node {
                        name,
                        depth,
                        fdt: self,
                        props: next,
                    };
                    pos = next;
                    depth += 1;
                    return Some(node);
                }
                END_NODE => {
                    depth = depth.checked_sub(1)?;
                    pos += 4;
                }
                PROP => pos = self.prop_at(pos)?.2,
                NOP => pos += 4,
                _ => return None, // FDT_END or garbage
            }
        })
    }

    /// The NUL-terminated name at `at`, and the 4-aligned offset after it.
    fn node_name(&self, at: usize) -> Option<(&'a str, usize)> {
        let rest = self.structs.get(at..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        let name = core::str::from_utf8(&rest[..len]).ok()?;
        Some((name, (at + len + 1).next_multiple_of(4)))
    }

    /// The property whose PROP token is at `pos`: (name, value, next offset).
    fn prop_at(&self, pos: usize) -> Option<(&'a str, &'a [u8], usize)> {
        let len = be32(self.structs, pos + 4)? as usize;
        let name_off = be32(self.structs, pos + 8)? as usize;
        let value = self.structs.get(pos + 12..(pos + 12).checked_add(len)?)?;
        let name_bytes = self.strings.get(name_off..)?;
        let name_len = name_bytes.iter().position(|&b| b == 0)?;
        let name = core::str::from_utf8(&name_bytes[..name_len]).ok()?;
        Some((name, value, (pos + 12 + len).next_multiple_of(4)))
    }
}

impl<'a> Node<'_, 'a> {
    /// The node name without its unit address (`cpu@1` -> `cpu`).
    pub fn base_name(&self) -> &'a str {
        self.name.split('@').next().unwrap_or(self.name)
    }

    pub fn prop(&self, name: &str) -> Option<&'a [u8]> {
        let mut pos = self.props;
        loop {
            match be32(self.fdt.structs, pos)? {
                PROP => {
                    let (n, value, next) = self.fdt.prop_at(pos)?;
                    if n == name {
                        return Some(value);
                    }
                    pos = next;
                }
                NOP => pos += 4,
                _ => return None,
            }
        }
    }

    /// A string property, without its terminating NUL.
    pub fn prop_str(&self, name: &str) -> Option<&'a str> {
        let value = self.prop(name)?;
        core::str::from_utf8(value.strip_suffix(&[0]).unwrap_or(value)).ok()
    }

    pub fn prop_u32(&self, name: &str) -> Option<u32> {
        be32(self.prop(name)?, 0)
    }

    /// Whether the `compatible` string list contains `what`.
    pub fn is_compatible(&self, what: &str) -> bool {
        let list = self.prop("compatible").unwrap_or(&[]);
        list.split(|&b| b == 0).any(|s| s == what.as_bytes())
    }
}
