//! The one walk every operation runs: the descent, its two phases, and what a visitor answers.
//! See the [`super`] module docs for the design.

use super::commit::{split_child, Commit};
use super::{chunks, load_settled, Chunk, Reserve};
use crate::flush::OpFlush;
use crate::sync::atomic::Ordering;
use crate::{Descriptor, DescriptorKind, Error, Flusher, Stage2Table, TableMemory};

/// One slot, as the walker shows it to a visitor. The phase is deliberately not part of it:
/// a visitor cannot answer the prepare and the commit differently.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visit {
    pub level: u8,
    /// The part of the walked range inside the slot.
    pub chunk: Chunk,
    /// What the slot holds (loaded settled if the visitor asks, see [`OpVisitor::SETTLE`]).
    pub desc: Descriptor,
}

/// What a visitor wants done with the slot it was shown.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step<E> {
    /// Nothing (more) here: go to the next slot.
    Next,
    /// Load the slot again and visit it again.
    Again,
    /// Descend into the table the slot holds (a table descriptor; anything else: next slot).
    Descend,
    /// The slot is empty: link a new table there and descend into it.
    Create,
    /// The slot holds a valid block: replace it (break-before-make) by a table of next-level
    /// leaves with the same translation, and descend into it.
    Split,
    /// Replace the slot's value with this (empty, leaf or software) descriptor, from the value
    /// shown: a compare-and-swap, break-before-make when a valid entry changes output address
    /// or attributes. If the slot changed meanwhile it is visited again.
    Write(Descriptor),
    /// End the walk with this error.
    Stop(E),
}

/// What a visitor wants done with a table after its subtree was walked (commit only: these
/// answers free pages, never take them, so the prepare does not need them).
#[derive(Clone, Copy, Debug)]
pub(crate) enum After<E> {
    Keep,
    /// Unlink the table if all its entries are empty; it is freed after a VMID-wide
    /// invalidation when the commit ends.
    Unlink,
    /// Free the table now, without unlinking (destroy: nothing walks the tables any more).
    Free,
    Stop(E),
}

/// Why a walk ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Halt<E> {
    /// The visitor said [`Step::Stop`] or [`After::Stop`].
    Stopped(E),
    /// The prepare's pages could not be allocated (nothing changed), or a commit ran out of
    /// them (which a prepared commit cannot, see [`Walk::commit`]).
    NoMemory,
}

impl From<Halt<Error>> for Error {
    fn from(h: Halt<Error>) -> Error {
        match h {
            Halt::Stopped(e) => e,
            Halt::NoMemory => Error::NoMemory,
        }
    }
}

/// An operation, as decisions per slot. In the prepare phase `visit` must only decide (the
/// walker writes nothing, and the commit visits the same slots again).
pub(crate) trait OpVisitor {
    type Error;
    /// Wait out a `Locked` slot (a break-before-make in progress) before showing it.
    const SETTLE: bool = true;
    /// Make the I-cache coherent before a [`Step::Write`] makes a frame executable.
    const ICACHE: bool = false;
    /// Invalidate the TLB entries a [`Step::Write`] changes (all but setting the Access flag
    /// or software bits); `false` only for Access-flag ageing.
    const INVALIDATE: bool = true;

    fn visit(&mut self, v: &Visit) -> Step<Self::Error>;

    /// After the subtree of the table at `v` (commit only); `v.desc` is the table descriptor.
    fn table_post(&mut self, v: &Visit) -> After<Self::Error> {
        let _ = v;
        After::Keep
    }

    /// A [`Step::Write`] of `new` over `v.desc` landed (commit only). `true`: visit the slot
    /// again.
    fn written(&mut self, v: &Visit, new: Descriptor) -> bool {
        let _ = (v, new);
        false
    }
}

/// The TLB and I-cache maintenance a commit does through.
pub(crate) trait Maintenance {
    fn changed(&mut self, ipa: u64, level: u8);
    fn break_now(&self, ipa: u64, level: u8);
    fn icache(&self, pa: u64, len: u64);
    fn vmid_now(&mut self);
}

