//! CUDA backend (feature `cuda`): device probing. Kernels arrive with the CUDA issue; until then
//! every device call reports `KVC_STATUS_CUDA_UNAVAILABLE`.

use crate::error::{Error, Result};

/// Fail unless a CUDA driver and device can be opened.
pub fn probe() -> Result<()> {
    Err(Error::CudaUnavailable(
        "the CUDA kernels are not built into this library yet".into(),
    ))
}
