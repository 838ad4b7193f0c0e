//! The console's commands as values. Every field holds a value the parser
//! checked, and `Display` prints a command back in the console syntax
//! (`parse(&cmd.to_string()) == Ok(Some(cmd))`).

use crate::PAGE_SIZE;
use alloc::string::String;
use core::fmt;

/// A VM id as typed; whether that VM exists is the hypervisor's question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u32);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A non-empty, page-aligned `[start, end)` of addresses (IPA or PA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: u64,
    end: u64,
}

impl PageRange {
    /// `None` unless both ends are page-aligned and `start < end`.
    pub const fn new(start: u64, end: u64) -> Option<PageRange> {
        if !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) || start >= end {
            return None;
        }
        Some(PageRange { start, end })
    }

    /// First address of the range, page-aligned.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Exclusive; at least `start + PAGE_SIZE`, so `end - PAGE_SIZE` never
    /// underflows.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// The address of the range's last page.
    pub const fn last_page(&self) -> u64 {
        self.end - PAGE_SIZE
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} {:#x}", self.start, self.end)
    }
}

/// One console command with validated arguments. Optional batch sizes stay
/// `None` when not typed: the default is the memory manager's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `help`: print [`HELP`](crate::HELP).
    Help,
    /// `vms`: list the VMs and their state.
    Vms,
    /// `stats`: print the memory manager's and the exit counters.
    Stats,
    /// `pause <vm>`: stop scheduling the VM's vCPUs until `resume`.
    Pause(VmId),
    /// `resume <vm>`: schedule a paused VM's vCPUs again.
    Resume(VmId),
    /// `destroy <vm>`: stop the VM (exit status 0) and free its memory once its
    /// last running vCPU is out.
    Destroy(VmId),
    /// `fork <vm> [n]`: n in 1..=1000, 1 when not typed.
    Fork {
        /// The VM to fork.
        vm: VmId,
        /// How many children to create, 1..=1000.
        count: u32,
    },
    /// `snapshot <vm> [n]`: n frozen forks of the VM, sharing its memory
    /// copy-on-write (a snapshot never runs, so it holds no VMID); each id is
    /// what `restore` takes.
    Snapshot {
        /// The VM to snapshot.
        vm: VmId,
        /// How many snapshots to take, 1..=1000 (1 when not typed).
        count: u32,
    },
    /// `restore <vm> <s>`: reset the VM's memory and vCPUs to snapshot `s`.
    Restore {
        /// The VM to reset.
        vm: VmId,
        /// The snapshot to reset it to (a VM id printed by `snapshot`): any frozen
        /// VM of the same shape (RAM layout and vCPU count), not only one of `vm`.
        snapshot: VmId,
    },
    /// `rmap <pa>`: who maps the frame at `pa` (hex).
    Rmap {
        /// Physical address of the frame, any byte in it (not rounded here).
        pa: u64,
    },
    /// `migrate <vm> <ipa> <ipa-end> [batch]`.
    Migrate {
        /// The VM whose frames move.
        vm: VmId,
        /// The guest-physical (IPA) range whose frames move; it must lie in the VM's
        /// RAM.
        range: PageRange,
        /// Frames per TLB invalidation, 1..=4096.
        batch: Option<usize>,
    },
    /// `evacuate <pa> <pa-end> [batch]`.
    Evacuate {
        /// The host-physical range to empty; its first and last pages must be RAM.
        range: PageRange,
        /// Frames per TLB invalidation, 1..=4096.
        batch: Option<usize>,
    },
    /// `online <pa> <pa-end>`.
    Online {
        /// The host-physical range to put back into the frame allocator.
        range: PageRange,
    },
    /// `reclaim <pages> [batch]`.
    Reclaim {
        /// How many cold frames to reclaim, 1..=2^24.
        pages: u64,
        /// Frames per TLB invalidation, 1..=4096.
        batch: Option<usize>,
    },
    /// `chaos <secs> [seed] [max-vms]`: seed 1 and 12 VMs when not typed.
    Chaos {
        /// How long to run, 1..=600 seconds.
        secs: u64,
        /// Seed of the xorshift generator that picks the operations (any `u64`).
        seed: u64,
        /// Chaos forks only while fewer than this many VMs exist (all VMs, not only
        /// its own), 1..=64.
        max_vms: usize,
    },
    /// `wait <secs>`.
    Wait {
        /// The longest wait, 1..=3600 seconds.
        secs: u64,
    },
    /// `bench fork <MiB> [forks]`.
    BenchFork {
        /// MiB of touched RAM in the forked VM, 1..=4096.
        mib: u64,
        /// Only fork this many times, 1..=1000, no copy (`cargo xtask profile fork`).
        forks: Option<u32>,
    },
    /// `bench migrate <mappers> <pages> <batch> [blocks]`.
    BenchMigrate {
        /// How many VMs map each frame (the bench VM and its snapshots), 1..=200.
        mappers: u64,
        /// Frames migrated per round, 1..=65536.
        pages: u64,
        /// Frames per TLB invalidation, 1..=4096.
        batch: usize,
        /// Keep the bench VM's 2 MiB blocks whole (`blocks`), so whole
        /// folios migrate as blocks; otherwise a warm-up migration splits
        /// them and the pages move one by one.
        blocks: bool,
    },
    /// `bench reclaim <pages> <batch>`.
    BenchReclaim {
        /// Pages reclaimed, 1..=65536.
        pages: u64,
        /// Frames per TLB invalidation, 1..=4096.
        batch: usize,
    },
    /// `bench merge <pages>`: the same-page merger's scan next to a memcmp
    /// of the same pages, and a CoW fault on a merged page next to one on a
    /// forked page.
    BenchMerge {
        /// Pages per bench VM, 1..=65536.
        pages: u64,
    },
    /// `sleep <ms>`: holds the next script command back.
    Sleep {
        /// Delay in milliseconds, 1..=60000.
        ms: u64,
    },
    /// `quit`: end the machine, exiting QEMU with the worst VM exit status seen
    /// (clamped to 0..=255).
    Quit,
    /// `console <vm>|hyp`: give the keyboard to that VM's console (or keep
    /// it at the hypervisor's).
    Console(Focus),
    // The hypervisor's disk (issue 17).
    /// `disk`: the disk's capacity, sector size and whether it is read-only.
    Disk,
    /// `disk sum <lba> <sectors>`: the FNV-1a 64 checksum of the sectors,
    /// read from the disk.
    DiskSum {
        /// First sector.
        lba: u64,
        /// How many sectors, 1..=2^21 (1 GiB).
        sectors: u64,
    },
    /// `disk fill <lba> <sectors> <seed>`: writes the seeded pattern of
    /// docs/TESTING.md over the sectors, and flushes.
    DiskFill {
        /// First sector.
        lba: u64,
        /// How many sectors, 1..=2^21 (1 GiB).
        sectors: u64,
        /// The pattern's seed (any `u64`).
        seed: u64,
    },
    /// `bench disk [MiB] [passes] [at <lba>]`: raw sequential write and read
    /// throughput of the disk over MiBs from `lba`, or its last MiBs (the
    /// data there is put back).
    BenchDisk {
        /// MiB written and read, 1..=1024 (64 when not typed).
        mib: u64,
        /// Write-and-read passes, 1..=15 (5 when not typed): one pass is the
        /// raw half of a pair interleaved with a save (`bench persist`).
        passes: u32,
        /// The first sector (`at <lba>`): `bench persist` writes where its
        /// saves land. None: the disk's last MiBs.
        at: Option<u64>,
    },
    // Independent VMs and trust groups (issue 16).
    /// `create linux|test [--mem MiB] [--vcpus N] [--cmdline ARGS...]`: boot a
    /// new, independent VM (not a fork) from the images the machine holds.
    Create(Create),
    /// `merge group <vm> <group>`: put the VM in trust group `group` (VMs
    /// merge identical pages only within a group).
    MergeGroup {
        /// The VM to move.
        vm: VmId,
        /// Its new group, 1..=[`MAX_GROUP`].
        group: u32,
    },
    /// `merge`: one whole pass of the same-page merger over every VM (a
    /// second one if the first found pages new or changed since their last
    /// visit), printing what it saved.
    Merge,
    /// `merge auto <pages-per-second>`: the merger scans in the background
    /// at that rate, 1..=[`MAX_MERGE_RATE`].
    MergeAuto {
        /// Pages visited per second.
        rate: u64,
    },
    /// `merge off`: stop the background merger.
    MergeOff,
    /// `merge list [n]`: the first n (default 8) merged frames, by address,
    /// with their trust group and mappers (read only: for tests and people).
    MergeList {
        /// How many frames to list, 1..=[`MAX_MERGE_LIST`].
        count: u64,
    },
    // Snapshots on the disk (issue 17).
    /// `save <vm> <name> [--diff <parent>]`: writes the VM (or an in-memory
    /// snapshot) to the disk's store as `name`; with `--diff`, only the pages
    /// dirtied since it was saved as `parent`.
    Save {
        /// The VM or snapshot to save.
        vm: VmId,
        /// The new snapshot's name (see [`SnapName`]).
        name: SnapName,
        /// The earlier save this one is a diff of.
        parent: Option<SnapName>,
    },
    /// `load <name> [--no-prefetch]`: a new VM from the saved snapshot, its
    /// memory read from the disk as it faults (and by a background prefetch
    /// in the order the VM first touched its pages, unless `--no-prefetch`).
    Load {
        /// The snapshot's name.
        name: SnapName,
        /// Prefetch pages in the background.
        prefetch: bool,
    },
    /// `images`: the snapshots saved on the disk (name, parent, size) and
    /// its free space.
    Images,
    /// `delete <name>`: removes a saved snapshot from the disk, freeing its
    /// space (refused for the parent of a diff, and for an image a loaded
    /// VM still reads its pages from).
    Delete {
        /// The snapshot's name.
        name: SnapName,
    },
}

