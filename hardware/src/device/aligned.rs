//! [`AlignedBuf`]: the only buffer type that crosses the [`BlockDevice`] seam.
//!
//! O_DIRECT and io_uring need the memory address, the file offset and the
//! length of every transfer aligned to the logical block size. We fix that at
//! [`IO_ALIGN_BYTES`] (4 KiB) for all three, so a buffer that exists is always
//! usable by every engine: the constructors refuse lengths that are not a
//! multiple of `IO_ALIGN_BYTES`, and the allocation itself is aligned to it.
//!
//! The allocation is owned: an in-flight operation holds the buffer until its
//! completion arrives, even if the caller's future was dropped, so the kernel
//! never writes into freed memory. Once the data is final it can leave as
//! [`bytes::Bytes`] without a copy ([`AlignedBuf::into_bytes`]).
//!
//! [`BlockDevice`]: super::BlockDevice

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{DeviceError, IO_ALIGN_BYTES};

/// A zero-initialised heap buffer aligned to [`IO_ALIGN_BYTES`] whose length is a
/// multiple of it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation; at least `IO_ALIGN_BYTES` so that a zero-length
    /// buffer still has a real, aligned allocation (zero-sized allocations
    /// are not allowed by `std::alloc`).
    capacity: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Vec<u8>`); there is
// no interior mutability, so sending it or sharing `&AlignedBuf` is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `len` bytes. `len` must be a multiple of
    /// [`IO_ALIGN_BYTES`] (zero is allowed).
    pub fn zeroed(len: usize) -> Result<Self, DeviceError> {
        // SAFETY: `alloc_zeroed` initialises every byte.
        unsafe { Self::allocate(len, true) }
    }

    /// Allocates `len` bytes (rounded up to one block for `len == 0`),
    /// zeroed or not.
    ///
    /// # Safety
    /// With `zeroed == false` the bytes are uninitialised: the caller must
    /// write all `len` of them before anything reads them.
    unsafe fn allocate(len: usize, zeroed: bool) -> Result<Self, DeviceError> {
        let unaligned = || DeviceError::Unaligned {
            offset: 0,
            len: len as u64,
        };
        if len % IO_ALIGN_BYTES != 0 {
            return Err(unaligned());
        }
        let capacity = len.max(IO_ALIGN_BYTES);
        let layout = Layout::from_size_align(capacity, IO_ALIGN_BYTES).map_err(|_| unaligned())?;
        // SAFETY: `layout` has a non-zero size (capacity >= IO_ALIGN_BYTES).
        let raw = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        Ok(Self { ptr, len, capacity })
    }

    /// Copies `data` into a new aligned buffer. `data.len()` must be a
    /// multiple of [`IO_ALIGN_BYTES`]; nothing is padded silently.
    pub fn from_slice(data: &[u8]) -> Result<Self, DeviceError> {
        // No zeroing: every byte is copied over right below (this is the
        // write path of every append; zeroing first cost a memset and a
        // page-fault storm per chunk).
        // SAFETY: all `data.len()` bytes are written before the buffer is
        // handed out; bytes past `len` are never exposed.
        let mut buf = unsafe { Self::allocate(data.len(), false) }?;
        // SAFETY: the buffer is valid for `len` bytes and cannot overlap
        // `data`, a live borrow of other memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr(), data.len()) };
        Ok(buf)
    }

    /// Length in bytes (a multiple of [`IO_ALIGN_BYTES`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer for the engines (io_uring SQEs).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw pointer for the engines (io_uring SQEs).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Hands the buffer to `bytes` without copying; the allocation is freed
    /// when the last `Bytes` clone is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc` or `alloc_zeroed` with exactly this layout
        // (the layout was valid then, so `from_size_align_unchecked` holds).
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.capacity, IO_ALIGN_BYTES),
            );
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity >= len` initialised (zeroed) bytes
        // owned by `self`, borrowed immutably for the lifetime of `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        // The length is already aligned, so this cannot fail except on OOM,
        // which `zeroed` turns into `handle_alloc_error`.
        match Self::from_slice(self) {
            Ok(buf) => buf,
            Err(error) => unreachable!("aligned length became unaligned: {error}"),
        }
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for blocks in [0usize, 1, 3, 64] {
            let buf = AlignedBuf::zeroed(blocks * IO_ALIGN_BYTES).unwrap();
            assert_eq!(buf.len(), blocks * IO_ALIGN_BYTES);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN_BYTES, 0);
            assert!(buf.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn unaligned_lengths_are_refused() {
        assert!(matches!(
            AlignedBuf::zeroed(100),
            Err(DeviceError::Unaligned { len: 100, .. })
        ));
        assert!(AlignedBuf::from_slice(&[1u8; 4097]).is_err());
    }

    #[test]
    fn from_slice_clone_and_bytes() {
        let data: Vec<u8> = (0..2 * IO_ALIGN_BYTES).map(|i| (i % 251) as u8).collect();
        let buf = AlignedBuf::from_slice(&data).unwrap();
        assert_eq!(&buf[..], &data[..]);
        let copy = buf.clone();
        assert_eq!(copy, buf);
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], &data[..]);
        let tail = bytes.slice(IO_ALIGN_BYTES..);
        drop(bytes);
        assert_eq!(&tail[..], &data[IO_ALIGN_BYTES..]);
    }

    #[test]
    fn is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AlignedBuf>();
    }
}
