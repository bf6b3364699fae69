//! # kvcompress
//!
//! Decides which entries of an LLM's KV cache can be dropped without changing what the model
//! says, with budgets that emerge per request instead of a ratio picked by the user.
//!
//! The pipeline, one module per stage:
//!
//! 1. **observe** ([`view`], [`state`]): the engine hands over, per sequence, the cells it holds
//!    with their positions, the newest post-RoPE queries of every layer and access to K;
//! 2. **score** ([`score`]): importance of every cell per (layer, KV head): positions, key norms,
//!    window attention (SnapKV, TOVA), accumulated attention (H2O), sampled-query votes (GVote);
//! 3. **budget** ([`budget`]): how many cells to keep — fixed ratio or count, or an adaptive rule
//!    (DBudgetKV's norm-drop stop, GVote's vote) — and how to spread it over layers (PyramidKV,
//!    DynamicKV) and heads (Ada-KV);
//! 4. **select** ([`select`]): keep sets per (layer, head) and their projection onto cells;
//! 5. **plan** ([`evictor`]): the cells to free, returned to the engine, which frees them.
//!
//! Named policies ([`policy`]) are presets of these stages. The C ABI lives in [`ffi`] and is
//! described by `include/kvcompress.h`.
//!
//! Modules are layered leaf to root; each imports only from the layers before it:
//!
//! - leaves: [`error`], [`view`] (shapes and K access), [`state`], [`kernels`] (the CPU's numeric
//!   loops, no policy knowledge);
//! - the stages: [`score`] (on kernels), [`select`], [`budget`] (on the score grid and the
//!   selection's rankings), each knowing only the stage types;
//! - [`policy`]: the policy table, each preset declared once as a build of the stages;
//! - [`backend`]: `score_units` on the CPU, on CUDA (feature `cuda`) or a stub answering
//!   `CudaUnavailable`; a device computes what the stages' recipes (`Scorer::device`,
//!   `BudgetRule::needs_newest_attention`) ask for, never looking at a policy;
//! - [`evictor`]: the plan, as named steps;
//! - [`ffi`]: the C ABI, status codes and the error -> status mapping.

pub mod backend;
pub mod budget;
pub mod error;
pub mod evictor;
mod failpoint;
pub mod ffi;
pub mod kernels;
pub mod policy;
pub mod reference;
pub mod score;
pub mod select;
pub mod state;
pub mod view;

pub use error::{Error, Result};
pub use evictor::{Evictor, Plan, SeqInput, Stats};
pub use policy::{Policy, POLICY_NAMES};
pub use view::{Keys, OwnedKeys, Shape};
