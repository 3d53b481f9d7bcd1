//! The `.tqi` index file: one versioned file per index.
//!
//! ```text
//! 0   magic "TQINDEX\0"                     8 bytes
//! 8   format version (u32 LE)               = 1
//! 12  index kind (u8: 0 flat, 1 IVF), 3 zero bytes
//! 16  commit slot A: seq u64, end u64, crc32 u32 (of seq, end), 4 zero bytes
//! 40  commit slot B: same
//! 64  spec: len u32, then `len` bytes (kind, codec name, dim, seed, rotation,
//!     metric, raw-vector precision, codec params, lists), then crc32 u32 of those bytes
//! ..  records up to the committed end, each:
//!     tag u32, payload length u64, crc32 u32 of the payload, payload
//!       1 ADD       count u64, ids u64×count, lists u32×count, entries
//!                   (each: the code, then the f16/f32 raw copy if kept)
//!       2 REMOVE    count u64, ids u64×count
//!       3 CENTROIDS nlist × dim f32 (IVF; first record)
//! ```
//! All integers little-endian. The valid commit slot with the highest `seq`
//! says where the committed records end.
//!
//! - **Save** writes a complete file to a temporary name in the same
//!   directory, fsyncs it, renames it over the target and fsyncs the
//!   directory: a crash leaves the old file or the new one, never a mix.
//! - **Append** (`Appender`) writes new ADD / REMOVE records after the
//!   committed end, fsyncs, then writes the *other* commit slot with `seq+1`
//!   and fsyncs again. A crash before the slot write leaves the previous
//!   commit in force (bytes after its end are ignored and overwritten by the
//!   next append); a torn slot fails its checksum and the other slot, the
//!   previous commit, is used.
//! - **Load** maps the file (mmap), checks the magic, refuses a newer format
//!   version, picks the commit, verifies the spec checksum and every record's
//!   checksum, and replays the records. A file shorter than its committed end
//!   is reported as truncated; any checksum failure names the byte offset.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tq_core::RotationKind;

use crate::{FlatIndex, IndexError, IndexSpec, IvfIndex, Metric, RawVectors, Result};

pub const MAGIC: &[u8; 8] = b"TQINDEX\0";
pub const VERSION: u32 = 1;
const SLOT_A: usize = 16;
const SLOT_B: usize = 40;
const SPEC_AT: usize = 64;
const TAG_ADD: u32 = 1;
const TAG_REMOVE: u32 = 2;
const TAG_CENTROIDS: u32 = 3;
const RECORD_HEAD: usize = 16;

/// A loaded index of either kind.
pub enum AnyIndex {
    Flat(FlatIndex),
    Ivf(IvfIndex),
}

