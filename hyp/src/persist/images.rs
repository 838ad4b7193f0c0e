//! `images` and `delete <name>`: the operator's view of the disk's store,
//! and the one way to give an image's space back.
//!
//! A delete is refused while anything still needs the image: a diff saved
//! on top of it (the store refuses: `IsParent`), or a VM loaded from it
//! whose pages are not all in yet (its stage-2 swap entries name sectors of
//! the image, which a later save could otherwise reuse). Whatever a delete
//! refuses, the store and every VM are left as they were.

use super::{disk, load, PersistError};
use alloc::string::String;
use alloc::vec::Vec;
use snapfile::SECTOR;

/// One saved snapshot, as `images` lists it.
pub struct ImageInfo {
    pub name: String,
    /// A diff's parent.
    pub parent: Option<String>,
    /// Creation sequence number (increasing: a parent's is smaller).
    pub seq: u64,
    /// Bytes of the image on the disk.
    pub bytes: u64,
    /// A VM loaded from it that still reads pages from it.
    pub loaded_by: Option<u32>,
}

/// The store's snapshots in creation order, and its free bytes.
pub fn list() -> Result<(Vec<ImageInfo>, u64), PersistError> {
    let (store, dev) = disk::open(false)?;
    let mut out: Vec<ImageInfo> = store
        .list()
        .iter()
        .map(|e| ImageInfo {
            name: String::from(e.name.as_str()),
            parent: e.parent.map(|p| String::from(p.0.as_str())),
            seq: e.seq,
            bytes: e.sectors * SECTOR as u64,
            loaded_by: reader_of(e.name.as_str()),
        })
        .collect();
    out.sort_unstable_by_key(|i| i.seq);
    let free = store.free_sectors() * SECTOR as u64;
    store.keep(&dev);
    Ok((out, free))
}

/// Deletes `name` from the store; the bytes it freed.
pub fn delete(name: &str) -> Result<u64, PersistError> {
    let (mut store, mut dev) = disk::open(false)?;
    if dev.0.readonly() {
        return Err(PersistError::ReadOnly);
    }
    let bytes = store.entry(name)?.sectors * SECTOR as u64;
    if let Some(vm) = reader_of(name) {
        return Err(PersistError::InUse { vm });
    }
    store.delete(&mut dev, name)?;
    store.keep(&dev);
    Ok(bytes)
}

/// The VM still reading pages from image `name`, if any. A diff's loaded
/// chain reads its parents too, but those the store already protects: a
/// parent is never deleted while its diff exists.
fn reader_of(name: &str) -> Option<u32> {
    load::all()
        .into_iter()
        .find(|l| l.image.name() == name)
        .map(|l| l.vm)
}
