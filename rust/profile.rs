//! The disk's cost profile: random direct-I/O read throughput (MB/s) by request size x number of
//! requests in flight, i.e. the paper's Figure 2 for this machine. The planner prices its
//! choices with it; `measure` produces one (`llmflash profile-disk`), `Profile::default()` is
//! a table measured with fio on this project's reference machine (ext4 on a virtual SSD).
//!
//! Model: a request of `s` bytes issued with `c` in flight costs `s / T(s, c)` seconds of the
//! batch's wall time, where `T` is the table's aggregate throughput, interpolated log-log in
//! size and linearly in log(concurrency), clamped at the edges (below the smallest size a
//! request costs as much as the smallest one: the per-request overhead dominates).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, Result};

pub const FORMAT: &str = "llmflash-disk-profile";
pub const VERSION: u64 = 1;
const MAX_POINTS: usize = 64; // sizes and concurrencies each: a profile is a small table
const MAX_PROFILE_FILE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Request sizes in bytes, strictly increasing, multiples of 4096.
    pub sizes: Vec<u64>,
    /// Requests in flight, strictly increasing, >= 1.
    pub concurrencies: Vec<u32>,
    /// mbps[i][j]: MB/s (1e6 bytes/s) at sizes[i] and concurrencies[j]; finite and > 0.
    pub mbps: Vec<Vec<f64>>,
    /// Where the numbers come from (free text).
    pub source: String,
}

impl Default for Profile {
    /// fio random direct reads on this project's reference machine: 4 GiB file, psync threads,
    /// ext4 on a virtual SSD.
    fn default() -> Profile {
        Profile {
            sizes: vec![4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
            concurrencies: vec![1, 8, 32],
            mbps: vec![
                vec![64.0, 178.0, 278.0],
                vec![223.0, 495.0, 768.0],
                vec![483.0, 1145.0, 1618.0],
                vec![900.0, 1489.0, 1626.0],
                vec![1022.0, 1582.0, 2046.0],
            ],
            source: "default: fio on the reference machine (ext4 on a virtual SSD)".to_string(),
        }
    }
}

fn lerp_log(x: f64, x0: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    // Interpolate ln(y) linearly in ln(x): power laws (throughput vs size) become straight lines.
    if x1 <= x0 {
        return y0;
    }
    let t = ((x.ln() - x0.ln()) / (x1.ln() - x0.ln())).clamp(0.0, 1.0);
    (y0.ln() + t * (y1.ln() - y0.ln())).exp()
}

/// Index i with xs[i] <= x <= xs[i+1], clamped to the table (xs sorted, non-empty).
fn bracket(xs: &[f64], x: f64) -> (usize, usize) {
    if xs.len() == 1 || x <= xs[0] {
        return (0, 0);
    }
    let last = xs.len() - 1;
    if x >= xs[last] {
        return (last, last);
    }
    let i = xs.partition_point(|&v| v <= x) - 1;
    (i, i + 1)
}

impl Profile {
    /// Build and validate a profile.
    pub fn new(sizes: Vec<u64>, concurrencies: Vec<u32>, mbps: Vec<Vec<f64>>, source: String) -> Result<Profile> {
        let p = Profile { sizes, concurrencies, mbps, source };
        p.validate(None)?;
        Ok(p)
    }

