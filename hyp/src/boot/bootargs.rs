//! The hypervisor's own command line (`/chosen/bootargs`). Its syntax and
//! keys are `hypcmd::bootargs` (total, tested on the host); here the words it
//! could not use are reported and image ranges become `MemRange`s.

use platform::MemRange;

pub use hypcmd::bootargs::BootArgs;

/// Parses the bootargs and reports every word that was ignored.
pub fn parse(line: &str) -> BootArgs<'_> {
    let args = BootArgs::parse(line);
    for word in &args.ignored {
        crate::println!("[hyp] ignoring boot argument '{word}'");
    }
    args
}

/// An `ADDR:SIZE` from the bootargs (whose end is known not to overflow).
pub fn mem_range(r: hypcmd::bootargs::ImageRange) -> MemRange {
    MemRange {
        base: r.base,
        size: r.size,
    }
}

/// RAM holding images QEMU loaded for a guest, to keep out of the frame
/// allocator until they are copied (quiet: `parse` reports bad words).
pub fn image_ranges(line: &str) -> impl Iterator<Item = MemRange> {
    BootArgs::image_ranges(line)
        .into_iter()
        .flatten()
        .map(mem_range)
}
