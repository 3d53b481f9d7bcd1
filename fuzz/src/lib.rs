//! The checks behind every fuzz target, shared by the libFuzzer binaries
//! (`fuzz_targets/`) and by `tests/corpus.rs`, which replays the committed
//! corpus and the saved reproducers under plain `cargo test`.
//!
//! Each check feeds untrusted bytes to one parser and then uses what it
//! returned the way the tools do (decode, search, write back). A check may
//! reject the input with an error; it must never panic, never take more than
//! a second, and never hold more than [`ALLOC_LIMIT`] bytes at once: the
//! global allocator below aborts the process (a libFuzzer crash) when an
//! allocation would cross it, whatever the sanitizer in use.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most bytes the process may hold at once (1 GiB).
pub const ALLOC_LIMIT: usize = 1 << 30;

struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over_limit(size: usize) -> ! {
    // no allocation here: format the size by hand into a stack buffer
    let mut buf = [0u8; 96];
    let head = b"tq-fuzz: allocation over the 1 GiB limit: ";
    buf[..head.len()].copy_from_slice(head);
    let mut digits = [0u8; 20];
    let (mut n, mut k) = (size, 0);
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        k += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut at = head.len();
    for d in digits[..k].iter().rev() {
        buf[at] = *d;
        at += 1;
    }
    buf[at..at + 7].copy_from_slice(b" bytes\n");
    at += 7;
    use std::io::Write;
    let _ = std::io::stderr().write_all(&buf[..at]);
    std::process::abort()
}

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        if l.size() > ALLOC_LIMIT || live > ALLOC_LIMIT {
            over_limit(l.size());
        }
        // SAFETY: forwarded unchanged
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        if l.size() > ALLOC_LIMIT || live > ALLOC_LIMIT {
            over_limit(l.size());
        }
        // SAFETY: forwarded unchanged
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            let live = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + (new - l.size());
            if new > ALLOC_LIMIT || live > ALLOC_LIMIT {
                over_limit(new);
            }
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// Builds every registered codec once at a small dimension, so that the
/// per-process tables they cache (PolarQuant's angle codebooks take about a
/// second under ASan) are not charged to the first input that names them.
pub fn warm_up() {
    for e in tq_core::registry() {
        for dim in [16] {
            let _ = e.build(dim, 0, tq_core::RotationKind::Hadamard, &[]);
        }
    }
}

/// A fixed query of `dim` values (the "use" half of decode-then-use).
fn query(dim: usize) -> Vec<f32> {
    (0..dim).map(|i| ((i * 7 + 3) % 11) as f32 * 0.25 - 1.25).collect()
}

/// Dimension above which a check does not build a codec that needs a dense
/// `dim × dim` matrix (the Haar rotation, the Gaussian QJL projection of
/// `tq-prod-B`). Their memory is capped by `tq_core::limits::MAX_DENSE_DIM`,
/// but building one is `O(dim³)` (Haar) or `O(dim²)` work that legitimately
/// takes seconds at dims in the thousands: a cost, not a parser bug (see
/// fuzz/README.md), and it would stop every run at the first such header.
pub const DENSE_FUZZ_DIM: usize = 256;

fn needs_dense(codec: &str, rotation_id: u8) -> bool {
    rotation_id == tq_core::RotationKind::Haar.id() || (codec.starts_with("tq-prod-") && !codec.ends_with("-orth"))
}