/// The fastest background merge rate a command names (pages per second).
pub const MAX_MERGE_RATE: u64 = 1 << 24;

/// The most merged frames `merge list` names.
pub const MAX_MERGE_LIST: u64 = 4096;

/// The largest trust group a command names (fresh groups are numbered above
/// every group ever named, so this leaves room).
pub const MAX_GROUP: u32 = 1_000_000;

/// Which guest `create` boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Guest {
    /// Linux from the kernel and initramfs QEMU's loader put in RAM.
    Linux,
    /// The embedded Rust test guest.
    Test,
}

impl fmt::Display for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Guest::Linux => "linux",
            Guest::Test => "test",
        })
    }
}

/// A new VM's settings as `create` typed them; `None`: the machine's default
/// (the bootargs' `mem=` and `vcpus=`, the guest's usual command line).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Create {
    /// Which guest.
    pub guest: Guest,
    /// Guest RAM in MiB, 1..=2^20.
    pub mem_mib: Option<u64>,
    /// vCPUs, 1..=16.
    pub vcpus: Option<usize>,
    /// The guest's command line (Linux) or arguments (test guest).
    pub cmdline: Option<Words>,
}

/// Non-empty text of whitespace-free words joined by single spaces (a
/// command line as the console splits it, so it prints back the same).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Words(String);

