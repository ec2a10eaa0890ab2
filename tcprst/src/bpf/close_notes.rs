//! The kernel's rings of `CloseNote`s (tcprst-ebpf's closing.rs), one per
//! CPU, mapped read-only: who started closing each socket, its steps since,
//! and the end of its close.
//!
//! The rings are read every 50 ms, and a close's notes are kept by cookie
//! from its start until its end note: what is kept at any moment is the
//! closes in progress, not the connections that came and went. A scan for
//! stuck sockets takes the notes of the half-closed sockets it found from
//! there, and forgets the closes it did not find whose notes predate it:
//! their end went unread, or no state change marks it (an orphan that
//! lives on as a timewait socket in FIN_WAIT2). When those pile up, a scan
//! comes early (`due`). A reset on a socket that sent its FIN looks there,
//! then among the closes that ended lately (`EndedCloses`): data that
//! arrives after close() ends the close, and the reset follows. A note
//! overwritten before it was read, or one no room was left for, is counted.
//!
//! Reading every close's notes costs userspace a few hash-map operations a
//! connection. It replaced a scan of every namespace's sockets whenever a
//! ring was half full, which on a churning host ran several times a second
//! and walked the kernel's whole socket table, TIME_WAIT included, each
//! time (#10). Now only closes that orphan their sockets before the peer's
//! FIN, at thousands a second, bring scans early.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::MapData;
use memmap2::{Mmap, MmapOptions};
use tcprst_common::{
    CLOSE_NOTES_BYTES, CloseMark, CloseNote, MARK_STEPS, NOTE_HEAD_STRIDE, NOTE_WRITING, close_op,
};

use crate::model::event::TcpState;

/// How the rings are laid out: the loader sizes the maps by it, and the
/// programs and this reader index them by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoteRings {
    /// Rings: one for every possible CPU, which the programs index by
    /// `bpf_get_smp_processor_id()`.
    pub cpus: u32,
    /// Each ring has `1 << slots_shift` slots.
    pub slots_shift: u8,
}

impl NoteRings {
    /// One slot, never written: with `--history` the programs keep socket
    /// storage instead.
    pub const UNUSED: Self = Self {
        cpus: 1,
        slots_shift: 0,
    };
    /// The fewest slots a ring gets, however many CPUs share the memory.
    const MIN_SLOTS_SHIFT: u8 = 10;

    pub fn for_this_machine() -> Result<Self> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, e)| anyhow!("counting the possible CPUs ({path}): {e}"))?;
        Ok(Self::for_cpus(cpus as u32))
    }

    /// `CLOSE_NOTES_BYTES` shared out, each ring a power of two.
    fn for_cpus(cpus: u32) -> Self {
        let per_cpu = CLOSE_NOTES_BYTES / size_of::<CloseNote>() as u32 / cpus.max(1);
        let shift = per_cpu.checked_ilog2().unwrap_or(0) as u8;
        Self {
            cpus: cpus.max(1),
            slots_shift: shift.max(Self::MIN_SLOTS_SHIFT),
        }
    }

    /// Slots in each ring.
    fn ring_slots(self) -> u64 {
        1 << self.slots_shift
    }

    /// Slots in all the rings: the notes map's entries.
    pub fn slots(self) -> u32 {
        self.cpus << self.slots_shift
    }

    /// The u64s of the heads map: a line of its own for each CPU's head.
    pub fn heads(self) -> u32 {
        self.cpus * NOTE_HEAD_STRIDE
    }
}

/// The rings as the kernel shares them.
struct Rings {
    notes: Mmap,
    heads: Mmap,
    layout: NoteRings,
}

/// What a ring's slot holds of the note asked for.
#[derive(Debug, PartialEq)]
enum Slot {
    Note(CloseNote),
    /// Not written yet: the program takes its number before it writes it.
    Pending,
    /// A later note took the slot.
    Overwritten,
}

impl Rings {
    fn map(notes: &MapData, heads: &MapData, layout: NoteRings) -> Result<Self> {
        let map = |data: &MapData, len: usize| {
            // SAFETY: the kernel backs an mmapable array map's pages for as
            // long as they are mapped; they are only read, through `read`
            // and `head`, which copy what may change under them.
            unsafe { MmapOptions::new().len(len).map(&data.fd().as_fd()) }
        };
        let rings = Self {
            notes: map(notes, layout.slots() as usize * size_of::<CloseNote>())
                .context("mapping the close-note rings")?,
            heads: map(heads, layout.heads() as usize * size_of::<u64>())
                .context("mapping the close-note heads")?,
            layout,
        };
        if rings.notes.as_ptr().align_offset(align_of::<CloseNote>()) != 0 {
            bail!("the close-note rings are not aligned");
        }
        Ok(rings)
    }