/// `.tqc`: parse, rebuild the codec it names (with its stored parameters),
/// decode every code, score a fixed query against every code, write back.
pub fn tqc(data: &[u8]) {
    let Ok(f) = tq_data::tqc::parse_tqc(data) else { return };
    assert_eq!(f.codes.len(), f.count * f.code_size, "codes length");
    assert!(f.dim <= tq_core::limits::MAX_DIM);
    // the image written back parses to the same file
    let again = tq_data::tqc::tqc_bytes(&f).expect("a parsed file can be written back");
    assert_eq!(tq_data::tqc::parse_tqc(&again).expect("written-back file parses"), f);
    let entry = tq_core::lookup(&f.codec_name).expect("a parsed codec name is registered");
    if f.dim > DENSE_FUZZ_DIM && needs_dense(&f.codec_name, f.rotation.id()) {
        return;
    }
    let Ok(codec) = entry.build(f.dim, f.seed, f.rotation, &f.params) else { return };
    assert_eq!(codec.code_size(), f.code_size, "code size of the rebuilt codec");
    let mut out = vec![0.0f32; f.count * f.dim];
    if codec.decode_batch(&f.codes, &mut out).is_err() {
        return; // e.g. a codec that needs training and has no parameters
    }
    let q = query(f.dim);
    if let Ok(pq) = codec.prepare(&q) {
        for c in f.codes.chunks_exact(f.code_size) {
            let _ = codec.score_ip(&pq, c);
            let _ = codec.score_l2(&pq, c);
        }
    }
}

