//! An independent stage-2 translation oracle: reads raw table memory the way the MMU does,
//! starting from VTCR_EL2 and VTTBR_EL2, with its own bit positions (it uses nothing of the
//! crate but `HostMemory::read`/`is_allocated` and the page-state decoder).
#![allow(dead_code)]

use stage2::software;
use stage2::HostMemory;
use std::collections::{BTreeMap, BTreeSet};

/// What the MMU would make of one 4 KiB IPA page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    Mapped {
        pa: u64,
        read: bool,
        write: bool,
        exec: bool,
        device: bool,
        young: bool,
        sw: u8,
    },
    Software(stage2::PageState),
}

/// One leaf as found in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawLeaf {
    pub ipa: u64,
    pub level: u8,
    pub raw: u64,
}

pub struct Oracle<'a> {
    pub mem: &'a HostMemory,
    pub ipa_bits: u32,
    pub start_level: u8,
    pub root_entries: u64,
    pub root: u64,
}

const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

fn shift(level: u8) -> u32 {
    12 + 9 * (3 - level as u32)
}

impl<'a> Oracle<'a> {
    /// Decodes VTCR/VTTBR independently of the crate.
    pub fn new(mem: &'a HostMemory, vtcr: u64, vttbr: u64) -> Self {
        let t0sz = (vtcr & 0x3f) as u32;
        let sl0 = (vtcr >> 6) & 3;
        assert_eq!((vtcr >> 14) & 3, 0, "TG0 must be 4K");
        assert_eq!((vtcr >> 12) & 3, 3, "SH0 inner");
        assert_eq!((vtcr >> 8) & 0xf, 0b0101, "IRGN0/ORGN0 WBWA");
        assert_ne!(vtcr & (1 << 31), 0, "RES1");
        let ipa_bits = 64 - t0sz;
        let start_level = match sl0 {
            0 => 2,
            1 => 1,
            2 => 0,
            _ => panic!("SL0 3 is not used with 4K granule"),
        };
        // Bits resolved at the start level, above the 9 of one table: concatenation.
        let root_bits = ipa_bits - shift(start_level);
        assert!(root_bits <= 9 + 4, "more than 16 concatenated tables");
        assert!(
            start_level > 0 || root_bits <= 9,
            "no concatenation at level 0"
        );
        let ps_bits = [32, 36, 40, 42, 44, 48, 52][((vtcr >> 16) & 7) as usize];
        assert!(ipa_bits <= ps_bits);
        let root = vttbr & 0x0000_ffff_ffff_fffe;
        let root_entries = 1u64 << root_bits;
        let root_bytes = (root_entries * 8).max(4096);
        assert_eq!(root % root_bytes, 0, "root must be aligned to its size");
        Oracle {
            mem,
            ipa_bits,
            start_level,
            root_entries,
            root,
        }
    }

    /// The leaf (valid or not) the MMU would reach for `ipa`, or None for a translation fault
    /// on an empty slot. Panics on malformed tables.
    pub fn leaf(&self, ipa: u64) -> Option<RawLeaf> {
        if ipa >> self.ipa_bits != 0 {
            return None;
        }
        let mut level = self.start_level;
        let mut table = self.root;
        loop {
            let idx = if level == self.start_level {
                ipa >> shift(level)
            } else {
                (ipa >> shift(level)) & 511
            };
            assert!(level != self.start_level || idx < self.root_entries);
            let desc = self.mem.read(table + idx * 8);
            let base = ipa & !((1u64 << shift(level)) - 1);
            if desc == 0 {
                return None;
            }
            if desc & 1 == 0 {
                return Some(RawLeaf {
                    ipa: base,
                    level,
                    raw: desc,
                });
            }
            if level < 3 && desc & 2 != 0 {
                table = desc & OA_MASK;
                assert!(
                    self.mem.is_allocated(table),
                    "table descriptor to a free page {table:#x}"
                );
                level += 1;
                continue;
            }
            assert!(
                level > 0 && (level == 3) == (desc & 2 != 0),
                "bad descriptor {desc:#x} at level {level}"
            );
            return Some(RawLeaf {
                ipa: base,
                level,
                raw: desc,
            });
        }
    }

