//! The core's one error type. Every message names the file (when there is one), the offset and
//! length involved, and what was expected. `py/errors.rs` maps each kind onto `llmflash.errors`:
//! I/O problems -> FlashIOError, bad layouts and corrupt bundles -> StoreError, bad arguments ->
//! ValueError.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug)]
pub enum Error {
    /// A file could not be opened (or created, for the profiler's scratch file).
    Open { path: PathBuf, source: io::Error },
    /// A read failed in the operating system (EIO, EBADF, ...), after EINTR retries.
    Read { path: PathBuf, offset: u64, len: u64, source: io::Error },
    /// The file ended before the request did: it was truncated (maybe under an open reader), or
    /// the request lies past its end.
    Eof { path: PathBuf, offset: u64, len: u64, got: u64, file_len: Option<u64> },
    /// Writing a file (a profile) failed.
    Write { path: PathBuf, source: io::Error },
    /// A region or bundle layout that cannot be right (misaligned, overflowing): a store problem.
    Layout { what: String },
    /// Bytes read from the file are not what the store recorded (a bundle's CRC-32 differs):
    /// the file is corrupt, or was changed after the store was written. `what` names the bundle.
    Corrupt { path: PathBuf, offset: u64, what: String },
    /// A caller passed a bad argument (an out-of-range neuron, a destination too small, ...).
    Invalid { what: String },
    /// A disk profile (JSON) is malformed or implausible.
    Profile { path: Option<PathBuf>, what: String },
    /// The allocator refused a buffer.
    Alloc { bytes: u64 },
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>) -> Error {
        Error::Invalid { what: what.into() }
    }

    pub(crate) fn layout(what: impl Into<String>) -> Error {
        Error::Layout { what: what.into() }
    }

    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Open { path, .. }
            | Error::Read { path, .. }
            | Error::Eof { path, .. }
            | Error::Write { path, .. }
            | Error::Corrupt { path, .. } => Some(path),
            Error::Profile { path, .. } => path.as_deref(),
            Error::Layout { .. } | Error::Invalid { .. } | Error::Alloc { .. } => None,
        }
    }

    /// The OS error number, when the error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. } | Error::Read { source, .. } | Error::Write { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    /// The message without the path (Python's exceptions prefix the path themselves).
    pub fn message(&self) -> String {
        match self {
            Error::Open { source, .. } => format!("cannot open: {source}"),
            Error::Read { offset, len, source, .. } => {
                format!("read of {len} bytes at offset {offset} failed: {source}")
            }
            Error::Eof { offset, len, got, file_len, .. } => {
                let size = match file_len {
                    Some(n) => format!("the file is now {n} bytes"),
                    None => "the file size is unknown".to_string(),
                };
                format!(
                    "read of {len} bytes at offset {offset} hit the end of the file after {got} \
                     bytes ({size}; expected at least {}): truncated or replaced?",
                    offset.saturating_add(*len)
                )
            }
            Error::Write { source, .. } => format!("cannot write: {source}"),
            Error::Corrupt { offset, what, .. } => format!("{what} at offset {offset}: the file is corrupt"),
            Error::Layout { what } | Error::Invalid { what } | Error::Profile { what, .. } => what.clone(),
            Error::Alloc { bytes } => format!("cannot allocate a {bytes}-byte aligned buffer"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path() {
            Some(p) => write!(f, "{}: {}", p.display(), self.message()),
            None => f.write_str(&self.message()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } | Error::Read { source, .. } | Error::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}
