//! burn-ep patch: kernel arguments bound to another device address (see PATCH.md).

use std::cell::RefCell;

thread_local! {
    /// The redirections in force on this thread: `(from, to)` address pairs.
    static REDIRECTS: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `launch` on this thread with every kernel argument whose buffer starts at
/// device address `from` bound to address `to` instead, for each `(from, to)` of
/// `redirects`. The argument's array length (in the kernel's metadata) stays the
/// `from` buffer's.
///
/// # Safety
///
/// Every `to` must be usable by the launching context (the same context, or a peer
/// with access enabled), at the alignment the kernel's vectors need, and valid for
/// every element the kernel touches through the argument until the kernel ends,
/// which the caller orders; the kernel must be launched unchecked where it touches
/// elements past the `from` buffer's length.
pub unsafe fn with_redirected_arguments<T>(
    redirects: &[(u64, u64)],
    launch: impl FnOnce() -> T,
) -> T {
    struct Restore(Vec<(u64, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = std::mem::take(&mut self.0);
            REDIRECTS.with(|r| *r.borrow_mut() = previous);
        }
    }
    let _restore = Restore(REDIRECTS.with(|r| r.replace(redirects.to_vec())));
    launch()
}

/// Where the argument whose buffer starts at `ptr` is bound, if redirected.
pub(crate) fn redirected(ptr: u64) -> Option<u64> {
    REDIRECTS.with(|r| {
        r.borrow()
            .iter()
            .find(|&&(from, _)| from == ptr)
            .map(|&(_, to)| to)
    })
}
