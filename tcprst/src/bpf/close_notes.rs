//! The kernel's rings of `CloseNote`s (tcprst-ebpf's closing.rs), one per
//! CPU, mapped read-only: who started closing each socket, and its steps
//! since, written as they happen and read only for the sockets tcprst
//! reports.
//!
//! Nothing here reads the rings per connection. A scan for stuck sockets
//! looks through the notes written since the previous scan began, for the
//! cookies of the half-closed sockets it found, and keeps what it finds
//! while they stay half-closed; a reset on a socket that sent its FIN looks
//! through the rings for its cookie. A note overwritten before any scan
//! looked at it is counted.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::MapData;
use memmap2::{Mmap, MmapOptions};
use tcprst_common::{CLOSE_NOTES_BYTES, CloseMark, CloseNote, MARK_STEPS, close_op};

use crate::memo::Memo;

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
}

/// The rings as the kernel shares them.
struct Rings {
    notes: Mmap,
    heads: Mmap,
    layout: NoteRings,
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
            heads: map(heads, layout.cpus as usize * size_of::<u64>())
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
        let head = self.heads.as_ptr().cast::<u64>().wrapping_add(cpu as usize);
        // SAFETY: `cpu`'s u64 in the page-aligned heads mapping (`cpu` is
        // below `layout.cpus`, as every caller iterates).
        unsafe { AtomicU64::from_ptr(head.cast_mut()) }.load(Ordering::Acquire)
    }

    fn heads(&self) -> Vec<u64> {
        (0..self.layout.cpus).map(|cpu| self.head(cpu)).collect()
    }

    /// Note `seq` of CPU `cpu`, if its slot still holds all of it.
    fn read(&self, cpu: u32, seq: u64) -> Option<CloseNote> {
        let slots = self.layout.ring_slots();
        let index = (u64::from(cpu) * slots + seq % slots) as usize;
        let slot = self.notes.as_ptr().cast::<CloseNote>().wrapping_add(index);
        // SAFETY: `slot` is inside the mapping and aligned (checked in
        // `map`); `seq` is its first field. The copy is volatile, and the
        // writer marks a slot `NOTE_WRITING` before it changes it and writes
        // `seq` last, so the same `seq` before and after means a whole note.
        unsafe {
            let seq_now = || AtomicU64::from_ptr(slot.cast_mut().cast()).load(Ordering::Acquire);
            if seq_now() != seq {
                return None;
            }
            let note = slot.read_volatile();
            fence(Ordering::Acquire);
            (seq_now() == seq && note.seq == seq).then_some(note)
        }
    }
}

/// The notes tcprst reads, and what it kept of them.
pub struct CloseNotes {
    rings: Rings,
    /// The rings' two maps, held while they are mapped.
    _maps: Vec<MapData>,
    /// The notes of the sockets the last scan found half-closed, by cookie.
    kept: HashMap<u64, Vec<CloseNote>>,
    /// Where the next scan looks from, per CPU: the heads when the last
    /// scan's dump began.
    search_from: Vec<u64>,
    /// Every note below this, per CPU, was looked at by a scan or counted.
    looked_to: Vec<u64>,
    /// Notes overwritten before a scan looked at them.
    overwritten: u64,
    /// What resets found, by cookie: a storm on one socket looks once.
    found: Memo<u64, Option<CloseMark>>,
}

impl CloseNotes {
    /// Sockets whose lookups `found` keeps.
    const MAX_FOUND: usize = 4096;

    pub fn new(notes: MapData, heads: MapData, layout: NoteRings) -> Result<Self> {
        let rings = Rings::map(&notes, &heads, layout)?;
        Ok(Self::reading(rings, vec![notes, heads]))
    }

    fn reading(rings: Rings, maps: Vec<MapData>) -> Self {
        let cpus = rings.layout.cpus as usize;
        Self {
            rings,
            _maps: maps,
            kept: HashMap::new(),
            search_from: vec![0; cpus],
            looked_to: vec![0; cpus],
            overwritten: 0,
            found: Memo::new(Self::MAX_FOUND),
        }
    }

