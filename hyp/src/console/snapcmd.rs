//! The commands of snapshots on the disk (issue 17): `save`, `load`,
//! `images` and `delete` (`persist` does the work; this file answers).

use crate::console::error::CmdError;
use crate::console::reply::Reply;
use crate::persist::{images, load, save, PersistError};
use hypcmd::Command;

/// Runs `save`, `load`, `images` or `delete`.
pub fn run(cmd: Command, r: &mut Reply) -> Result<(), CmdError> {
    match cmd {
        Command::Save { vm, name, parent } => {
            let v = crate::console::cmd::vm(vm)?;
            let parent = parent.as_ref().map(|p| p.as_str());
            let rep = save::save(&v, name.as_str(), parent).map_err(CmdError::Persist)?;
            say_saved(&rep, name.as_str(), parent, r);
        }
        Command::Load { name, prefetch } => {
            let rep = load::load(name.as_str(), prefetch).map_err(CmdError::Persist)?;
            say_loaded(&rep, name.as_str(), prefetch, r);
        }
        Command::Images => say_images(r)?,
        Command::Delete { name } => {
            let bytes = images::delete(name.as_str())?;
            crate::say!(r, "deleted '{name}' ({} KiB freed)", bytes >> 10);
            r.set("freed", bytes);
        }
        other => return Err(CmdError::NotHere(other)),
    }
    Ok(())
}

/// `images`: one line per saved snapshot, oldest first, then the free space.
fn say_images(r: &mut Reply) -> Result<(), PersistError> {
    let (list, free) = images::list()?;
    crate::say!(
        r,
        "  seq  name                              KiB  parent / loaded"
    );
    for i in &list {
        crate::say!(
            r,
            "  {:<4} {:<32} {:>8}  {}{}",
            i.seq,
            i.name,
            i.bytes >> 10,
            i.parent
                .as_deref()
                .map(|p| alloc::format!("diff of '{p}'"))
                .unwrap_or_default(),
            i.loaded_by
                .map(|v| alloc::format!(" (vm {v} reads it)"))
                .unwrap_or_default(),
        );
        let mut row = hypapi::Map::new();
        row.insert("name".into(), i.name.as_str().into());
        row.insert("seq".into(), i.seq.into());
        row.insert("bytes".into(), i.bytes.into());
        row.insert("parent".into(), i.parent.as_deref().into());
        row.insert("loaded_by".into(), i.loaded_by.into());
        r.push("images", row);
    }
    crate::say!(r, "{} snapshots; {} MiB free", list.len(), free >> 20);
    r.set("free", free);
    Ok(())
}

/// The save's guest-RAM rate, where its time went, and LZ4's verdict.
fn say_split(rep: &save::SaveReport, r: &mut Reply) {
    let t = &rep.split;
    crate::say!(
        r,
        "  guest RAM {} MiB at {} MiB/s; time (ms): stage-2 walk and copy {} (zero checks {}, table walk and records {}), pages faulted in {}, LZ4 {}, page checksums and copies {}, device writes (waits) {}, finish (index, header, flush, TOC commit) {} (queued writes drained {}, header flush and TOC commit {}), snapshot handed over for teardown {}; second CPU: {} pages in {} ms (started {} us after the job was posted; asleep waiting for room {} ms; the saving CPU for it {} ms)",
        rep.ram_bytes >> 20,
        rep.ram_mib_s(),
        t.walk / 1000,
        t.zero / 1000,
        t.copy / 1000,
        t.slow / 1000,
        t.lz4 / 1000,
        t.checksum / 1000,
        t.device / 1000,
        t.finish / 1000,
        t.drain / 1000,
        t.commit / 1000,
        t.teardown / 1000,
        t.helper_pages,
        t.helper_us / 1000,
        t.helper_start_us,
        t.naps.0 / 1000,
        t.naps.1 / 1000
    );
    r.set("ram_mib_s", rep.ram_mib_s());
    r.set("walk_us", t.walk);
    r.set("helper_pages", t.helper_pages);
    r.set("helper_us", t.helper_us);
    r.set("helper_start_us", t.helper_start_us);
    r.set("helper_full_us", t.naps.0);
    r.set("helper_wait_us", t.naps.1);
    r.set("zero_us", t.zero);
    r.set("copy_us", t.copy);
    r.set("slow_us", t.slow);
    r.set("lz4_us", t.lz4);
    r.set("xxh3_us", t.checksum);
    r.set("device_us", t.device);
    r.set("drain_us", t.drain);
    r.set("commit_us", t.commit);
    say_lz4(t, r);
    say_in_place(rep, r);
}

