//! The fuzz targets' bodies ([`targets`], shared with the workspace's replay test `tests/fuzz_regressions.rs`)
//! and an allocator that aborts on any single allocation above [`MAX_ALLOC`]: inputs are at most a few MiB, so
//! a bigger allocation is driven by a length read from the input and not checked against it.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a target may make (256 MiB).
pub const MAX_ALLOC: usize = 256 << 20;

/// The system allocator, refusing (aborting) allocations above [`MAX_ALLOC`].
pub struct CappedAlloc;

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No formatting here: it would allocate. libFuzzer reports the abort with the input that caused it.
        const MSG: &[u8] = b"dinov2-fuzz: allocation above MAX_ALLOC driven by the input\n";
        unsafe { libc_write(MSG) };
        std::process::abort();
    }
}

unsafe fn libc_write(msg: &[u8]) {
    extern "C" {
        fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    }
    write(2, msg.as_ptr(), msg.len());
}

/// Installs [`CappedAlloc`] as the global allocator of a fuzz target.
#[macro_export]
macro_rules! capped_alloc {
    () => {
        #[global_allocator]
        static ALLOC: $crate::CappedAlloc = $crate::CappedAlloc;
    };
}

pub mod targets;
