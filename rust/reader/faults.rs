//! Test-only fault injection for the reader: make chosen reads fail (EIO), be interrupted
//! (EINTR), end early (EOF), come back short, or bring changed bytes, in both engines, so the
//! tests can check that every one is retried or reported and none gives wrong data.
//!
//! Off (no rule installed), the cost is one relaxed atomic load per read system call (pool) or
//! per completion (io_uring). The rules are process-wide; Python reaches them only through the
//! private `llmflash._native._inject_fault` / `_clear_faults` / `_faults_fired`.
//!
//! What a rule does to a read it fires on (a `pread`, or an io_uring completion):
//! - `Eio` / `Eintr`: the read fails with that errno (the pool skips the system call; io_uring's
//!   result is replaced, as if the kernel had returned it).
//! - `Eof`: the read returns 0 bytes, as at the end of the file.
//! - `Short`: the read returns about half of what was asked (4 KiB-aligned when that is at least
//!   4 KiB, else at least 1 byte), so the reader must continue the request.
//! - `Flip`: the read completes, then one byte of what it brought is inverted (the first byte of
//!   the read inside the rule's range), as if the file had changed on disk.
//!
//! A read matches a rule when its file path ends with the rule's `file` (any file if empty) and
//! its byte range `[offset, offset + len)` meets the rule's `[start, end)`. Every matching read
//! counts toward each rule's `skip` (reads let through first); the first rule past its skip with
//! firings left (`times`, None = every time) fires. A rule of `Eintr` without a limit makes the
//! reader retry forever: give it `times`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::aligned::ALIGN;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Eio,
    Eintr,
    Eof,
    Short,
    Flip,
}

impl Kind {
    /// "eio", "eintr", "eof", "short" or "flip".
    pub fn parse(name: &str) -> Result<Kind> {
        Ok(match name {
            "eio" => Kind::Eio,
            "eintr" => Kind::Eintr,
            "eof" => Kind::Eof,
            "short" => Kind::Short,
            "flip" => Kind::Flip,
            other => {
                return Err(Error::invalid(format!(
                    "fault kind {other:?} (expected \"eio\", \"eintr\", \"eof\", \"short\" or \"flip\")"
                )))
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub kind: Kind,
    /// Suffix of the file's path ("ffn.bin"); empty: every file.
    pub file: String,
    /// File byte range `[start, end)` a read must meet.
    pub start: u64,
    pub end: u64,
    /// Matching reads let through before the rule fires.
    pub skip: u64,
    /// How many times it fires; None: every matching read after the skipped ones.
    pub times: Option<u64>,
}

struct Armed {
    rule: Rule,
    seen: u64,
    fired: u64,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static RULES: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

fn rules() -> std::sync::MutexGuard<'static, Vec<Armed>> {
    RULES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Add a rule; returns its index (for `fired`).
pub fn inject(rule: Rule) -> Result<usize> {
    if rule.start >= rule.end {
        return Err(Error::invalid(format!("fault range [{}, {}) is empty", rule.start, rule.end)));
    }
    let mut r = rules();
    r.push(Armed { rule, seen: 0, fired: 0 });
    ARMED.store(true, Ordering::Relaxed);
    Ok(r.len() - 1)
}

/// Remove every rule; returns how many times each fired.
pub fn clear() -> Vec<u64> {
    let mut r = rules();
    ARMED.store(false, Ordering::Relaxed);
    r.drain(..).map(|a| a.fired).collect()
}

/// How many times each installed rule has fired so far.
pub fn fired() -> Vec<u64> {
    rules().iter().map(|a| a.fired).collect()
}

/// What to do to one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hit {
    /// Fail with this errno.
    Fail(i32),
    Eof,
    Short,
    /// Invert the byte this far into the read (once it has brought that byte).
    Flip(usize),
}

/// The fault for a read of `len` bytes at `offset` of `path`, if a rule fires on it.
#[inline]
pub(super) fn check(path: &Path, offset: u64, len: usize) -> Option<Hit> {
    if !ARMED.load(Ordering::Relaxed) {
        return None;
    }
    check_rules(path, offset, len)
}

#[cold]
fn check_rules(path: &Path, offset: u64, len: usize) -> Option<Hit> {
    let end = offset.saturating_add(len as u64);
    let mut hit = None;
    for a in rules().iter_mut() {
        let r = &a.rule;
        if end <= r.start || offset >= r.end || !path.as_os_str().to_string_lossy().ends_with(r.file.as_str()) {
            continue;
        }
        a.seen += 1;
        if hit.is_some() || a.seen <= r.skip || r.times.is_some_and(|t| a.fired >= t) {
            continue;
        }
        a.fired += 1;
        hit = Some(match r.kind {
            Kind::Eio => Hit::Fail(libc::EIO),
            Kind::Eintr => Hit::Fail(libc::EINTR),
            Kind::Eof => Hit::Eof,
            Kind::Short => Hit::Short,
            Kind::Flip => Hit::Flip((r.start.max(offset) - offset) as usize),
        });
    }
    hit
}

/// The length a `Short` read returns when `want` bytes were asked: about half (see above).
pub(super) fn short_len(want: usize) -> usize {
    let half = want / 2;
    if half >= ALIGN {
        half / ALIGN * ALIGN
    } else {
        half.max(1)
    }
}

/// Apply a `Flip` to a read of `got` bytes that landed at `dest`.
///
/// # Safety
/// `dest .. dest + got` must be valid for reads and writes and not used by anyone else.
pub(super) unsafe fn flip(hit: Option<Hit>, dest: *mut u8, got: usize) {
    if let Some(Hit::Flip(at)) = hit {
        if at < got {
            // SAFETY: at < got, inside the range the caller vouches for.
            unsafe { *dest.add(at) ^= 0xFF };
        }
    }
}
