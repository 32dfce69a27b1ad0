//! The read planner: wanted neurons of one layer -> few large, aligned read requests.
//!
//! Pure (no I/O). A layer's region holds `n_neurons` bundles of `bundle_bytes` back to back from
//! a 4 KiB-aligned `offset`, padded to a whole page (llmflash.store). Direct I/O reads whole
//! pages, so a bundle j costs the pages [j*bb / 4K, ceil((j+1)*bb / 4K)).
//!
//! Choices, each priced with the disk profile (`Profile::request_seconds`):
//! 1. Sparse: sort and dedupe the wanted neurons, turn each into its pages, merge runs that
//!    touch, and bridge a gap of up to `max_gap_bytes` (reading it costs less than one more
//!    request: `Profile::bridge_gap_bytes`), then cut runs longer than `max_request_bytes` into
//!    even pieces (big requests gain nothing past the table's top size, and pieces spread one
//!    run over several workers); with whole-page bundles, pieces hold whole bundles, so each
//!    can be read straight into its rows (a piece cut mid-bundle must be staged and copied).
//! 2. One span: every page from the first wanted bundle's to the last's, in even pieces of at
//!    most `max_request_bytes` (the whole region when the wanted set spans it). For small
//!    bundles and a dense wanted set, many small requests cost several times more than reading
//!    it all in large ones. Flash must never be slower than naive: the cheaper plan wins. The
//!    span, not the whole region, so that a layer whose wanted neurons lie in one part of it (a
//!    placed store keeps the pinned hot neurons, never read, together at the end) reads only
//!    that part.
//!
//! Destination layout: the requests' data lie back to back in one buffer of `buffer_bytes`
//! (request r at `dest_offset`, a multiple of 4 KiB so direct I/O can write it). The wanted
//! neuron `neurons[k]` lands at `landing[k]`, inside request `request_index[k]` (a bundle whose
//! run was cut may continue into the next request, which directly follows it in the buffer).

use crate::aligned::ALIGN;
use crate::error::{Error, Result};
use crate::profile::Profile;

const PAGE: u64 = ALIGN as u64;

/// One layer's FFN region in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// File offset of bundle 0 (a multiple of 4096).
    pub offset: u64,
    pub n_neurons: u32,
    pub bundle_bytes: u64,
}

impl Region {
    /// `n_neurons * bundle_bytes`, checked.
    pub fn payload_bytes(&self) -> Result<u64> {
        (self.n_neurons as u64)
            .checked_mul(self.bundle_bytes)
            .ok_or_else(|| Error::layout(format!("{} neurons x {} bytes overflows", self.n_neurons, self.bundle_bytes)))
    }

    /// The payload rounded up to a whole page: the bytes a plan may read.
    pub fn region_bytes(&self) -> Result<u64> {
        let p = self.payload_bytes()?;
        crate::aligned::align_up(p).ok_or_else(|| Error::layout(format!("region of {p} bytes overflows")))
    }

    pub fn validate(&self) -> Result<()> {
        if self.bundle_bytes == 0 {
            return Err(Error::layout("bundle_bytes = 0 (expected at least one byte per neuron)"));
        }
        if self.offset % PAGE != 0 {
            return Err(Error::layout(format!(
                "region offset {} is not a multiple of {PAGE}: direct I/O cannot address it",
                self.offset
            )));
        }
        let len = self.region_bytes()?;
        if self.offset.checked_add(len).map_or(true, |end| end > i64::MAX as u64) {
            return Err(Error::layout(format!("region [{}, +{len}) overflows a file offset", self.offset)));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    /// Largest single request (rounded down to a multiple of 4096; at least 4096).
    pub max_request_bytes: u64,
    /// Reads in flight (the reader's concurrency): which column of the profile applies.
    pub concurrency: u32,
    /// Consider reading one span (first to last wanted page) when it is cheaper.
    pub allow_whole: bool,
    /// Override the profile's bridgeable gap (bytes; rounded down to whole pages).
    pub max_gap_bytes: Option<u64>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { max_request_bytes: 1 << 20, concurrency: 32, allow_whole: true, max_gap_bytes: None }
    }
}

/// One aligned read: `len` bytes at file `offset`, to `dest_offset` in the plan's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub offset: u64,
    pub len: u64,
    pub dest_offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub region: Region,
    /// Aligned requests in file order; destinations back to back from 0.
    pub requests: Vec<Request>,
    /// The unique wanted neurons, sorted.
    pub neurons: Vec<u32>,
    /// For each of `neurons`: where its bundle starts in the plan's buffer.
    pub landing: Vec<u64>,
    /// For each of `neurons`: the request holding its bundle's first byte.
    pub request_index: Vec<u32>,
    /// Sum of request lengths: bytes read from disk, and the buffer size needed.
    pub buffer_bytes: u64,
    /// Bytes of wanted bundles (`neurons.len() * bundle_bytes`).
    pub useful_bytes: u64,
    /// Widest gap (bytes) the sparse plan bridges rather than issuing another request.
    pub max_gap_bytes: u64,
    /// The plan reads one span, every page from the first wanted bundle's to the last's
    /// (cheaper than the sparse plan by the profile; the whole region when the wanted set spans it).
    pub whole_region: bool,
    /// Estimated seconds for the chosen plan, the sparse plan and the one-span plan.
    pub est_seconds: f64,
    pub est_sparse_seconds: f64,
    pub est_whole_seconds: f64,
}

