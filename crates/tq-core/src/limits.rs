//! Documented resource limits. Every size read from a header, a flag or an
//! input array is checked against these before anything is allocated, so a
//! tiny hostile input can never make the library allocate absurd memory.

/// Largest vector dimension any codec, file or index accepts.
pub const MAX_DIM: usize = 1 << 16;

/// Largest dimension of a dense `dim × dim` matrix (the Haar rotation, the
/// Gaussian QJL projection of `tq-prod-B`): two f32 copies of 4096² are
/// 128 MiB, built from a 128 MiB f64 matrix. Larger dimensions take the
/// Hadamard rotation (and `tq-prod-B-orth`), which are `O(dim)` in memory.
pub const MAX_DENSE_DIM: usize = 1 << 12;

/// Checks `dim` against [`MAX_DIM`], and against [`MAX_DENSE_DIM`] when a
/// dense `dim × dim` matrix is to be built for it (`what` names it).
pub fn check_dim(dim: usize, dense: Option<&str>) -> crate::Result<()> {
    if dim > MAX_DIM {
        return Err(crate::TqError::BadParams(format!("dimension {dim} exceeds the maximum dimension {MAX_DIM}")));
    }
    if let Some(what) = dense {
        if dim > MAX_DENSE_DIM {
            return Err(crate::TqError::BadParams(format!(
                "{what} is a dense {dim} × {dim} matrix; the largest dimension for one is {MAX_DENSE_DIM} (use the Hadamard rotation)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::RotationKind;

    /// A file header can name any dimension up to `u32::MAX`: building its
    /// codec must fail before allocating (found by fuzzing `.tqi` specs:
    /// dim 352 321 536 asked the Hadamard rotation for 5.6 GB).
    #[test]
    fn oversized_dimensions_are_refused_before_allocating() {
        for name in ["tq-mse-4", "tq-prod-3", "tq-prod-3-orth", "tq-mse-2.5", "rabitq-2", "pq-4", "q8_0", "mxfp4", "polar-3"] {
            for dim in [super::MAX_DIM + 1, 352_321_536, u32::MAX as usize] {
                let e = crate::build(name, dim, 0, RotationKind::Hadamard).err().unwrap_or_else(|| panic!("{name} at {dim} built"));
                assert!(e.to_string().contains("maximum dimension"), "{name}: {e}");
            }
        }
        // dense dim × dim matrices: the Haar rotation and the Gaussian QJL projection
        let big = super::MAX_DENSE_DIM + 1;
        assert!(crate::build("tq-mse-4", big, 0, RotationKind::Haar).err().unwrap().to_string().contains("Haar"));
        assert!(crate::build("tq-prod-2", big, 0, RotationKind::Hadamard).err().unwrap().to_string().contains("QJL"));
        assert!(crate::build("tq-prod-2-orth", big, 0, RotationKind::Hadamard).is_ok());
        assert!(crate::build("tq-mse-4", super::MAX_DIM, 0, RotationKind::Hadamard).is_ok());
    }
}
