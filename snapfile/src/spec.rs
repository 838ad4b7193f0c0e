//! What a save asks for, checked before its first page: the spec, the checks that need
//! no space, and the header the image starts with.

use crate::dev::{BlockDevice, SECTOR};
use crate::error::Error;
use crate::header::{Header, Span};
use crate::image::read_header;
use crate::store::Store;
use crate::types::{Gpn, Name, Shape};
use crate::{codec::checksum, MAX_CHAIN, MAX_STATE};

/// What to save: everything the writer must know before the first page.
#[derive(Clone, Copy, Debug)]
pub struct SaveSpec<'a> {
    /// The new snapshot's name.
    pub name: &'a str,
    /// For a diff: the snapshot it is relative to (same shape).
    pub parent: Option<&'a str>,
    /// The VM's RAM and vCPUs.
    pub shape: Shape,
    /// The hypervisor's serialised vCPU / vGIC / timer / UART state, stored as is.
    pub state: &'a [u8],
    /// Pages in the order the VM first touched them since its last restore (for prefetch).
    pub touch: &'a [Gpn],
    /// At most this many `page`/`absent` calls will follow (the present or dirty pages the
    /// hypervisor counted at the pause); bounds the space to reserve.
    pub max_pages: u32,
    /// LZ4-compress pages (else every non-zero page is stored raw): off when the device
    /// writes faster than one CPU compresses, since the image is then written sooner raw.
    pub compress: bool,
}

impl Store {
    /// The checks that need no space: name, TOC room, parent, sizes, touch order.
    pub(crate) fn check_spec<D: BlockDevice>(
        &self,
        dev: &mut D,
        spec: &SaveSpec<'_>,
    ) -> Result<(Name, Option<(Name, u64)>), Error> {
        let name = Name::new(spec.name)?;
        if !spec.shape.is_valid() {
            return Err(Error::BadShape);
        }
        if self.toc.find(&name).is_some() {
            return Err(Error::NameExists);
        }
        if self.toc.entries.len() >= self.sb.max_entries as usize {
            return Err(Error::TocFull);
        }
        let parent = spec
            .parent
            .map(|p| self.check_parent(dev, p, &spec.shape))
            .transpose()?;
        if spec.state.len() > MAX_STATE || spec.max_pages > spec.shape.ram_pages {
            return Err(Error::TooLarge);
        }
        if let Some(g) = spec.touch.iter().find(|g| g.0 >= spec.shape.ram_pages) {
            return Err(Error::PageOutOfRange { page: g.0 });
        }
        Ok((name, parent))
    }

    fn check_parent<D: BlockDevice>(
        &self,
        dev: &mut D,
        parent: &str,
        shape: &Shape,
    ) -> Result<(Name, u64), Error> {
        let p = *self.entry(parent).map_err(|e| {
            if e == Error::NotFound {
                Error::ParentMissing
            } else {
                e
            }
        })?;
        if self.chain(parent)?.len() >= MAX_CHAIN {
            return Err(Error::ChainTooDeep);
        }
        if read_header(dev, &p)?.shape != *shape {
            return Err(Error::ShapeMismatch);
        }
        Ok((p.name, p.seq))
    }
}

/// The header of an image being written: its state span is known; the data, index and
/// touch spans are filled in by `finish`.
pub(crate) fn fresh_header(
    name: Name,
    seq: u64,
    parent: Option<(Name, u64)>,
    spec: &SaveSpec<'_>,
) -> Header {
    let state = Span {
        off: SECTOR as u64,
        len: spec.state.len() as u64,
        sum: checksum(spec.state),
    };
    let data = Span {
        off: state.off + state.len,
        ..Span::default()
    };
    let (shape, index, touch) = (spec.shape, data, data);
    Header {
        name,
        seq,
        shape,
        parent,
        state,
        data,
        index,
        touch,
    }
}
