//! Vector files: `.npy` (read 1-D/2-D little-endian f4/f8 in C or Fortran
//! order, write f32) and `.fvecs` (read). Sizes in a header are checked
//! against the bytes present before anything is allocated.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{bail, err, Context, Result};

/// A row-major matrix of f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Rows (vectors).
    pub rows: usize,
    /// Columns (the dimension).
    pub cols: usize,
    /// `rows × cols` values, row after row.
    pub data: Vec<f32>,
}

pub(crate) fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).with_context(|| format!("cannot read {}", path.display()))?;
    if v.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(v)
}

/// Reads `.npy` (2-D or 1-D, little-endian f4/f8, C or Fortran order) or `.fvecs`, by extension.
pub fn read_vectors(path: &Path) -> Result<Matrix> {
    let bytes = read_all(path)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => parse_npy(&bytes).with_context(|| format!("{} is not a usable .npy file", path.display())),
        Some("fvecs") => parse_fvecs(&bytes).with_context(|| format!("{} is not a valid .fvecs file", path.display())),
        _ => bail!("{}: unknown input format (expected .npy or .fvecs)", path.display()),
    }
}

/// Parses `.npy` bytes (see the module docs for what is accepted).
pub fn parse_npy(b: &[u8]) -> Result<Matrix> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        bail!("missing NPY magic");
    }
    let major = b[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                bail!("truncated header");
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => bail!("unsupported NPY version {v}"),
    };
    let header = b.get(start..start + hlen).ok_or_else(|| err!("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| err!("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = &header[i + key.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| err!("no descr"))?;
    let elem = if descr.starts_with("'<f4'") || descr.starts_with("'float32'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        bail!("dtype {} is not supported (need little-endian float32 or float64)", descr.split(',').next().unwrap_or(""));
    };
    let fortran = field("fortran_order").map(|f| f.starts_with("True")).unwrap_or(false);
    let shape = field("shape").ok_or_else(|| err!("no shape"))?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| err!("bad shape"))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| err!("bad shape entry '{s}'")))
        .collect::<Result<_>>()?;
    let (rows, cols) = match dims.as_slice() {
        [n, d] => (*n, *d),
        [d] => (1, *d),
        _ => bail!("expected a 1-D or 2-D array, got shape {dims:?}"),
    };
    if rows == 0 || cols == 0 {
        bail!("array is empty (shape {dims:?})");
    }
    let data_start = start + hlen;
    let need = rows.checked_mul(cols).and_then(|v| v.checked_mul(elem)).ok_or_else(|| err!("shape overflows"))?;
    let payload = &b[data_start..];
    if payload.len() < need {
        bail!("truncated: header promises {need} data bytes, file has {}", payload.len());
    }
    let data: Vec<f32> = if elem == 4 {
        payload[..need].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        payload[..need].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
    };
    if fortran && rows > 1 {
        // column-major on disk: element (r, c) is at c·rows + r
        let mut t = vec![0.0f32; data.len()];
        for (c, col) in data.chunks_exact(rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                t[r * cols + c] = v;
            }
        }
        return Ok(Matrix { rows, cols, data: t });
    }
    Ok(Matrix { rows, cols, data })
}

/// Parses `.fvecs` bytes: records of an i32 LE dimension and that many f32 LE values, all of one dimension.
pub fn parse_fvecs(b: &[u8]) -> Result<Matrix> {
    let mut off = 0;
    let mut cols = 0usize;
    let mut data = Vec::new();
    let mut rows = 0;
    while off < b.len() {
        let h = b.get(off..off + 4).ok_or_else(|| err!("truncated record header at byte {off}"))?;
        let d = i32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if d <= 0 {
            bail!("record {rows} has invalid dimension {d}");
        }
        let d = d as usize;
        if rows == 0 {
            cols = d;
        } else if d != cols {
            bail!("record {rows} has dimension {d}, the first record {cols}");
        }
        let body = b.get(off + 4..off + 4 + 4 * d).ok_or_else(|| err!("record {rows} is truncated"))?;
        data.extend(body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        off += 4 + 4 * d;
        rows += 1;
    }
    if rows == 0 {
        bail!("no vectors");
    }
    Ok(Matrix { rows, cols, data })
}

/// Serializes a float32 `.npy` (version 1).
pub fn npy_bytes(m: &Matrix) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", m.rows, m.cols);
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * m.data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &m.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `m` as a float32 `.npy`, atomically (see `tq_io::write_atomic`).
pub fn write_npy(path: &Path, m: &Matrix) -> Result<()> {
    tq_io::write_atomic(path, &npy_bytes(m)).with_context(|| format!("cannot write {}", path.display()))
}
