//! A persistent pool of worker threads that runs the items of a batch, many at once.
//!
//! Why threads and not a spawn per batch: a token needs one batch per layer (30 a token for
//! SmolLM2), each a few hundred microseconds of I/O; spawning 32 threads costs about as much
//! as the reads. The workers sleep on a condition variable between batches.
//!
//! A batch is a job with `len()` items; workers take the oldest batch with unclaimed items from
//! the queue and claim its items with an atomic counter (no lock per item), so a batch of k
//! items keeps min(k, threads) reads in flight, and several batches from several callers share
//! the workers in FIFO order. The caller blocks until every item of its batch has run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Work for the pool: `run(i)` for every i in 0..len(), each exactly once, from any thread.
pub(super) trait BatchJob: Send + Sync {
    fn len(&self) -> usize;
    fn run(&self, i: usize);
}

struct Batch {
    job: Arc<dyn BatchJob>,
    next: AtomicUsize, // next unclaimed item
    left: AtomicUsize, // items not yet finished
    done_lock: Mutex<()>,
    done: Condvar,
}

impl Batch {
    fn finish_one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Take the lock so the waiter is either before its check or inside wait(): no lost wake-up.
            let _g = lock(&self.done_lock);
            self.done.notify_all();
        }
    }
}

struct Queue {
    batches: VecDeque<Arc<Batch>>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

pub(super) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker never panics while holding a lock (nothing in there can panic), but if one did,
    // the data (a queue, a counter) is still consistent: carry on rather than propagate.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub(super) fn new(threads: usize, name: &str) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { batches: VecDeque::new(), shutdown: false }),
            work: Condvar::new(),
        });
        let mut pool = Pool { shared, threads: Vec::with_capacity(threads) };
        for i in 0..threads {
            let shared = pool.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(256 << 10) // pread loops and error formatting: small stacks suffice
                .spawn(move || worker(&shared))?; // on error, Drop joins the ones started
            pool.threads.push(h);
        }
        Ok(pool)
    }

    /// Run every item of `job` on the workers; return when all have finished.
    pub(super) fn run(&self, job: Arc<dyn BatchJob>) {
        let n = job.len();
        if n == 0 {
            return;
        }
        if n == 1 || self.threads.is_empty() {
            // One item: run it here, saving two thread wake-ups (tens of microseconds).
            for i in 0..n {
                job.run(i);
            }
            return;
        }
        let batch = Arc::new(Batch {
            job,
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(n),
            done_lock: Mutex::new(()),
            done: Condvar::new(),
        });
        lock(&self.shared.queue).batches.push_back(batch.clone());
        if n >= self.threads.len() {
            self.shared.work.notify_all();
        } else {
            for _ in 0..n {
                self.shared.work.notify_one();
            }
        }
        let mut g = lock(&batch.done_lock);
        while batch.left.load(Ordering::Acquire) > 0 {
            g = batch.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        // Find a batch with unclaimed items (dropping exhausted ones from the queue)...
        let batch = {
            let mut q = lock(&shared.queue);
            loop {
                match q.batches.front() {
                    Some(b) if b.next.load(Ordering::Relaxed) < b.job.len() => break b.clone(),
                    Some(_) => {
                        q.batches.pop_front();
                    }
                    None if q.shutdown => return,
                    None => q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        // ...then claim its items without the lock until none is left.
        loop {
            let i = batch.next.fetch_add(1, Ordering::Relaxed);
            if i >= batch.job.len() {
                break;
            }
            // Count the item as finished even if `run` unwinds, so the caller never waits forever.
            struct Finish<'a>(&'a Batch);
            impl Drop for Finish<'_> {
                fn drop(&mut self) {
                    self.0.finish_one();
                }
            }
            let _finish = Finish(&batch);
            batch.job.run(i);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.work.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}
