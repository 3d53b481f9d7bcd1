//! The self-describing `.tqc` code file, version 1 (little-endian):
//!
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
//!
//! Written atomically (`tq_io::write_atomic`): a failed write leaves no file
//! and never clobbers a good one. Reading checks the magic, the version, both
//! checksums, that the codec id and name agree, that the code size is the
//! codec's at that dimension, that the dimension is at most
//! `tq_core::limits::MAX_DIM`, and that `count × code_size` is exactly the
//! bytes present — before allocating anything sized by the header.

use std::path::Path;

use tq_core::RotationKind;
use tq_io::LeReader;

use crate::error::{bail, err, Context, Result};

/// The magic bytes of a `.tqc` file.
pub const TQC_MAGIC: &[u8; 8] = b"TQCODES\0";
/// The format version written (and the newest read).
pub const TQC_VERSION: u32 = 1;

/// A parsed `.tqc` file.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeFile {
    /// Registry name of the codec.
    pub codec_name: String,
    /// Rotation of the codec.
    pub rotation: RotationKind,
    /// Vector dimension.
    pub dim: usize,
    /// Number of codes.
    pub count: usize,
    /// Codec seed.
    pub seed: u64,
    /// Bytes per code.
    pub code_size: usize,
    /// Codec parameters (`Codec::params`).
    pub params: Vec<u8>,
    /// `count × code_size` bytes of codes.
    pub codes: Vec<u8>,
}

/// The file image of `f`.
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
    let crc = tq_io::crc32(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&f.codes);
    h.extend_from_slice(&tq_io::crc32(&f.codes).to_le_bytes());
    Ok(h)
}

/// Parses and checks a `.tqc` file image (see the module docs).
pub fn parse_tqc(b: &[u8]) -> Result<CodeFile> {
    let mut c = LeReader::new(b);
    let t = |e: tq_io::Truncated| err!("truncated file: header ends inside {}", e.field);
    if c.take(8, "magic").map(|m| m != TQC_MAGIC).unwrap_or(true) {
        bail!("not a .tqc file (bad magic)");
    }
    let version = c.u32("version").map_err(t)?;
    if version > TQC_VERSION {
        bail!("format version {version} is newer than this tq supports ({TQC_VERSION}); upgrade tq");
    }
    if version != TQC_VERSION {
        bail!("unsupported format version {version}");
    }
    let id = c.u16("codec id").map_err(t)?;
    let rot = c.u8("rotation").map_err(t)?;
    let _reserved = c.u8("reserved").map_err(t)?;
    let dim = c.u32("dim").map_err(t)? as usize;
    let count = c.u64("count").map_err(t)?;
    let seed = c.u64("seed").map_err(t)?;
    let code_size = c.u32("code size").map_err(t)? as usize;
    let name_len = c.u16("name length").map_err(t)? as usize;
    let name = c.take(name_len, "codec name").map_err(t)?;
    let params_len = c.u32("params length").map_err(t)? as usize;
    let params = c.take(params_len, "codec parameters").map_err(t)?;
    let header_end = c.position();
    let crc = c.u32("header checksum").map_err(t)?;
    if tq_io::crc32(&b[..header_end]) != crc {
        bail!("corrupt header: checksum mismatch");
    }
    let name = std::str::from_utf8(name).map_err(|_| err!("corrupt header: codec name is not UTF-8"))?.to_string();
    let entry = tq_core::registry::by_id(id).ok_or_else(|| err!("unknown codec id {id} (written by a newer tq?)"))?;
    if entry.name != name {
        bail!("corrupt header: codec id {id} is {}, header names {name}", entry.name);
    }
    let rotation = RotationKind::from_id(rot).ok_or_else(|| err!("unknown rotation id {rot}"))?;
    if dim > tq_core::limits::MAX_DIM {
        bail!("header field dim = {dim} exceeds the maximum dimension {}", tq_core::limits::MAX_DIM);
    }
    if dim < entry.min_dim() || entry.code_size(dim) != code_size {
        bail!("corrupt header: code size {code_size} does not match {name} at dim {dim}");
    }
    let rest = c.remaining();
    let payload = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(code_size))
        .filter(|&p| p.checked_add(4).is_some_and(|need| need <= rest))
        .ok_or_else(|| err!("truncated file: header field count = {count} needs {count} × {code_size} bytes of codes, {rest} bytes present"))?;
    if rest != payload + 4 {
        bail!("corrupt file: {} trailing bytes after the codes", rest - payload - 4);
    }
    let codes = c.take(payload, "codes").map_err(t)?;
    let crc = c.u32("codes checksum").map_err(t)?;
    if tq_io::crc32(codes) != crc {
        bail!("corrupt codes: checksum mismatch");
    }
    Ok(CodeFile { codec_name: name, rotation, dim, count: count as usize, seed, code_size, params: params.to_vec(), codes: codes.to_vec() })
}

