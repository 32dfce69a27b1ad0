//! llmflash's I/O core: the part of "LLM in a flash" that talks to the disk.
//!
//! - [`aligned`]: 4 KiB-aligned buffers owned by Rust (direct I/O needs them; Python views them
//!   without copying).
//! - [`reader`]: one file opened with `O_DIRECT`, many requests in flight (io_uring for small
//!   batches, a persistent pool of `pread` workers for large ones), batch reads that complete or
//!   fail as a whole.
//! - [`planner`]: wanted neurons -> few large aligned reads, priced with the disk [`profile`].
//! - [`cache`]: the per-layer neuron cache (sliding window, LRW eviction under a capacity,
//!   contiguous live rows, background fills).
//! - [`staging`]: staging buffers shared by caches (bounded transient memory).
//! - [`profile`]: measured throughput by request size x concurrency (the paper's Figure 2).
//! - [`stats`]: counters of what was read and how long it took.
//! - [`gemv`]: the decode product over float16 bundle rows (faster than torch's for that layout).
//! - [`quant`]: decode kernels over GGML block formats (q8_0, q4_0, q4_1): quantized matvec,
//!   bundle FFN and dequantization, AVX2 or portable.
//! - [`attend`]: decode attention over a float16 or float32 KV cache (no upcast copy).
//! - [`decode`]: the attention half of a decoder layer for one token of a quantized model, in one call.
//! - [`par`]: two-way parallelism for those kernels on a persistent helper thread.
//!
//! The core never imports pyo3; the Python bindings live in `py/` behind the `python` feature.

pub mod aligned;
pub mod attend;
pub mod cache;
pub mod decode;
pub mod error;
pub mod gemv;
pub mod par;
pub mod planner;
pub mod profile;
pub mod quant;
pub mod reader;
pub mod staging;
pub mod stats;

#[cfg(feature = "python")]
mod py;

pub use aligned::{AlignedBuf, ALIGN};
pub use cache::{Admission, CacheStats, NeuronCache, StagingPool};
pub use error::{Error, Result};
pub use planner::{plan, Plan, PlanOptions, Region, Request};
pub use profile::Profile;
pub use reader::{Engine, RawOp, ReadOp, Reader, ReaderOptions};
pub use stats::{Stats, StatsSnapshot};
