//! Eviction: rows whose neuron fell out of the window or was chosen for capacity become holes
//! (`take_holes`); `close_holes` keeps the live block contiguous by moving the last live rows in
//! (the paper's deletion).

use std::sync::atomic::Ordering;

use super::{NeuronCache, ABSENT, EMPTY, READY};

/// How `take_holes` chooses rows.
#[derive(Clone, Copy)]
pub(super) enum Doom {
    /// Not wanted in the last `window` steps before `step`, nor by the admission being made
    /// (a guess records its neurons a step back: `begin_guess`).
    Window { step: u64, window: u32 },
    /// Marked in `doomed`.
    Marked,
}

impl NeuronCache {
    pub(super) fn is_doomed(&self, j: u32, how: Doom) -> bool {
        match how {
            Doom::Window { step, window } => {
                self.seen[j as usize] != self.serial
                    && step.saturating_sub(self.last_wanted[j as usize]) > window as u64
            }
            Doom::Marked => self.doomed[j as usize],
        }
    }

    /// Drop row `row` from the index (its bytes stay until overwritten).
    pub(super) fn unindex(&mut self, row: usize) {
        let j = self.neuron_of[row];
        self.slot_of[j as usize] = ABSENT;
        self.doomed[j as usize] = false;
        self.neuron_of[row] = ABSENT;
        self.shared.state[row].store(EMPTY, Ordering::Relaxed);
    }

    /// Unindex every live row whose neuron is doomed and return those rows (holes, ascending).
    /// Only called with no fill pending, so every live row is ready and owned by the owner.
    pub(super) fn take_holes(&mut self, how: Doom) -> Vec<usize> {
        let mut holes = Vec::new();
        for row in 0..self.live {
            let j = self.neuron_of[row];
            if j != ABSENT && self.is_doomed(j, how) {
                self.unindex(row);
                holes.push(row);
            }
        }
        holes
    }

    /// Close `holes` (unindexed rows below `live`, ascending) by moving the last live rows into
    /// them (the paper's deletion); holes at the end just shorten the block. Only called with no
    /// fill pending.
    pub(super) fn close_holes(&mut self, holes: &[usize]) {
        let bb = self.shared.bundle_bytes;
        let base = self.shared.slots.as_mut_ptr();
        let mut end = self.live;
        let mut hi = holes.len();
        for (i, &h) in holes.iter().enumerate() {
            // drop holes not yet filled (and nothing else) from the end of the block
            while hi > i && end > 0 && holes[hi - 1] == end - 1 {
                hi -= 1;
                end -= 1;
            }
            if h >= end {
                break;
            }
            let last = end - 1;
            if self.shared.external {
                self.moves.push((h as u32, last as u32)); // the caller's rows: it moves them
            } else {
                // No fill is pending and compute may not read rows across a `begin` (module
                // comment).
                // SAFETY: h < last < live <= capacity: two distinct rows inside the slot matrix
                // (kept alive by self.shared) that no other thread touches now.
                unsafe { std::ptr::copy_nonoverlapping(base.add(last * bb), base.add(h * bb), bb) };
            }
            let j = self.neuron_of[last];
            self.neuron_of[h] = j;
            self.slot_of[j as usize] = h as u32;
            self.shared.state[h].store(READY, Ordering::Relaxed);
            self.neuron_of[last] = ABSENT;
            self.shared.state[last].store(EMPTY, Ordering::Relaxed);
            end -= 1;
        }
        self.live = end;
    }
}