/// Reads and checks a `.tqc` file.
pub fn read_tqc(path: &Path) -> Result<CodeFile> {
    let b = crate::vectors::read_all(path)?;
    parse_tqc(&b).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a `.tqc` file atomically.
pub fn write_tqc(path: &Path, f: &CodeFile) -> Result<()> {
    let bytes = tqc_bytes(f)?;
    tq_io::write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Vectors used to fit data-dependent codec parameters (fractional codecs).
const TRAIN_SAMPLE: usize = 4096;

/// What [`encode_file`] wrote.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Vectors encoded.
    pub count: usize,
    /// Their dimension.
    pub dim: usize,
    /// Bytes per code.
    pub code_size: usize,
    /// Bits per value, every per-vector overhead included.
    pub bits_per_value: f64,
    /// Bytes of the file written.
    pub file_bytes: usize,
    /// Seconds spent encoding (not reading or writing).
    pub encode_seconds: f64,
}

/// `tq encode`: the vectors of `input` (.npy or .fvecs) encoded with the
/// registry codec `name` into the `.tqc` file `out` (written atomically).
/// Codecs that fit parameters to data (fractional bit widths) fit them on the
/// first 4,096 rows.
pub fn encode_file(name: &str, input: &Path, out: &Path, seed: u64, rotation: RotationKind) -> Result<Encoded> {
    let entry = tq_core::lookup(name)?;
    let m = crate::vectors::read_vectors(input)?;
    let mut codec = entry.build(m.cols, seed, rotation, &[]).with_context(|| format!("{} has dimension {}", input.display(), m.cols))?;
    tq_core::codec::check_vectors(&m.data, m.cols).with_context(|| format!("bad input {}", input.display()))?;
    codec.train(&m.data[..m.cols * m.rows.min(TRAIN_SAMPLE)])?;
    let mut codes = vec![0u8; m.rows * codec.code_size()];
    let t = std::time::Instant::now();
    codec.encode_batch(&m.data, &mut codes)?;
    let encode_seconds = t.elapsed().as_secs_f64();
    let code_size = codec.code_size();
    let file = CodeFile { codec_name: name.to_string(), rotation, dim: m.cols, count: m.rows, seed, code_size, params: codec.params(), codes };
    let bytes = tqc_bytes(&file)?;
    tq_io::write_atomic(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(Encoded { count: m.rows, dim: m.cols, code_size, bits_per_value: codec.bits_per_value(), file_bytes: bytes.len(), encode_seconds })
}

/// `tq decode`: the codes of the `.tqc` file `input` decoded into the `.npy`
/// file `out`. Returns the file's header (its codes emptied).
pub fn decode_file(input: &Path, out: &Path) -> Result<CodeFile> {
    let mut f = read_tqc(input)?;
    if f.count == 0 {
        bail!("{} holds no codes (count 0): nothing to decode", input.display());
    }
    let entry = tq_core::lookup(&f.codec_name)?;
    let codec = entry.build(f.dim, f.seed, f.rotation, &f.params).with_context(|| format!("cannot rebuild the codec of {}", input.display()))?;
    let mut data = vec![0.0f32; f.count * f.dim];
    codec.decode_batch(&f.codes, &mut data)?;
    crate::vectors::write_npy(out, &crate::Matrix { rows: f.count, cols: f.dim, data })?;
    f.codes = Vec::new();
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_only(codec: &str, dim: usize, rotation: RotationKind) -> Vec<u8> {
        let entry = tq_core::lookup(codec).unwrap();
        let f = CodeFile { codec_name: codec.into(), rotation, dim, count: 0, seed: 1, code_size: entry.code_size(dim), params: Vec::new(), codes: Vec::new() };
        tqc_bytes(&f).unwrap()
    }

    /// A header of a few dozen bytes may name any dimension up to `MAX_DIM`;
    /// rebuilding its codec (the decode path) must be refused, not allocate
    /// a dense `dim × dim` matrix (16 GiB for a Haar rotation at 65 536).
    #[test]
    fn dense_codecs_at_huge_dimensions_are_refused_on_decode() {
        for (codec, rot) in [("tq-mse-4", RotationKind::Haar), ("tq-prod-2", RotationKind::Hadamard)] {
            let f = parse_tqc(&header_only(codec, tq_core::limits::MAX_DIM, rot)).unwrap();
            let e = tq_core::lookup(&f.codec_name).unwrap().build(f.dim, f.seed, f.rotation, &f.params).err().expect("refused");
            assert!(e.to_string().contains("dense"), "{codec}: {e}");
        }
        let mut b = header_only("tq-mse-4", 16, RotationKind::Hadamard);
        b[16..20].copy_from_slice(&((tq_core::limits::MAX_DIM + 1) as u32).to_le_bytes());
        let crc_at = b.len() - 8;
        let crc = tq_io::crc32(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(parse_tqc(&b).unwrap_err().to_string().contains("maximum dimension"));
    }
}