impl Words {
    /// The words of `text` re-joined by single spaces; `None` if there are none.
    pub fn new(text: &str) -> Option<Words> {
        let mut out = String::new();
        for w in text.split_whitespace() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(w);
        }
        (!out.is_empty()).then_some(Words(out))
    }

    /// The words, single-spaced.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A snapshot name on the disk: 1 to 32 bytes of printable ASCII without
/// spaces, not starting with `-` (so it cannot be taken for an option).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SnapName(String);

impl SnapName {
    /// The longest name, in bytes (the store's limit).
    pub const MAX: usize = 32;

    /// Checks a name.
    pub fn new(s: &str) -> Option<SnapName> {
        let ok = (1..=Self::MAX).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| SnapName(String::from(s)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Create {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "create {}", self.guest)?;
        if let Some(m) = self.mem_mib {
            write!(f, " --mem {m}")?;
        }
        if let Some(n) = self.vcpus {
            write!(f, " --vcpus {n}")?;
        }
        if let Some(c) = &self.cmdline {
            write!(f, " --cmdline {}", c.0)?;
        }
        Ok(())
    }
}

impl fmt::Display for SnapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which console has the keyboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Focus {
    /// The hypervisor's own (`hyp>`).
    Hypervisor,
    /// A VM's console.
    Vm(VmId),
}

impl fmt::Display for Focus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Focus::Hypervisor => f.write_str("hyp"),
            Focus::Vm(vm) => write!(f, "{vm}"),
        }
    }
}

