//! `AlignedBuf`: a zero-initialised heap buffer whose start is 4 KiB aligned and whose capacity
//! is a whole number of 4 KiB pages, as direct I/O requires of its destinations. The memory is
//! a raw allocation (not a `Vec`), so it never moves and never reallocates: Python views of it
//! (numpy, torch) stay valid for as long as the owning object lives.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Page size and direct-I/O alignment used everywhere (offsets, lengths, buffer addresses).
pub const ALIGN: usize = 4096;

/// Round `n` up to a multiple of [`ALIGN`], or `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGN as u64 - 1).map(|x| x / ALIGN as u64 * ALIGN as u64)
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); moving it between
// threads or sharing `&AlignedBuf` is as safe as for Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see Send: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (any length; capacity rounded up to 4 KiB, at least one page).
    pub fn zeroed(len: usize) -> Result<AlignedBuf> {
        let cap = align_up(len as u64)
            .filter(|&c| c <= isize::MAX as u64)
            .ok_or(Error::Alloc { bytes: len as u64 })?
            .max(ALIGN as u64) as usize;
        let layout = Layout::from_size_align(cap, ALIGN).map_err(|_| Error::Alloc { bytes: len as u64 })?;
        // SAFETY: layout has a non-zero size (cap >= ALIGN). The allocation is owned by the
        // returned AlignedBuf and freed once, in Drop, with the same layout.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(Error::Alloc { bytes: cap as u64 })?;
        Ok(AlignedBuf { ptr, len, cap })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes: `len` rounded up to 4 KiB (the bytes past `len` are zero).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The raw start pointer, for writers that coordinate access themselves (the reader's
    /// workers, Python-side writes through the buffer protocol). Not derived from a reference.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout (validated there) and is
        // freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, ALIGN)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={}, address={:#x})", self.len, self.ptr.as_ptr() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_any_length() {
        for len in [0usize, 1, 3456, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity() % ALIGN == 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn huge_allocation_is_an_error_not_an_abort() {
        assert!(matches!(AlignedBuf::zeroed(usize::MAX - 10), Err(Error::Alloc { .. })));
    }
}
