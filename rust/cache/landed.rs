//! External rows (the module comment of cache.rs): each fill's bundles land in a buffer of their
//! own, which the owner reads (`landed`), copies into its rows and marks taken (`take_landed`).
//! Bundles never taken are dropped by the next admission; taken buffers go back to the staging
//! pool once the owner lets go of them.

use std::sync::Arc;

use super::{NeuronCache, ABSENT};
use crate::aligned::AlignedBuf;

impl NeuronCache {
    /// External rows: the bundles of the last fill that finished, row k (of `bundle_bytes`) for
    /// the admission's `filled_rows[k]`; None when there is none or it was taken. Look after
    /// `wait` (or an inline `admit`), copy them into their rows, then `take_landed`.
    pub fn landed(&self) -> Option<Arc<AlignedBuf>> {
        self.landed.as_ref().map(|(b, _)| b.clone())
    }

    /// `landed`, marking the bundles taken: their rows stay in the cache. Bundles not taken by
    /// the next admission never reached their rows, so that admission drops their neurons (as
    /// if their fill had failed) and reads them again when wanted.
    pub fn take_landed(&mut self) -> Option<Arc<AlignedBuf>> {
        let (buf, _) = self.landed.take()?;
        self.spent = Some(buf.clone());
        Some(buf)
    }

    /// Keep a fill's landed bundles for the owner (external rows).
    pub(super) fn land(&mut self, landed: Option<(AlignedBuf, Vec<usize>)>) {
        self.landed = landed.map(|(b, rows)| (Arc::new(b), rows));
    }

    /// Before an admission: the rows of bundles the owner did not take (they never reached
    /// its rows) are unindexed and returned as holes; spent landing buffers go back to the pool.
    pub(super) fn drop_untaken(&mut self) -> Vec<usize> {
        let mut holes = Vec::new();
        if let Some((buf, rows)) = self.landed.take() {
            for row in rows {
                if self.neuron_of[row] != ABSENT {
                    self.unindex(row);
                    holes.push(row);
                }
            }
            self.spent = Some(buf);
        }
        // The owner's views hold the other references; once they are gone the buffer is ours.
        match self.spent.take().map(Arc::try_unwrap) {
            Some(Ok(buf)) => self.shared.staging.give(buf),
            Some(Err(held)) => self.spent = Some(held),
            None => {}
        }
        holes
    }
}
