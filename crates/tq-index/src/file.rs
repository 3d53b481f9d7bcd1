//! The `.tqi` index file: one versioned file per index.
//!
//! ```text
//! 0   magic "TQINDEX\0"                     8 bytes
//! 8   format version (u32 LE)               = 1
//! 12  index kind (u8: 0 flat, 1 IVF), 3 zero bytes
//! 16  commit slot A: seq u64, end u64, crc32 u32 (of seq, end), 4 zero bytes
//! 40  commit slot B: same (all 24 bytes zero until first written)
//! 64  spec: len u32, then `len` bytes (kind, codec name, dim, seed, rotation,
//!     metric, raw-vector precision, codec params, lists), then crc32 u32 of those bytes
//! ..  records up to the committed end, each:
//!     tag u32, payload length u64, crc32 u32 of the payload, payload
//!       1 ADD       count u64, ids u64×count, lists u32×count, entries
//!                   (each: the code, then the f16/f32 raw copy if kept)
//!       2 REMOVE    count u64, ids u64×count
//!       3 CENTROIDS nlist × dim f32 (IVF; first record)
//!
//! beside it: <name>.tqi.lock   the write lock (advisory, exclusive; holds the
//!                              holder's pid as text while held)
//! ```
//! All integers little-endian. The valid commit slot with the highest `seq`
//! says where the committed records end. A slot is *empty* (all 24 bytes
//! zero, never written), *valid* (checksum matches, `seq > 0`, reserved bytes
//! zero) or *corrupt* (anything else).
//!
//! **Writers.** Every writer (`Appender`, [`open_for_write`], [`save`],
//! [`save_over`], and through them `tq index add/remove/build` and Python
//! `Index.save`) takes an exclusive advisory lock ([`WriteLock`], `flock`) on
//! the sidecar file `<name>.tqi.lock` for its whole read-modify-commit; the
//! sidecar (not the index) is locked because `save` replaces the index by a
//! new inode. The sidecar is created if absent and never deleted. A second
//! writer waits up to its [`LockWait`] (default 10 s) and then fails with
//! [`IndexError::LockTimeout`], naming the lock file and the holder's pid.
//! The lock dies with its holder (a killed writer never leaves it held).
//!
//! Under the lock a writer re-reads the commit slots and checks that the
//! file's committed `(seq, end)` — and the file itself (same inode) — is
//! what its in-memory view was loaded from. If not, it refuses with
//! [`IndexError::Changed`] ("index file changed since it was loaded: commit
//! N -> M; reload and retry") and writes nothing: a stale writer never
//! truncates someone else's record. Read-modify-commit callers (the CLI's
//! `index add`/`remove`) use [`open_for_write`], which loads under the lock
//! and keeps it until the `Appender` is dropped, so they never go stale.
//!
//! - **Save** writes a complete file to a temporary name in the same
//!   directory, fsyncs it, renames it over the target and fsyncs the
//!   directory: a crash leaves the old file or the new one, never a mix.
//!   The new file's commit number is one more than the replaced file's
//!   newest (1 for a new file), so under the lock a path never shows the
//!   same commit twice: two snapshots of equal size cannot revive a stale
//!   view, even on a file system that reuses the replaced inode's number.
//! - **Append** writes a new ADD / REMOVE record at the committed end
//!   (dropping any bytes there from an interrupted append), fsyncs, then
//!   writes the *other* commit slot with `seq+1` and fsyncs again. A crash
//!   before the slot write leaves the previous commit in force (bytes after
//!   its end are ignored and overwritten by the next append). A failed
//!   append (disk full, I/O error) truncates the file back to the committed
//!   end before returning the error (best effort).
//! - **Load** (readers take no lock) reads the header with `pread`, picks the
//!   commit, maps the file up to the committed end (mmap), verifies the spec
//!   checksum, every size field against the file size and
//!   `tq_core::limits` *before* allocating, and every record's checksum, and
//!   replays the records. Bytes below a committed end never change (only
//!   the 48 slot bytes, which are read by `pread`, not through the map), so a
//!   reader sees one commit, never half of one. A file shorter than its
//!   committed end is reported as truncated; any checksum failure names the
//!   byte offset; an absurd size names the field ([`IndexError::TooLarge`]).
//!
//! **Corrupt slots.** A slot that fails its checksum (a flipped bit, a torn
//! write after power loss) makes load fail with [`IndexError::CorruptSlot`],
//! naming the slot and its offset: the other slot may hold an *older*
//! commit, and silently falling back would roll back acknowledged writes.
//! [`check`] reports exactly what is there (slot states, committed seq/end,
//! records verified, complete records after the committed end, whether the
//! previous commit is intact). Loading with
//! `LoadOptions { recover_previous_commit: true }` (CLI
//! `--recover-previous-commit`) uses the newest valid slot. While a slot is
//! corrupt, writers refuse to append if a checksum-valid record lies after
//! the committed end (it may belong to the lost commit); otherwise the next
//! append rewrites the corrupt slot with a valid commit. A snapshot `save`
//! without a view (`save`, `tq index build`) replaces the file outright.

