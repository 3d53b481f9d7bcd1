//! Several writers on one `.tqi` file: the write lock, the stale-view check,
//! killed writers, lock timeouts and a failed (disk-full) append. Child
//! processes re-execute this test binary (`--exact … --ignored`) with an
//! environment variable naming the file, as in `durability.rs`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tq_core::rng::Xoshiro256;
use tq_index::file::{self, AnyIndex, Appender, LockWait};
use tq_index::{FlatIndex, IndexError, IndexSpec, Metric};

use crate::data;

const DIM: usize = 16;
/// Ids of the index every scenario starts from.
const BASE: u64 = 10;
/// Generous: a test machine may be slow, and a timeout would fail the test.
const WAIT: LockWait = LockWait { timeout: Duration::from_secs(60) };

fn base_index() -> AnyIndex {
    let mut f = FlatIndex::new(IndexSpec::new("tq-mse-4", DIM, Metric::Ip)).unwrap();
    f.add(&(0..BASE).collect::<Vec<u64>>(), &data(BASE as usize, DIM, 1)).unwrap();
    AnyIndex::Flat(f)
}

fn ids_of(a: &AnyIndex) -> BTreeSet<u64> {
    a.ids().into_iter().collect()
}

fn child(test: &str, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Writes `line` to stdout at once (the parent reads it even if this process is killed next).
fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Child of the two-writer tests: `TQI_W_OPS` adds and removes on
/// `TQI_W_PATH`, by every writer path (locked read-modify-commit, a plain
/// `Appender` on an unlocked load, a snapshot `save_over`), retrying when
/// the file changed since it was loaded. Prints `a ID` / `r ID` before a
/// write and `A ID` / `R ID` once it is committed (acknowledged).
#[test]
#[ignore = "child process of the two-writer tests"]
fn writer_child() {
    let path = std::env::var("TQI_W_PATH").expect("run by the parent test");
    let path = Path::new(&path);
    let me: u64 = std::env::var("TQI_W_ID").unwrap().parse().unwrap();
    let ops: u64 = std::env::var("TQI_W_OPS").unwrap().parse().unwrap();
    let mut rng = Xoshiro256::new(std::env::var("TQI_W_SEED").unwrap().parse().unwrap());
    let mut mine: Vec<u64> = Vec::new();
    let mut retries = 0;
    for op in 0..ops {
        let remove = !mine.is_empty() && rng.below(3) == 0;
        let id = if remove { mine.swap_remove(rng.below(mine.len() as u64) as usize) } else { (me + 1) * 1_000_000 + op };
        let (tag, ack) = if remove { ("r", "R") } else { ("a", "A") };
        say(format!("{tag} {id}"));
        let x = data(1, DIM, id);
        let how = rng.below(4);
        loop {
            let res = (|| -> tq_index::Result<()> {
                match how {
                    // the CLI's way: load and commit under one lock
                    0 | 1 => {
                        let (mut idx, mut app) = file::open_for_write(path, WAIT)?;
                        if remove {
                            app.append_remove(&idx.remove(&[id])?)
                        } else {
                            app.append_add(&idx.add(&[id], &x)?)
                        }
                    }
                    // a load, then an append that takes the lock only to commit
                    2 => {
                        let (mut idx, commit) = file::load(path)?;
                        let mut app = Appender::new(path, commit).with_wait(WAIT);
                        if remove {
                            app.append_remove(&idx.remove(&[id])?)
                        } else {
                            app.append_add(&idx.add(&[id], &x)?)
                        }
                    }
                    // Python's way: a load, then a snapshot save over the same file
                    _ => {
                        let (mut idx, commit) = file::load(path)?;
                        if remove {
                            idx.remove(&[id])?;
                        } else {
                            idx.add(&[id], &x)?;
                        }
                        file::save_over(&idx, path, Some(commit), WAIT).map(|_| ())
                    }
                }
            })();
            match res {
                Ok(()) => break,
                Err(IndexError::Changed { .. }) => retries += 1,
                Err(e) => panic!("writer {me}, op {op}: {e}"),
            }
            std::thread::sleep(Duration::from_micros(rng.below(500)));
        }
        say(format!("{ack} {id}"));
        if !remove {
            mine.push(id);
        }
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
    eprintln!("writer {me}: {retries} retries after a concurrent commit");
}

#[derive(Default)]
struct Log {
    /// Acknowledged adds and removes, and writes begun but not acknowledged.
    added: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    pending: BTreeSet<u64>,
}

fn parse_log(out: &str) -> Log {
    let mut log = Log::default();
    for line in out.lines() {
        // the last two words (the first line follows libtest's "test … ... ")
        let mut w = line.split_whitespace().rev();
        let (Some(id), Some(t)) = (w.next(), w.next()) else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        match t {
            "a" | "r" => {
                log.pending.insert(id);
            }
            "A" => {
                log.pending.remove(&id);
                log.added.insert(id);
            }
            "R" => {
                log.pending.remove(&id);
                log.removed.insert(id);
            }
            _ => {}
        }
    }
    log
}

fn spawn_writer(path: &Path, me: u64, ops: u64, seed: u64) -> Child {
    child(
        "writers::writer_child",
        &[("TQI_W_PATH", path.display().to_string()), ("TQI_W_ID", me.to_string()), ("TQI_W_OPS", ops.to_string()), ("TQI_W_SEED", seed.to_string())],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Exit status, stdout, and the writer's retry note from stderr.
fn finish(mut c: Child) -> (bool, String) {
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    if let Some(l) = err.lines().find(|l| l.contains("retries")) {
        eprintln!("{l}");
    }
    (c.wait().unwrap().success(), out)
}

/// Two processes, 100 adds/removes each with random interleavings, by every
/// writer path: every acknowledged write is in the file, nothing else is.
#[test]
fn two_writers_lose_no_acknowledged_write() {
    let _alone = crate::processes_alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.tqi");
    file::save(&base_index(), &path).unwrap();
    let ws = [spawn_writer(&path, 0, 100, 11), spawn_writer(&path, 1, 100, 12)];
    let mut expect: BTreeSet<u64> = (0..BASE).collect();
    let mut acked = 0;
    for w in ws {
        let (ok, out) = finish(w);
        assert!(ok, "a writer failed:\n{out}");
        let log = parse_log(&out);
        assert!(log.pending.is_empty(), "a writer stopped mid-write");
        acked += log.added.len() + log.removed.len();
        expect.extend(log.added.difference(&log.removed));
    }
    assert_eq!(acked, 200);
    let (idx, commit) = file::load(&path).unwrap();
    assert_eq!(ids_of(&idx), expect);
    assert_eq!(idx.len(), expect.len());
    assert!(commit.seq >= 1);
    let report = file::check(&path).unwrap();
    assert!(report.loads && report.count == Some(expect.len()), "{report:?}");
}

/// Two writers, one killed at a random point, many times: the file always
/// loads (a committed state), every acknowledged write is there.
#[test]
fn killed_writer_loses_no_acknowledged_write() {
    let _alone = crate::processes_alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.tqi");
    let mut rng = Xoshiro256::new(5);
    let mut victims_acked = Vec::new();
    for round in 0..12u64 {
        file::save(&base_index(), &path).unwrap();
        let mut ws = vec![spawn_writer(&path, 0, 30, 100 + round), spawn_writer(&path, 1, 30, 200 + round)];
        std::thread::sleep(Duration::from_millis(8 + rng.below(80)));
        let victim = rng.below(2) as usize;
        let _ = ws[victim].kill();
        let mut expect: BTreeSet<u64> = (0..BASE).collect();
        let mut maybe = BTreeSet::new();
        for (i, w) in ws.into_iter().enumerate() {
            let (ok, out) = finish(w);
            assert!(ok || i == victim, "round {round}: the surviving writer failed:\n{out}");
            let log = parse_log(&out);
            if i == victim {
                victims_acked.push(log.added.len() + log.removed.len());
            }
            expect.extend(log.added.difference(&log.removed));
            for id in &log.removed {
                expect.remove(id);
            }
            maybe.extend(log.pending);
        }
        let (idx, _) = file::load(&path).unwrap_or_else(|e| panic!("round {round}: load after a kill failed: {e}"));
        let got = ids_of(&idx);
        // an unacknowledged write of the killed writer may or may not have committed
        let got_sure: BTreeSet<u64> = got.difference(&maybe).copied().collect();
        let expect_sure: BTreeSet<u64> = expect.difference(&maybe).copied().collect();
        assert_eq!(got_sure, expect_sure, "round {round}: acknowledged writes lost or unknown ids present");
        // the next writer appends after whatever the kill left
        let (mut idx, mut app) = file::open_for_write(&path, WAIT).unwrap();
        app.append_add(&idx.add(&[7_000_000], &data(1, DIM, 7)).unwrap()).unwrap();
        drop(app);
        assert!(file::load(&path).unwrap().0.contains(7_000_000));
    }
    eprintln!("writes acknowledged by the killed writer before its kill (of 30): {victims_acked:?}");
}

/// Two snapshots of equal size (one remove, one add) bring the file back to
/// the same size: a view loaded before them is still refused, by the commit
/// number alone (the new file may reuse the old inode number, as ext4 does),
/// and every snapshot continues the numbering of the file it replaces.
#[test]
fn equal_size_snapshots_do_not_revive_a_stale_view() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aba.tqi");
    let first = file::save_over(&base_index(), &path, None, WAIT).unwrap();
    assert_eq!(first.seq, 1);
    let (stale, view) = file::load(&path).unwrap();
    let mut stale2 = file::load(&path).unwrap().0;
    // what a reused inode number would make the identity check see
    let view = file::Commit { file: None, ..view };
    let (mut idx, c) = file::load(&path).unwrap();
    idx.remove(&[3]).unwrap();
    let c = file::save_over(&idx, &path, Some(c), WAIT).unwrap();
    assert_eq!(c.seq, 2);
    idx.add(&[99], &data(1, DIM, 99)).unwrap();
    let c = file::save_over(&idx, &path, Some(c), WAIT).unwrap();
    assert_eq!((c.seq, c.end), (3, view.end), "the two snapshots were meant to restore the size");
    let e = file::save_over(&stale, &path, Some(view), WAIT).unwrap_err();
    assert!(matches!(e, IndexError::Changed { loaded: 1, now: 3, .. }), "{e}");
    let e = Appender::new(&path, view).with_wait(WAIT).append_add(&stale2.add(&[500], &data(1, DIM, 5)).unwrap()).unwrap_err();
    assert!(matches!(e, IndexError::Changed { .. }), "{e}");
    let (now, c2) = file::load(&path).unwrap();
    assert_eq!(ids_of(&now), ids_of(&idx));
    assert_eq!(c2.seq, 3);
    // an append continues from there, and a plain save over it too
    let (mut w, mut app) = file::open_for_write(&path, WAIT).unwrap();
    app.append_add(&w.add(&[100], &data(1, DIM, 100)).unwrap()).unwrap();
    assert_eq!(app.commit().seq, 4);
    drop(app);
    file::save(&w, &path).unwrap();
    assert_eq!(file::load(&path).unwrap().1.seq, 5);
}

/// A writer whose view is stale is refused and writes nothing; a locked
/// read-modify-commit is never stale.
#[test]
fn stale_views_are_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.tqi");
    file::save(&base_index(), &path).unwrap();
    let (mut a, ca) = file::load(&path).unwrap();
    let (mut b, cb) = file::load(&path).unwrap();
    Appender::new(&path, ca).append_add(&a.add(&[100], &data(1, DIM, 100)).unwrap()).unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = Appender::new(&path, cb).append_add(&b.add(&[200], &data(1, DIM, 200)).unwrap()).unwrap_err();
    assert!(matches!(e, IndexError::Changed { loaded: 1, now: 2, replaced: false, .. }), "{e}");
    assert!(e.to_string().contains("index file changed since it was loaded: commit 1 -> 2; reload and retry"), "{e}");
    let e = file::save_over(&b, &path, Some(cb), WAIT).unwrap_err();
    assert!(matches!(e, IndexError::Changed { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "a refused writer changed the file");
    // a save replaces the file by one of the same length: its commit number
    // is one more (the inode may or may not differ), so it is noticed
    file::save(&base_index(), &path).unwrap();
    let (_, cc) = file::load(&path).unwrap();
    let mut other = base_index();
    other.remove(&[0]).unwrap();
    other.add(&[0], &data(1, DIM, 55)).unwrap();
    file::save(&other, &path).unwrap();
    let now = file::load(&path).unwrap().1;
    assert_eq!((now.seq, now.end), (cc.seq + 1, cc.end));
    let e = Appender::new(&path, cc).append_remove(&[0u8; 8]).unwrap_err();
    assert!(matches!(e, IndexError::Changed { .. }), "{e}");
    // save_over with a fresh view succeeds and returns the new commit
    let (mut d, cd) = file::load(&path).unwrap();
    d.add(&[300], &data(1, DIM, 3)).unwrap();
    let cn = file::save_over(&d, &path, Some(cd), WAIT).unwrap();
    let mut app = Appender::new(&path, cn);
    app.append_remove(&d.remove(&[300]).unwrap()).unwrap();
    assert_eq!(ids_of(&file::load(&path).unwrap().0), ids_of(&d));
}

/// Child of `lock_timeout_names_the_holder`: holds the write lock until killed.
#[test]
#[ignore = "child process of lock_timeout_names_the_holder"]
fn lock_holder_child() {
    let path = std::env::var("TQI_W_PATH").expect("run by the parent test");
    let _held = file::open_for_write(Path::new(&path), LockWait::default()).unwrap();
    say("LOCK-HELD".into());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn lock_timeout_names_the_holder() {
    let _alone = crate::processes_alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.tqi");
    file::save(&base_index(), &path).unwrap();
    let mut c =
        child("writers::lock_holder_child", &[("TQI_W_PATH", path.display().to_string())]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    while !line.contains("LOCK-HELD") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the lock holder exited");
    }
    let pid = c.id();
    let lock = file::lock_path(&path);
    let short = LockWait::new(Duration::from_millis(50));
    let before = std::fs::read(&path).unwrap();
    let errs = [
        file::open_for_write(&path, short).err().unwrap(),
        file::save_over(&base_index(), &path, None, short).unwrap_err(),
        Appender::new(&path, file::load(&path).unwrap().1).with_wait(LockWait::no_wait()).append_remove(&[0; 8]).unwrap_err(),
    ];
    for e in errs {
        match &e {
            IndexError::LockTimeout { lock: l, holder_pid, .. } => {
                assert_eq!(*holder_pid, Some(pid));
                assert_eq!(Path::new(l), lock);
            }
            _ => panic!("expected a lock timeout, got {e}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&format!("pid {pid}")) && msg.contains("l.tqi.lock"), "{msg}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // a dead holder's lock is gone at once
    c.kill().unwrap();
    c.wait().unwrap();
    let (mut idx, mut app) = file::open_for_write(&path, LockWait::no_wait()).unwrap();
    app.append_add(&idx.add(&[42], &data(1, DIM, 42)).unwrap()).unwrap();
    drop(app);
    assert!(lock.exists(), "the lock file stays");
    // in one process too (each open of the lock file is its own lock)
    let held = file::open_for_write(&path, LockWait::no_wait()).unwrap();
    let e = file::open_for_write(&path, LockWait::no_wait()).err().unwrap();
    assert!(matches!(e, IndexError::LockTimeout { holder_pid: Some(p), .. } if p == std::process::id()), "{e}");
    drop(held);
    assert!(file::open_for_write(&path, LockWait::no_wait()).is_ok());
}

/// Child of `failed_append_leaves_no_partial_record`: runs with a file-size
/// limit (`ulimit -f`, SIGXFSZ ignored) so a large append fails part-way.
#[test]
#[ignore = "child process of failed_append_leaves_no_partial_record"]
fn disk_full_child() {
    let path = std::env::var("TQI_W_PATH").expect("run by the parent test");
    let path = Path::new(&path);
    let (mut idx, mut app) = file::open_for_write(path, LockWait::default()).unwrap();
    let end = app.commit().end;
    let n = 20_000;
    let ids: Vec<u64> = (1000..1000 + n as u64).collect();
    let payload = idx.add(&ids, &data(n, DIM, 9)).unwrap();
    assert!(payload.len() > 128 * 1024);
    let e = app.append_add(&payload).unwrap_err();
    assert!(matches!(e, IndexError::Io { .. }), "{e}");
    assert_eq!(std::fs::metadata(path).unwrap().len(), end, "a partial record was left after a failed append");
    assert_eq!(app.commit().end, end);
    say("refused".into());
}

#[test]
fn failed_append_leaves_no_partial_record() {
    let _alone = crate::processes_alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.tqi");
    file::save(&base_index(), &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(before.len() < 16 * 1024);
    let exe = std::env::current_exe().unwrap();
    // 64 blocks: 32 KiB (512-byte blocks) or 64 KiB (1024-byte blocks), both
    // above the file and far below the append
    let out = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args(["--exact", "writers::disk_full_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TQI_W_PATH", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("refused"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(ids_of(&file::load(&path).unwrap().0), (0..BASE).collect());
}
