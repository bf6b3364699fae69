//! The C boundary's plumbing: panic catching, NULL and slice checks, C strings, error text.

use crate::error::{Error, Result};
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Run `f`, turning an `Err` or a panic into a status (and a message through `on_err`).
pub fn guard<F>(on_err: impl FnOnce(&Error), f: F) -> u32
where
    F: FnOnce() -> Result<()>,
{
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return super::status::KVC_STATUS_OK,
        Ok(Err(e)) => e,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            Error::Panic(msg)
        }
    };
    on_err(&err);
    err.status()
}

/// Run `f` for a value-returning export; a panic gives `default`.
pub fn guard_value<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// Borrow `n` elements at `ptr`; NULL is accepted only when `n == 0`.
///
/// # Safety
/// When non-NULL, `ptr` must point to `n` readable, initialized elements that outlive `'a`.
pub unsafe fn slice<'a, T>(ptr: *const T, n: usize, name: &'static str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::NullArgument(name));
    }
    if n > (isize::MAX as usize) / std::mem::size_of::<T>().max(1) {
        return Err(Error::InvalidShape(format!(
            "`{name}`: length {n} is too large"
        )));
    }
    Ok(std::slice::from_raw_parts(ptr, n))
}

/// Borrow a NUL-terminated UTF-8 string.
///
/// # Safety
/// When non-NULL, `ptr` must point to a NUL-terminated string that outlives `'a`.
pub unsafe fn c_str<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::NullArgument(name));
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map_err(|_| Error::InvalidUtf8(name))
}

/// Borrow an array of `n` C strings (`name=value` overrides).
///
/// # Safety
/// `kv` must point to `n` valid NUL-terminated strings (or be NULL with `n == 0`).
pub unsafe fn c_str_array<'a>(
    kv: *const *const c_char,
    n: usize,
    name: &'static str,
) -> Result<Vec<&'a str>> {
    slice(kv, n, name)?
        .iter()
        .map(|&p| c_str(p, name))
        .collect()
}

/// Copy `msg` into a caller buffer, truncated and NUL-terminated. NULL or 0-length: nothing.
///
/// # Safety
/// When non-NULL, `buf` must be writable for `len` bytes.
pub unsafe fn write_msg(buf: *mut c_char, len: usize, msg: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let bytes = msg.as_bytes();
    let n = bytes.len().min(len - 1);
    std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, buf, n);
    *buf.add(n) = 0;
}