    fn validate(&self, path: Option<&Path>) -> Result<()> {
        let bad = |what: String| Err(Error::Profile { path: path.map(Path::to_path_buf), what });
        let (ns, nc) = (self.sizes.len(), self.concurrencies.len());
        if ns == 0 || nc == 0 || ns > MAX_POINTS || nc > MAX_POINTS {
            return bad(format!("profile has {ns} sizes x {nc} concurrencies (expected 1..={MAX_POINTS} of each)"));
        }
        if self.sizes.iter().any(|&s| s == 0 || s % ALIGN as u64 != 0 || s > 1 << 32)
            || self.sizes.windows(2).any(|w| w[0] >= w[1])
        {
            return bad(format!("profile sizes {:?} must be increasing multiples of 4096 up to 4 GiB", self.sizes));
        }
        if self.concurrencies.iter().any(|&c| c == 0 || c > 65536)
            || self.concurrencies.windows(2).any(|w| w[0] >= w[1])
        {
            return bad(format!("profile concurrencies {:?} must be increasing, in 1..=65536", self.concurrencies));
        }
        if self.mbps.len() != ns || self.mbps.iter().any(|row| row.len() != nc) {
            return bad(format!("profile mbps must be a {ns} x {nc} table (sizes x concurrencies)"));
        }
        if self.mbps.iter().flatten().any(|&v| !(v.is_finite() && v > 0.0 && v < 1e9)) {
            return bad("profile throughputs must be finite, positive MB/s".to_string());
        }
        Ok(())
    }

    /// Aggregate throughput in MB/s for requests of `size` bytes with `concurrency` in flight.
    pub fn throughput_mbps(&self, size: u64, concurrency: u32) -> f64 {
        let size = size.max(1) as f64;
        let c = concurrency.max(1) as f64;
        let sizes: Vec<f64> = self.sizes.iter().map(|&s| s as f64).collect();
        let concs: Vec<f64> = self.concurrencies.iter().map(|&c| c as f64).collect();
        let (c0, c1) = bracket(&concs, c);
        let at_conc = |j: usize| -> f64 {
            let col = |i: usize| self.mbps[i][j];
            if size < sizes[0] {
                // Below the table: the same time per request as the smallest size.
                return col(0) * size / sizes[0];
            }
            let (i0, i1) = bracket(&sizes, size);
            lerp_log(size, sizes[i0], sizes[i1], col(i0), col(i1))
        };
        lerp_log(c, concs[c0], concs[c1], at_conc(c0), at_conc(c1))
    }

    /// Seconds of batch wall time one request of `size` bytes costs with `concurrency` in flight.
    pub fn request_seconds(&self, size: u64, concurrency: u32) -> f64 {
        if size == 0 {
            return 0.0;
        }
        size as f64 / (self.throughput_mbps(size, concurrency) * 1e6)
    }

    /// The widest gap (bytes, a multiple of 4096) worth reading through rather than issuing one
    /// more request, at `concurrency` in flight.
    ///
    /// Fit the cost of one request as `overhead + s / B`: B is the throughput of the largest
    /// requests, and the overhead is what the smallest request costs beyond its bytes at B.
    /// Reading a gap g costs g / B; a second request costs the overhead; bridge when
    /// g / B < overhead, i.e. g < overhead * B. The default table at 32 in flight: 4 KiB costs
    /// 14.7 us, 4 KiB at 2046 MB/s is 2.0 us, so gaps under 26 KB (6 pages) are bridged.
    pub fn bridge_gap_bytes(&self, concurrency: u32) -> u64 {
        let smin = self.sizes[0];
        let smax = *self.sizes.last().unwrap_or(&smin);
        let bw = self.throughput_mbps(smax, concurrency) * 1e6; // bytes/s
        let overhead = self.request_seconds(smin, concurrency) - smin as f64 / bw;
        if overhead.is_nan() || overhead <= 0.0 {
            return 0;
        }
        let g = (overhead * bw).min(1e12) as u64;
        g / ALIGN as u64 * ALIGN as u64
    }