impl AnyIndex {
    pub fn spec(&self) -> &IndexSpec {
        match self {
            AnyIndex::Flat(f) => f.spec(),
            AnyIndex::Ivf(i) => i.spec(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            AnyIndex::Flat(f) => f.len(),
            AnyIndex::Ivf(i) => i.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, id: u64) -> bool {
        match self {
            AnyIndex::Flat(f) => f.contains(id),
            AnyIndex::Ivf(i) => i.contains(id),
        }
    }
    pub fn search(&self, q: &[f32], k: usize, p: &crate::SearchParams<'_>) -> Result<Vec<crate::Hit>> {
        match self {
            AnyIndex::Flat(f) => f.search(q, k, p),
            AnyIndex::Ivf(i) => i.search(q, k, p),
        }
    }
    pub fn search_batch(&self, qs: &[f32], k: usize, p: &crate::SearchParams<'_>) -> Result<Vec<Vec<crate::Hit>>> {
        match self {
            AnyIndex::Flat(f) => f.search_batch(qs, k, p),
            AnyIndex::Ivf(i) => i.search_batch(qs, k, p),
        }
    }
    /// Encodes a batch and adds it in memory; returns the ADD record payload
    /// to append to the file (nothing is added on error).
    pub fn add(&mut self, ids: &[u64], xs: &[f32]) -> Result<Vec<u8>> {
        let (lists, codes) = match self {
            AnyIndex::Flat(f) => {
                let codes = f.encode(ids, xs)?;
                f.add_codes(ids, &codes)?;
                (vec![0u32; ids.len()], codes)
            }
            AnyIndex::Ivf(i) => {
                let (lists, codes) = i.encode(ids, xs)?;
                i.add_codes(ids, &lists, &codes)?;
                (lists, codes)
            }
        };
        Ok(add_payload(ids, &lists, &codes))
    }
    /// Removes in memory; returns the REMOVE record payload.
    pub fn remove(&mut self, ids: &[u64]) -> Result<Vec<u8>> {
        match self {
            AnyIndex::Flat(f) => f.remove(ids)?,
            AnyIndex::Ivf(i) => i.remove(ids)?,
        }
        Ok(remove_payload(ids))
    }
}

fn err(path: &Path, msg: impl Into<String>) -> IndexError {
    IndexError::File { path: path.display().to_string(), msg: msg.into() }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IndexError + '_ {
    move |e| IndexError::Io { path: path.display().to_string(), source: e }
}

fn spec_bytes(spec: &IndexSpec, nlist: u32, kind: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(kind);
    b.extend_from_slice(&(spec.codec.len() as u16).to_le_bytes());
    b.extend_from_slice(spec.codec.as_bytes());
    b.extend_from_slice(&(spec.dim as u32).to_le_bytes());
    b.extend_from_slice(&spec.seed.to_le_bytes());
    b.push(spec.rotation.id());
    b.push(spec.metric.id());
    b.push(spec.raw.id());
    b.extend_from_slice(&(spec.params.len() as u32).to_le_bytes());
    b.extend_from_slice(&spec.params);
    b.extend_from_slice(&nlist.to_le_bytes());
    b
}

fn record(tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEAD + payload.len());
    r.extend_from_slice(&tag.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    r.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

fn add_payload(ids: &[u64], lists: &[u32], codes: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + 12 * ids.len() + codes.len());
    p.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    ids.iter().for_each(|i| p.extend_from_slice(&i.to_le_bytes()));
    lists.iter().for_each(|l| p.extend_from_slice(&l.to_le_bytes()));
    p.extend_from_slice(codes);
    p
}

fn remove_payload(ids: &[u64]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + 8 * ids.len());
    p.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    ids.iter().for_each(|i| p.extend_from_slice(&i.to_le_bytes()));
    p
}

fn slot_bytes(seq: u64, end: u64) -> [u8; 24] {
    let mut s = [0u8; 24];
    s[..8].copy_from_slice(&seq.to_le_bytes());
    s[8..16].copy_from_slice(&end.to_le_bytes());
    let crc = crc32fast::hash(&s[..16]);
    s[16..20].copy_from_slice(&crc.to_le_bytes());
    s
}

/// The complete bytes of a snapshot of `index`.
pub fn to_bytes(index: &AnyIndex) -> Vec<u8> {
    let (kind, nlist) = match index {
        AnyIndex::Flat(_) => (0u8, 0u32),
        AnyIndex::Ivf(i) => (1u8, i.nlist() as u32),
    };
    let spec = spec_bytes(index.spec(), nlist, kind);
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&[0u8; 48]); // slots, filled below
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    out.extend_from_slice(&crc32fast::hash(&spec).to_le_bytes());
    match index {
        AnyIndex::Flat(f) => {
            out.extend(record(TAG_ADD, &add_payload(f.ids(), &vec![0; f.len()], &f.all_codes())));
        }
        AnyIndex::Ivf(ivf) => {
            let c: Vec<u8> = ivf.centroids().iter().flat_map(|v| v.to_le_bytes()).collect();
            out.extend(record(TAG_CENTROIDS, &c));
            let (mut ids, mut lists, mut codes) = (Vec::new(), Vec::new(), Vec::new());
            for l in 0..ivf.nlist() {
                let f = ivf.list(l);
                ids.extend_from_slice(f.ids());
                lists.extend(std::iter::repeat_n(l as u32, f.len()));
                codes.extend(f.all_codes());
            }
            out.extend(record(TAG_ADD, &add_payload(&ids, &lists, &codes)));
        }
    }
    let end = out.len() as u64;
    out[SLOT_A..SLOT_A + 24].copy_from_slice(&slot_bytes(1, end));
    out
}