    /// Notes CPU `cpu` has written since loading.
    fn head(&self, cpu: u32) -> u64 {
        let head = self
            .heads
            .as_ptr()
            .cast::<u64>()
            .wrapping_add((cpu * NOTE_HEAD_STRIDE) as usize);
        // SAFETY: `cpu`'s u64 in the page-aligned heads mapping (`cpu` is
        // below `layout.cpus`, as every caller iterates).
        unsafe { AtomicU64::from_ptr(head.cast_mut()) }.load(Ordering::Acquire)
    }

    /// Note `seq` of CPU `cpu`, if its slot holds all of it.
    fn read(&self, cpu: u32, seq: u64) -> Slot {
        let slots = self.layout.ring_slots();
        let index = (u64::from(cpu) * slots + seq % slots) as usize;
        let slot = self.notes.as_ptr().cast::<CloseNote>().wrapping_add(index);
        // SAFETY: `slot` is inside the mapping and aligned (checked in
        // `map`); `seq` is its first field. The copy is volatile, and the
        // writer marks a slot `NOTE_WRITING` before it changes it and writes
        // `seq` last, so the same `seq` before and after means a whole note.
        unsafe {
            let seq_now = || AtomicU64::from_ptr(slot.cast_mut().cast()).load(Ordering::Acquire);
            let before = seq_now();
            if before != seq {
                return Self::not_there(before, seq);
            }
            let note = slot.read_volatile();
            fence(Ordering::Acquire);
            match seq_now() {
                // The maps start zeroed, so note 0's slot reads as written
                // before its program has begun; no socket has cookie 0.
                after if after == seq && note.seq == seq && note.cookie == 0 => Slot::Pending,
                after if after == seq && note.seq == seq => Slot::Note(note),
                // It was whole before the copy: whoever wrote it since is a
                // later note.
                _ => Slot::Overwritten,
            }
        }
    }

    /// What a slot holding note `found` says of note `seq`.
    fn not_there(found: u64, seq: u64) -> Slot {
        if found == NOTE_WRITING || found < seq {
            Slot::Pending
        } else {
            Slot::Overwritten
        }
    }
}

/// The notes tcprst reads, and what it keeps of them.
pub struct CloseNotes {
    rings: Rings,
    /// The rings' two maps, held while they are mapped.
    _maps: Vec<MapData>,
    /// The notes of each close read and not seen to end, by cookie. The
    /// cookies come from the kernel, not from the network, so a fast hash
    /// is safe.
    open: HashMap<u64, Vec<CloseNote>, foldhash::fast::RandomState>,
    /// The closes whose end was read lately.
    ended: RecentEnds,
    /// Their notes, for the resets that come after.
    ended_closes: EndedCloses,
    /// Per CPU, the next note to read.
    read_to: Vec<u64>,
    /// Notes lost unread: overwritten before a read, or not kept because
    /// `MAX_OPEN` closes were in progress.
    overwritten: u64,
    /// Closes kept as the last scan ended, after it forgot what it could.
    open_after_scan: usize,
}

impl CloseNotes {
    /// Closes kept in progress at once, a few hundred bytes each: sockets
    /// stuck half-closed stay here as long as they are stuck.
    const MAX_OPEN: usize = 65_536;
    /// Notes kept of one close: a start, its steps, and a second start (a
    /// close() after a shutdown()) fit several times over.
    const MAX_NOTES: usize = 2 * MARK_STEPS;
    /// How long before a dump began the last note of a close the dump did
    /// not find must be for the scan to forget it. The reset that ends such
    /// a close can come well after its notes: in a storm of data after
    /// close(), the resets of some closes noted just before a dump came
    /// about 4,100 sockets later (some 40 ms), when later closes had taken
    /// their slots among those that ended (`EndedCloses`), and named no
    /// close: 96 and 3 in two of six 3 s runs by hand, 12 in a full bench.
    const FORGET_AFTER_NS: u64 = 200_000_000;

    pub fn new(notes: MapData, heads: MapData, layout: NoteRings) -> Result<Self> {
        let rings = Rings::map(&notes, &heads, layout)?;
        Ok(Self::reading(rings, vec![notes, heads]))
    }

