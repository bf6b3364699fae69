//! Errors of the library. A leaf module: the C status code of each variant and the C message
//! live in `ffi` (`Error::status`, defined there).

use thiserror::Error;

/// Everything that can go wrong in a call. Each variant maps to one `kvc_status` code
/// (`Error::status`, in `ffi`); the message names the offending argument or value.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A required pointer argument was NULL.
    #[error("argument `{0}` is NULL")]
    NullArgument(&'static str),
    /// Sizes that must agree do not (a zero head count, a group that does not divide, ...).
    #[error("invalid shape: {0}")]
    InvalidShape(String),
    /// The dtype code is not one the library reads.
    #[error("unsupported dtype code {0} (expected F32=0, F16=1 or BF16=2)")]
    UnsupportedDtype(u32),
    /// NaN or infinity in a query or key.
    #[error("non-finite value in {what} (layer {layer}, row {row})")]
    NonFinite {
        /// "queries" or "keys"
        what: &'static str,
        /// layer index
        layer: usize,
        /// row index within the layer input
        row: usize,
    },
    /// The policy name is not one of the policy table's names (`kvcompress::POLICY_NAMES`);
    /// the C boundary's message lists them.
    #[error("unknown policy '{0}'")]
    UnknownPolicy(String),
    /// A `name=value` override names a parameter the policy does not have.
    #[error("unknown parameter '{name}' for policy '{policy}' (accepted: {accepted})")]
    UnknownParam {
        /// the policy
        policy: String,
        /// the parameter given
        name: String,
        /// the parameters the policy accepts
        accepted: String,
    },
    /// A parameter value that does not parse or is out of range.
    #[error("invalid value '{value}' for parameter '{name}': {why}")]
    InvalidParamValue {
        /// the parameter
        name: String,
        /// the value given
        value: String,
        /// what is expected
        why: String,
    },
    /// An output buffer cannot hold the result.
    #[error("output buffer too small: need {need}, got {got}")]
    BufferTooSmall {
        /// elements needed
        need: usize,
        /// elements provided
        got: usize,
    },
    /// A CUDA call was requested but the CUDA backend is not compiled in, the PTX is missing or
    /// no driver/device could be opened.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// The caller was built against another ABI version.
    #[error("ABI version mismatch: caller has {caller}, library has {library}")]
    AbiMismatch {
        /// the caller's KVC_ABI_VERSION
        caller: u32,
        /// this library's
        library: u32,
    },
    /// A C string argument is not valid UTF-8.
    #[error("argument `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// The policy's plans would cost more than the engine allows (`kvc_params.max_plan_cost`,
    /// `max_token_cost`); the message names the parameters that set the cost.
    #[error(
        "policy '{policy}' costs {cost:.1} units per {per} (limit {limit:.1}; a unit is one query row scored against every held key, about the attention work of decoding one token){hint}"
    )]
    TooCostly {
        /// the policy as described (`name k=v ...`)
        policy: String,
        /// "plan" or "generated token"
        per: &'static str,
        /// its cost
        cost: f32,
        /// the bound it exceeds
        limit: f32,
        /// what to change, starting with "; " (or empty)
        hint: String,
    },
    /// A panic inside the library was caught at the C boundary.
    #[error("internal panic: {0}")]
    Panic(String),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an [`Error::InvalidShape`].
pub(crate) fn shape_err(msg: impl Into<String>) -> Error {
    Error::InvalidShape(msg.into())
}