    pub fn to_json(&self) -> String {
        let v = json!({
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "sizes": self.sizes,
            "concurrencies": self.concurrencies,
            "mbps": self.mbps,
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Parse a profile written by `to_json` (hostile input: every field checked).
    pub fn from_json(text: &str) -> Result<Profile> {
        Profile::parse(text, None)
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Profile> {
        let err = |what: String| Error::Profile { path: path.map(Path::to_path_buf), what };
        let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(err(format!("format is not {FORMAT:?}")));
        }
        if v.get("version").and_then(Value::as_u64) != Some(VERSION) {
            return Err(err(format!("unknown profile version (this llmflash reads version {VERSION})")));
        }
        let list = |k: &str| -> Result<&Vec<Value>> {
            v.get(k)
                .and_then(Value::as_array)
                .filter(|a| a.len() <= MAX_POINTS)
                .ok_or_else(|| err(format!("{k} must be a short list")))
        };
        let sizes = list("sizes")?
            .iter()
            .map(|x| x.as_u64().ok_or_else(|| err("sizes must be integers".into())))
            .collect::<Result<Vec<u64>>>()?;
        let concurrencies = list("concurrencies")?
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|c| u32::try_from(c).ok())
                    .ok_or_else(|| err("concurrencies must be integers".into()))
            })
            .collect::<Result<Vec<u32>>>()?;
        let mbps = list("mbps")?
            .iter()
            .map(|row| {
                row.as_array()
                    .filter(|r| r.len() <= MAX_POINTS)
                    .ok_or_else(|| err("mbps must be a list of rows".into()))?
                    .iter()
                    .map(|x| x.as_f64().ok_or_else(|| err("mbps entries must be numbers".into())))
                    .collect::<Result<Vec<f64>>>()
            })
            .collect::<Result<Vec<Vec<f64>>>>()?;
        let source = v.get("source").and_then(Value::as_str).unwrap_or("").chars().take(500).collect();
        let p = Profile { sizes, concurrencies, mbps, source };
        p.validate(path)?;
        Ok(p)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Profile> {
        let path = path.as_ref();
        let open = |source| Error::Open { path: path.to_path_buf(), source };
        let f = File::open(path).map_err(open)?;
        let len = f.metadata().map_err(open)?.len();
        if len > MAX_PROFILE_FILE {
            return Err(Error::Profile {
                path: Some(path.into()),
                what: format!("{len} bytes: too large for a profile"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(open)?;
        Profile::parse(&text, Some(path))
    }

    /// Write atomically (a temporary sibling renamed over the target).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let werr = |source| Error::Write { path: path.to_path_buf(), source };
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = File::create(&tmp).map_err(werr)?;
        f.write_all(self.to_json().as_bytes()).and_then(|_| f.sync_all()).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            werr(e)
        })
    }
}

/// Random direct reads of `size` bytes at `concurrency` threads over `path` for `seconds`;
/// returns MB/s. Offsets are multiples of `size` (as fio's randread), uniformly spread.
pub fn measure_point(path: &Path, size: u64, concurrency: u32, seconds: f64) -> Result<f64> {
    if size == 0 || size % ALIGN as u64 != 0 || size > 1 << 30 {
        return Err(Error::invalid(format!("request size {size} must be a positive multiple of 4096 up to 1 GiB")));
    }
    if concurrency == 0 || concurrency as usize > crate::reader::MAX_CONCURRENCY {
        return Err(Error::invalid(format!("concurrency {concurrency} must be in 1..=1024")));
    }
    if !(seconds > 0.0 && seconds <= 3600.0) {
        return Err(Error::invalid(format!("seconds per point {seconds} must be in (0, 3600]")));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
    let file_len = file.metadata().map_err(|source| Error::Open { path: path.to_path_buf(), source })?.len();
    let blocks = file_len / size;
    if blocks == 0 {
        return Err(Error::invalid(format!(
            "{}: {file_len} bytes is smaller than one {size}-byte request",
            path.display()
        )));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|t| {
                let file = &file;
                s.spawn(move || -> Result<u64> {
                    let buf = AlignedBuf::zeroed(size as usize)?;
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) << 32) ^ t0.elapsed().as_nanos() as u64;
                    let mut bytes = 0u64;
                    while Instant::now() < deadline {
                        x ^= x << 13; // xorshift64
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % blocks) * size;
                        // SAFETY: buf is a live, exclusively owned allocation of >= size bytes;
                        // the descriptor is kept open by `file`, borrowed for the whole scope.
                        let r = unsafe {
                            libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), size as usize, off as libc::off_t)
                        };
                        if r < 0 {
                            let e = std::io::Error::last_os_error();
                            if e.raw_os_error() == Some(libc::EINTR) {
                                continue;
                            }
                            return Err(Error::Read { path: path.to_path_buf(), offset: off, len: size, source: e });
                        }
                        bytes += r as u64;
                    }
                    Ok(bytes)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Ok(0))).collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let mut total = 0u64;
    for r in results {
        total += r?;
    }
    Ok(total as f64 / elapsed / 1e6)
}

/// Measure every (size, concurrency) point; `progress(i, n)` is called after each point.
pub fn measure(
    path: &Path,
    sizes: &[u64],
    concurrencies: &[u32],
    seconds_per_point: f64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Profile> {
    let n = sizes.len() * concurrencies.len();
    let mut mbps = vec![vec![0.0; concurrencies.len()]; sizes.len()];
    let mut k = 0;
    for (i, &s) in sizes.iter().enumerate() {
        for (j, &c) in concurrencies.iter().enumerate() {
            mbps[i][j] = measure_point(path, s, c, seconds_per_point)?.max(1e-3);
            k += 1;
            progress(k, n);
        }
    }
    Profile::new(sizes.to_vec(), concurrencies.to_vec(), mbps, format!("measured on {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_interpolates_the_table() {
        let p = Profile::default();
        assert_eq!(p.throughput_mbps(4096, 1), 64.0);
        assert_eq!(p.throughput_mbps(1 << 20, 32), 2046.0);
        assert!((p.throughput_mbps(1 << 30, 64) - 2046.0).abs() < 1e-9); // clamped
        let mid = p.throughput_mbps(8192, 32);
        assert!(mid > 278.0 && mid < 768.0);
        let c16 = p.throughput_mbps(65536, 16);
        assert!(c16 > 1145.0 && c16 < 1618.0);
        // Below the table: one smallest request's time.
        assert!((p.request_seconds(512, 32) - p.request_seconds(4096, 32)).abs() < 1e-12);
        assert_eq!(p.bridge_gap_bytes(32), 6 * 4096);
    }

    #[test]
    fn json_round_trip_and_hostile_input() {
        let p = Profile::default();
        let q = Profile::from_json(&p.to_json()).unwrap();
        assert_eq!(p, q);
        for bad in [
            "",
            "[]",
            r#"{"format": "x", "version": 1}"#,
            r#"{"format": "llmflash-disk-profile", "version": 2, "sizes": [4096], "concurrencies": [1], "mbps": [[1]]}"#,
            r#"{"format": "llmflash-disk-profile", "version": 1, "sizes": [4095], "concurrencies": [1], "mbps": [[1]]}"#,
            r#"{"format": "llmflash-disk-profile", "version": 1, "sizes": [4096], "concurrencies": [1], "mbps": [[-1]]}"#,
            r#"{"format": "llmflash-disk-profile", "version": 1, "sizes": [4096, 4096], "concurrencies": [1], "mbps": [[1],[1]]}"#,
            r#"{"format": "llmflash-disk-profile", "version": 1, "sizes": [4096], "concurrencies": [1, 2], "mbps": [[1]]}"#,
        ] {
            assert!(matches!(Profile::from_json(bad), Err(Error::Profile { .. })), "{bad}");
        }
    }

    #[test]
    fn save_load_and_measure() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("p.json");
        Profile::default().save(&path).unwrap();
        assert_eq!(Profile::load(&path).unwrap(), Profile::default());
        let data = dir.path().join("scratch");
        std::fs::write(&data, vec![7u8; 1 << 20]).unwrap();
        let p = measure(&data, &[4096, 65536], &[1, 2], 0.02, |_, _| {}).unwrap();
        assert!(p.mbps.iter().flatten().all(|&v| v > 0.0));
        assert!(measure_point(&data, 4097, 1, 0.01).is_err());
    }
}