    /// The heads as a scan's dump begins: every socket the dump finds
    /// half-closed started closing after the previous scan's heads, and
    /// noted it before the dump saw it.
    pub fn heads(&self) -> Vec<u64> {
        self.rings.heads()
    }

    /// Whether notes pile up fast enough that the next scan must come
    /// early, before a ring overwrites what no scan has looked at.
    pub fn due(&self) -> bool {
        let half = self.rings.layout.ring_slots() / 2;
        (0..self.rings.layout.cpus)
            .zip(&self.search_from)
            .any(|(cpu, from)| self.rings.head(cpu).saturating_sub(*from) > half)
    }

    /// Notes overwritten before a scan looked at them: the sockets they
    /// belong to, if reported, show no initiator.
    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    /// The close marks of the sockets a scan found, by cookie, from the
    /// notes written since the previous scan began and those kept from
    /// before. `dump_began` is `heads()` as this scan's dump began.
    pub fn scanned(
        &mut self,
        dump_began: &[u64],
        cookies: impl IntoIterator<Item = u64>,
    ) -> HashMap<u64, CloseMark> {
        let wanted: HashSet<u64> = cookies.into_iter().collect();
        self.kept.retain(|cookie, _| wanted.contains(cookie));
        let slots = self.rings.layout.ring_slots();
        for cpu in 0..self.rings.layout.cpus {
            let i = cpu as usize;
            let head = self.rings.head(cpu);
            let look = Looked::at(self.search_from[i]..head, self.looked_to[i], slots);
            self.overwritten += look.lost;
            self.looked_to[i] = self.looked_to[i].max(head);
            self.search_from[i] = dump_began.get(i).copied().unwrap_or(head);
            for seq in look.range {
                let Some(note) = self.rings.read(cpu, seq) else {
                    continue;
                };
                if wanted.contains(&note.cookie) {
                    let notes = self.kept.entry(note.cookie).or_default();
                    // The ranges of two scans overlap.
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
            }
        }
        self.kept
            .iter()
            .filter_map(|(cookie, notes)| Some((*cookie, close_mark(notes)?)))
            .collect()
    }

    /// The close mark of a socket a reset came on, which sent its FIN: from
    /// what the last scan kept, or every note the rings hold for it.
    pub fn mark_of(&mut self, cookie: u64) -> Option<CloseMark> {
        if let Some(notes) = self.kept.get(&cookie) {
            return close_mark(notes);
        }
        let rings = &self.rings;
        self.found.get(&cookie, || {
            let slots = rings.layout.ring_slots();
            let mut notes = Vec::new();
            for cpu in 0..rings.layout.cpus {
                let head = rings.head(cpu);
                notes.extend(
                    (head.saturating_sub(slots)..head)
                        .filter_map(|seq| rings.read(cpu, seq))
                        .filter(|n| n.cookie == cookie),
                );
            }
            close_mark(&notes)
        })
    }
}

/// Which notes of `want` a scan can still read in a ring of `slots`, and
/// how many it lost.
#[derive(Debug, PartialEq)]
struct Looked {
    range: Range<u64>,
    lost: u64,
}

impl Looked {
    /// `want` ends at the head; `looked_to` is where earlier scans looked
    /// up to, so a note is counted lost once, however the ranges overlap.
    fn at(want: Range<u64>, looked_to: u64, slots: u64) -> Self {
        let oldest = want.end.saturating_sub(slots);
        Self {
            range: want.start.max(oldest)..want.end,
            lost: oldest.saturating_sub(looked_to),
        }
    }
}

/// A socket's notes, from any CPUs, as the mark `--history` would keep:
/// from its first note of a process starting the close, with the steps
/// since in time order; None without such a note.
fn close_mark(notes: &[CloseNote]) -> Option<CloseMark> {
    let mut sorted = notes.to_vec();
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
        let mut head_page = MmapOptions::new().len(16).map_anon().unwrap();
        head_page[..8].copy_from_slice(&heads[0].to_ne_bytes());
        head_page[8..].copy_from_slice(&heads[1].to_ne_bytes());
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
    fn a_slot_being_written_or_taken_by_a_later_note_reads_as_nothing() {
        use TcpState::*;
        let whole = note(5, 7, close_op::CLOSE, CloseWait, LastAck);
        let writing = CloseNote {
            seq: tcprst_common::NOTE_WRITING,
            ..note(6, 8, close_op::CLOSE, CloseWait, LastAck)
        };
        let later = note(7 + SLOTS, 9, close_op::CLOSE, CloseWait, LastAck);
        let rings = rings(&[(1, whole), (1, writing), (1, later)], [0, 8 + SLOTS]);
        assert_eq!(rings.heads(), [0, 8 + SLOTS]);
        assert_eq!(rings.read(1, 5), Some(whole));
        // The same slot of the other CPU's ring is empty.
        assert_eq!(rings.read(0, 5), None);
        assert_eq!(rings.read(1, 6), None);
        assert_eq!(rings.read(1, 7), None);
        assert_eq!(rings.read(1, 7 + SLOTS), Some(later));
    }

    #[test]
    fn scans_keep_the_notes_of_sockets_still_half_closed() {
        use TcpState::*;
        let client = 70;
        let server = 80;
        // The processes closed on CPU 0; the client's FIN_WAIT2 came in a
        // softirq on CPU 1.
        let notes = [
            (
                0,
                note(0, client, close_op::SHUTDOWN, Established, FinWait1),
            ),
            (0, note(1, 99, close_op::CLOSE, CloseWait, LastAck)),
            (0, note(2, server, close_op::CLOSE, CloseWait, LastAck)),
            (1, note(0, client, close_op::NONE, FinWait1, FinWait2)),
        ];
        // The first scan's dump began when two notes were written on CPU 0
        // and one on CPU 1: it found the client only.
        let mut reader = CloseNotes::reading(rings(&notes, [3, 1]), Vec::new());
        let marks = reader.scanned(&[2, 1], [client]);
        assert_eq!(marks.keys().collect::<Vec<_>>(), [&client]);
        assert_eq!(marks[&client].steps, 2);
        // The server's note came after that dump began: the next scan still
        // finds it, and does not keep the client's notes twice.
        let marks = reader.scanned(&[3, 1], [client, server]);
        assert_eq!(marks[&client].steps, 2);
        assert_eq!(marks[&server].op, close_op::CLOSE);
        // A reset finds a socket no scan kept by looking back.
        assert_eq!(reader.mark_of(99).unwrap().first_state, CloseWait as u8);
        assert_eq!(reader.mark_of(12345), None);
        // Gone from the dump, gone from what is kept.
        let marks = reader.scanned(&[3, 1], [server]);
        assert!(!marks.contains_key(&client));
        assert_eq!(reader.overwritten(), 0);
        assert!(!reader.due());
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
        let mut notes = vec![note(0, 7, close_op::CLOSE, CloseWait, LastAck)];
        notes.extend((1..10).map(|seq| note(seq, 7, close_op::NONE, LastAck, Closing)));
        assert_eq!(close_mark(&notes).unwrap().steps as usize, MARK_STEPS);
    }

    #[test]
    fn a_scan_reads_what_the_ring_still_holds_and_counts_the_rest_once() {
        // Everything still there.
        assert_eq!(
            Looked::at(10..500, 0, SLOTS),
            Looked {
                range: 10..500,
                lost: 0
            }
        );
        // The ring went round: notes below head - SLOTS are gone, and those
        // no scan had looked at are lost.
        let head = SLOTS + 1_000;
        assert_eq!(
            Looked::at(200..head, 300, SLOTS),
            Looked {
                range: 1_000..head,
                lost: 700
            }
        );
        // The next scan starts where the last dump began (overlapping what
        // was looked at): nothing is counted twice.
        let later = head + SLOTS + 10;
        assert_eq!(Looked::at(head - 5..later, head, SLOTS).lost, 10);
        assert_eq!(Looked::at(head - 5..head + 3, head, SLOTS).lost, 0);
    }
}