use std::fs::{File, Metadata, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use tq_core::limits::{MAX_DIM, MAX_NLIST};
use tq_core::RotationKind;
use tq_io::LeReader;

use crate::{FlatIndex, IndexError, IndexSpec, IvfIndex, Metric, RawVectors, Result};

/// The first 8 bytes of every `.tqi` file.
pub const MAGIC: &[u8; 8] = b"TQINDEX\0";
/// The format version this build writes (and the newest it reads).
pub const VERSION: u32 = 1;
const SLOT_A: usize = 16;
const SLOT_B: usize = 40;
const SLOT_AT: [usize; 2] = [SLOT_A, SLOT_B];
const SLOT_NAME: [char; 2] = ['A', 'B'];
const SPEC_AT: usize = 64;
/// The fixed header: magic, version, kind, both slots.
const HEAD: usize = SPEC_AT;
const TAG_ADD: u32 = 1;
const TAG_REMOVE: u32 = 2;
const TAG_CENTROIDS: u32 = 3;
const RECORD_HEAD: usize = 16;

/// A loaded index of either kind.
pub enum AnyIndex {
    /// A flat index (kind 0).
    Flat(FlatIndex),
    /// An IVF index (kind 1).
    Ivf(IvfIndex),
}

impl AnyIndex {
    /// The index's spec.
    pub fn spec(&self) -> &IndexSpec {
        match self {
            AnyIndex::Flat(f) => f.spec(),
            AnyIndex::Ivf(i) => i.spec(),
        }
    }
    /// Number of vectors held.
    pub fn len(&self) -> usize {
        match self {
            AnyIndex::Flat(f) => f.len(),
            AnyIndex::Ivf(i) => i.len(),
        }
    }
    /// Whether the index holds no vector.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every id held: the flat index's slot order, or list after list.
    pub fn ids(&self) -> Vec<u64> {
        match self {
            AnyIndex::Flat(f) => f.ids().to_vec(),
            AnyIndex::Ivf(i) => (0..i.nlist()).flat_map(|l| i.list(l).ids().to_vec()).collect(),
        }
    }
    /// Whether `id` is in the index.
    pub fn contains(&self, id: u64) -> bool {
        match self {
            AnyIndex::Flat(f) => f.contains(id),
            AnyIndex::Ivf(i) => i.contains(id),
        }
    }
    /// The `k` best hits for one query, best first.
    pub fn search(&self, q: &[f32], k: usize, p: &crate::SearchParams<'_>) -> Result<Vec<crate::Hit>> {
        match self {
            AnyIndex::Flat(f) => f.search(q, k, p),
            AnyIndex::Ivf(i) => i.search(q, k, p),
        }
    }
    /// Searches many queries (row-major) in parallel.
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

fn too_large(path: &Path, field: &'static str, value: u64, limit: u64) -> IndexError {
    IndexError::TooLarge { path: path.display().to_string(), field, value, limit }
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
    r.extend_from_slice(&tq_io::crc32(payload).to_le_bytes());
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
    let crc = tq_io::crc32(&s[..16]);
    s[16..20].copy_from_slice(&crc.to_le_bytes());
    s
}

/// The complete bytes of a snapshot of `index` (commit number 1).
pub fn to_bytes(index: &AnyIndex) -> Vec<u8> {
    snapshot_bytes(index, 1)
}

/// A snapshot whose commit slot A holds `seq`.
fn snapshot_bytes(index: &AnyIndex, seq: u64) -> Vec<u8> {
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
    out.extend_from_slice(&tq_io::crc32(&spec).to_le_bytes());
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
    out[SLOT_A..SLOT_A + 24].copy_from_slice(&slot_bytes(seq, end));
    out
}

// ---------------------------------------------------------------------------
// The write lock
// ---------------------------------------------------------------------------

/// How long a writer waits for another writer's lock before failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockWait {
    /// The longest wait; zero fails at once.
    pub timeout: Duration,
}

impl LockWait {
    /// The default wait: 10 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Wait up to `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
    /// Fail at once if another writer holds the lock.
    pub fn no_wait() -> Self {
        Self { timeout: Duration::ZERO }
    }
}

impl Default for LockWait {
    fn default() -> Self {
        Self { timeout: Self::DEFAULT_TIMEOUT }
    }
}

/// The sidecar lock file of an index: `<name>.lock` beside it.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

/// The exclusive write lock of one index file (see the module docs),
/// released when dropped (or when the holding process dies).
pub struct WriteLock {
    file: File,
    path: PathBuf,
}

impl WriteLock {
    /// Locks `<index>.lock`, waiting up to `wait`, then writes this
    /// process's pid into it.
    pub fn acquire(index: &Path, wait: LockWait) -> Result<Self> {
        let path = lock_path(index);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        let t = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
            let waited = t.elapsed();
            if waited >= wait.timeout {
                let holder_pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                return Err(IndexError::LockTimeout { lock: path.display().to_string(), holder_pid, waited_ms: waited.as_millis() as u64 });
            }
            std::thread::sleep(pause.min(wait.timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        // the pid is only informative (for the timeout message of the next writer)
        let mut f = &file;
        let _ = f.set_len(0).and_then(|_| f.seek(SeekFrom::Start(0))).and_then(|_| writeln!(f, "{}", std::process::id()));
        Ok(Self { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

// ---------------------------------------------------------------------------
// Commits and slots
// ---------------------------------------------------------------------------

/// Identity of a file on disk (device, inode), to notice a file replaced by
/// a `save` since it was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

#[cfg(unix)]
fn file_id(m: &Metadata) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    Some(FileId { dev: m.dev(), ino: m.ino() })
}

#[cfg(not(unix))]
fn file_id(_: &Metadata) -> Option<FileId> {
    None
}

/// Where the committed records of a loaded file end, for appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Commit number: one more per append, and a snapshot saved over a
    /// file continues its numbering (1 for a new file), so under the write
    /// lock a path never shows the same commit twice.
    pub seq: u64,
    /// Byte offset where the committed records end.
    pub end: u64,
    /// Which slot holds it (0 = A, 1 = B).
    pub slot: u8,
    /// The file it was read from (`load`; `None` from `from_bytes`).
    pub file: Option<FileId>,
}

/// What one commit slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// All zero: never written.
    Empty,
    /// Checksum matches, `seq > 0`, reserved bytes zero.
    Valid {
        /// Commit number.
        seq: u64,
        /// Byte offset where the committed records end.
        end: u64,
    },
    /// Fails its checksum (or has `seq` 0 / non-zero reserved bytes); the
    /// stored, unverified values.
    Corrupt {
        /// The stored commit number (unverified).
        seq: u64,
        /// The stored end offset (unverified).
        end: u64,
    },
}

fn slot_state(b: &[u8]) -> SlotState {
    let seq = u64::from_le_bytes(b[..8].try_into().expect("8"));
    let end = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    let crc = u32::from_le_bytes(b[16..20].try_into().expect("4"));
    if b[..24].iter().all(|&x| x == 0) {
        SlotState::Empty
    } else if seq > 0 && tq_io::crc32(&b[..16]) == crc && b[20..24] == [0; 4] {
        SlotState::Valid { seq, end }
    } else {
        SlotState::Corrupt { seq, end }
    }
}

fn slot_states(head: &[u8]) -> [SlotState; 2] {
    [slot_state(&head[SLOT_A..SLOT_A + 24]), slot_state(&head[SLOT_B..SLOT_B + 24])]
}

/// How to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// When a commit slot is corrupt, use the newest valid slot (the
    /// previous commit, if the corrupt slot held the last one) instead of
    /// failing. Writes committed only by the corrupt slot are then not seen.
    pub recover_previous_commit: bool,
}

impl LoadOptions {
    /// Options with `recover_previous_commit` set.
    pub fn recover() -> Self {
        Self { recover_previous_commit: true }
    }
}

/// The newest valid commit; an error for a corrupt slot unless recovering.
fn choose(slots: [SlotState; 2], opts: LoadOptions, path: &Path) -> Result<Commit> {
    let valid = |i: usize| match slots[i] {
        SlotState::Valid { seq, end } => Some(Commit { seq, end, slot: i as u8, file: None }),
        _ => None,
    };
    let best = match (valid(0), valid(1)) {
        (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
        (a, b) => a.or(b),
    };
    if !opts.recover_previous_commit {
        if let Some(i) = slots.iter().position(|s| matches!(s, SlotState::Corrupt { .. })) {
            let other = match best {
                Some(c) => format!(
                    "slot {} holds commit {} (end {}), which is older than the lost one if this slot held the last commit",
                    SLOT_NAME[c.slot as usize], c.seq, c.end
                ),
                None => "the other slot holds no valid commit either".to_string(),
            };
            let hint = if best.is_some() { "; load with the recover-previous-commit option to use it" } else { "" };
            return Err(IndexError::CorruptSlot {
                path: path.display().to_string(),
                slot: SLOT_NAME[i],
                offset: SLOT_AT[i],
                detail: format!("checksum mismatch; {other}; `tq index check` shows what is recoverable{hint}"),
            });
        }
    }
    best.ok_or_else(|| err(path, "corrupt header: no valid commit record"))
}

/// Magic, version and the reserved kind bytes of the fixed header (`b.len() >= HEAD + 4`).
fn check_head(b: &[u8], path: &Path) -> Result<()> {
    if b.is_empty() {
        return Err(err(path, "empty file (not a .tqi index)"));
    }
    if b.len() < HEAD || &b[..8] != MAGIC {
        return Err(err(path, "not a .tqi index file (bad magic or too short)"));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    if version > VERSION {
        return Err(err(path, format!("format version {version} is newer than this build supports ({VERSION}); upgrade tq")));
    }
    if version == 0 {
        return Err(err(path, "corrupt header: format version 0"));
    }
    if b[13..16] != [0, 0, 0] {
        return Err(err(path, "corrupt header: reserved bytes are not zero"));
    }
    Ok(())
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4"))
}

/// Parses the spec and replays the records of `b`, the file image up to (at
/// least) `end`, counting verified records in `verified`.
fn parse(b: &[u8], end: u64, path: &Path, verified: &mut usize) -> Result<AnyIndex> {
    if b.len() < SPEC_AT + 4 {
        return Err(err(path, "truncated header"));
    }
    if (b.len() as u64) < end {
        return Err(err(path, format!("truncated: {} bytes, but {end} bytes are committed", b.len())));
    }
    let spec_len = read_u32(b, SPEC_AT) as usize;
    let room = b.len() - (SPEC_AT + 4);
    if room < 4 || spec_len > room - 4 {
        // the spec (and its checksum) would run past the file
        return Err(too_large(path, "spec length", spec_len as u64, room.saturating_sub(4) as u64));
    }
    let spec_raw = &b[SPEC_AT + 4..SPEC_AT + 4 + spec_len];
    let crc = read_u32(b, SPEC_AT + 4 + spec_len);
    if tq_io::crc32(spec_raw) != crc {
        return Err(err(path, "corrupt header: checksum mismatch in the index spec"));
    }
    let records_at = SPEC_AT + 8 + spec_len;
    if (end as usize) < records_at {
        return Err(err(path, "corrupt header: commit ends inside the header"));
    }
    let bad_spec = || err(path, "corrupt header: malformed index spec");
    let mut s = LeReader::new(spec_raw);
    let kind = s.u8("kind").map_err(|_| bad_spec())?;
    if kind != b[12] || kind > 1 {
        return Err(bad_spec());
    }
    let nlen = s.u16("codec name length").map_err(|_| bad_spec())? as usize;
    let codec = std::str::from_utf8(s.take(nlen, "codec name").map_err(|_| bad_spec())?).map_err(|_| bad_spec())?.to_string();
    let dim = s.u32("dim").map_err(|_| bad_spec())? as usize;
    if dim == 0 {
        return Err(err(path, "corrupt header: dim is 0"));
    }
    if dim > MAX_DIM {
        return Err(too_large(path, "dim", dim as u64, MAX_DIM as u64));
    }
    let seed = s.u64("seed").map_err(|_| bad_spec())?;
    let rotation = RotationKind::from_id(s.u8("rotation").map_err(|_| bad_spec())?).ok_or_else(bad_spec)?;
    let metric = Metric::from_id(s.u8("metric").map_err(|_| bad_spec())?).ok_or_else(bad_spec)?;
    let raw = RawVectors::from_id(s.u8("raw vectors").map_err(|_| bad_spec())?).ok_or_else(bad_spec)?;
    let plen = s.u32("params length").map_err(|_| bad_spec())? as usize;
    let left = s.remaining();
    if plen > left {
        return Err(too_large(path, "codec params length", plen as u64, left as u64));
    }
    let params = s.take(plen, "params").map_err(|_| bad_spec())?.to_vec();
    let nlist = s.u32("nlist").map_err(|_| bad_spec())? as usize;
    if s.remaining() != 0 {
        return Err(bad_spec());
    }
    if kind == 0 && nlist != 0 {
        return Err(err(path, format!("corrupt header: a flat index with nlist {nlist}")));
    }
    if kind == 1 {
        if nlist == 0 {
            return Err(err(path, "corrupt header: an IVF index with nlist 0"));
        }
        if nlist > MAX_NLIST {
            return Err(too_large(path, "nlist", nlist as u64, MAX_NLIST as u64));
        }
        // the centroids record must fit in the committed bytes
        let need = (nlist as u64) * (dim as u64) * 4;
        let room = end - records_at as u64;
        if need > room {
            return Err(too_large(path, "nlist × dim centroid bytes", need, room));
        }
    }
    let spec = IndexSpec { codec, dim, seed, rotation, metric, params, raw };
    let end = end as usize;
    let mut index = match kind {
        0 => AnyIndex::Flat(FlatIndex::new(spec)?),
        _ => {
            // the centroids must be the first record
            let (tag, payload, _) = read_record(b, records_at, end, path)?;
            if tag != TAG_CENTROIDS || payload.len() as u64 != (nlist as u64) * (dim as u64) * 4 {
                return Err(err(path, format!("corrupt record at byte {records_at}: expected {nlist} IVF centroids")));
            }
            let c = payload.chunks_exact(4).map(|x| f32::from_le_bytes(x.try_into().expect("4"))).collect();
            AnyIndex::Ivf(IvfIndex::with_centroids(spec, c)?)
        }
    };
    let mut at = records_at;
    while at < end {
        let (tag, payload, next) = read_record(b, at, end, path)?;
        let bad = |what: &str| err(path, format!("corrupt record at byte {at}: {what}"));
        let mut p = LeReader::new(payload);
        match tag {
            TAG_CENTROIDS if at == records_at && matches!(index, AnyIndex::Ivf(_)) => {}
            TAG_ADD => {
                let n = p.u64("ADD count").map_err(|_| bad("short ADD"))?;
                let cs = match &index {
                    AnyIndex::Flat(f) => f.entry_size(),
                    AnyIndex::Ivf(i) => i.list(0).entry_size(),
                };
                let fits = (payload.len() as u64 - 8) / (12 + cs as u64);
                if n > fits {
                    return Err(too_large(path, "ADD count", n, fits));
                }
                let n = n as usize;
                if payload.len() != 8 + n * (12 + cs) {
                    return Err(bad("ADD length does not match its count"));
                }
                // sized above: these reads cannot run short
                let short = |_| bad("short ADD");
                let ids = (0..n).map(|_| p.u64("id")).collect::<std::result::Result<Vec<u64>, _>>().map_err(short)?;
                let lists = (0..n).map(|_| p.u32("list")).collect::<std::result::Result<Vec<u32>, _>>().map_err(short)?;
                let codes = p.take(n * cs, "codes").map_err(short)?;
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
                let n = p.u64("REMOVE count").map_err(|_| bad("short REMOVE"))?;
                let fits = (payload.len() as u64 - 8) / 8;
                if n > fits {
                    return Err(too_large(path, "REMOVE count", n, fits));
                }
                let n = n as usize;
                if payload.len() != 8 + n * 8 {
                    return Err(bad("REMOVE length does not match its count"));
                }
                let ids = (0..n).map(|_| p.u64("id")).collect::<std::result::Result<Vec<u64>, _>>().map_err(|_| bad("short REMOVE"))?;
                let res = match &mut index {
                    AnyIndex::Flat(f) => f.remove(&ids),
                    AnyIndex::Ivf(i) => i.remove(&ids),
                };
                res.map_err(|e| bad(&e.to_string()))?;
            }
            t => return Err(bad(&format!("unknown record tag {t}"))),
        }
        *verified += 1;
        at = next;
    }
    Ok(index)
}

fn read_record<'a>(b: &'a [u8], at: usize, end: usize, path: &Path) -> Result<(u32, &'a [u8], usize)> {
    let bad = |_| err(path, format!("corrupt record at byte {at}: header runs past the committed end"));
    let mut r = LeReader::new(b.get(at..end).unwrap_or_default());
    let tag = r.u32("record tag").map_err(bad)?;
    let len = r.u64("record length").map_err(bad)?;
    let crc = r.u32("record checksum").map_err(bad)?;
    let room = r.remaining() as u64;
    if len > room {
        return Err(too_large(path, "record length", len, room));
    }
    let payload = r.take(len as usize, "record").map_err(bad)?;
    if tq_io::crc32(payload) != crc {
        return Err(err(path, format!("corrupt record at byte {at}: checksum mismatch")));
    }
    Ok((tag, payload, at + r.position()))
}

/// Parses a complete file image (a corrupt commit slot is an error).
pub fn from_bytes(b: &[u8], path: &Path) -> Result<(AnyIndex, Commit)> {
    from_bytes_with(b, path, LoadOptions::default())
}

/// Parses a complete file image.
pub fn from_bytes_with(b: &[u8], path: &Path, opts: LoadOptions) -> Result<(AnyIndex, Commit)> {
    check_head(b, path)?;
    let commit = choose(slot_states(b), opts, path)?;
    let index = parse(b, commit.end, path, &mut 0)?;
    Ok((index, commit))
}

/// Reads the fixed header with `pread`. A slot that reads as corrupt is
/// read again a few times: a writer may be rewriting it at this moment
/// (a reader must not mistake a slot write in flight for corruption).
fn read_head(f: &File, path: &Path) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(HEAD);
    for attempt in 0..5 {
        head.clear();
        let mut r = f;
        r.seek(SeekFrom::Start(0)).map_err(io(path))?;
        r.take(HEAD as u64).read_to_end(&mut head).map_err(io(path))?;
        if head.len() < HEAD || !slot_states(&head).iter().any(|s| matches!(s, SlotState::Corrupt { .. })) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1 << attempt));
    }
    Ok(head)
}

/// Loads an index by mapping the file (a corrupt commit slot is an error).
pub fn load(path: &Path) -> Result<(AnyIndex, Commit)> {
    load_with(path, LoadOptions::default())
}

/// Loads an index by mapping the file up to its committed end.
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<(AnyIndex, Commit)> {
    let f = File::open(path).map_err(io(path))?;
    let head = read_head(&f, path)?;
    check_head(&head, path)?;
    let mut commit = choose(slot_states(&head), opts, path)?;
    // stat after reading the slots: records are written before their slot,
    // so the file is at least as long as any end read above
    let meta = f.metadata().map_err(io(path))?;
    if meta.len() < commit.end {
        return Err(err(path, format!("truncated: {} bytes, but {} bytes are committed", meta.len(), commit.end)));
    }
    if commit.end < (SPEC_AT + 8) as u64 {
        return Err(err(path, "corrupt header: commit ends inside the header"));
    }
    let len = usize::try_from(commit.end).map_err(|_| too_large(path, "committed end", commit.end, usize::MAX as u64))?;
    // SAFETY: the map is read-only, covers only the committed bytes and is
    // dropped before returning. Writers (all through this module, under the
    // write lock) never change bytes below a committed end except the 48
    // commit-slot bytes, which are read above with `pread` and never through
    // the map; they truncate no lower than the committed end, so the file
    // never shrinks under the map (no SIGBUS); `save` replaces the file by
    // rename, leaving the mapped inode intact. (As with any mmap, a program
    // outside this module rewriting the file in place could break this.)
    let map = unsafe { MmapOptions::new().len(len).map(&f) }.map_err(io(path))?;
    let index = parse(&map, commit.end, path, &mut 0)?;
    commit.file = file_id(&meta);
    Ok((index, commit))
}

// ---------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------

/// Whether a complete, checksum-valid record starts at `at` (before
/// `len`); returns where it ends. Reads in bounded chunks (a corrupt length
/// allocates nothing).
fn record_at(f: &File, at: u64, len: u64) -> std::io::Result<Option<u64>> {
    if len < at + RECORD_HEAD as u64 {
        return Ok(None);
    }
    let mut r = f;
    r.seek(SeekFrom::Start(at))?;
    let mut h = [0u8; RECORD_HEAD];
    r.read_exact(&mut h)?;
    let tag = read_u32(&h, 0);
    let plen = u64::from_le_bytes(h[4..12].try_into().expect("8"));
    let crc = read_u32(&h, 12);
    if !(TAG_ADD..=TAG_CENTROIDS).contains(&tag) || plen > len - at - RECORD_HEAD as u64 {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (plen as usize).min(1 << 20)];
    let mut left = plen;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok((hasher.finalize() == crc).then_some(at + RECORD_HEAD as u64 + plen))
}

/// Under the write lock: the file's current commit, checked against the
/// writer's view. Refuses when the file changed since the view was loaded,
/// or when a slot is corrupt and a valid record lies after the committed
/// end (which may belong to the lost commit and must not be overwritten).
fn verify_view(f: &File, path: &Path, view: &Commit) -> Result<Commit> {
    let head = read_head(f, path)?;
    check_head(&head, path)?;
    let slots = slot_states(&head);
    let cur = choose(slots, LoadOptions::recover(), path)?;
    let meta = f.metadata().map_err(io(path))?;
    let replaced = matches!((view.file, file_id(&meta)), (Some(a), Some(b)) if a != b);
    if replaced || (cur.seq, cur.end) != (view.seq, view.end) {
        return Err(IndexError::Changed { path: path.display().to_string(), loaded: view.seq, now: cur.seq, replaced });
    }
    if let Some(i) = slots.iter().position(|s| matches!(s, SlotState::Corrupt { .. })) {
        if let Some(to) = record_at(f, cur.end, meta.len()).map_err(io(path))? {
            return Err(IndexError::CorruptSlot {
                path: path.display().to_string(),
                slot: SLOT_NAME[i],
                offset: SLOT_AT[i],
                detail: format!(
                    "checksum mismatch, and a valid record lies after the committed end (bytes {}..{to}), possibly \
                     from the lost commit; refusing to overwrite it. `tq index check` shows what is recoverable",
                    cur.end
                ),
            });
        }
    }
    if meta.len() < cur.end {
        return Err(err(path, format!("truncated: {} bytes, but {} bytes are committed", meta.len(), cur.end)));
    }
    Ok(Commit { file: view.file, ..cur })
}

/// Loads `path` under its write lock for a read-modify-commit: the returned
/// `Appender` keeps the lock until dropped, so no other writer can commit in
/// between. Fails early (before the caller does any work) if the file
/// cannot be appended to (see the module docs on corrupt slots).
pub fn open_for_write(path: &Path, wait: LockWait) -> Result<(AnyIndex, Appender)> {
    open_for_write_with(path, wait, LoadOptions::default())
}

/// [`open_for_write`] with load options (e.g. recovering the previous commit).
pub fn open_for_write_with(path: &Path, wait: LockWait, opts: LoadOptions) -> Result<(AnyIndex, Appender)> {
    let lock = WriteLock::acquire(path, wait)?;
    let (index, commit) = load_with(path, opts)?;
    let f = File::open(path).map_err(io(path))?;
    verify_view(&f, path, &commit)?;
    Ok((index, Appender { path: path.to_path_buf(), commit, lock: Some(lock), wait }))
}

/// Appends records to a loaded file without rewriting it.
///
/// Each append runs under the file's write lock: the lock held since
/// [`open_for_write`], or (from [`Appender::new`]) one taken for that append.
pub struct Appender {
    path: PathBuf,
    commit: Commit,
    lock: Option<WriteLock>,
    wait: LockWait,
}

impl Appender {
    /// `commit` is what `load` returned for this file. Each append takes
    /// the write lock and refuses if the file changed since that load.
    pub fn new(path: &Path, commit: Commit) -> Self {
        Self { path: path.to_path_buf(), commit, lock: None, wait: LockWait::default() }
    }

    /// How long each append waits for the lock (when not already held).
    pub fn with_wait(mut self, wait: LockWait) -> Self {
        self.wait = wait;
        self
    }

    /// The file's commit as of this appender's last append (or its creation).
    pub fn commit(&self) -> Commit {
        self.commit
    }

    /// Whether this appender holds the write lock between appends.
    pub fn holds_lock(&self) -> bool {
        self.lock.is_some()
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
        let _per_append = match self.lock {
            Some(_) => None,
            None => Some(WriteLock::acquire(&self.path, self.wait)?),
        };
        let path = self.path.clone();
        let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
        let cur = verify_view(&f, &path, &self.commit)?;
        let end = cur.end;
        // bytes after the committed end belong to an interrupted append: drop them
        let written = (|| -> std::io::Result<()> {
            f.set_len(end)?;
            f.seek(SeekFrom::Start(end))?;
            f.write_all(rec)?;
            f.sync_data()
        })();
        if let Err(e) = written {
            // disk full or I/O error: leave no partial record behind (best effort)
            let _ = f.set_len(end).and_then(|_| f.sync_data());
            return Err(io(&path)(e));
        }
        let seq = cur.seq.checked_add(1).ok_or_else(|| err(&path, "commit number overflow (u64::MAX commits); save a snapshot to a new file"))?;
        let next = Commit { seq, end: end + rec.len() as u64, slot: 1 - cur.slot, file: cur.file };
        let at = SLOT_AT[next.slot as usize];
        // the slot may have landed even if this fails: the record stays
        f.seek(SeekFrom::Start(at as u64)).map_err(io(&path))?;
        f.write_all(&slot_bytes(next.seq, next.end)).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        self.commit = next;
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same directory,
/// fsync, rename, fsync of the directory. On error the temp file is removed
/// and `path` is untouched. Takes no lock: writers of index files use
/// [`save`] / [`save_over`], which hold the write lock around this.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    tq_io::write_atomic(path, bytes).map_err(io(path))
}

/// The number the next snapshot of `path` takes: one more than the newest
/// commit a reader could have loaded from the file there, and one more again
/// when a slot is corrupt (it may have held that newer commit); `None`
/// without a readable header.
fn previous_seq(path: &Path) -> Option<u64> {
    let f = File::open(path).ok()?;
    let head = read_head(&f, path).ok()?;
    check_head(&head, path).ok()?;
    let slots = slot_states(&head);
    let valid = slots.iter().filter_map(|s| if let SlotState::Valid { seq, .. } = *s { Some(seq) } else { None }).max().unwrap_or(0);
    let corrupt = slots.iter().any(|s| matches!(s, SlotState::Corrupt { .. }));
    Some(valid.saturating_add(corrupt as u64))
}

/// Saves a snapshot, replacing whatever `path` holds (under the write lock,
/// default wait; see the module docs).
pub fn save(index: &AnyIndex, path: &Path) -> Result<()> {
    save_over(index, path, None, LockWait::default()).map(|_| ())
}

/// Saves a snapshot under the write lock. With `view` (the commit `index`
/// was loaded from, from this path), refuses with [`IndexError::Changed`]
/// if the file changed since, instead of discarding another writer's
/// commits. Returns the commit of the new file.
pub fn save_over(index: &AnyIndex, path: &Path, view: Option<Commit>, wait: LockWait) -> Result<Commit> {
    let _lock = WriteLock::acquire(path, wait)?;
    if let Some(view) = view {
        match File::open(path) {
            Ok(f) => {
                verify_view(&f, path, &view)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexError::Changed { path: path.display().to_string(), loaded: view.seq, now: 0, replaced: true });
            }
            Err(e) => return Err(io(path)(e)),
        }
    }
    // the new file continues the replaced one's numbering, so a commit
    // (seq, end) never repeats for this path: a view loaded before two
    // snapshots of equal size is still refused, even when the file system
    // hands the replaced file's inode number to the new one
    let seq = previous_seq(path).map_or(1, |s| s.saturating_add(1));
    let bytes = snapshot_bytes(index, seq);
    write_atomic(path, &bytes)?;
    let meta = std::fs::metadata(path).map_err(io(path))?;
    Ok(Commit { seq, end: bytes.len() as u64, slot: 0, file: file_id(&meta) })
}

// ---------------------------------------------------------------------------
// Check
// ---------------------------------------------------------------------------

/// One commit slot as found by [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotReport {
    /// 'A' or 'B'.
    pub name: char,
    /// Byte offset in the file.
    pub offset: usize,
    /// Empty, valid or corrupt, with the stored values.
    pub state: SlotState,
}

