//! TurboQuant core: rotations, Lloyd–Max codebooks, codecs, bit packing and
//! scoring kernels. This crate does no I/O.

#![warn(missing_docs)]

pub mod baselines;
pub mod bitpack;
pub mod codebook;
pub mod error;
pub mod kernels;
pub mod kv_layout;
pub mod rng;
pub mod rotation;

pub use error::{Result, TqError};
pub mod codec;
pub mod eval;
pub mod fastscan;
pub mod geometry;
pub mod kmeans;
pub mod limits;
pub mod matrix;
pub mod registry;

pub use codec::{CodebookView, Codec, PreparedQuery};
pub use geometry::KvGeometry;
pub use kv_layout::KvLayout;
pub use registry::{build, lookup, registry, CodecEntry, CodecKind};
pub use rotation::RotationKind;