    fn reading(rings: Rings, maps: Vec<MapData>) -> Self {
        let cpus = rings.layout.cpus as usize;
        Self {
            rings,
            _maps: maps,
            open: HashMap::default(),
            ended: RecentEnds::default(),
            ended_closes: EndedCloses::new(),
            read_to: vec![0; cpus],
            overwritten: 0,
            open_after_scan: 0,
        }
    }

    /// Reads every note written since the last read: a close's notes are
    /// kept from its start, and forgotten at its end.
    pub fn read(&mut self) {
        let slots = self.rings.layout.ring_slots();
        let mut to_heads = true;
        for cpu in 0..self.rings.layout.cpus {
            let i = cpu as usize;
            let unread = Unread::at(self.read_to[i], self.rings.head(cpu), slots);
            self.overwritten += unread.lost;
            self.read_to[i] = unread.range.end;
            for seq in unread.range {
                match self.rings.read(cpu, seq) {
                    Slot::Note(note) => self.keep(note),
                    Slot::Overwritten => self.overwritten += 1,
                    // The next read starts here.
                    Slot::Pending => {
                        self.read_to[i] = seq;
                        to_heads = false;
                        break;
                    }
                }
            }
        }
        if to_heads {
            self.ended.read_past();
        }
    }

    fn keep(&mut self, note: CloseNote) {
        if note.new_state == TcpState::Close as u8 {
            let notes = self.open.remove(&note.cookie).unwrap_or_default();
            self.ended_closes.keep(note.cookie, &notes);
            self.ended.insert(&note);
            return;
        }
        if self.ended.before(&note) {
            self.ended_closes.add_late(note);
            return;
        }
        // A step may be read before its start when the two were written on
        // different CPUs: each is kept, and `close_mark` orders them.
        if let Some(notes) = self.open.get_mut(&note.cookie) {
            if notes.len() < Self::MAX_NOTES {
                notes.push(note);
            }
        } else if self.open.len() < Self::MAX_OPEN {
            // Room for the usual start, step and second start, so that
            // the steps after do not reallocate.
            let mut notes = Vec::with_capacity(4);
            notes.push(note);
            self.open.insert(note.cookie, notes);
        } else {
            self.overwritten += 1;
        }
    }

    /// Whether closes pile up that only a scan can forget, so that one must
    /// come early, well before `MAX_OPEN`: orphans the kernel keeps as
    /// timewait sockets in FIN_WAIT2 (closed before the peer's FIN came),
    /// whose end no state change marks. Closes still in progress after a
    /// scan do not count again.
    pub fn due(&self) -> bool {
        self.open.len() > self.open_after_scan + Self::MAX_OPEN / 2
    }

    /// Notes lost unread: the sockets they belong to, if reported, show no
    /// initiator.
    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    /// The close marks of the sockets a scan found, by cookie. A close the
    /// scan did not find ended, unless its last note was written less than
    /// `FORGET_AFTER_NS` before the dump began (`dump_began_ns`,
    /// CLOCK_MONOTONIC), or after: the dump may have missed it, or its
    /// reset may still come. The others go to the closes that ended, since
    /// their end notes, which the rings order only within one CPU, may have
    /// been read before them, or there were none. An orphan's death in
    /// FIN_WAIT2 writes none (it looks like its becoming a timewait socket),
    /// and the reset that killed it may be read after the scan: data after
    /// close() on a socket the peer's ACK had moved to FIN_WAIT2.
    pub fn scanned(
        &mut self,
        dump_began_ns: u64,
        cookies: impl IntoIterator<Item = u64>,
    ) -> HashMap<u64, CloseMark> {
        self.read();
        let wanted: HashSet<u64> = cookies.into_iter().collect();
        let Self {
            open, ended_closes, ..
        } = self;
        open.retain(|cookie, notes| {
            let ongoing = wanted.contains(cookie)
                || notes
                    .iter()
                    .any(|n| n.at_ns.saturating_add(Self::FORGET_AFTER_NS) >= dump_began_ns);
            if !ongoing {
                ended_closes.keep_unless_newer(*cookie, notes);
            }
            ongoing
        });
        self.open_after_scan = self.open.len();
        wanted
            .iter()
            .filter_map(|cookie| Some((*cookie, close_mark(self.open.get(cookie)?)?)))
            .collect()
    }

    /// The close mark of a socket a reset came on, which sent its FIN: from
    /// the closes in progress, or from those that ended lately (the reset
    /// may have ended its close before it was read). The notes written
    /// since the last read are read first: the reset's record can come
    /// before the next read, and its close's notes were written before it.
    pub fn mark_of(&mut self, cookie: u64) -> Option<CloseMark> {
        self.read();
        match self.open.get(&cookie) {
            Some(notes) => close_mark(notes),
            None => close_mark(self.ended_closes.notes(cookie)?),
        }
    }
}