/// What [`check`] found in a `.tqi` file: what is there and what is recoverable.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The file checked.
    pub path: PathBuf,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// A problem with the fixed header (magic, version, reserved bytes).
    pub header_error: Option<String>,
    /// Slots A and B, in that order.
    pub slots: [SlotReport; 2],
    /// The newest commit held by a valid slot (with a corrupt slot this is
    /// what loading with `recover_previous_commit` uses).
    pub commit: Option<Commit>,
    /// Records up to that commit's end that verified and replayed.
    pub records_verified: usize,
    /// Live vectors in that commit, when it replays completely.
    pub count: Option<usize>,
    /// The first problem in the spec or the committed records.
    pub records_error: Option<String>,
    /// Bytes after the committed end (an interrupted append, or the records
    /// of a commit whose slot is corrupt).
    pub bytes_after_end: u64,
    /// Complete, checksum-valid records right after the committed end.
    pub records_after_end: usize,
    /// Where those records end.
    pub records_after_end_to: u64,
    /// A plain load succeeds.
    pub loads: bool,
    /// The error of a plain load.
    pub load_error: Option<String>,
    /// A slot is corrupt but the newest valid commit is intact (loads with
    /// `recover_previous_commit`).
    pub previous_commit_intact: bool,
}

impl CheckReport {
    /// Whether either commit slot is corrupt.
    pub fn corrupt_slot(&self) -> bool {
        self.slots.iter().any(|s| matches!(s.state, SlotState::Corrupt { .. }))
    }