/// The piece length for a run of `len` pages: even pieces of at most `max_pages`, rounded to a
/// multiple of `unit` pages (a whole-page bundle's pages; 1 otherwise) when that still fits.
fn piece_step(len: u64, max_pages: u64, unit: u64) -> u64 {
    let step = len.div_ceil(len.div_ceil(max_pages));
    let aligned = step.div_ceil(unit) * unit;
    if aligned <= max_pages {
        aligned
    } else if unit <= max_pages {
        max_pages / unit * unit
    } else {
        step
    }
}

/// Split page runs `[p0, p1)` into pieces of at most `max_pages` (`piece_step`); place them back
/// to back.
fn pieces(runs: &[(u64, u64)], max_pages: u64, unit: u64, out: &mut Vec<(u64, u64)>) {
    for &(p0, p1) in runs {
        let step = piece_step(p1 - p0, max_pages, unit);
        let mut p = p0;
        while p < p1 {
            let q = (p + step).min(p1);
            out.push((p, q));
            p = q;
        }
    }
}

/// Cost of reading these page runs, all in one batch with up to `concurrency` in flight.
#[cfg(test)]
fn cost(profile: &Profile, runs: &[(u64, u64)], concurrency: u32) -> f64 {
    let c = (runs.len() as u64).min(concurrency as u64).max(1) as u32;
    runs.iter().map(|&(a, b)| profile.request_seconds((b - a) * PAGE, c)).sum()
}

/// The shape of `pieces(runs, max_pages, unit)` without building it: for each run, how many
/// pieces of `step` pages and the length of the shorter last piece (0 if none).
fn piece_shapes(runs: &[(u64, u64)], max_pages: u64, unit: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    runs.iter().map(move |&(p0, p1)| {
        let len = p1 - p0;
        let step = piece_step(len, max_pages, unit);
        (len / step, step, len % step)
    })
}

/// `cost(profile, pieces(runs, max_pages, unit), concurrency)`, computed per run (a whole
/// 268 MB region is one run of 256+ equal pieces: one profile lookup, not one per piece).
fn pieces_cost(profile: &Profile, runs: &[(u64, u64)], max_pages: u64, unit: u64, concurrency: u32) -> f64 {
    let count: u64 = piece_shapes(runs, max_pages, unit).map(|(full, _, rem)| full + u64::from(rem > 0)).sum();
    let c = count.min(concurrency as u64).max(1) as u32;
    piece_shapes(runs, max_pages, unit)
        .map(|(full, step, rem)| {
            let last = if rem > 0 { profile.request_seconds(rem * PAGE, c) } else { 0.0 };
            full as f64 * profile.request_seconds(step * PAGE, c) + last
        })
        .sum()
}

/// Cut runs into pieces, choosing the piece cap (max_pages, max_pages/2, ... down to 16 pages)
/// that the profile prices cheapest: one 5 MB layer read as five 1 MiB requests keeps only 5
/// in flight, and at 5 in flight the table gives less than 21 requests of 256 KiB do at 21.
/// Caps are priced without building their pieces (`pieces_cost`), only the cheapest is built.
fn split_cheapest(
    profile: &Profile,
    runs: &[(u64, u64)],
    max_pages: u64,
    unit: u64,
    concurrency: u32,
) -> (Vec<(u64, u64)>, f64) {
    let mut best: Option<(u64, f64)> = None;
    let mut cap = max_pages;
    loop {
        let c = pieces_cost(profile, runs, cap, unit, concurrency);
        if best.map_or(true, |b| c < b.1) {
            best = Some((cap, c));
        }
        if cap <= 16 || (runs.len() as u64) >= concurrency as u64 {
            break; // enough requests in flight already: smaller pieces only add overhead
        }
        cap /= 2;
    }
    let (cap, c) = best.unwrap_or((max_pages, 0.0));
    let mut out = Vec::with_capacity(runs.len());
    pieces(runs, cap, unit, &mut out);
    (out, c)
}

