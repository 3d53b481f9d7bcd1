//! Hostile or damaged files: corrupt commit slots (no silent rollback),
//! crafted headers with absurd sizes (refused before allocating), and
//! request sizes (k) that must not size allocations.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use tq_core::RotationKind;
use tq_index::file::{self, AnyIndex, Appender, LoadOptions, LockWait, SlotState};
use tq_index::{FlatIndex, IndexError, IndexSpec, IvfIndex, Metric, RawVectors, SearchParams};

use crate::data;

fn flat(n: u64, dim: usize) -> AnyIndex {
    let mut f = FlatIndex::new(IndexSpec::new("tq-mse-4", dim, Metric::Ip)).unwrap();
    f.add(&(0..n).collect::<Vec<u64>>(), &data(n as usize, dim, 3)).unwrap();
    AnyIndex::Flat(f)
}

fn ids_of(a: &AnyIndex) -> BTreeSet<u64> {
    a.ids().into_iter().collect()
}

fn slot_b_flipped(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    b[40 + 9] ^= 1 << 2; // slot B's `end`
    std::fs::write(path, &b).unwrap();
}

/// One flipped bit in the active slot: load names the slot instead of
/// rolling back; recovery loads the previous commit; `check` says so; no
/// writer overwrites the record of the lost commit.
#[test]
fn corrupt_active_slot_is_an_error_not_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.tqi");
    file::save(&flat(10, 16), &path).unwrap();
    let (mut idx, mut app) = file::open_for_write(&path, LockWait::default()).unwrap();
    let first_end = app.commit().end;
    app.append_add(&idx.add(&[100], &data(1, 16, 100)).unwrap()).unwrap();
    assert_eq!(app.commit().slot, 1);
    drop(app);
    slot_b_flipped(&path);
    let damaged = std::fs::read(&path).unwrap();

    let e = file::load(&path).err().unwrap();
    assert!(matches!(e, IndexError::CorruptSlot { slot: 'B', offset: 40, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("slot B") && msg.contains("byte 40") && !msg.contains('\n'), "{msg}");

    let (old, commit) = file::load_with(&path, LoadOptions::recover()).unwrap();
    assert_eq!((commit.seq, commit.end, commit.slot), (1, first_end, 0));
    assert_eq!(ids_of(&old), (0..10).collect());

    let r = file::check(&path).unwrap();
    assert!(!r.loads && r.load_error.as_deref().is_some_and(|m| m.contains("slot B")), "{r:?}");
    assert!(matches!(r.slots[0].state, SlotState::Valid { seq: 1, end } if end == first_end), "{r:?}");
    assert!(matches!(r.slots[1].state, SlotState::Corrupt { seq: 2, .. }), "{r:?}");
    assert_eq!((r.slots[1].name, r.slots[1].offset), ('B', 40));
    assert_eq!(r.commit.map(|c| (c.seq, c.end)), Some((1, first_end)));
    assert_eq!((r.records_verified, r.count), (1, Some(10)));
    assert_eq!(r.bytes_after_end, damaged.len() as u64 - first_end);
    assert_eq!((r.records_after_end, r.records_after_end_to), (1, damaged.len() as u64));
    assert!(r.previous_commit_intact && r.corrupt_slot());
    assert!(r.verdict().contains("previous commit 1"), "{}", r.verdict());

    // no writer truncates the record of the lost commit
    let e = file::open_for_write(&path, LockWait::default()).err().unwrap();
    assert!(matches!(e, IndexError::CorruptSlot { slot: 'B', .. }), "{e}");
    let e = file::open_for_write_with(&path, LockWait::default(), LoadOptions::recover()).err().unwrap();
    assert!(matches!(e, IndexError::CorruptSlot { .. }) && e.to_string().contains("refusing to overwrite"), "{e}");
    let mut old2 = file::load_with(&path, LoadOptions::recover()).unwrap().0;
    let e = Appender::new(&path, commit).append_add(&old2.add(&[5000], &data(1, 16, 1)).unwrap()).unwrap_err();
    assert!(matches!(e, IndexError::CorruptSlot { .. }), "{e}");
    let e = file::save_over(&old, &path, Some(commit), LockWait::default()).unwrap_err();
    assert!(matches!(e, IndexError::CorruptSlot { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "a refused writer changed the file");

    // with nothing after the committed end, a recovering writer repairs the slot
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(first_end).unwrap();
    let (mut idx, mut app) = file::open_for_write_with(&path, LockWait::default(), LoadOptions::recover()).unwrap();
    app.append_add(&idx.add(&[101], &data(1, 16, 101)).unwrap()).unwrap();
    drop(app);
    let (fixed, c) = file::load(&path).unwrap();
    assert_eq!(c.seq, 2);
    assert!(fixed.contains(101) && !fixed.contains(100));
    assert!(file::check(&path).unwrap().loads);
}

/// Flips anywhere in either slot are corrupt-slot errors (whichever slot
/// was active); in-memory parsing behaves as loading.
#[test]
fn any_slot_flip_is_reported_by_from_bytes() {
    let mem = flat(5, 16);
    let good = file::to_bytes(&mem);
    let path = Path::new("x.tqi");
    for at in 16..64 {
        let mut b = good.clone();
        b[at] ^= 0x10;
        let e = file::from_bytes(&b, path).err().unwrap_or_else(|| panic!("flip at {at} undetected"));
        let want = if at < 40 { 'A' } else { 'B' };
        assert!(matches!(e, IndexError::CorruptSlot { slot, .. } if slot == want), "{at}: {e}");
        // recovery: slot B is unused in a snapshot, so a flip there recovers everything
        let r = file::from_bytes_with(&b, path, LoadOptions::recover());
        assert_eq!(r.is_ok(), at >= 40, "{at}");
    }
}

struct Craft {
    kind: u8,
    dim: u32,
    nlist: u32,
    params_len: Option<u32>,
    spec_len: Option<u32>,
    records: Vec<(u32, Vec<u8>, Option<u64>)>,
}

impl Craft {
    fn flat(dim: u32) -> Self {
        Self { kind: 0, dim, nlist: 0, params_len: None, spec_len: None, records: Vec::new() }
    }
    /// A file with valid checksums everywhere (slot A committing all of it).
    fn bytes(&self) -> Vec<u8> {
        let mut s = vec![self.kind];
        let codec = b"tq-mse-4";
        s.extend_from_slice(&(codec.len() as u16).to_le_bytes());
        s.extend_from_slice(codec);
        s.extend_from_slice(&self.dim.to_le_bytes());
        s.extend_from_slice(&0u64.to_le_bytes());
        s.extend_from_slice(&[RotationKind::Hadamard.id(), Metric::Ip.id(), RawVectors::None.id()]);
        s.extend_from_slice(&self.params_len.unwrap_or(0).to_le_bytes());
        s.extend_from_slice(&self.nlist.to_le_bytes());
        let mut b = b"TQINDEX\0".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[self.kind, 0, 0, 0]);
        b.extend_from_slice(&[0; 48]);
        b.extend_from_slice(&self.spec_len.unwrap_or(s.len() as u32).to_le_bytes());
        b.extend_from_slice(&s);
        b.extend_from_slice(&crc32fast::hash(&s).to_le_bytes());
        for (tag, p, len) in &self.records {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&len.unwrap_or(p.len() as u64).to_le_bytes());
            b.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            b.extend_from_slice(p);
        }
        let end = b.len() as u64;
        let mut slot = [0u8; 16];
        slot[..8].copy_from_slice(&1u64.to_le_bytes());
        slot[8..].copy_from_slice(&end.to_le_bytes());
        b[16..32].copy_from_slice(&slot);
        b[32..36].copy_from_slice(&crc32fast::hash(&slot).to_le_bytes());
        b
    }
}

/// Crafted files, each with valid checksums and one absurd size field, and
/// the field each must be refused by.
fn crafted() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let count = |n: u64| n.to_le_bytes().to_vec();
    let mut huge_count = count(1 << 60);
    huge_count.extend_from_slice(&[0; 12]);
    vec![
        ("huge dim", "dim", Craft { records: vec![(1, count(0), None)], ..Craft::flat(1 << 30) }.bytes()),
        ("huge ADD count", "ADD count", Craft { records: vec![(1, huge_count, None)], ..Craft::flat(16) }.bytes()),
        ("huge REMOVE count", "REMOVE count", Craft { records: vec![(2, count(u64::MAX), None)], ..Craft::flat(16) }.bytes()),
        ("huge record length", "record length", Craft { records: vec![(1, count(0), Some(u64::MAX))], ..Craft::flat(16) }.bytes()),
        ("huge nlist", "nlist", Craft { kind: 1, nlist: u32::MAX, records: vec![(3, vec![0; 64], None)], ..Craft::flat(16) }.bytes()),
        (
            "nlist past the file",
            "nlist × dim centroid bytes",
            Craft { kind: 1, nlist: 1 << 20, records: vec![(3, vec![0; 64], None)], ..Craft::flat(16) }.bytes(),
        ),
        ("huge spec length", "spec length", Craft { spec_len: Some(u32::MAX), ..Craft::flat(16) }.bytes()),
        ("huge codec params length", "codec params length", Craft { params_len: Some(u32::MAX), ..Craft::flat(16) }.bytes()),
    ]
}