/// LZ4's verdict, if the save judged it (or took an earlier save's).
fn say_lz4(t: &save::Split, r: &mut Reply) {
    if let Some((kept, lz4, write)) = t.lz4_verdict {
        crate::say!(
            r,
            "  LZ4 {}: {lz4} ns a page to compress, {write} ns to write the bytes it saved{}",
            if kept {
                "kept"
            } else {
                "off after the trial (pages stored raw)"
            },
            if t.lz4_cached {
                " (judged by an earlier save of this boot)"
            } else {
                ""
            },
        );
        r.set("lz4_kept", u64::from(kept));
    }
}

/// The pages the disk read from the guest's frames where they lay.
fn say_in_place(rep: &save::SaveReport, r: &mut Reply) {
    let (pages, runs) = rep.in_place;
    if pages > 0 {
        crate::say!(
            r,
            "  {pages} pages written in place from the guest's frames, in {runs} runs (no copy)"
        );
    }
    r.set("in_place_pages", pages);
    r.set("in_place_runs", runs);
}

fn say_saved(rep: &save::SaveReport, name: &str, parent: Option<&str>, r: &mut Reply) {
    let ms = rep.us / 1000;
    crate::say!(
        r,
        "vm {} saved as '{name}'{}: {} pages ({} zero), {} KiB of page data, {} KiB image, in {ms} ms ({} MiB/s), paused {} us",
        rep.vm,
        parent.map(|p| alloc::format!(" (diff of '{p}')")).unwrap_or_default(),
        rep.pages,
        rep.zero,
        rep.data_bytes >> 10,
        rep.image_bytes >> 10,
        rep.mib_s(),
        rep.pause_us
    );
    r.set("vm", rep.vm);
    r.set("pages", rep.pages);
    r.set("zero", rep.zero);
    r.set("data_bytes", rep.data_bytes);
    r.set("image_bytes", rep.image_bytes);
    r.set("us", rep.us);
    r.set("pause_us", rep.pause_us);
    r.set("mib_s", rep.mib_s());
    say_split(rep, r);
    crate::say!(
        r,
        "  {} pages in its touch order; image at sectors {}..{}, page data at bytes {:#x}..{:#x}",
        rep.touched,
        rep.extent.0,
        rep.extent.0 + rep.extent.1,
        rep.data.0,
        rep.data.1
    );
    r.set("touched", rep.touched);
    r.set("start_sector", rep.extent.0);
    r.set("sectors", rep.extent.1);
    r.set("data_start", rep.data.0);
    r.set("data_end", rep.data.1);
}

fn say_loaded(rep: &load::LoadReport, name: &str, prefetch: bool, r: &mut Reply) {
    crate::say!(
        r,
        "'{name}' loaded as vm {}: {} vCPUs, {} MiB, {} pages on the disk, running {} us after its header was read ({} us in all){}",
        rep.vm,
        rep.vcpus,
        rep.ram >> 20,
        rep.pages,
        rep.ready_us,
        rep.total_us,
        if prefetch { "; prefetching" } else { "" }
    );
    r.set("vm", rep.vm);
    r.set("pages", rep.pages);
    r.set("ready_us", rep.ready_us);
    r.set("total_us", rep.total_us);
}

/// The `restore=` bootarg: loads `name` instead of a default guest and
/// gives it the keyboard. Errors are printed; the machine stays up.
pub fn boot_restore(name: &str) {
    match load::load(name, true) {
        Ok(rep) => {
            say_loaded(&rep, name, true, &mut Reply::console());
            crate::console::cmd::set_focus(rep.vm);
        }
        Err(e) => crate::println!("[hyp] cannot restore '{name}': {e}"),
    }
}

impl From<PersistError> for CmdError {
    fn from(e: PersistError) -> Self {
        CmdError::Persist(e)
    }
}
