//! `begin`'s five steps (the module doc of cache.rs): mark the wanted neurons, evict by the
//! window, evict for capacity (least recently wanted first), place the missing neurons into holes
//! and after the live rows (the rest overflows), then plan their reads and start them in the
//! background (or run them inline).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::counters::{add, ns_since, Counters};
use super::evict::Doom;
use super::fill::{run_fill, Fill};
use super::{Admission, NeuronCache, ABSENT, FILLING};
use crate::error::Result;
use crate::planner::plan;

impl NeuronCache {
    /// `mark`: the step recorded as the wanted neurons' last (`step`, or `step - 1` for a guess);
    /// evictions are decided at `step`, never of a neuron of this admission.
    pub(super) fn begin_inner(&mut self, wanted: &[u32], step: u64, mark: u64, background: bool) -> Result<Admission> {
        self.check_ids(wanted)?;
        self.wait()?;
        let t0 = Instant::now();
        let untaken = self.drop_untaken();
        self.serial += 1;
        let serial = self.serial;

        // 1. Mark, deduplicating in the caller's order.
        let mut unique = Vec::with_capacity(wanted.len());
        for &j in wanted {
            let k = j as usize;
            if self.seen[k] != serial {
                self.seen[k] = serial;
                self.last_wanted[k] = mark;
                unique.push(j);
            }
        }

        // 2. The window: its rows become holes (unindexed; their bytes stay until overwritten).
        let mut holes = self.take_holes(Doom::Window { step, window: self.window });
        let evicted_window = holes.len();
        holes.extend(untaken);

        // 3. Capacity: evict least recently wanted neurons not wanted at this step.
        let missing: Vec<u32> = unique.iter().copied().filter(|&j| self.slot_of[j as usize] == ABSENT).collect();
        let hits = unique.len() - missing.len();
        let mut evicted_capacity = 0;
        let held = self.live - holes.len();
        if held + missing.len() > self.capacity {
            let need = held + missing.len() - self.capacity;
            let mut cand: Vec<(u64, u32)> = self.neuron_of[..self.live]
                .iter()
                .filter(|&&j| j != ABSENT)
                .filter(|&&j| self.seen[j as usize] != serial)
                .map(|&j| (self.last_wanted[j as usize], j))
                .filter(|&(t, _)| t < step)
                .collect();
            let k = need.min(cand.len());
            if k > 0 {
                if k < cand.len() {
                    cand.select_nth_unstable(k); // cand[..k]: the k oldest (keys are unique)
                }
                for &(_, j) in &cand[..k] {
                    self.doomed[j as usize] = true;
                }
                let more = self.take_holes(Doom::Marked);
                evicted_capacity = more.len();
                holes.extend(more);
            }
        }
        holes.sort_unstable();
        if !self.fill_holes {
            self.close_holes(&holes); // the paper's deletion: every hole closed by a move
            holes.clear();
        }

        // 4. What fits goes into the lowest holes, then after the live rows; the rest overflows.
        let held = self.live - holes.len();
        let m = missing.len().min(self.capacity - held);
        let (append, overflow) = missing.split_at(m);
        // Holes left over (more evicted than read) are closed by moving the last live rows in.
        let leftover = holes.split_off(m.min(holes.len()));
        self.close_holes(&leftover);
        let mut rows: Vec<usize> = holes;
        rows.extend(self.live..self.live + (m - rows.len()));
        let ready_rows = rows.first().copied().unwrap_or(self.live);
        let count = |c: &Counters| {
            add(&c.admissions, 1);
            add(&c.hits, hits as u64);
            add(&c.misses, m as u64);
            add(&c.overflow, overflow.len() as u64);
            add(&c.evicted_window, evicted_window as u64);
            add(&c.evicted_capacity, evicted_capacity as u64);
        };
        let mut adm = Admission {
            epoch: serial,
            ready_rows,
            total_rows: self.live,
            hits,
            misses: m,
            overflow: overflow.to_vec(),
            filled_rows: Vec::new(),
            moves: Vec::new(),
            evicted_window,
            evicted_capacity,
            bytes_read: 0,
            bytes_useful: 0,
            requests: 0,
            whole_region: false,
            est_seconds: 0.0,
        };
        if m == 0 {
            adm.moves = std::mem::take(&mut self.moves);
            self.ready = self.live;
            count(&self.shared.counters);
            add(&self.shared.counters.mgmt_ns, ns_since(t0));
            return Ok(adm);
        }

        // 5. Plan the new neurons and start their reads. On a planning error the rows meant for
        // them are closed again, so the cache stays a contiguous block of ready rows.
        let planned = plan(append, &self.region, &self.profile, &self.opts)
            .and_then(|p| self.fill_for(serial, &p, &rows).map(|f| (p, f)));
        let (p, fill) = match planned {
            Ok(pf) => pf,
            Err(e) => {
                let inside: Vec<usize> = rows.iter().copied().filter(|&r| r < self.live).collect();
                self.close_holes(&inside);
                self.ready = self.live;
                return Err(e);
            }
        };
        count(&self.shared.counters);
        // Rows in the plan's (sorted) neuron order: neighbouring bundles that land in
        // neighbouring rows (appended ones, or adjacent holes) share a read.
        for (&j, &row) in p.neurons.iter().zip(&rows) {
            self.neuron_of[row] = j;
            self.slot_of[j as usize] = row as u32;
            self.shared.state[row].store(FILLING, Ordering::Relaxed);
        }
        self.ready = ready_rows;
        self.live = self.live.max(rows.last().map_or(0, |&r| r + 1));
        adm.total_rows = self.live;
        adm.filled_rows = rows.iter().map(|&r| r as u32).collect();
        adm.bytes_read = p.buffer_bytes;
        adm.bytes_useful = p.useful_bytes;
        adm.requests = p.requests.len();
        adm.whole_region = p.whole_region;
        adm.est_seconds = p.est_seconds;
        adm.moves = std::mem::take(&mut self.moves);
        add(&self.shared.counters.mgmt_ns, ns_since(t0));
        self.pending = Some(serial);
        if background && self.start_filler() {
            if let Some(f) = &self.filler {
                match f.jobs.send(fill) {
                    Ok(()) => return Ok(adm),
                    Err(back) => {
                        // The filler is gone: run this fill here.
                        self.filler = None;
                        self.inline_only = true;
                        return self.run_inline(back.0, adm);
                    }
                }
            }
        }
        self.run_inline(fill, adm)
    }

    fn run_inline(&mut self, fill: Fill, adm: Admission) -> Result<Admission> {
        let t0 = Instant::now();
        let r = run_fill(&self.shared, fill);
        add(&self.shared.counters.wait_ns, ns_since(t0));
        self.land(r.landed);
        if let Err(e) = self.settle(r.error) {
            // The admission's moves were done in the index: the owner gets them with the next.
            let later = std::mem::replace(&mut self.moves, adm.moves);
            self.moves.extend(later);
            return Err(e);
        }
        Ok(adm)
    }
}
