//! Lanes (`Writer::lane`, `Lane::stage`, `Writer::append`): pages staged apart from the
//! writer, on other threads, and appended in whatever order their batches come, make an
//! image that restores exactly the memory a serial save does, mixed with pages the writer
//! stages itself; and a lane's batches count against the writer's limits.

mod common;

use common::*;
use proptest::prelude::*;
use snapfile::{Error, Gpn, MemDisk, SaveSpec, Sealed, Store, Writer, BATCH, PAGE};

/// A memory of `n` pages: zero, compressible and random ones, some never touched.
fn memory(n: usize, seed: u64) -> Mem {
    (0..n)
        .map(|i| {
            let k = (seed as usize + i * 7) % 11;
            (k != 0).then(|| page_of((k % 3) as u8, seed ^ i as u64))
        })
        .collect()
}

fn spec<'a>(mem: &Mem, name: &'a str, compress: bool) -> SaveSpec<'a> {
    SaveSpec {
        name,
        parent: None,
        shape: shape(mem.len() as u32),
        state: b"lane test state",
        touch: &[],
        max_pages: mem.len() as u32,
        compress,
    }
}

/// Stages pages `pages` of `mem` in a lane (on this thread), every sealed batch in order.
fn lane_batches(w: &Writer<'_>, mem: &Mem, pages: &[usize]) -> Vec<Sealed> {
    let mut lane = w.lane();
    let zero = zero_page();
    let mut out = Vec::new();
    for &g in pages {
        let data = mem[g].as_deref().unwrap_or(&zero);
        out.extend(lane.stage(Gpn(g as u32), data).unwrap());
    }
    out.extend(lane.seal());
    out
}

/// A save whose first `head` pages the writer stages itself, the rest split between two
/// lanes run on two threads (odd and even 64-page chunks), their batches appended in the
/// order `order` picks (`true`: the next of lane 1), then the last `tail` pages by `page`.
fn save_in_lanes(
    store: &mut Store,
    dev: &mut MemDisk,
    name: &str,
    mem: &Mem,
    (head, tail): (usize, usize),
    order: &[bool],
    compress: bool,
) -> Result<snapfile::Summary, Error> {
    let n = mem.len();
    let mut w = store.begin(dev, &spec(mem, name, compress))?;
    for (g, page) in mem.iter().enumerate().take(head) {
        w.stage(Gpn(g as u32), page.as_deref().unwrap_or(&zero_page()))?;
    }
    w.write_staged(dev)?;
    let middle: Vec<usize> = (head..n - tail).collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, chunk) in middle.chunks(64).enumerate() {
        [&mut a, &mut b][i % 2].extend_from_slice(chunk);
    }
    let (ba, bb) = std::thread::scope(|s| {
        let wr = &w;
        let ta = s.spawn(|| lane_batches(wr, mem, &a));
        let tb = s.spawn(|| lane_batches(wr, mem, &b));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (mut ia, mut ib) = (ba.into_iter(), bb.into_iter());
    let mut picks = order.iter().cycle();
    loop {
        let next = match picks.next() {
            Some(true) => ib.next().or_else(|| ia.next()),
            _ => ia.next().or_else(|| ib.next()),
        };
        let Some(batch) = next else { break };
        w.append(dev, batch)?;
    }
    for (g, page) in mem.iter().enumerate().skip(n - tail) {
        match page {
            Some(p) => w.page(dev, Gpn(g as u32), p)?,
            None => w.absent(Gpn(g as u32))?,
        }
    }
    w.finish(dev)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lanes_restore_what_a_serial_save_does(
        n in 300usize..1400,
        seed in any::<u64>(),
        head in 0usize..40,
        tail in 0usize..40,
        order in prop::collection::vec(any::<bool>(), 1..8),
        compress in any::<bool>(),
    ) {
        let mem = memory(n, seed);
        let mut dev = MemDisk::new(40_000);
        let mut store = Store::format(&mut dev, 1, 8).unwrap();
        let all: Vec<usize> = (0..n).collect();
        let serial = save(&mut store, &mut dev, "serial", None, &mem, &all, b"").unwrap();
        let lanes =
            save_in_lanes(&mut store, &mut dev, "lanes", &mem, (head, tail), &order, compress)
                .unwrap();
        prop_assert_eq!(serial.lz4 + serial.raw, lanes.lz4 + lanes.raw);
        prop_assert_eq!(serial.skipped, lanes.skipped);
        let img = store.image(&mut dev, "lanes").unwrap();
        check_restore(&img, &mut dev, &mem);
        // Lanes pad each batch to a sector and leave a page's room at its end at most.
        let batches = (lanes.data_bytes as usize).div_ceil(BATCH - PAGE - 8) as u64 + 2;
        let slack = batches * (PAGE as u64 + 512) + 512;
        let data = lanes.sections[1].1 - lanes.sections[1].0;
        prop_assert!(data <= lanes.data_bytes + slack, "{} data bytes for {}", data, lanes.data_bytes);
    }
}

#[test]
fn a_lane_batch_counts_against_the_page_limit_and_refuses_pages_outside_the_vm() {
    let mem = memory(64, 3);
    let mut dev = MemDisk::new(4096);
    let mut store = Store::format(&mut dev, 1, 8).unwrap();
    let mut s = spec(&mem, "x", false);
    s.max_pages = 10;
    let mut w = store.begin(&mut dev, &s).unwrap();
    let mut lane = w.lane();
    assert_eq!(
        lane.stage(Gpn(64), &zero_page()).err(),
        Some(Error::PageOutOfRange { page: 64 })
    );
    let full = (0..11).try_for_each(|g| {
        let page = mem[g].as_deref().copied().unwrap_or_else(zero_page);
        lane.stage(Gpn(g as u32), &page)
            .map(|b| assert!(b.is_none()))
    });
    assert_eq!(full, Ok(()));
    let batch = lane.seal().unwrap();
    assert_eq!(batch.pages(), 11);
    assert_eq!(w.append(&mut dev, batch).err(), Some(Error::TooManyPages));
    // The writer is failed: nothing more, and no image.
    assert_eq!(w.finish(&mut dev).err(), Some(Error::WriterFailed));
    assert_eq!(store.list().len(), 0);
}