/// Writes `bytes` to `path` atomically: temp file in the same directory,
/// fsync, rename, fsync of the directory. On error the temp file is removed
/// and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| err(path, "not a file path"))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            // fsync of the directory makes the rename durable (not supported everywhere)
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io(path))
}

/// Saves a snapshot (see the module docs).
pub fn save(index: &AnyIndex, path: &Path) -> Result<()> {
    write_atomic(path, &to_bytes(index))
}

/// Where the committed records of a loaded file end, for appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub seq: u64,
    pub end: u64,
    /// Which slot holds it (0 = A, 1 = B).
    pub slot: u8,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes(s.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_le_bytes(s.try_into().expect("8")))
    }
}

fn read_slot(b: &[u8]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    let (seq, end) = (u64::from_le_bytes(b[..8].try_into().ok()?), u64::from_le_bytes(b[8..16].try_into().ok()?));
    (seq > 0 && crc32fast::hash(&b[..16]) == crc).then_some((seq, end))
}

/// Parses a complete file image.
pub fn from_bytes(b: &[u8], path: &Path) -> Result<(AnyIndex, Commit)> {
    if b.is_empty() {
        return Err(err(path, "empty file (not a .tqi index)"));
    }
    if b.len() < SPEC_AT + 4 || &b[..8] != MAGIC {
        return Err(err(path, "not a .tqi index file (bad magic or too short)"));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    if version > VERSION {
        return Err(err(path, format!("format version {version} is newer than this build supports ({VERSION}); upgrade tq")));
    }
    if version == 0 {
        return Err(err(path, "corrupt header: format version 0"));
    }
    if b[13..16] != [0, 0, 0] || b[SLOT_A + 20..SLOT_A + 24] != [0; 4] || b[SLOT_B + 20..SLOT_B + 24] != [0; 4] {
        return Err(err(path, "corrupt header: reserved bytes are not zero"));
    }
    let slots = [read_slot(&b[SLOT_A..SLOT_A + 24]), read_slot(&b[SLOT_B..SLOT_B + 24])];
    let (slot, (seq, end)) = match slots {
        [Some(a), Some(bb)] => {
            if bb.0 > a.0 {
                (1u8, bb)
            } else {
                (0u8, a)
            }
        }
        [Some(a), None] => (0, a),
        [None, Some(bb)] => (1, bb),
        [None, None] => return Err(err(path, "corrupt header: no valid commit record")),
    };
    let mut r = Reader { b, at: SPEC_AT };
    let spec_len = r.u32().ok_or_else(|| err(path, "truncated header"))? as usize;
    let spec_raw = r.take(spec_len).ok_or_else(|| err(path, "truncated header"))?;
    let crc = r.u32().ok_or_else(|| err(path, "truncated header"))?;
    if crc32fast::hash(spec_raw) != crc {
        return Err(err(path, "corrupt header: checksum mismatch in the index spec"));
    }
    let records_at = r.at;
    if (end as usize) < records_at {
        return Err(err(path, "corrupt header: commit ends inside the header"));
    }
    if (b.len() as u64) < end {
        return Err(err(path, format!("truncated: {} bytes, but {end} bytes are committed", b.len())));
    }
    let bad_spec = || err(path, "corrupt header: malformed index spec");
    let mut s = Reader { b: spec_raw, at: 0 };
    let kind = s.u8().ok_or_else(bad_spec)?;
    if kind != b[12] || kind > 1 {
        return Err(bad_spec());
    }
    let nlen = s.u16().ok_or_else(bad_spec)? as usize;
    let codec = std::str::from_utf8(s.take(nlen).ok_or_else(bad_spec)?).map_err(|_| bad_spec())?.to_string();
    let dim = s.u32().ok_or_else(bad_spec)? as usize;
    let seed = s.u64().ok_or_else(bad_spec)?;
    let rotation = RotationKind::from_id(s.u8().ok_or_else(bad_spec)?).ok_or_else(bad_spec)?;
    let metric = Metric::from_id(s.u8().ok_or_else(bad_spec)?).ok_or_else(bad_spec)?;
    let raw = RawVectors::from_id(s.u8().ok_or_else(bad_spec)?).ok_or_else(bad_spec)?;
    let plen = s.u32().ok_or_else(bad_spec)? as usize;
    let params = s.take(plen).ok_or_else(bad_spec)?.to_vec();
    let nlist = s.u32().ok_or_else(bad_spec)? as usize;
    if s.at != spec_raw.len() {
        return Err(bad_spec());
    }
    let spec = IndexSpec { codec, dim, seed, rotation, metric, params, raw };
    let mut index = match kind {
        0 => AnyIndex::Flat(FlatIndex::new(spec)?),
        _ => {
            // the centroids must be the first record
            let (tag, payload, _) = read_record(b, records_at, end as usize, path)?;
            if tag != TAG_CENTROIDS || payload.len() != nlist * dim * 4 || nlist == 0 {
                return Err(err(path, format!("corrupt record at byte {records_at}: expected {nlist} IVF centroids")));
            }
            let c = payload.chunks_exact(4).map(|x| f32::from_le_bytes(x.try_into().expect("4"))).collect();
            AnyIndex::Ivf(IvfIndex::with_centroids(spec, c)?)
        }
    };
    let mut at = records_at;
    while at < end as usize {
        let (tag, payload, next) = read_record(b, at, end as usize, path)?;
        let bad = |what: &str| err(path, format!("corrupt record at byte {at}: {what}"));
        let mut p = Reader { b: payload, at: 0 };
        match tag {
            TAG_CENTROIDS if at == records_at && matches!(index, AnyIndex::Ivf(_)) => {}
            TAG_ADD => {
                let n = p.u64().ok_or_else(|| bad("short ADD"))? as usize;
                let cs = match &index {
                    AnyIndex::Flat(f) => f.entry_size(),
                    AnyIndex::Ivf(i) => i.list(0).entry_size(),
                };
                let need = n.checked_mul(12 + cs).ok_or_else(|| bad("count overflow"))?;
                if payload.len() != 8 + need {
                    return Err(bad("ADD length does not match its count"));
                }
                let ids: Vec<u64> = (0..n).map(|_| p.u64().expect("sized")).collect();
                let lists: Vec<u32> = (0..n).map(|_| p.u32().expect("sized")).collect();
                let codes = p.take(n * cs).expect("sized");
                let res = match &mut index {
                    AnyIndex::Flat(f) => {
                        if lists.iter().any(|&l| l != 0) {
                            return Err(bad("flat index with list numbers"));
                        }
                        f.add_codes(&ids, codes)
                    }
                    AnyIndex::Ivf(i) => i.add_codes(&ids, &lists, codes),
                };
                res.map_err(|e| bad(&e.to_string()))?;
            }
            TAG_REMOVE => {
                let n = p.u64().ok_or_else(|| bad("short REMOVE"))? as usize;
                if payload.len() != 8 + n.checked_mul(8).ok_or_else(|| bad("count overflow"))? {
                    return Err(bad("REMOVE length does not match its count"));
                }
                let ids: Vec<u64> = (0..n).map(|_| p.u64().expect("sized")).collect();
                let res = match &mut index {
                    AnyIndex::Flat(f) => f.remove(&ids),
                    AnyIndex::Ivf(i) => i.remove(&ids),
                };
                res.map_err(|e| bad(&e.to_string()))?;
            }
            t => return Err(bad(&format!("unknown record tag {t}"))),
        }
        at = next;
    }
    Ok((index, Commit { seq, end, slot }))
}

fn read_record<'a>(b: &'a [u8], at: usize, end: usize, path: &Path) -> Result<(u32, &'a [u8], usize)> {
    let mut r = Reader { b: &b[..end], at };
    let bad = || err(path, format!("corrupt record at byte {at}: header or length runs past the committed end"));
    let tag = r.u32().ok_or_else(bad)?;
    let len = r.u64().ok_or_else(bad)?;
    let crc = r.u32().ok_or_else(bad)?;
    let payload = r.take(usize::try_from(len).map_err(|_| bad())?).ok_or_else(bad)?;
    if crc32fast::hash(payload) != crc {
        return Err(err(path, format!("corrupt record at byte {at}: checksum mismatch")));
    }
    Ok((tag, payload, r.at))
}