/// The console's `help` text: the syntax `parse` accepts.
pub const HELP: &str = "commands:
  help              this list
  vms               list VMs
  stats             memory and exit counters
  pause <vm>        stop scheduling a VM's vCPUs
  resume <vm>       resume a paused VM
  destroy <vm>      stop a VM and free its memory
  fork <vm> [n]     fork a VM (n times); children share memory copy-on-write
  snapshot <vm> [n] a frozen fork of a VM (n times); snapshots hold no VMID
  restore <vm> <s>  reset a VM to snapshot s
  rmap <pa>         which VMs map the frame at pa, and through which chain
  bench fork <MiB> [n]  time a fork of a VM with MiB resident next to an eager copy
                    (n: only fork n times)
  migrate <vm> <ipa> <ipa-end> [batch]  move a VM's frames in [ipa, ipa-end) to new frames
  evacuate <pa> <pa-end> [batch]        move every frame out of [pa, pa-end) and keep it offline
  online <pa> <pa-end>                  give an evacuated range back to the allocator
  reclaim <pages> [batch]               push cold frames (access-bit clock) to the compressed store
  chaos <secs> [seed] [max-vms]         random migrate/evacuate/reclaim/fork/destroy for secs
  wait <secs>                           wait until no runnable VM is left (at most secs)
  bench migrate <mappers> <pages> <batch> [blocks]  migration next to memcpy of the same frames
  bench reclaim <pages> <batch>         reclaim next to LZ4 of the same pages, and fault-in
  bench merge <pages>                   merge scan next to memcmp; CoW on merged vs forked pages
  sleep <ms>        (in a script) wait before the next command
  console <vm>|hyp  give the keyboard to a VM's console (or the hypervisor's)
  create linux|test [--mem MiB] [--vcpus N] [--cmdline ARGS...]  boot a new independent VM
  merge group <vm> <group>              put a VM in a trust group (pages merge only within one)
  merge             merge identical pages across VMs of a trust group now (one pass)
  merge auto <pages-per-second>         keep merging in the background at that rate
  merge off         stop merging in the background
  merge list [n]    the first n merged frames (default 8): address, group, mappers
  quit              end the machine
  disk              the hypervisor's disk: capacity, sector size, read-only
  disk sum <lba> <sectors>              FNV-1a 64 checksum of sectors read from the disk
  disk fill <lba> <sectors> <seed>      write a seeded test pattern over sectors (and flush)
  bench disk [MiB] [passes] [at <lba>]  raw write and read throughput of the disk's last MiBs, or from lba (its data is kept)
  save <vm> <name> [--diff <parent>]    write a VM or snapshot to the disk (a diff: pages dirtied since parent)
  load <name> [--no-prefetch]           a new VM from a saved snapshot, its memory read lazily from the disk
  images            the snapshots saved on the disk, and its free space
  delete <name>     remove a saved snapshot from the disk (not a diff's parent, nor one a loaded VM reads)
keys: Ctrl-A Ctrl-A next console (hypervisor -> vm ... -> hypervisor);
      Ctrl-A <vm> Enter that VM; Ctrl-A h the hypervisor; Ctrl-A a a literal Ctrl-A";