impl<F: Flusher + ?Sized> Maintenance for OpFlush<'_, F> {
    fn changed(&mut self, ipa: u64, level: u8) {
        OpFlush::changed(self, ipa, level)
    }
    fn break_now(&self, ipa: u64, level: u8) {
        OpFlush::break_now(self, ipa, level)
    }
    fn icache(&self, pa: u64, len: u64) {
        OpFlush::icache(self, pa, len)
    }
    fn vmid_now(&mut self) {
        OpFlush::vmid_now(self)
    }
}

/// For visitors whose writes owe no maintenance: the read-only walk and Access-flag updates
/// (`INVALIDATE` and `ICACHE` off, AF is not a break-before-make bit, no tables unlinked).
pub(crate) struct NoMaintenance;

impl Maintenance for NoMaintenance {
    fn changed(&mut self, _: u64, _: u8) {
        debug_assert!(
            false,
            "stage2: a maintenance-free walk changed a live entry"
        );
    }
    fn break_now(&self, _: u64, _: u8) {
        debug_assert!(
            false,
            "stage2: a maintenance-free walk did a break-before-make"
        );
    }
    fn icache(&self, _: u64, _: u64) {
        debug_assert!(
            false,
            "stage2: a maintenance-free walk made a frame executable"
        );
    }
    fn vmid_now(&mut self) {
        debug_assert!(false, "stage2: a maintenance-free walk unlinked a table");
    }
}

/// A table the descent is in, as a phase sees it.
pub(crate) trait Pass<M: TableMemory> {
    type Table: Copy;
    /// The linked table page at `pa`.
    fn linked(pa: u64) -> Self::Table;
    /// The value of the slot of `table` at `level` for `chunk`.
    fn load(&self, table: Self::Table, level: u8, chunk: &Chunk, settle: bool) -> Descriptor;
    /// [`Step::Create`]: the new table, or `None` if the slot changed (look again).
    fn create<E>(&mut self, table: Self::Table, v: &Visit) -> Result<Option<Self::Table>, Halt<E>>;
    /// [`Step::Split`]: the new table, or `None` if the slot changed (look again).
    fn split<E>(&mut self, table: Self::Table, v: &Visit) -> Result<Option<Self::Table>, Halt<E>>;
    /// [`Step::Write`]: `true` to visit the slot again.
    fn write<V: OpVisitor>(
        &mut self,
        table: Self::Table,
        v: &Visit,
        new: Descriptor,
        op: &mut V,
    ) -> bool;
    /// After the subtree of `below`, linked from the slot of `table` at `v`.
    fn post<V: OpVisitor>(
        &mut self,
        table: Self::Table,
        v: &Visit,
        below: Self::Table,
        op: &mut V,
    ) -> Result<(), Halt<V::Error>>;
}

/// Prepare's view of a table: linked, or one the commit would create.
#[derive(Clone, Copy)]
pub(crate) enum Planned {
    Linked(u64),
    /// A table [`Step::Create`] would link: all empty.
    Empty,
    /// The table [`Step::Split`] of this block (at the level above) would link: its leaves.
    Split(Descriptor),
}

/// The prepare phase: loads real slots, writes nothing, counts the pages creating and
/// splitting take, and descends into the tables they would make.
pub(crate) struct Prepare<'t, M: TableMemory> {
    t: &'t Stage2Table<M>,
    pages: usize,
}

impl<M: TableMemory> Pass<M> for Prepare<'_, M> {
    type Table = Planned;

    fn linked(pa: u64) -> Planned {
        Planned::Linked(pa)
    }

    fn load(&self, table: Planned, level: u8, chunk: &Chunk, settle: bool) -> Descriptor {
        match table {
            Planned::Linked(pa) => load(self.t, pa, level, chunk, settle),
            Planned::Empty => Descriptor::EMPTY,
            // The leaf the commit's split will write in this slot.
            Planned::Split(block) => split_child(block, level - 1, chunk.base),
        }
    }

    fn create<E>(&mut self, _: Planned, _: &Visit) -> Result<Option<Planned>, Halt<E>> {
        self.pages += 1;
        Ok(Some(Planned::Empty))
    }

    fn split<E>(&mut self, _: Planned, v: &Visit) -> Result<Option<Planned>, Halt<E>> {
        self.pages += 1;
        Ok(Some(Planned::Split(v.desc)))
    }

    fn write<V: OpVisitor>(&mut self, _: Planned, _: &Visit, _: Descriptor, _: &mut V) -> bool {
        false
    }

    fn post<V: OpVisitor>(
        &mut self,
        _: Planned,
        _: &Visit,
        _: Planned,
        _: &mut V,
    ) -> Result<(), Halt<V::Error>> {
        Ok(())
    }
}

