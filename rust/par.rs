//! `join(a, b)`: run two closures in parallel, `b` on a persistent helper thread.
//!
//! Why not `std::thread::scope`: the decode kernels (crate::gemv, crate::attend) split products
//! of a fraction of a millisecond to a few milliseconds between two threads, ~160 times a token,
//! and starting a thread costs about as much as such a product takes (a small product run on two
//! spawned threads is slower than on one). A helper that stays alive and spins briefly for the
//! next job before it sleeps costs a few microseconds per join.
//!
//! One helper serves the whole process, one join at a time: a join that finds it busy (another
//! thread is joining) or that runs in a forked child (the helper lives in the parent) falls back
//! to a scoped thread. A panic in `b` is re-raised in the caller, as `std::thread::scope` does.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long the helper polls for the next job before it sleeps.
const HELPER_SPIN: Duration = Duration::from_micros(300);

type Job = dyn FnMut() + Send;
/// A job borrowing the caller's stack, before its lifetime is erased to post it.
type Borrowed<'a> = Box<dyn FnMut() + Send + 'a>;

/// The job slot's states.
const IDLE: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;
const PANICKED: u8 = 3;

struct Helper {
    pid: u32,
    /// Held by the one caller using the helper.
    busy: Mutex<()>,
    state: AtomicU8,
    /// The posted job: a `*mut Job` whose referent outlives the join (see `join`).
    job: AtomicPtr<Box<Job>>,
    sleeping: Mutex<bool>,
    wake: Condvar,
}

fn helper() -> Option<&'static Helper> {
    static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();
    let h = *HELPER.get_or_init(|| {
        let h: &'static Helper = Box::leak(Box::new(Helper {
            pid: std::process::id(),
            busy: Mutex::new(()),
            state: AtomicU8::new(IDLE),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleeping: Mutex::new(false),
            wake: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new().name("llmflash-helper".into()).spawn(move || h.serve());
        spawned.is_ok().then_some(h)
    });
    h.filter(|h| h.pid == std::process::id())
}

impl Helper {
    fn serve(&self) {
        loop {
            let since = Instant::now();
            while self.state.load(Ordering::Acquire) != POSTED {
                if since.elapsed() > HELPER_SPIN {
                    let mut sleeping = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
                    *sleeping = true;
                    while self.state.load(Ordering::Acquire) != POSTED {
                        sleeping = self.wake.wait(sleeping).unwrap_or_else(|e| e.into_inner());
                    }
                    *sleeping = false;
                    break;
                }
                std::hint::spin_loop();
            }
            let job = self.job.load(Ordering::Acquire);
            // SAFETY: the caller posted a valid `*mut Box<Job>` before setting POSTED (Release,
            // read above with Acquire) and does not return, so the closure stays alive and
            // unaliased, until it sees DONE or PANICKED, which is stored only after this call.
            let ok = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() })).is_ok();
            self.state.store(if ok { DONE } else { PANICKED }, Ordering::Release);
        }
    }
}

/// Run `a` here and `b` on the helper thread, in parallel; return when both are done.
pub fn join<A: FnOnce(), B: FnOnce() + Send>(a: A, b: B) {
    let Some(h) = helper() else {
        return scoped(a, b);
    };
    // a join that panicked (re-raising its halves' panic) poisons `busy`; the helper is fine
    let _busy = match h.busy.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return scoped(a, b),
    };
    let mut b = Some(b);
    let mut call = move || {
        if let Some(b) = b.take() {
            b()
        }
    };
    let boxed: Borrowed<'_> = Box::new(&mut call);
    // SAFETY: only the lifetime is erased ('_ -> 'static, same layout): the helper runs the job
    // before storing DONE/PANICKED, and this function neither returns nor unwinds (`a` runs under
    // catch_unwind) until it has seen one of them, so the closure's borrows outlive its use.
    let mut boxed: Box<Job> = unsafe { std::mem::transmute::<Borrowed<'_>, Box<Job>>(boxed) };
    h.job.store(&mut boxed, Ordering::Release);
    h.state.store(POSTED, Ordering::Release);
    if *h.sleeping.lock().unwrap_or_else(|e| e.into_inner()) {
        h.wake.notify_one();
    }
    let ours = panic::catch_unwind(AssertUnwindSafe(a));
    let mut spins = 0u32;
    let theirs = loop {
        match h.state.load(Ordering::Acquire) {
            DONE => break true,
            PANICKED => break false,
            _ => {}
        }
        spins += 1;
        if spins % 64 == 0 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    };
    h.state.store(IDLE, Ordering::Release);
    h.job.store(std::ptr::null_mut(), Ordering::Release);
    drop(boxed);
    if let Err(e) = ours {
        panic::resume_unwind(e);
    }
    assert!(theirs, "the helper thread's half of a parallel kernel panicked");
}

fn scoped<A: FnOnce(), B: FnOnce() + Send>(a: A, b: B) {
    std::thread::scope(|s| {
        s.spawn(b);
        a();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn both_halves_run_with_borrows() {
        for n in 0..2000 {
            let (mut x, mut y) = (0usize, 0usize);
            join(|| x = n, || y = 2 * n);
            assert_eq!((x, y), (n, 2 * n));
        }
    }

    #[test]
    fn concurrent_joins_all_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        join(
                            || {
                                total.fetch_add(1, Ordering::Relaxed);
                            },
                            || {
                                total.fetch_add(1, Ordering::Relaxed);
                            },
                        );
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4000);
    }

    #[test]
    fn a_panic_on_the_helper_reaches_the_caller_and_the_helper_survives() {
        let r = panic::catch_unwind(|| join(|| {}, || panic!("boom")));
        assert!(r.is_err());
        let mut y = 0;
        join(|| {}, || y = 7);
        assert_eq!(y, 7);
        // the panicking join left `busy` poisoned: later joins still use the helper (retried:
        // a join of a test running beside this one may hold it for a moment)
        let on_helper = std::sync::atomic::AtomicBool::new(false);
        for _ in 0..10_000 {
            join(
                || {},
                || on_helper.store(std::thread::current().name() == Some("llmflash-helper"), Ordering::Relaxed),
            );
            if on_helper.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(on_helper.load(Ordering::Relaxed));
    }

    #[test]
    fn the_helper_wakes_after_sleeping() {
        std::thread::sleep(HELPER_SPIN * 4);
        let mut y = 0;
        join(|| {}, || y = 1);
        assert_eq!(y, 1);
    }
}
