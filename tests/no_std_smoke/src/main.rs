//! Parses the committed `.irisemb` fixture with iris-core built without std.
//!
//! Run `cargo check` in this folder; it is not meant to be linked on the host.
//! The fixture is regenerated (and checked to be current) by
//! `cargo test -p iris-core --test irisemb fixture`.
#![no_std]
#![no_main]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

static FIXTURE: &[u8] = include_bytes!("../fixture.irisemb");

/// A bump allocator over a static buffer: enough for one small parse.
struct Bump {
    heap: UnsafeCell<[u8; 64 * 1024]>,
    next: AtomicUsize,
}

// SAFETY: `next` is only advanced atomically, so concurrent callers get
// disjoint ranges of `heap`.
unsafe impl Sync for Bump {}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.heap.get() as usize;
        let mut start = 0;
        let claimed = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                start = (base + next).next_multiple_of(layout.align()) - base;
                let end = start.checked_add(layout.size())?;
                (end <= 64 * 1024).then_some(end)
            });
        match claimed {
            Ok(_) => (base + start) as *mut u8,
            Err(_) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump {
    heap: UnsafeCell::new([0; 64 * 1024]),
    next: AtomicUsize::new(0),
};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// Entry point for a bare-metal start-up routine: returns the number of
/// classes in the fixture, or 0 if it failed to parse.
#[unsafe(no_mangle)]
pub extern "C" fn iris_smoke_main() -> usize {
    match iris_core::irisemb::read(FIXTURE) {
        Ok(task) => task.classes().len(),
        Err(_) => 0,
    }
}
