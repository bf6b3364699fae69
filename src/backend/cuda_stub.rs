//! The CUDA backend when the `cuda` feature is off: every entry point answers
//! [`Error::CudaUnavailable`], so callers need no `cfg`.

use super::{UnitOut, UnitsIn};
use crate::error::{Error, Result};

fn off() -> Error {
    Error::CudaUnavailable("libkvcompress was built without the `cuda` feature".into())
}

/// Always unavailable.
pub fn probe() -> Result<()> {
    Err(off())
}

/// Always unavailable: K in device memory is never read on the host.
pub fn score_units(_inp: &UnitsIn, device: u32) -> Result<Vec<UnitOut>> {
    Err(Error::CudaUnavailable(format!(
        "K is in the memory of CUDA device {device}, but libkvcompress was built without the \
         `cuda` feature (build it with --features cuda, or hand K over in host memory)"
    )))
}
