//! libFuzzer target: the whole C API, driven by `fuzz/driver.rs` (see there for what counts as
//! a bug). Any panic here, including the driver's own assertions, is a crash.
#![no_main]

#[path = "../driver.rs"]
mod driver;

libfuzzer_sys::fuzz_target!(|data: &[u8]| driver::run(data));
