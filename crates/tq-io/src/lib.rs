//! Persistence primitives shared by every turboquant file format (`.tqc`
//! codes, `.tqi` indexes, key calibrations):
//!
//! - [`write_atomic`] / [`write_atomic_with`]: a temporary file in the
//!   destination directory, fsynced, renamed over the target, directory
//!   fsynced. A crash or an error leaves the old file or the new one, never a
//!   mix, and never a temporary file behind.
//! - [`LeReader`]: a bounds-checked little-endian cursor over a byte slice;
//!   every read names the field it reads, so a truncated file is reported as
//!   "ends inside `<field>`".
//! - [`crc32`]: CRC-32 (IEEE), the checksum of every format.
//!
//! Nothing here allocates more than the caller asks for: lengths read from a
//! file are checked against the bytes present before they are used.

#![warn(missing_docs)]

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// CRC-32 (IEEE 802.3) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The temporary name [`write_atomic_with`] writes before renaming: hidden,
/// in the same directory (so the rename is atomic), unique per process.
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let dir = parent_dir(path);
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("output path {} has no file name", path.display())))?;
    Ok(dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically (see the crate docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes `path` atomically through `fill`, which writes the whole content
/// into the temporary file. On any error the temporary file is removed and
/// `path` is untouched.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let res = (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // fsync of the directory makes the rename durable (not supported everywhere)
        if let Ok(d) = File::open(parent_dir(path)) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A read past the end of the bytes: the field it was reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// The field being read.
    pub field: String,
    /// Byte offset where the field starts.
    pub at: usize,
}

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "truncated: the data ends inside {} (byte {})", self.field, self.at)
    }
}

impl std::error::Error for Truncated {}

/// A bounds-checked little-endian cursor.
#[derive(Clone, Debug)]
pub struct LeReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> LeReader<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }
    /// Bytes read so far (the offset of the next read).
    pub fn position(&self) -> usize {
        self.at
    }
    /// Bytes left after the cursor.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
    /// The bytes after the cursor.
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
    /// The next `n` bytes (`field` names them in the error).
    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], Truncated> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(Truncated { field: field.to_string(), at: self.at }),
        }
    }
    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], Truncated> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// A byte.
    pub fn u8(&mut self, field: &str) -> Result<u8, Truncated> {
        Ok(self.array::<1>(field)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self, field: &str) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// A little-endian u32.
    pub fn u32(&mut self, field: &str) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// A little-endian u64.
    pub fn u64(&mut self, field: &str) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// A little-endian f32.
    pub fn f32(&mut self, field: &str) -> Result<f32, Truncated> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_le_fields_and_names_the_truncated_one() {
        let b = [1u8, 0, 2, 0, 0, 0, 9];
        let mut r = LeReader::new(&b);
        assert_eq!(r.u16("a").unwrap(), 1);
        assert_eq!(r.u32("b").unwrap(), 2);
        assert_eq!(r.remaining(), 1);
        let e = r.u32("the count").unwrap_err();
        assert_eq!(e.field, "the count");
        assert_eq!(e.at, 6);
        assert!(e.to_string().contains("the count"));
        // a failed read does not move the cursor
        assert_eq!(r.u8("c").unwrap(), 9);
        assert!(r.take(usize::MAX, "huge").is_err());
    }

    #[test]
    fn crc_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn atomic_write_replaces_or_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_atomic(&p, b"old").unwrap();
        let e = write_atomic_with(&p, |f| {
            f.write_all(b"new, half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temporary file left behind: {names:?}");
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }
}
