//! File formats: `.npy` (read f32/f64, write f32), `.fvecs` (read), and the
//! self-describing `.tqc` code file. Every write goes to a temporary file in
//! the destination directory, is fsynced, then renamed into place, so a failed
//! command never leaves a partial output and never clobbers a good file.
//!
//! `.tqc` format, version 1 (little-endian):
//! ```text
//! magic        8  b"TQCODES\0"
//! version      u32 = 1
//! codec_id     u16   (registry id)
//! rotation     u8    (0 hadamard, 1 haar)
//! reserved     u8    = 0
//! dim          u32
//! count        u64
//! seed         u64
//! code_size    u32
//! name_len     u16, name bytes (registry name, must match codec_id)
//! params_len   u32, params bytes (codec parameters, e.g. outlier channels)
//! header_crc   u32   CRC-32 of every header byte above
//! codes        count × code_size bytes
//! codes_crc    u32   CRC-32 of the codes
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tq_core::RotationKind;

pub const TQC_MAGIC: &[u8; 8] = b"TQCODES\0";
pub const TQC_VERSION: u32 = 1;

/// A row-major matrix of f32.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| anyhow!("output path {} has no file name", path.display()))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename onto {}", path.display()))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
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
    let header = b.get(start..start + hlen).ok_or_else(|| anyhow!("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| anyhow!("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = &header[i + key.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| anyhow!("no descr"))?;
    let elem = if descr.starts_with("'<f4'") || descr.starts_with("'float32'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        bail!("dtype {} is not supported (need little-endian float32 or float64)", descr.split(',').next().unwrap_or(""));
    };
    let fortran = field("fortran_order").map(|f| f.starts_with("True")).unwrap_or(false);
    let shape = field("shape").ok_or_else(|| anyhow!("no shape"))?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| anyhow!("bad shape"))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| anyhow!("bad shape entry '{s}'")))
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
    let need = rows.checked_mul(cols).and_then(|v| v.checked_mul(elem)).ok_or_else(|| anyhow!("shape overflows"))?;
    let payload = &b[data_start..];
    if payload.len() < need {
        bail!("truncated: header promises {need} data bytes, file has {}", payload.len());
    }
    let data: Vec<f32> = if elem == 4 {
        payload[..need].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        payload[..need]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()
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

pub fn parse_fvecs(b: &[u8]) -> Result<Matrix> {
    let mut off = 0;
    let mut cols = 0usize;
    let mut data = Vec::new();
    let mut rows = 0;
    while off < b.len() {
        let h = b.get(off..off + 4).ok_or_else(|| anyhow!("truncated record header at byte {off}"))?;
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
        let body = b.get(off + 4..off + 4 + 4 * d).ok_or_else(|| anyhow!("record {rows} is truncated"))?;
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

/// A parsed `.tqc` file.
pub struct CodeFile {
    pub codec_name: String,
    pub rotation: RotationKind,
    pub dim: usize,
    pub count: usize,
    pub seed: u64,
    pub code_size: usize,
    pub params: Vec<u8>,
    pub codes: Vec<u8>,
}

pub fn tqc_bytes(f: &CodeFile) -> Result<Vec<u8>> {
    let entry = tq_core::lookup(&f.codec_name)?;
    let mut h = Vec::new();
    h.extend_from_slice(TQC_MAGIC);
    h.extend_from_slice(&TQC_VERSION.to_le_bytes());
    h.extend_from_slice(&entry.id.to_le_bytes());
    h.push(f.rotation.id());
    h.push(0);
    h.extend_from_slice(&(f.dim as u32).to_le_bytes());
    h.extend_from_slice(&(f.count as u64).to_le_bytes());
    h.extend_from_slice(&f.seed.to_le_bytes());
    h.extend_from_slice(&(f.code_size as u32).to_le_bytes());
    h.extend_from_slice(&(f.codec_name.len() as u16).to_le_bytes());
    h.extend_from_slice(f.codec_name.as_bytes());
    h.extend_from_slice(&(f.params.len() as u32).to_le_bytes());
    h.extend_from_slice(&f.params);
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&f.codes);
    h.extend_from_slice(&crc32fast::hash(&f.codes).to_le_bytes());
    Ok(h)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| anyhow!("truncated file: header ends inside {what}"))?;
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

pub fn parse_tqc(b: &[u8]) -> Result<CodeFile> {
    let mut c = Cursor { b, at: 0 };
    if c.take(8, "magic").map(|m| m != TQC_MAGIC).unwrap_or(true) {
        bail!("not a .tqc file (bad magic)");
    }
    let version = c.u32("version")?;
    if version > TQC_VERSION {
        bail!("format version {version} is newer than this tq supports ({TQC_VERSION}); upgrade tq");
    }
    if version != TQC_VERSION {
        bail!("unsupported format version {version}");
    }
    let id = c.u16("codec id")?;
    let rot = c.take(1, "rotation")?[0];
    let _reserved = c.take(1, "reserved")?;
    let dim = c.u32("dim")? as usize;
    let count = c.u64("count")? as usize;
    let seed = c.u64("seed")?;
    let code_size = c.u32("code size")? as usize;
    let name_len = c.u16("name length")? as usize;
    let name = c.take(name_len, "codec name")?;
    let params_len = c.u32("params length")? as usize;
    let params = c.take(params_len, "codec parameters")?.to_vec();
    let header_end = c.at;
    let crc = c.u32("header checksum")?;
    if crc32fast::hash(&b[..header_end]) != crc {
        bail!("corrupt header: checksum mismatch");
    }
    let name = std::str::from_utf8(name).map_err(|_| anyhow!("corrupt header: codec name is not UTF-8"))?.to_string();
    let entry = tq_core::registry::by_id(id).ok_or_else(|| anyhow!("unknown codec id {id} (written by a newer tq?)"))?;
    if entry.name != name {
        bail!("corrupt header: codec id {id} is {}, header names {name}", entry.name);
    }
    let rotation = RotationKind::from_id(rot).ok_or_else(|| anyhow!("unknown rotation id {rot}"))?;
    if dim < entry.min_dim() || entry.code_size(dim) != code_size {
        bail!("corrupt header: code size {code_size} does not match {name} at dim {dim}");
    }
    let payload = count.checked_mul(code_size).ok_or_else(|| anyhow!("corrupt header: count overflows"))?;
    let rest = b.len() - c.at;
    if rest != payload + 4 {
        if rest < payload + 4 {
            bail!("truncated file: {count} codes need {} bytes, {} present", payload + 4, rest);
        }
        bail!("corrupt file: {} trailing bytes after the codes", rest - payload - 4);
    }
    let codes = &b[c.at..c.at + payload];
    let crc = u32::from_le_bytes(b[c.at + payload..].try_into().unwrap());
    if crc32fast::hash(codes) != crc {
        bail!("corrupt codes: checksum mismatch");
    }
    Ok(CodeFile { codec_name: name, rotation, dim, count, seed, code_size, params, codes: codes.to_vec() })
}

pub fn read_tqc(path: &Path) -> Result<CodeFile> {
    let b = read_all(path)?;
    parse_tqc(&b).with_context(|| format!("cannot read {}", path.display()))
}