/// The notes of the closes whose end was read lately, in a table indexed
/// by cookie, one close a slot: keeping one copies its first notes into
/// the slot over the close it displaces, and a lookup is one compare. It
/// replaced a search of the rings for the reset's cookie, which took about
/// a millisecond, so a storm of data arriving after close() kept tcprst
/// searching and lost most of its records. The notes lie in the slots, not
/// in vectors of their own: freeing a vector kept for thousands of closes
/// missed the cache, 100–190 ns a connection of churn. Cookies come from a
/// counter, so consecutive sockets take consecutive slots, and a close
/// stays until `SLOTS` later closes have ended: half a second at 8,000
/// closes a second, where a reset's record follows the end of its close
/// by microseconds. The table takes 0.85 MB.
struct EndedCloses {
    slots: Box<[EndedClose]>,
}

/// A slot: cookie 0, which no socket has, until one is kept.
#[derive(Clone, Copy)]
struct EndedClose {
    cookie: u64,
    len: u8,
    /// A start and its steps, with room for one more: a close's notes
    /// past them are not kept.
    notes: [CloseNote; 4],
}

impl EndedCloses {
    const SLOTS: usize = 4096;

    fn new() -> Self {
        // SAFETY: all zero bytes is a valid CloseNote: integers and a byte
        // array.
        let unused: CloseNote = unsafe { std::mem::zeroed() };
        let slot = EndedClose {
            cookie: 0,
            len: 0,
            notes: [unused; 4],
        };
        Self {
            slots: vec![slot; Self::SLOTS].into_boxed_slice(),
        }
    }

    fn slot(&mut self, cookie: u64) -> &mut EndedClose {
        &mut self.slots[Self::index(cookie)]
    }

    fn index(cookie: u64) -> usize {
        cookie as usize % Self::SLOTS
    }

    /// Keeps the notes of `cookie`'s close, which just ended.
    fn keep(&mut self, cookie: u64, notes: &[CloseNote]) {
        let slot = self.slot(cookie);
        let kept = notes.len().min(slot.notes.len());
        slot.notes[..kept].copy_from_slice(&notes[..kept]);
        slot.cookie = cookie;
        slot.len = kept as u8;
    }

    /// Keeps the notes of a close a scan found ended, unless its slot holds
    /// a later socket's close: a scan ends many closes at once, in no order.
    fn keep_unless_newer(&mut self, cookie: u64, notes: &[CloseNote]) {
        if self.slot(cookie).cookie <= cookie {
            self.keep(cookie, notes);
        }
    }

    /// Adds a note read after the end of its close: one written on another
    /// CPU than the end.
    fn add_late(&mut self, note: CloseNote) {
        let slot = self.slot(note.cookie);
        if slot.cookie == note.cookie && usize::from(slot.len) < slot.notes.len() {
            slot.notes[usize::from(slot.len)] = note;
            slot.len += 1;
        }
    }

    fn notes(&self, cookie: u64) -> Option<&[CloseNote]> {
        let slot = &self.slots[Self::index(cookie)];
        (slot.cookie == cookie).then(|| &slot.notes[..usize::from(slot.len)])
    }
}

/// The ends of closes read lately, by cookie, with their times. The rings
/// are read one CPU after the other, so a close's end, written in a
/// softirq on one CPU, can be read before its start, written earlier by
/// the closing process on another: the end must not leave the start to
/// open the close again, for good. A close's notes are all written before
/// its end, so every read that reaches all the heads after its end was read
/// has read them: an end is kept until then.
#[derive(Default)]
struct RecentEnds {
    /// Ends read since the last read that reached every head.
    now: HashMap<u64, u64, foldhash::fast::RandomState>,
    /// Ends read before it.
    earlier: HashMap<u64, u64, foldhash::fast::RandomState>,
}

impl RecentEnds {
    fn insert(&mut self, end: &CloseNote) {
        // Bounded as the closes kept are; past it a start read late is
        // forgotten by the next scan.
        if self.now.len() < CloseNotes::MAX_OPEN {
            self.now.insert(end.cookie, end.at_ns);
        }
    }

    /// Whether `note` belongs to a close whose end was read already. A
    /// socket disconnected and connected again closes again later, under
    /// the same cookie.
    fn before(&self, note: &CloseNote) -> bool {
        [&self.now, &self.earlier]
            .iter()
            .any(|ends| ends.get(&note.cookie).is_some_and(|&end| note.at_ns <= end))
    }