/// Loads the slot of the linked table at `pa`, settled if asked.
pub(crate) fn load<M: TableMemory>(
    t: &Stage2Table<M>,
    pa: u64,
    level: u8,
    chunk: &Chunk,
    settle: bool,
) -> Descriptor {
    let slot = t.slot(pa, level, chunk.start);
    if settle {
        load_settled(slot)
    } else {
        Descriptor::from_raw(slot.load(Ordering::Acquire))
    }
}

/// An operation's range `[start, end)` of a table (inside the IPA space).
pub(crate) struct Walk<'t, M: TableMemory> {
    pub t: &'t Stage2Table<M>,
    pub start: u64,
    pub end: u64,
    /// Tests only: walk a one-page range by the general recursion, to compare the two.
    #[cfg(test)]
    pub recurse: bool,
}

impl<'t, M: TableMemory> Walk<'t, M> {
    pub fn new(t: &'t Stage2Table<M>, start: u64, end: u64) -> Self {
        Walk {
            t,
            start,
            end,
            #[cfg(test)]
            recurse: false,
        }
    }

    /// The walk over the page holding `ipa`, or [`Error::OutOfRange`].
    pub fn page(t: &'t Stage2Table<M>, ipa: u64) -> Result<Self, Error> {
        if ipa >= t.cfg.ipa_limit() {
            return Err(Error::OutOfRange);
        }
        let base = ipa & !(crate::PAGE_SIZE - 1);
        Ok(Walk::new(t, base, base + crate::PAGE_SIZE))
    }

    /// Runs `op` without writing and reserves the pages its commit will take: exactly the
    /// [`Step::Create`]s and [`Step::Split`]s it answered. On error nothing was allocated.
    pub fn prepare<V: OpVisitor>(&self, op: &mut V) -> Result<Reserve<'t, M>, Halt<V::Error>> {
        let mut pass = Prepare {
            t: self.t,
            pages: 0,
        };
        self.descend(&mut pass, op, Planned::Linked(self.t.root_pa))?;
        Reserve::new(&self.t.mem, pass.pages).map_err(|_| Halt::NoMemory)
    }

    /// Runs `op` again, writing, creating and splitting with pages from `reserve`.
    ///
    /// The commit cannot take more pages than the prepare counted: it asks the same visitor
    /// about the same slots, and under the stage-2 lock (which every operation that creates
    /// or splits holds) no slot the prepare saw becomes a table or a leaf where it was empty,
    /// nor a block where it was a table. Lockless updaters only change leaves into leaves,
    /// software entries or empty slots, which can only spare a split. So
    /// [`Halt::NoMemory`] from a commit is a bug, asserted in debug builds and reported as a
    /// typed error, not a panic.
    pub fn commit<V: OpVisitor, X: Maintenance>(
        &self,
        op: &mut V,
        reserve: Reserve<'t, M>,
        flush: &mut X,
    ) -> Result<(), Halt<V::Error>> {
        let mut pass = Commit::new(self.t, reserve, flush);
        let r = self.descend(&mut pass, op, self.t.root_pa);
        debug_assert!(
            !matches!(r, Err(Halt::NoMemory)),
            "stage2: a commit outran its prepare"
        );
        pass.finish();
        r
    }

    /// [`Walk::prepare`] then [`Walk::commit`].
    pub fn run<V: OpVisitor, X: Maintenance>(
        &self,
        op: &mut V,
        flush: &mut X,
    ) -> Result<(), Halt<V::Error>> {
        let reserve = self.prepare(op)?;
        self.commit(op, reserve, flush)
    }

    fn descend<P: Pass<M>, V: OpVisitor>(
        &self,
        pass: &mut P,
        op: &mut V,
        root: P::Table,
    ) -> Result<(), Halt<V::Error>> {
        let level = self.t.cfg.start_level();
        let page = crate::PAGE_SIZE;
        let one_page = self.end - self.start == page && self.start.is_multiple_of(page);
        #[cfg(test)]
        let one_page = one_page && !self.recurse;
        if one_page {
            return walk_page(pass, op, root, level, self.start);
        }
        walk_table(pass, op, root, level, self.start, self.end)
    }
}