fn assert_refused(what: &str, field: &str, e: IndexError) {
    let msg = e.to_string();
    assert!(matches!(&e, IndexError::TooLarge { field: f, .. } if *f == field), "{what}: {msg}");
    assert!(msg.contains(field) && !msg.contains('\n'), "{what}: {msg}");
}

#[test]
fn crafted_absurd_sizes_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, field, b)) in crafted().into_iter().enumerate() {
        assert!(b.len() < 300, "{what}: {} bytes", b.len());
        assert_refused(what, field, file::from_bytes(&b, Path::new("c.tqi")).err().unwrap());
        let p = dir.path().join(format!("{i}.tqi"));
        std::fs::write(&p, &b).unwrap();
        assert_refused(what, field, file::load(&p).err().unwrap());
        let r = file::check(&p).unwrap();
        assert!(!r.loads && r.records_error.is_some_and(|m| m.contains(field)), "{what}");
    }
}

/// Child of `crafted_files_load_in_little_memory`: loads every crafted file
/// (all refused) and fails if the peak resident memory passed 100 MB.
#[test]
#[ignore = "child process of crafted_files_load_in_little_memory"]
fn crafted_rss_child() {
    let dir = std::env::var("TQI_CRAFT_DIR").expect("run by the parent test");
    for (i, (what, _, _)) in crafted().into_iter().enumerate() {
        assert!(file::load(&Path::new(&dir).join(format!("{i}.tqi"))).is_err(), "{what}");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    println!("peak rss {kb} kB");
    assert!(kb < 100_000, "peak RSS {kb} kB");
}

#[test]
fn crafted_files_load_in_little_memory() {
    let _alone = crate::processes_alone();
    if !Path::new("/proc/self/status").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (_, _, b)) in crafted().into_iter().enumerate() {
        std::fs::write(dir.path().join(format!("{i}.tqi")), &b).unwrap();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hostile::crafted_rss_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TQI_CRAFT_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A huge k returns every live vector, allocating nothing by k (flat,
/// fast-scan with rerank, raw re-rank, IVF).
#[test]
fn huge_k_is_clamped_to_the_live_vectors() {
    let dim = 16;
    let xs = data(60, dim, 8);
    let ids: Vec<u64> = (0..60).collect();
    let mut f = FlatIndex::new(IndexSpec { raw: RawVectors::F16, ..IndexSpec::new("tq-mse-4", dim, Metric::Ip) }).unwrap();
    f.add(&ids, &xs).unwrap();
    let mut ivf = IvfIndex::train(IndexSpec::new("tq-mse-4", dim, Metric::L2), 4, &xs, 4).unwrap();
    ivf.add(&ids, &xs).unwrap();
    let q = &xs[..dim];
    for k in [1_000_000_000, usize::MAX] {
        for (exact, raw_rerank) in [(false, false), (true, false), (false, true)] {
            let p = SearchParams { exact, raw_rerank, rerank: 1000, nprobe: 4, ..Default::default() };
            assert_eq!(f.search(q, k, &p).unwrap().len(), 60);
            assert_eq!(ivf.search(q, k, &p).unwrap().len(), 60);
            assert_eq!(f.search_batch(&xs[..2 * dim], k, &p).unwrap()[1].len(), 60);
        }
    }
    let empty = FlatIndex::new(IndexSpec::new("tq-mse-4", dim, Metric::Ip)).unwrap();
    assert!(empty.search(q, usize::MAX, &SearchParams::default()).unwrap().is_empty());
}

/// A repeated id in one request is reported as repeated, not as unknown or
/// already present; nothing changes.
#[test]
fn repeated_ids_are_reported_as_repeated() {
    let xs = data(20, 16, 2);
    let ids: Vec<u64> = (0..20).collect();
    let mut f = FlatIndex::new(IndexSpec::new("tq-mse-4", 16, Metric::Ip)).unwrap();
    f.add(&ids, &xs).unwrap();
    let mut ivf = IvfIndex::train(IndexSpec::new("tq-mse-4", 16, Metric::Ip), 3, &xs, 3).unwrap();
    ivf.add(&ids, &xs).unwrap();
    let mut all = [AnyIndex::Flat(f), AnyIndex::Ivf(ivf)];
    for idx in &mut all {
        let e = idx.remove(&[3, 4, 3]).unwrap_err();
        assert!(matches!(e, IndexError::RepeatedId(3)), "{e}");
        assert!(e.to_string().contains("more than once"), "{e}");
        assert!(matches!(idx.remove(&[99]).unwrap_err(), IndexError::UnknownId(99)));
        assert!(matches!(idx.add(&[50, 50], &data(2, 16, 5)).unwrap_err(), IndexError::RepeatedId(50)));
        assert!(matches!(idx.add(&[7], &data(1, 16, 5)).unwrap_err(), IndexError::DuplicateId(7)));
        assert_eq!(idx.len(), 20);
    }
}

/// Found by fuzzing: a file that ends 0–3 bytes after the spec length field
/// (so the spec's checksum would lie past the end) is a clean error, not an
/// out-of-bounds panic, on every path that reads it.
#[test]
fn a_spec_checksum_past_the_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let found: [&[u8]; 2] = [
        include_bytes!("../../../../fuzz/regressions/tqi/spec-checksum-past-the-end-68b"),
        include_bytes!("../../../../fuzz/regressions/tqi/spec-checksum-past-the-end-69b"),
    ];
    for (i, b) in found.into_iter().enumerate() {
        for opts in [LoadOptions::default(), LoadOptions { recover_previous_commit: true }] {
            assert!(file::from_bytes_with(b, Path::new("t.tqi"), opts).is_err(), "input {i}");
        }
        let p = dir.path().join(format!("{i}.tqi"));
        std::fs::write(&p, b).unwrap();
        assert!(file::load(&p).is_err());
        assert!(!file::check(&p).unwrap().loads);
    }
}