    /// A read reached every ring's head, as it was when the read began.
    fn read_past(&mut self) {
        std::mem::swap(&mut self.now, &mut self.earlier);
        // Clearing keeps the allocation for the next reads.
        self.now.clear();
    }
}

/// The notes a read can still get from a ring of `slots`, and how many it
/// lost.
#[derive(Debug, PartialEq)]
struct Unread {
    range: Range<u64>,
    lost: u64,
}

impl Unread {
    /// Notes from `read_to` up to `head`; those below `head - slots` were
    /// overwritten.
    fn at(read_to: u64, head: u64, slots: u64) -> Self {
        let oldest = head.saturating_sub(slots);
        Self {
            range: read_to.max(oldest)..head.max(read_to),
            lost: oldest.saturating_sub(read_to),
        }
    }
}

/// A socket's notes, from any CPUs, as the mark `--history` would keep:
/// from its first note of a process starting the close, with the steps
/// since in time order; None without such a note. The end of the close is
/// not a step: a mark is read before it.
fn close_mark(notes: &[CloseNote]) -> Option<CloseMark> {
    let mut sorted: Vec<CloseNote> = notes
        .iter()
        .filter(|n| n.new_state != TcpState::Close as u8)
        .copied()
        .collect();
    sorted.sort_by_key(|n| n.at_ns);
    let start = sorted.iter().position(|n| n.op != close_op::NONE)?;
    let first = sorted[start];
    let mut mark = CloseMark {
        op_at_ns: first.at_ns,
        tgid: first.tgid,
        op: first.op,
        how: first.how,
        first_state: first.old_state,
        steps: 0,
        comm: first.comm,
        step_state: [0; 8],
        step_at_ns: [0; MARK_STEPS],
    };
    for (i, note) in sorted[start..].iter().take(MARK_STEPS).enumerate() {
        mark.step_state[i] = note.new_state;
        mark.step_at_ns[i] = note.at_ns;
        mark.steps += 1;
    }
    Some(mark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::TcpState;

    fn note(seq: u64, cookie: u64, op: u8, old: TcpState, new: TcpState) -> CloseNote {
        CloseNote {
            seq,
            cookie,
            at_ns: 1_000 * seq,
            tgid: if op == close_op::NONE { 0 } else { 51435 },
            op,
            how: 1,
            old_state: old as u8,
            new_state: new as u8,
            comm: *b"envoy\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    /// Note `seq` as a program leaves it while writing it.
    fn being_written(seq: u64, cookie: u64) -> CloseNote {
        CloseNote {
            seq: NOTE_WRITING,
            ..note(
                seq,
                cookie,
                close_op::CLOSE,
                TcpState::Established,
                TcpState::FinWait1,
            )
        }
    }

    const LAYOUT: NoteRings = NoteRings {
        cpus: 2,
        slots_shift: 10,
    };
    const SLOTS: u64 = 1 << 10;

    /// Two rings in anonymous memory holding `notes`, (cpu, note) each, in
    /// their slots, with `heads` notes written.
    fn rings(notes: &[(u32, CloseNote)], heads: [u64; 2]) -> Rings {
        let mut slots = MmapOptions::new()
            .len(LAYOUT.slots() as usize * size_of::<CloseNote>())
            .map_anon()
            .unwrap();
        for (cpu, n) in notes {
            let index = u64::from(*cpu) * SLOTS + n.seq % SLOTS;
            let at = index as usize * size_of::<CloseNote>();
            // SAFETY: in bounds, and the anonymous mapping is page-aligned.
            unsafe { slots.as_mut_ptr().add(at).cast::<CloseNote>().write(*n) };
        }
        let mut head_page = MmapOptions::new()
            .len(LAYOUT.heads() as usize * size_of::<u64>())
            .map_anon()
            .unwrap();
        // Each CPU's head 128 bytes from the last, as the loader sizes them.
        head_page[..8].copy_from_slice(&heads[0].to_ne_bytes());
        head_page[128..136].copy_from_slice(&heads[1].to_ne_bytes());
        Rings {
            notes: slots.make_read_only().unwrap(),
            heads: head_page.make_read_only().unwrap(),
            layout: LAYOUT,
        }
    }

    #[test]
    fn the_rings_share_their_memory_out_by_cpu() {
        // 3 MiB of 48-byte notes is 65,536: 32,768 each for two CPUs.
        let two = NoteRings::for_cpus(2);
        assert_eq!((two.cpus, two.ring_slots()), (2, 32_768));
        assert_eq!(two.slots() as usize * size_of::<CloseNote>(), 3 << 20);
        // Three CPUs round each ring down to a power of two.
        assert_eq!(NoteRings::for_cpus(3).ring_slots(), 16_384);
        // Many CPUs keep a floor.
        assert_eq!(NoteRings::for_cpus(1024).ring_slots(), 1_024);
    }

    #[test]
    fn a_slot_not_yet_written_is_read_later_and_one_taken_by_a_later_note_is_lost() {
        use TcpState::*;
        let whole = note(5, 7, close_op::CLOSE, Established, FinWait1);
        let writing = being_written(6, 8);
        let later = note(7 + SLOTS, 9, close_op::CLOSE, Established, FinWait1);
        let rings = rings(&[(1, whole), (1, writing), (1, later)], [0, 8 + SLOTS]);
        assert_eq!(rings.read(1, 5), Slot::Note(whole));
        // The same slot of the other CPU's ring: nothing written there yet.
        assert_eq!(rings.read(0, 5), Slot::Pending);
        assert_eq!(rings.read(1, 6), Slot::Pending);
        assert_eq!(rings.read(1, 7), Slot::Overwritten);
        assert_eq!(rings.read(1, 7 + SLOTS), Slot::Note(later));
        // Note 0's slot holds zeroes, and seq 0, until it is written.
        assert_eq!(rings.read(0, 0), Slot::Pending);
    }

    #[test]
    fn a_close_is_kept_from_its_start_to_its_end() {
        use TcpState::*;
        let client = 70;
        let server = 80;
        let other = 99;
        // The processes closed on CPU 0; the client's FIN_WAIT2 came in a
        // softirq on CPU 1. Another connection came and went.
        let notes = [
            (
                0,
                note(0, client, close_op::SHUTDOWN, Established, FinWait1),
            ),
            (0, note(1, other, close_op::CLOSE, Established, FinWait1)),
            (0, note(2, server, close_op::CLOSE, Established, FinWait1)),
            (0, note(3, other, close_op::NONE, FinWait1, Close)),
            (1, note(0, client, close_op::NONE, FinWait1, FinWait2)),
        ];
        let mut reader = CloseNotes::reading(rings(&notes, [4, 1]), Vec::new());
        reader.read();
        let mut open: Vec<_> = reader.open.keys().copied().collect();
        open.sort();
        assert_eq!(open, [client, server]);
        // A scan found the client half-closed; the server's close started
        // after its dump began (at 2,000 ns), so it may have been missed.
        let marks = reader.scanned(2_000, [client]);
        assert_eq!(marks.keys().collect::<Vec<_>>(), [&client]);
        assert_eq!(marks[&client].steps, 2);
        assert!(reader.open.contains_key(&server));
        // Nor does a scan whose dump began soon after its last note: its
        // reset may still come.
        assert!(reader.scanned(10_000, [client]).contains_key(&client));
        assert!(reader.open.contains_key(&server));
        // A later scan that does not find it ends it: a reset that comes
        // for it still finds its notes.
        let later = 2_000 + CloseNotes::FORGET_AFTER_NS + 1;
        assert!(reader.scanned(later, [client]).contains_key(&client));
        assert!(!reader.open.contains_key(&server));
        assert_eq!(reader.mark_of(server).unwrap().op, close_op::CLOSE);
        // A reset on a socket whose close ended finds its notes among the
        // closes that ended, without the end.
        let mark = reader.mark_of(other).unwrap();
        assert_eq!((mark.first_state, mark.steps), (Established as u8, 1));
        assert_eq!(reader.mark_of(12345), None);
        assert_eq!(reader.overwritten(), 0);
    }

    /// A scan ends its closes in no order: an earlier socket's close never
    /// displaces a later one's from their slot.
    #[test]
    fn a_scan_keeps_the_later_of_two_closes_in_a_slot() {
        use TcpState::*;
        let early = 70;
        let later = early + EndedCloses::SLOTS as u64;
        let start = |seq, cookie| note(seq, cookie, close_op::CLOSE, Established, FinWait1);
        let mut ended = EndedCloses::new();
        ended.keep_unless_newer(later, &[start(0, later)]);
        ended.keep_unless_newer(early, &[start(1, early)]);
        assert_eq!(ended.notes(early), None);
        assert_eq!(ended.notes(later).map(<[_]>::len), Some(1));
        ended.keep_unless_newer(later + 1, &[start(2, later + 1)]);
        assert_eq!(ended.notes(later + 1).map(<[_]>::len), Some(1));
    }

    #[test]
    fn a_close_whose_end_is_read_before_its_start_is_not_kept() {
        use TcpState::*;
        let (early, late) = (70, 80);
        // Note `seq` of its CPU's ring, written at `at_ns`.
        let at = |at_ns, note: CloseNote| CloseNote { at_ns, ..note };
        // The early client shut down on CPU 1; the server's FIN came in a
        // softirq on CPU 0, whose ring is read first. That close was whole
        // before this read began.
        let mut notes = vec![
            (
                1,
                at(
                    10,
                    note(0, early, close_op::SHUTDOWN, Established, FinWait1),
                ),
            ),
            (
                0,
                at(20, note(0, early, close_op::NONE, FinWait1, FinWait2)),
            ),
            (0, at(30, note(1, early, close_op::NONE, FinWait2, Close))),
        ];
        let mut reader = CloseNotes::reading(rings(&notes, [2, 1]), Vec::new());
        reader.read();
        assert!(reader.open.is_empty());
        // The late close began on CPU 0 just after this read took CPU 0's
        // head, and ended on CPU 1 before it took CPU 1's: its start is read
        // only by the next read.
        notes.extend([
            (
                0,
                at(40, note(2, late, close_op::SHUTDOWN, Established, FinWait1)),
            ),
            (1, at(50, note(1, late, close_op::NONE, FinWait1, FinWait2))),
            (1, at(60, note(2, late, close_op::NONE, FinWait2, Close))),
        ]);
        reader.rings = rings(&notes, [2, 3]);
        reader.read();
        reader.rings = rings(&notes, [3, 3]);
        reader.read();
        assert!(reader.open.is_empty());
        assert_eq!(reader.read_to, [3, 3]);
        // Once a read has passed it, an end is forgotten: a socket that
        // connects again and closes again is kept anew.
        reader.read();
        reader.keep(at(
            70,
            note(2, late, close_op::SHUTDOWN, Established, FinWait1),
        ));
        assert!(reader.open.contains_key(&late));
    }

    /// Data that arrives after close() ends the close, then sends the reset:
    /// the reset is read after its close's notes, and maybe before the
    /// drain's read of them. Its close is found without a search of the
    /// rings, even when its start was on another CPU than its end and is
    /// read after it.
    #[test]
    fn a_reset_finds_the_close_it_ended() {
        use TcpState::*;
        let (one_cpu, two_cpus) = (70, 80);
        let at = |at_ns, note: CloseNote| CloseNote { at_ns, ..note };
        let notes = [
            (
                0,
                at(10, note(0, one_cpu, close_op::CLOSE, Established, FinWait1)),
            ),
            (
                0,
                at(20, note(1, one_cpu, close_op::NONE, FinWait1, FinWait2)),
            ),
            (0, at(30, note(2, one_cpu, close_op::NONE, FinWait2, Close))),
            // CPU 0's ring is read first, so this end comes before its start.
            (
                0,
                at(50, note(3, two_cpus, close_op::NONE, FinWait1, Close)),
            ),
            (
                1,
                at(
                    40,
                    note(0, two_cpus, close_op::SHUTDOWN, Established, FinWait1),
                ),
            ),
        ];
        // Nothing read before the resets.
        let mut reader = CloseNotes::reading(rings(&notes, [4, 1]), Vec::new());
        let mark = reader.mark_of(one_cpu).unwrap();
        assert_eq!(
            (mark.op, mark.tgid, mark.steps),
            (close_op::CLOSE, 51435, 2)
        );
        assert_eq!(&mark.step_state[..2], [FinWait1 as u8, FinWait2 as u8]);
        let mark = reader.mark_of(two_cpus).unwrap();
        assert_eq!(
            (mark.op, mark.op_at_ns, mark.steps),
            (close_op::SHUTDOWN, 40, 1)
        );
        assert!(reader.open.is_empty());
        // The close that ends `SLOTS` cookies later takes the slot.
        let later = one_cpu + EndedCloses::SLOTS as u64;
        reader.keep(note(4, later, close_op::CLOSE, Established, FinWait1));
        reader.keep(note(5, later, close_op::NONE, FinWait1, Close));
        assert_eq!(reader.mark_of(one_cpu), None);
        assert_eq!(reader.mark_of(later).unwrap().op, close_op::CLOSE);
        // A socket whose close was never noted (a server's, answering the
        // peer's FIN) has none.
        assert_eq!(reader.mark_of(12345), None);
    }

    #[test]
    fn closes_that_pile_up_unended_bring_a_scan_early() {
        use TcpState::*;
        let mut reader = CloseNotes::reading(rings(&[], [0, 0]), Vec::new());
        let half = (CloseNotes::MAX_OPEN / 2) as u64;
        for cookie in 1..=half {
            reader.keep(note(cookie, cookie, close_op::CLOSE, Established, FinWait1));
        }
        assert!(!reader.due());
        reader.keep(note(
            half + 1,
            half + 1,
            close_op::CLOSE,
            Established,
            FinWait1,
        ));
        assert!(reader.due());
        // A scan forgets the closes it did not find; those it found stay,
        // and do not bring the next one early.
        reader.scanned(u64::MAX, 1..=1_000);
        assert_eq!(reader.open.len(), 1_000);
        assert!(!reader.due());
    }

    #[test]
    fn a_read_waits_for_a_note_being_written_and_counts_the_overwritten() {
        use TcpState::*;
        let first = note(0, 70, close_op::SHUTDOWN, Established, FinWait1);
        let writing = being_written(1, 80);
        let mut reader =
            CloseNotes::reading(rings(&[(0, first), (0, writing)], [2, 0]), Vec::new());
        reader.read();
        assert_eq!(reader.read_to, [1, 0]);
        assert!(reader.open.contains_key(&70));
        // The ring went round before the next read: the note being
        // written then and the one after it are gone.
        let mut later: Vec<_> = (3..SLOTS + 2)
            .map(|seq| (0, note(seq, 5, close_op::NONE, FinWait1, Close)))
            .collect();
        later.push((
            0,
            note(SLOTS + 2, 90, close_op::CLOSE, Established, FinWait1),
        ));
        reader.rings = rings(&later, [SLOTS + 3, 0]);
        reader.read();
        assert_eq!(reader.overwritten(), 2);
        assert!(reader.open.contains_key(&90));
        assert_eq!(reader.read_to, [SLOTS + 3, 0]);
    }

    #[test]
    fn a_mark_starts_at_the_first_op_and_keeps_the_steps_after_it() {
        use TcpState::*;
        let notes = [
            // Out of order, as two scans may keep them.
            note(9, 7, close_op::NONE, FinWait1, FinWait2),
            note(4, 7, close_op::SHUTDOWN, Established, FinWait1),
            // A step before any op: the close started in a kernel thread.
            note(2, 7, close_op::NONE, FinWait1, FinWait2),
        ];
        let mark = close_mark(&notes).unwrap();
        assert_eq!(
            (mark.op, mark.how, mark.tgid, mark.op_at_ns),
            (close_op::SHUTDOWN, 1, 51435, 4_000)
        );
        assert_eq!(mark.first_state, Established as u8);
        assert_eq!(mark.steps, 2);
        assert_eq!(&mark.step_state[..2], &[FinWait1 as u8, FinWait2 as u8]);
        assert_eq!(&mark.step_at_ns[..2], &[4_000, 9_000]);
        assert_eq!(&mark.comm[..5], b"envoy");
    }

    #[test]
    fn steps_without_an_op_make_no_mark() {
        use TcpState::*;
        assert_eq!(
            close_mark(&[note(3, 7, close_op::NONE, FinWait1, FinWait2)]),
            None
        );
        assert_eq!(close_mark(&[]), None);
    }

    #[test]
    fn a_mark_keeps_as_many_steps_as_the_kernel_would() {
        use TcpState::*;
        let mut notes = vec![note(0, 7, close_op::CLOSE, Established, FinWait1)];
        notes.extend((1..10).map(|seq| note(seq, 7, close_op::NONE, FinWait1, Closing)));
        assert_eq!(close_mark(&notes).unwrap().steps as usize, MARK_STEPS);
    }

    #[test]
    fn a_read_gets_what_the_ring_still_holds_and_counts_the_rest() {
        // Everything still there.
        assert_eq!(
            Unread::at(10, 500, SLOTS),
            Unread {
                range: 10..500,
                lost: 0
            }
        );
        // The ring went round: notes below head - SLOTS are gone.
        let head = SLOTS + 1_000;
        assert_eq!(
            Unread::at(300, head, SLOTS),
            Unread {
                range: 1_000..head,
                lost: 700
            }
        );
        // Nothing new.
        assert_eq!(Unread::at(head, head, SLOTS).range, head..head);
    }
}