    /// A short human-readable verdict.
    pub fn verdict(&self) -> String {
        if self.loads {
            let trail = if self.bytes_after_end > 0 {
                format!(" ({} bytes of an uncommitted append after the end are ignored)", self.bytes_after_end)
            } else {
                String::new()
            };
            format!("ok: {} vectors, commit {}{trail}", self.count.unwrap_or(0), self.commit.map_or(0, |c| c.seq))
        } else if self.previous_commit_intact {
            let c = self.commit.expect("intact commit");
            let lost = if self.records_after_end > 0 {
                format!(
                    "{} valid record(s) after its end (bytes {}..{}) are probably the lost commit and would not be loaded",
                    self.records_after_end, c.end, self.records_after_end_to
                )
            } else {
                "no valid records follow its end".to_string()
            };
            format!("corrupt commit slot; the previous commit {} ({} vectors) is intact and loads with recovery; {lost}", c.seq, self.count.unwrap_or(0))
        } else {
            format!("not loadable: {}", self.load_error.as_deref().unwrap_or("unknown error"))
        }
    }
}

/// Examines a `.tqi` file without changing it (no lock taken).
pub fn check(path: &Path) -> Result<CheckReport> {
    let f = File::open(path).map_err(io(path))?;
    let head = read_head(&f, path)?;
    let file_bytes = f.metadata().map_err(io(path))?.len();
    let header_error = check_head(&head, path).err().map(|e| e.to_string());
    let states = if head.len() >= HEAD { slot_states(&head) } else { [SlotState::Empty; 2] };
    let slots = [0, 1].map(|i| SlotReport { name: SLOT_NAME[i], offset: SLOT_AT[i], state: states[i] });
    let load_error = load(path).err().map(|e| e.to_string());
    let mut r = CheckReport {
        path: path.to_path_buf(),
        file_bytes,
        header_error,
        slots,
        commit: None,
        records_verified: 0,
        count: None,
        records_error: None,
        bytes_after_end: 0,
        records_after_end: 0,
        records_after_end_to: 0,
        loads: load_error.is_none(),
        load_error,
        previous_commit_intact: false,
    };
    if r.header_error.is_some() {
        return Ok(r);
    }
    let commit = match choose(states, LoadOptions::recover(), path) {
        Ok(c) => c,
        Err(e) => {
            r.records_error = Some(e.to_string());
            return Ok(r);
        }
    };
    r.commit = Some(commit);
    if commit.end > file_bytes || commit.end < (SPEC_AT + 8) as u64 {
        r.records_error = Some(format!("the commit ends at byte {}, outside the header..file ({file_bytes} bytes)", commit.end));
        return Ok(r);
    }
    // SAFETY: as in `load_with`: read-only, only the committed bytes, which
    // writers never change (nor truncate) while this map lives.
    let map = unsafe { MmapOptions::new().len(commit.end as usize).map(&f) }.map_err(io(path))?;
    match parse(&map, commit.end, path, &mut r.records_verified) {
        Ok(idx) => r.count = Some(idx.len()),
        Err(e) => r.records_error = Some(e.to_string()),
    }
    drop(map);
    r.bytes_after_end = file_bytes - commit.end;
    let mut at = commit.end;
    // a file truncated concurrently just ends the scan
    while let Ok(Some(next)) = record_at(&f, at, file_bytes) {
        r.records_after_end += 1;
        at = next;
    }
    r.records_after_end_to = at;
    r.previous_commit_intact = r.corrupt_slot() && r.count.is_some();
    Ok(r)
}
