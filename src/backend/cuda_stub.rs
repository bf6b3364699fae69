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

/// Always unavailable.
pub fn score_units(_inp: &UnitsIn) -> Result<Vec<UnitOut>> {
    Err(off())
}