    /// The state of the page at `ipa` (PA of that page, not of the block).
    pub fn translate(&self, ipa: u64) -> Option<PageState> {
        let leaf = self.leaf(ipa)?;
        Some(decode_page(leaf, ipa))
    }

    /// Every non-empty leaf in the tables, in IPA order, and checks the tree: every table is an
    /// allocated page reachable exactly once. Returns the leaves and the number of table pages
    /// (root pages included).
    pub fn dump(&self) -> (Vec<RawLeaf>, usize) {
        let root_pages = (self.root_entries * 8).div_ceil(4096) as usize;
        let (leaves, tables) = self.tree();
        (leaves, root_pages + tables.len())
    }

    /// As [`Oracle::dump`], with the set of table pages below the root (their addresses).
    pub fn tree(&self) -> (Vec<RawLeaf>, BTreeSet<u64>) {
        let mut leaves = Vec::new();
        let mut seen = BTreeSet::new();
        let root_pages = (self.root_entries * 8).div_ceil(4096) as usize;
        for p in 0..root_pages as u64 {
            assert!(self.mem.is_allocated(self.root + p * 4096));
        }
        self.dump_table(
            self.root,
            self.start_level,
            0,
            self.root_entries,
            &mut leaves,
            &mut seen,
        );
        (leaves, seen)
    }

    fn dump_table(
        &self,
        table: u64,
        level: u8,
        base: u64,
        entries: u64,
        out: &mut Vec<RawLeaf>,
        seen: &mut BTreeSet<u64>,
    ) {
        for i in 0..entries {
            let desc = self.mem.read(table + i * 8);
            let ipa = base + (i << shift(level));
            if desc == 0 {
                continue;
            }
            if desc & 1 == 1 && level < 3 && desc & 2 != 0 {
                let next = desc & OA_MASK;
                assert!(
                    self.mem.is_allocated(next),
                    "table descriptor to a free page"
                );
                assert!(seen.insert(next), "table page linked twice");
                self.dump_table(next, level + 1, ipa, 512, out, seen);
            } else {
                assert!(desc & 1 == 0 || (level > 0 && (level == 3) == (desc & 2 != 0)));
                out.push(RawLeaf {
                    ipa,
                    level,
                    raw: desc,
                });
            }
        }
    }

    /// Page-granular view of every leaf (blocks expanded).
    pub fn pages(&self) -> (BTreeMap<u64, PageState>, usize) {
        let (leaves, tables) = self.dump();
        let mut map = BTreeMap::new();
        for l in leaves {
            let size = 1u64 << shift(l.level);
            for off in (0..size).step_by(4096) {
                map.insert(l.ipa + off, decode_page(l, l.ipa + off));
            }
        }
        (map, tables)
    }
}

/// Decodes a leaf for the page at `ipa` with the architectural bit positions.
pub fn decode_page(leaf: RawLeaf, ipa: u64) -> PageState {
    let d = leaf.raw;
    if d & 1 == 0 {
        return PageState::Software(
            software::decode(d).unwrap_or_else(|| panic!("unknown invalid descriptor {d:#x}")),
        );
    }
    let size = 1u64 << shift(leaf.level);
    let memattr = (d >> 2) & 0xf;
    assert!(memattr == 0xf || memattr == 0x1, "memattr {memattr:#x}");
    assert_eq!((d >> 8) & 3, 3, "inner shareable");
    assert_eq!(d & (1 << 11), 0);
    let xn = (d >> 53) & 3;
    assert!(xn == 0 || xn == 2);
    let oa = d & OA_MASK & !(size - 1);
    assert_eq!(
        d & OA_MASK & (size - 1),
        0,
        "block output address has low bits set"
    );
    PageState::Mapped {
        pa: oa + (ipa - leaf.ipa),
        read: d & (1 << 6) != 0,
        write: d & (1 << 7) != 0,
        exec: xn == 0,
        device: memattr == 1,
        young: d & (1 << 10) != 0,
        sw: ((d >> 55) & 0xf) as u8,
    }
}