/// Plan the reads of `wanted` (neuron ids in store order; any order, duplicates allowed).
pub fn plan(wanted: &[u32], region: &Region, profile: &Profile, opts: &PlanOptions) -> Result<Plan> {
    region.validate()?;
    if opts.max_request_bytes < PAGE {
        return Err(Error::invalid(format!(
            "max_request_bytes = {} (expected at least {PAGE})",
            opts.max_request_bytes
        )));
    }
    if opts.concurrency == 0 {
        return Err(Error::invalid("concurrency = 0 (expected at least 1 read in flight)"));
    }
    let bb = region.bundle_bytes;
    let region_pages = region.region_bytes()? / PAGE;
    let max_pages = opts.max_request_bytes / PAGE;

    let mut neurons = wanted.to_vec();
    if let Some(&bad) = neurons.iter().find(|&&j| j >= region.n_neurons) {
        return Err(Error::invalid(format!(
            "neuron {bad} is out of range: the layer has {} neurons (ids 0..{})",
            region.n_neurons, region.n_neurons
        )));
    }
    neurons.sort_unstable();
    neurons.dedup();

    let max_gap_bytes = opts.max_gap_bytes.unwrap_or_else(|| profile.bridge_gap_bytes(opts.concurrency)) / PAGE * PAGE;
    let gap_pages = max_gap_bytes / PAGE;

    // Sparse: each bundle's pages, merged when they touch or the gap is bridgeable.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &j in &neurons {
        let start = j as u64 * bb; // < region bytes: no overflow (validated)
        let (a, b) = (start / PAGE, (start + bb).div_ceil(PAGE));
        match runs.last_mut() {
            Some(last) if a <= last.1 + gap_pages => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    // Whole-page bundles: runs (and the one span) start on bundle boundaries, so pieces of
    // whole bundles stay on them.
    let unit = if bb % PAGE == 0 { bb / PAGE } else { 1 };
    let (sparse, est_sparse_seconds) = split_cheapest(profile, &runs, max_pages, unit, opts.concurrency);
    let span: Vec<(u64, u64)> = match (runs.first(), runs.last()) {
        (Some(first), Some(last)) => vec![(first.0, last.1.min(region_pages))],
        _ => Vec::new(),
    };
    let (whole, est_whole_seconds) = split_cheapest(profile, &span, max_pages, unit, opts.concurrency);

    let whole_region = opts.allow_whole && !neurons.is_empty() && est_whole_seconds < est_sparse_seconds;
    let (chosen, est_seconds) = if whole_region { (whole, est_whole_seconds) } else { (sparse, est_sparse_seconds) };

    let mut requests = Vec::with_capacity(chosen.len());
    let mut dest = 0u64;
    for &(a, b) in &chosen {
        let len = (b - a) * PAGE;
        requests.push(Request { offset: region.offset + a * PAGE, len, dest_offset: dest });
        dest += len;
    }

    // Landing places: neurons and pieces are both sorted by position, so one merge-like scan.
    let mut landing = Vec::with_capacity(neurons.len());
    let mut request_index = Vec::with_capacity(neurons.len());
    let mut r = 0usize;
    for &j in &neurons {
        let start = j as u64 * bb;
        while chosen[r].1 * PAGE <= start {
            r += 1; // every bundle's first byte lies in some piece, so r stays in range
        }
        landing.push(requests[r].dest_offset + (start - chosen[r].0 * PAGE));
        request_index.push(r as u32);
    }

    Ok(Plan {
        region: *region,
        requests,
        useful_bytes: neurons.len() as u64 * bb,
        neurons,
        landing,
        request_index,
        buffer_bytes: dest,
        max_gap_bytes,
        whole_region,
        est_seconds,
        est_sparse_seconds,
        est_whole_seconds,
    })
}

impl Plan {
    /// Copy each wanted bundle from the plan's buffer `src` into `dst`, row k = `neurons[k]`
    /// (`dst` holds at least `neurons.len() * bundle_bytes` bytes).
    pub fn gather(&self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let bb = self.region.bundle_bytes as usize;
        if (src.len() as u64) < self.buffer_bytes {
            return Err(Error::invalid(format!(
                "source buffer of {} bytes is smaller than the plan's {}",
                src.len(),
                self.buffer_bytes
            )));
        }
        if (dst.len() as u64) < self.useful_bytes {
            return Err(Error::invalid(format!(
                "destination of {} bytes cannot hold {} bundles of {bb} bytes",
                dst.len(),
                self.neurons.len()
            )));
        }
        for (k, &at) in self.landing.iter().enumerate() {
            let at = at as usize;
            dst[k * bb..(k + 1) * bb].copy_from_slice(&src[at..at + bb]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
