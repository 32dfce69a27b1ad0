//! A persistent pool of worker threads that runs the items of a batch, many at once.
//!
//! Why threads and not a spawn per batch: a token needs one batch per layer (30 a token for
//! SmolLM2), each a few hundred microseconds of I/O; spawning 32 threads costs about as much
//! as the reads. The workers sleep on a condition variable between batches.
//!
//! A batch is a job with `len()` items; workers claim item indices one at a time (under the
//! queue lock, which is held for a few instructions), so a batch of k items keeps
//! min(k, threads) reads in flight, and several batches from several callers share the workers
//! in FIFO order. The caller blocks until every item of its batch has run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Work for the pool: `run(i)` for every i in 0..len(), each exactly once, from any thread.
pub(crate) trait BatchJob: Send + Sync {
    fn len(&self) -> usize;
    fn run(&self, i: usize);
}

struct Batch {
    job: Arc<dyn BatchJob>,
    next: AtomicUsize,     // next unclaimed item (claimed under the queue lock)
    left: Mutex<usize>,    // items not yet finished
    done: Condvar,
}

struct Queue {
    batches: VecDeque<Arc<Batch>>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker never panics while holding a lock (nothing in there can panic), but if one did,
    // the data (a queue, a counter) is still consistent: carry on rather than propagate.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub(crate) fn new(threads: usize, name: &str) -> std::io::Result<Pool> {
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

    pub(crate) fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Run every item of `job` on the workers; return when all have finished.
    pub(crate) fn run(&self, job: Arc<dyn BatchJob>) {
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
        let batch = Arc::new(Batch { job, next: AtomicUsize::new(0), left: Mutex::new(n), done: Condvar::new() });
        {
            let mut q = lock(&self.shared.queue);
            q.batches.push_back(batch.clone());
        }
        if n >= self.threads.len() {
            self.shared.work.notify_all();
        } else {
            for _ in 0..n {
                self.shared.work.notify_one();
            }
        }
        let mut left = lock(&batch.left);
        while *left > 0 {
            left = batch.done.wait(left).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let (batch, i) = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(b) = q.batches.front() {
                    let b = b.clone();
                    let i = b.next.fetch_add(1, Ordering::Relaxed);
                    if i + 1 >= b.job.len() {
                        q.batches.pop_front(); // last item claimed: the batch leaves the queue
                    }
                    if i < b.job.len() {
                        break (b, i);
                    }
                    continue;
                }
                if q.shutdown {
                    return;
                }
                q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        // Count the item as finished even if `run` unwinds, so the caller never waits forever.
        struct Finish<'a>(&'a Batch);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let mut left = lock(&self.0.left);
                *left -= 1;
                if *left == 0 {
                    self.0.done.notify_all();
                }
            }
        }
        let _finish = Finish(&batch);
        batch.job.run(i);
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