fn same_matrix(a: &tq_data::vectors::Matrix, b: &tq_data::vectors::Matrix) -> bool {
    a.rows == b.rows && a.cols == b.cols && a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `.npy`: parse, check the shape, write back as f32 `.npy` and re-parse.
pub fn npy(data: &[u8]) {
    let Ok(m) = tq_data::vectors::parse_npy(data) else { return };
    assert_eq!(m.data.len(), m.rows * m.cols, "npy data length");
    let again = tq_data::vectors::parse_npy(&tq_data::vectors::npy_bytes(&m)).expect("written-back npy parses");
    assert!(same_matrix(&m, &again), "npy round trip");
}

/// `.fvecs`: parse, check the shape.
pub fn fvecs(data: &[u8]) {
    let Ok(m) = tq_data::vectors::parse_fvecs(data) else { return };
    assert_eq!(m.data.len(), m.rows * m.cols, "fvecs data length");
    assert!(m.rows > 0 && m.cols > 0);
}

/// Key calibration file: parse, touch every stream, write back byte for byte.
pub fn kv_calib(data: &[u8]) {
    let Ok(c) = tq_kv::KeyCalibration::from_bytes(data) else { return };
    let (n, d) = (c.shape.layers * c.shape.kv_heads, c.shape.head_dim);
    for i in 0..n {
        assert_eq!(c.mu(i).len(), d);
        assert_eq!(c.t(i).len(), d * d);
        assert_eq!(c.t_inv(i).len(), d * d);
    }
    assert_eq!(c.to_bytes(), data, "calibration file round trip");
}

/// `.tqi`: parse the image, search it with a fixed query (default and exact
/// scoring), write a snapshot and parse that back.
pub fn tqi(data: &[u8]) {
    let path = std::path::Path::new("fuzz-input.tqi");
    if tqi_spec_is_dense(data) {
        return;
    }
    let Ok((index, _commit)) = tq_index::file::from_bytes(data, path) else { return };
    let dim = index.spec().dim;
    let q = query(dim);
    for exact in [false, true] {
        let p = tq_index::SearchParams { exact, ..Default::default() };
        if let Ok(hits) = index.search(&q, 5, &p) {
            assert!(hits.len() <= 5.min(index.len()), "more hits than asked for or stored");
        }
    }
    let snap = tq_index::file::to_bytes(&index);
    let (again, _) = tq_index::file::from_bytes(&snap, path).expect("a snapshot of a loaded index loads");
    assert_eq!(again.len(), index.len());
    assert_eq!(again.spec(), index.spec());
}

/// Whether a `.tqi` image's spec names a dense codec above [`DENSE_FUZZ_DIM`]
/// (spec at byte 68: kind u8, name u16 + bytes, dim u32, seed u64, rotation u8).
fn tqi_spec_is_dense(b: &[u8]) -> bool {
    let Some(nlen) = le_u16(b, 69) else { return false };
    let Some(name) = b.get(71..71 + nlen) else { return false };
    let (Some(dim), Some(&rot)) = (le_u32(b, 71 + nlen), b.get(71 + nlen + 12)) else { return false };
    dim > DENSE_FUZZ_DIM && needs_dense(&String::from_utf8_lossy(name), rot)
}

// ---- checksum repair ------------------------------------------------------
//
// Every format here carries CRC-32s, so almost every mutated input would stop
// at a checksum mismatch and the fuzzer would never reach the code behind it.
// Each target therefore runs its check twice: on the bytes as given (the
// checksum paths), and on a copy whose checksums were recomputed where the
// format puts them (everything after). Neither library is changed for this.

fn le_u16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}
fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn put_crc(b: &mut [u8], over: std::ops::Range<usize>, at: usize) -> Option<()> {
    let c = tq_io_crc(b.get(over)?);
    b.get_mut(at..at + 4)?.copy_from_slice(&c.to_le_bytes());
    Some(())
}
/// CRC-32 (IEEE), the one all three formats use.
pub fn tq_io_crc(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// `.tqc` with its header and codes checksums recomputed (None if too short to place them).
pub fn repair_tqc(data: &[u8]) -> Option<Vec<u8>> {
    let mut b = data.to_vec();
    // magic 8, version 4, id 2, rot 1, res 1, dim 4, count 8, seed 8, code_size 4 = 40
    let name_len = le_u16(&b, 40)?;
    let params_len = le_u32(&b, 42 + name_len)?;
    let header_end = 46usize.checked_add(name_len)?.checked_add(params_len)?;
    put_crc(&mut b, 0..header_end, header_end)?;
    let codes_at = header_end + 4;
    if b.len() >= codes_at + 4 {
        let end = b.len() - 4;
        put_crc(&mut b, codes_at..end, end)?;
    }
    Some(b)
}

/// Key calibration file with its trailing checksum recomputed.
pub fn repair_kv_calib(data: &[u8]) -> Option<Vec<u8>> {
    let mut b = data.to_vec();
    let end = b.len().checked_sub(4)?;
    put_crc(&mut b, 0..end, end)?;
    Some(b)
}

/// `.tqi` with both commit slots, the spec and every record header-to-end
/// checksummed again (records are walked while their lengths fit).
pub fn repair_tqi(data: &[u8]) -> Option<Vec<u8>> {
    let mut b = data.to_vec();
    for slot in [16usize, 40] {
        put_crc(&mut b, slot..slot + 16, slot + 16)?;
    }
    let spec_len = le_u32(&b, 64)?;
    let spec_end = 68usize.checked_add(spec_len)?;
    put_crc(&mut b, 68..spec_end, spec_end)?;
    let mut at = spec_end + 4;
    while let Some(len) = le_u64(&b, at + 4) {
        let start = at + 16;
        let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)).filter(|&e| e <= b.len()) else { break };
        put_crc(&mut b, start..end, at + 12)?;
        at = end;
    }
    Some(b)
}

/// Runs `check` on `data` and on its checksum-repaired copy.
pub fn both(data: &[u8], repair: fn(&[u8]) -> Option<Vec<u8>>, check: fn(&[u8])) {
    check(data);
    if let Some(r) = repair(data) {
        if r != data {
            check(&r);
        }
    }
}

/// The entry point of each target (what the libFuzzer binaries call).
pub mod target {
    pub fn tqc(d: &[u8]) {
        super::both(d, super::repair_tqc, super::tqc)
    }
    pub fn npy(d: &[u8]) {
        super::npy(d)
    }
    pub fn fvecs(d: &[u8]) {
        super::fvecs(d)
    }
    pub fn kv_calib(d: &[u8]) {
        super::both(d, super::repair_kv_calib, super::kv_calib)
    }
    pub fn tqi(d: &[u8]) {
        super::both(d, super::repair_tqi, super::tqi)
    }
    /// Target names, in the order the script runs them.
    pub const ALL: [(&str, fn(&[u8])); 5] = [("tqc", tqc), ("npy", npy), ("fvecs", fvecs), ("kv_calib", kv_calib), ("tqi", tqi)];
}