/// Loads an index by mapping the file.
pub fn load(path: &Path) -> Result<(AnyIndex, Commit)> {
    let f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len == 0 {
        return Err(err(path, "empty file (not a .tqi index)"));
    }
    // SAFETY: the map is read-only and dropped before returning; a concurrent
    // writer only ever appends past the committed end or replaces the file by
    // rename (the mapped inode stays intact), so the bytes read do not change.
    let map = unsafe { Mmap::map(&f) }.map_err(io(path))?;
    from_bytes(&map, path)
}

/// Appends records to a loaded file without rewriting it (single writer).
pub struct Appender {
    path: PathBuf,
    commit: Commit,
}

impl Appender {
    /// `commit` is what `load` returned for this file.
    pub fn new(path: &Path, commit: Commit) -> Self {
        Self { path: path.to_path_buf(), commit }
    }

    pub fn commit(&self) -> Commit {
        self.commit
    }

    /// Appends an ADD record payload (from `AnyIndex::add`).
    pub fn append_add(&mut self, payload: &[u8]) -> Result<()> {
        self.append(&record(TAG_ADD, payload))
    }

    /// Appends a REMOVE record payload (from `AnyIndex::remove`).
    pub fn append_remove(&mut self, payload: &[u8]) -> Result<()> {
        self.append(&record(TAG_REMOVE, payload))
    }

    fn append(&mut self, rec: &[u8]) -> Result<()> {
        let path = self.path.clone();
        let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
        // the file must still be the one we loaded: same committed slot
        let mut head = [0u8; 64];
        std::io::Read::read_exact(&mut f, &mut head).map_err(io(&path))?;
        let cur = [read_slot(&head[SLOT_A..SLOT_A + 24]), read_slot(&head[SLOT_B..SLOT_B + 24])];
        if cur[self.commit.slot as usize] != Some((self.commit.seq, self.commit.end)) {
            return Err(err(&path, "the file changed since it was loaded; reload and retry"));
        }
        let end = self.commit.end;
        // bytes after the committed end belong to an interrupted append: drop them
        f.set_len(end).map_err(io(&path))?;
        f.seek(SeekFrom::Start(end)).map_err(io(&path))?;
        f.write_all(rec).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        let next = Commit { seq: self.commit.seq + 1, end: end + rec.len() as u64, slot: 1 - self.commit.slot };
        let at = if next.slot == 0 { SLOT_A } else { SLOT_B };
        f.seek(SeekFrom::Start(at as u64)).map_err(io(&path))?;
        f.write_all(&slot_bytes(next.seq, next.end)).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        self.commit = next;
        Ok(())
    }
}