/// The walk of the one page at `page`: one slot per level, so a loop down the levels where
/// [`walk_table`] recurses over [`chunks`]. It shows the visitor the same slots and acts on
/// the same answers, in the same order (`tests.rs` checks it against `walk_table`); it exists
/// because every fault, compare-and-swap and Access-flag update is a one-page walk, and the
/// recursion's iterators cost about as much as the rest of such a walk.
fn walk_page<M: TableMemory, P: Pass<M>, V: OpVisitor>(
    pass: &mut P,
    op: &mut V,
    root: P::Table,
    first: u8,
    page: u64,
) -> Result<(), Halt<V::Error>> {
    // The tables above the current one: each with the visit that descended and the table below.
    type Above<T> = Option<(T, Visit, T)>;
    let mut path: [Above<P::Table>; 4] = [None; 4];
    let (mut table, mut level, mut depth) = (root, first, 0);
    loop {
        let chunk = Chunk::page(level, page);
        let desc = pass.load(table, level, &chunk, V::SETTLE);
        let v = Visit { level, chunk, desc };
        let below = match op.visit(&v) {
            Step::Next => break,
            Step::Again => continue,
            Step::Stop(e) => return Err(Halt::Stopped(e)),
            Step::Write(new) if pass.write(table, &v, new, op) => continue,
            Step::Write(_) => break,
            Step::Descend => match desc.kind(level) {
                DescriptorKind::Table { pa } => Some(P::linked(pa)),
                _ => break,
            },
            Step::Create => pass.create(table, &v)?,
            Step::Split => pass.split(table, &v)?,
        };
        // `None`: the slot changed before the table was linked; look at it again.
        let Some(below) = below else { continue };
        path[depth] = Some((table, v, below));
        (table, level, depth) = (below, level + 1, depth + 1);
    }
    // Deepest first, as the recursion returns.
    for (table, v, below) in path[..depth].iter().rev().flatten() {
        pass.post(*table, v, *below, op)?;
    }
    Ok(())
}

/// Visits the slots of `table` (at `level`) that `[start, end)` overlaps.
pub(crate) fn walk_table<M: TableMemory, P: Pass<M>, V: OpVisitor>(
    pass: &mut P,
    op: &mut V,
    table: P::Table,
    level: u8,
    start: u64,
    end: u64,
) -> Result<(), Halt<V::Error>> {
    for chunk in chunks(level, start, end) {
        walk_slot(pass, op, table, level, chunk)?;
    }
    Ok(())
}

/// Visits one slot until the visitor is done with it.
fn walk_slot<M: TableMemory, P: Pass<M>, V: OpVisitor>(
    pass: &mut P,
    op: &mut V,
    table: P::Table,
    level: u8,
    chunk: Chunk,
) -> Result<(), Halt<V::Error>> {
    loop {
        let desc = pass.load(table, level, &chunk, V::SETTLE);
        let v = Visit { level, chunk, desc };
        let below = match op.visit(&v) {
            Step::Next => return Ok(()),
            Step::Again => continue,
            Step::Stop(e) => return Err(Halt::Stopped(e)),
            Step::Write(new) if pass.write(table, &v, new, op) => continue,
            Step::Write(_) => return Ok(()),
            Step::Descend => match desc.kind(level) {
                DescriptorKind::Table { pa } => Some(P::linked(pa)),
                _ => return Ok(()),
            },
            Step::Create => pass.create(table, &v)?,
            Step::Split => pass.split(table, &v)?,
        };
        // `None`: the slot changed before the table was linked; look at it again.
        let Some(below) = below else { continue };
        walk_table(pass, op, below, level + 1, chunk.start, chunk.end)?;
        return pass.post(table, &v, below, op);
    }
}
