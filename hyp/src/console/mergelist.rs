//! `merge list [n]` (issue 16): the first n merged frames by address, each
//! with its trust group and mappers, so a test (or a person) can pick one
//! and `rmap`, `migrate`, `evacuate` or `reclaim` it. Read only.

use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::mm::glue::{rmap, HypVms};

/// Lists up to `count` merged frames. A snapshot: the scanner and the fault
/// paths do not run while a console command does (CPU 0, no vCPU loaded),
/// but vCPUs on other CPUs may unmerge a frame meanwhile.
pub fn list(count: u64, r: &mut Reply) -> Result<(), CmdError> {
    let rm = rmap();
    let mut listed = 0u64;
    for (pfn, frame) in rm.frames().iter() {
        if listed >= count {
            break;
        }
        if !frame.is_merged() {
            continue;
        }
        // Unmerged since `is_merged` was read: not worth listing.
        let Some(node) = rm.stable_info(pfn) else {
            continue;
        };
        let pa = pfn.pa().raw();
        let mut vms = alloc::vec::Vec::new();
        for m in rm.mappers(pfn, &HypVms) {
            if !vms.contains(&m.vm.0) {
                vms.push(m.vm.0);
            }
        }
        crate::say!(
            r,
            "merged frame {pa:#x}: group {}, {} family items, mapcount {}, vms {vms:?}",
            node.group,
            node.items.len(),
            frame.mapcount()
        );
        let mut entry = hypapi::Map::new();
        entry.insert("pa".into(), pa.into());
        entry.insert("group".into(), node.group.into());
        entry.insert("mapcount".into(), frame.mapcount().into());
        let vms: alloc::vec::Vec<hypapi::Value> = vms.into_iter().map(Into::into).collect();
        entry.insert("vms".into(), vms.into());
        r.push("frames", entry);
        listed += 1;
    }
    crate::say!(r, "merge list: {listed} merged frames listed");
    r.set("listed", listed);
    Ok(())
}
