//! Shared memory mappings of BPF map file descriptors (the ring buffer's position pages, the
//! IPv4 flow table), unmapped when dropped.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::bail;

/// A shared mapping of `len` bytes of a map's file descriptor.
pub(crate) struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset` (a multiple of the page size), read-only or
    /// read-write; `what` names it in the error.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
        writable: bool,
        what: &str,
    ) -> anyhow::Result<Self> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a map fd, of a length and at an offset the caller
        // takes from the kernel's layout of that map; nothing else is mapped there.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mapping {what}: {}", std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    /// The start of the mapping (page-aligned).
    pub(crate) fn ptr(&self) -> *mut libc::c_void {
        self.ptr
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; whoever used it is gone with `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The system's page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
