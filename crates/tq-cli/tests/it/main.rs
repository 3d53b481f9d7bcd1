//! End-to-end tests of the `tq` binary: outputs, exit codes, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tq")).args(args).output().expect("run tq")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tq-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_npy(path: &Path, rows: usize, cols: usize, data: &[f32]) {
    write_npy_order(path, rows, cols, data, false)
}

/// `data` is written as given; with `fortran` the header declares column-major order.
fn write_npy_order(path: &Path, rows: usize, cols: usize, data: &[f32], fortran: bool) {
    let order = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': {order}, 'shape': ({rows}, {cols}), }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    for v in data {
        b.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn data(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 5) as f32)).collect()
}

/// Asserts failure with a one-line message containing `needle`.
fn assert_fails(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.to_lowercase().contains(&needle.to_lowercase()), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn codecs_lists_the_registry_as_json() {
    let out = tq(&["codecs", "--json", "--dim", "128"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v["codecs"].as_array().unwrap();
    assert_eq!(list.len(), tq_core::registry().len());
    let mse4 = list.iter().find(|c| c["name"] == "tq-mse-4").unwrap();
    assert_eq!(mse4["code_size"], 68);
    assert_eq!(mse4["bits_per_value"], 4.25);
}

#[test]
fn distortion_json_has_the_documented_keys_and_theory_values() {
    let out = tq(&["distortion", "--codec", "tq-mse-2", "--dim", "64", "--n", "3000", "--seed", "5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["codec", "dim", "n", "bits_per_value", "d_mse", "d_prod", "ip_bias", "ip_bias_stderr"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    let (m, se, t) = (v["d_mse"].as_f64().unwrap(), v["d_mse_stderr"].as_f64().unwrap(), v["d_mse_theory"].as_f64().unwrap());
    assert!((m - t).abs() < 4.0 * se, "{m} vs {t} ± {se}");
}

#[test]
fn encode_decode_roundtrip_and_identical_bytes_on_any_thread_count() {
    let d = tmpdir("rt");
    let x = data(700, 48);
    write_npy(&d.join("x.npy"), 700, 48, &x);
    let run = |threads: &str, out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_tq"))
            .env("RAYON_NUM_THREADS", threads)
            .args(["encode", "--codec", "tq-mse-3.5", "--seed", "9"])
            .arg("--input")
            .arg(d.join("x.npy"))
            .arg("--out")
            .arg(d.join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(d.join(out)).unwrap()
    };
    let a = run("1", "a.tqc");
    let b = run("2", "b.tqc");
    assert_eq!(a, b);
    let o = tq(&["decode", d.join("a.tqc").to_str().unwrap(), "--out", d.join("y.npy").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = std::fs::read(d.join("y.npy")).unwrap();
    let hl = u16::from_le_bytes([y[8], y[9]]) as usize;
    let vals: Vec<f32> = y[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals.len(), x.len());
    let err: f64 = x.iter().zip(&vals).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let nrm: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    assert!(err / nrm < 0.05, "relative error {}", err / nrm);
}

#[test]
fn fvecs_input_is_accepted() {
    let d = tmpdir("fvecs");
    let mut b = Vec::new();
    for v in data(10, 16).chunks(16) {
        b.extend_from_slice(&16i32.to_le_bytes());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(d.join("x.fvecs"), &b).unwrap();
    let o = tq(&["encode", "--codec", "tq-prod-3", "--input", d.join("x.fvecs").to_str().unwrap(), "--out", d.join("c.tqc").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a truncated fvecs is refused
    std::fs::write(d.join("t.fvecs"), &b[..b.len() - 3]).unwrap();
    let o = tq(&["encode", "--codec", "tq-prod-3", "--input", d.join("t.fvecs").to_str().unwrap(), "--out", d.join("t.tqc").to_str().unwrap()]);
    assert_fails(&o, "truncated");
    assert!(!d.join("t.tqc").exists());
}

#[test]
fn bad_input_gives_one_line_errors_and_no_partial_output() {
    let d = tmpdir("bad");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let mut x = data(20, 8);
    write_npy(&d.join("ok.npy"), 20, 8, &x);
    x[13] = f32::NAN;
    write_npy(&d.join("nan.npy"), 20, 8, &x);
    x[13] = f32::INFINITY;
    write_npy(&d.join("inf.npy"), 20, 8, &x);
    std::fs::write(d.join("empty.npy"), b"").unwrap();
    // a good output file that failed commands must not clobber
    std::fs::write(d.join("keep.tqc"), b"precious").unwrap();

    assert_fails(&tq(&["encode", "--codec", "tq-mse-4", "--input", &p("nan.npy"), "--out", &p("keep.tqc")]), "non-finite");
    assert_fails(&tq(&["encode", "--codec", "tq-mse-4", "--input", &p("inf.npy"), "--out", &p("keep.tqc")]), "non-finite");
    assert_fails(&tq(&["encode", "--codec", "tq-mse-9", "--input", &p("ok.npy"), "--out", &p("keep.tqc")]), "unsupported bit width 9");
    assert_fails(&tq(&["encode", "--codec", "tq-mse-0", "--input", &p("ok.npy"), "--out", &p("keep.tqc")]), "unsupported bit width 0");
    assert_fails(&tq(&["encode", "--codec", "zzz", "--input", &p("ok.npy"), "--out", &p("keep.tqc")]), "unknown codec");
    assert_fails(&tq(&["encode", "--codec", "tq-mse-4", "--input", &p("empty.npy"), "--out", &p("keep.tqc")]), "empty");
    assert_fails(&tq(&["encode", "--codec", "tq-mse-4", "--input", &p("missing.npy"), "--out", &p("keep.tqc")]), "cannot open");
    assert_eq!(std::fs::read(d.join("keep.tqc")).unwrap(), b"precious");

    // a good code file, then damaged copies of it
    let o = tq(&["encode", "--codec", "tq-mse-4", "--input", &p("ok.npy"), "--out", &p("good.tqc")]);
    assert!(o.status.success());
    let good = std::fs::read(d.join("good.tqc")).unwrap();
    std::fs::write(d.join("keep.npy"), b"precious").unwrap();
    let check = |name: &str, bytes: &[u8], needle: &str| {
        std::fs::write(d.join(name), bytes).unwrap();
        assert_fails(&tq(&["decode", &p(name), "--out", &p("keep.npy")]), needle);
        assert_eq!(std::fs::read(d.join("keep.npy")).unwrap(), b"precious", "{name}");
    };
    check("trunc.tqc", &good[..good.len() - 10], "truncated");
    check("trunc_header.tqc", &good[..20], "truncated");
    let mut flip = good.clone();
    let last = flip.len() - 20;
    flip[last] ^= 0x40;
    check("flip.tqc", &flip, "checksum");
    let mut hdr = good.clone();
    hdr[30] ^= 1;
    check("hdr.tqc", &hdr, "corrupt");
    let mut ver = good.clone();
    ver[8] = 2;
    check("ver.tqc", &ver, "newer");
    check("empty.tqc", b"", "empty");
    check("junk.tqc", b"hello world, not codes", "bad magic");
    // decode of the good file works
    assert!(tq(&["decode", &p("good.tqc"), "--out", &p("out.npy")]).status.success());
    // no temporary files are left behind
    let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn zero_vectors_roundtrip_through_the_cli() {
    let d = tmpdir("zero");
    write_npy(&d.join("z.npy"), 3, 16, &[0.0; 48]);
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    assert!(tq(&["encode", "--codec", "tq-prod-2", "--input", &p("z.npy"), "--out", &p("z.tqc")]).status.success());
    assert!(tq(&["decode", &p("z.tqc"), "--out", &p("y.npy")]).status.success());
    let y = std::fs::read(d.join("y.npy")).unwrap();
    let hl = u16::from_le_bytes([y[8], y[9]]) as usize;
    let vals: Vec<f32> = y[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals.len(), 48);
    assert!(vals.iter().all(|&v| v == 0.0), "{vals:?}");
}

#[test]
fn report_quick_writes_markdown_html_json_and_plots() {
    let d = tmpdir("report");
    let o = tq(&["report", "--quick", "--out", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(d.join("index.md")).unwrap();
    assert!(md.contains("tq-mse-4") && md.contains("Hadamard vs Haar"));
    let svg = std::fs::read_to_string(d.join("distortion_d64.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Lloyd"));
    let js: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("results.json")).unwrap()).unwrap();
    let tq_codecs = tq_core::registry().iter().filter(|e| e.kind.is_turboquant()).count();
    assert!(js["distortion"].as_array().unwrap().len() >= tq_codecs);
    assert!(std::fs::read_to_string(d.join("index.html")).unwrap().contains("<table>"));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The index life cycle through the CLI: build, search, add, remove, info, and
/// refusal of bad input with the file left as it was.
#[test]
fn index_build_search_add_remove_info() {
    let d = tmpdir("index");
    let mut rng = tq_core::rng::Xoshiro256::new(3);
    let x: Vec<f32> = (0..500 * 24).map(|_| rng.gaussian() as f32).collect();
    write_npy(&d.join("x.npy"), 500, 24, &x);
    write_npy(&d.join("q.npy"), 3, 24, &x[..3 * 24]);
    let idx = d.join("a.tqi");
    let (xp, qp) = (d.join("x.npy"), d.join("q.npy"));
    for (codec, ivf) in [("tq-mse-4", None), ("tq-mse-3", None), ("tq-mse-4-nc", Some("4"))] {
        let mut args = vec!["index", "build", "--codec", codec, "--metric", "cosine", "--input", p(&xp), "--out", p(&idx), "--json"];
        if let Some(l) = ivf {
            args.extend(["--ivf", l]);
        }
        let o = tq(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let search = |extra: &[&str]| {
            let mut a = vec!["index", "search", "--index", p(&idx), "--queries", p(&qp), "-k", "5", "--nprobe", "4", "--json"];
            a.extend_from_slice(extra);
            let o = tq(&a);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
        };
        let v = search(&[]);
        // each query is a stored vector: cosine puts it first
        for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(r["ids"][0], i as u64, "{codec}");
            assert_eq!(r["ids"].as_array().unwrap().len(), 5);
        }
        let f = search(&["--allow", "7,8,9"]);
        for r in f["results"].as_array().unwrap() {
            assert!(r["ids"].as_array().unwrap().iter().all(|id| [7, 8, 9].contains(&id.as_u64().unwrap())));
        }
        let info = |idx: &Path| -> serde_json::Value { serde_json::from_slice(&tq(&["index", "info", "--index", p(idx), "--json"]).stdout).unwrap() };
        // a build over the previous codec's file continues its commit numbers
        let built = info(&idx)["commit_seq"].as_u64().unwrap();
        assert!(tq(&["index", "add", "--index", p(&idx), "--input", p(&d.join("q.npy"))]).status.success());
        assert!(tq(&["index", "remove", "--index", p(&idx), "--ids", "0,1"]).status.success());
        let info = info(&idx);
        assert_eq!(info["count"], 501);
        assert_eq!(info["commit_seq"], built + 2);
        let v = search(&[]);
        let ids: Vec<u64> = v["results"][0]["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert!(!ids.contains(&0) && ids.contains(&500), "{codec}: removed id returned or added copy missing: {ids:?}");
    }
    let before = std::fs::read(&idx).unwrap();
    assert_fails(&tq(&["index", "remove", "--index", p(&idx), "--ids", "0"]), "not in the index");
    write_npy(&d.join("bad.npy"), 1, 23, &x[..23]);
    assert_fails(&tq(&["index", "add", "--index", p(&idx), "--input", p(&d.join("bad.npy"))]), "dimension");
    assert_fails(&tq(&["index", "search", "--index", p(&idx), "--queries", p(&d.join("bad.npy"))]), "dimension");
    assert_eq!(std::fs::read(&idx).unwrap(), before, "a refused command changed the index file");
    let mut corrupt = before.clone();
    let n = corrupt.len();
    corrupt[n - 3] ^= 0x10;
    std::fs::write(d.join("c.tqi"), &corrupt).unwrap();
    assert_fails(&tq(&["index", "info", "--index", p(&d.join("c.tqi"))]), "checksum");
    std::fs::write(d.join("t.tqi"), &before[..n / 2]).unwrap();
    assert_fails(&tq(&["index", "info", "--index", p(&d.join("t.tqi"))]), "truncated");
    std::fs::write(d.join("e.tqi"), b"").unwrap();
    assert_fails(&tq(&["index", "info", "--index", p(&d.join("e.tqi"))]), "empty");
    assert_fails(&tq(&["index", "build", "--codec", "tq-mse-4", "--out", p(&idx)]), "--data");
}

/// Fortran-ordered .npy files (as the GloVe package ships) read as row-major.
#[test]
fn fortran_order_npy_is_transposed() {
    let d = tmpdir("fortran");
    let (rows, cols) = (3usize, 2usize);
    let c_order = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let column_major: Vec<f32> = (0..cols).flat_map(|c| (0..rows).map(move |r| c_order[r * cols + c])).collect();
    write_npy_order(&d.join("f.npy"), rows, cols, &column_major, true);
    let o = tq(&["encode", "--codec", "tq-mse-8", "--input", p(&d.join("f.npy")), "--out", p(&d.join("f.tqc"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tq(&["decode", p(&d.join("f.tqc")), "--out", p(&d.join("g.npy"))]).status.success());
    let g = std::fs::read(d.join("g.npy")).unwrap();
    let vals: Vec<f32> = g[g.len() - 24..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    for (a, b) in vals.iter().zip(c_order) {
        assert!((a - b).abs() < 0.05 * b.abs().max(1.0), "{vals:?}");
    }
}

/// Without pip or network the fetch fails with one clear line and no cache file.
#[test]
fn data_fetch_failure_is_clear() {
    let d = tmpdir("data");
    let o = Command::new(env!("CARGO_BIN_EXE_tq"))
        .env("TQ_DATA_DIR", &d)
        .env("TQ_PYTHON", "/nonexistent/python3")
        .args(["data", "fetch", "glove50"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error:") && last.contains("python3") && !err.contains("panicked"), "{err}");
    assert!(!d.join("glove50.npy").exists());
    assert_fails(&tq(&["data", "fetch", "nope"]), "unknown dataset");
}

/// KV evaluation and memory planning refuse bad input with one clear line.
#[test]
fn kv_and_vram_bad_input_is_clear() {
    let d = tmpdir("kv");
    let run =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_tq")).env("TQ_DATA_DIR", &d).env("TQ_PYTHON", "/nonexistent/python3").args(args).output().unwrap();
    assert_fails(&run(&["kv", "eval", "--kv", "int3"]), "valid: f32, f16");
    assert_fails(&run(&["kv", "eval", "--kv", "tq-mse-9"]), "unsupported bit width 9");
    // no model and no way to fetch it: the error names what was tried
    let o = run(&["kv", "eval", "--kv", "tq-mse-4", "--text", d.join("missing.txt").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read text file"));
    std::fs::write(d.join("empty.txt"), "  \n").unwrap();
    assert_fails(&run(&["kv", "eval", "--text", d.join("empty.txt").to_str().unwrap()]), "empty");
    // key calibrations: missing, not one, corrupt; options that exclude each other
    let cal = d.join("missing.cal");
    assert_fails(&run(&["kv", "eval", "--kv", "tq-mse-4", "--calib", cal.to_str().unwrap()]), "cannot read key calibration");
    std::fs::write(d.join("junk.cal"), b"not a calibration").unwrap();
    assert_fails(&run(&["kv", "eval", "--kv", "tq-mse-4", "--calib", d.join("junk.cal").to_str().unwrap()]), "bad magic");
    let mut head = b"TQKVCAL\0".to_vec();
    head.extend_from_slice(&1u32.to_le_bytes());
    head.extend_from_slice(&[30, 0, 0, 0, 3, 0, 0, 0, 64, 0, 0, 0]);
    std::fs::write(d.join("short.cal"), &head).unwrap();
    assert_fails(&run(&["kv", "eval", "--kv", "tq-mse-4", "--calib", d.join("short.cal").to_str().unwrap()]), "truncated");
    let o = run(&["kv", "eval", "--kv", "tq-mse-4", "--calib", d.join("junk.cal").to_str().unwrap(), "--center-keys"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    let o = run(&["kv", "eval", "--kv", "tq-mse-4", "--delayed"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--recent"));
    assert_fails(&run(&["vram", "--model", "gpt-5"]), "unknown model");
    assert_fails(&run(&["vram", "--model", "smollm2-135m", "--context", "100000"]), "exceeds");
    assert_fails(&run(&["vram", "--model", "llama-3.1-8b", "--kv", "f16,int3"]), "unknown kv precision");
    let o = run(&["vram", "--model", "llama-3.1-8b", "--context", "100000", "--kv", "f16,tq-mse-4", "--json"]);
    assert!(o.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert!((rows[0]["kv_gb"].as_f64().unwrap() - 13.1072).abs() < 1e-9);
    assert_eq!(rows[1]["kv_bits_per_value"], 4.125); // 4-bit indices + a bf16 norm per 128 values
                                                     // bit budgets: absurd ones refused by name before any model loads; the planner takes one as its bound
    assert_fails(&run(&["kv", "eval", "--kv", "0.5"]), "outside 1..=32");
    assert_fails(&run(&["kv", "eval", "--kv", "budget:3.5:ctx=0"]), "ctx 0");
    assert_fails(&run(&["kv", "eval", "--kv", "budget:3.5:win=2"]), "unknown part");
    assert_fails(&run(&["kv", "plan", "--kv", "tq-mse-4"]), "is not a budget");
    let o = run(&["vram", "--model", "llama-3.1-8b", "--context", "100000", "--kv", "3.5", "--json"]);
    assert!(o.status.success());
    let row: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(row["kv_bits_per_value"], 3.5);
}

/// Without a GPU (CI), `tq bench cuda` fails with one clear line, never a
/// panic; with one it must pass its checks.
#[test]
fn bench_cuda_without_a_gpu_is_a_clear_error() {
    let o = tq(&["bench", "cuda", "--check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if !o.status.success() {
        assert!(err.starts_with("error: no usable CUDA driver") || err.starts_with("error: this build"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// A benchmark grid the kernels cannot run is refused by name before any
/// device is opened.
#[test]
fn bench_cuda_refuses_a_bad_grid() {
    for (args, want) in [
        (&["--q-tokens", "9"][..], "9 query tokens per sequence: the kernels take 1 to 8"),
        (&["--q-tokens", "0"][..], "0 query tokens per sequence: the kernels take 1 to 8"),
        (&["--geometries", "gpt-2"][..], "unknown geometry 'gpt-2'"),
        (&["--kv", "tq-mse-4,int3"][..], "unknown KV precision 'int3'"),
    ] {
        let o = tq(&[&["bench", "cuda"][..], args].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Bad input to the LLM commands is refused before any model is loaded.
#[test]
fn generate_and_needle_refuse_bad_input() {
    let o = tq(&["generate", "--kv", "int3", "--prompt", "hello"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown KV precision 'int3'") && err.contains("tq-mse-B"), "{err}");
    let o = tq(&["generate", "--kv", "tq-mse-4", "--prompt", "  "]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("the prompt is empty"), "{err}");
    let o = tq(&["kv", "needle", "--kv", "tq-mse-4", "--depths", "0.5,1.5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("depth 1.5 is outside 0..1"), "{err}");
    let o = tq(&["kv", "needle", "--kv", "tq-mse-4", "--lengths", "1024,abc"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad length 'abc'"), "{err}");
}

/// A closed pipe (`tq codecs | head -1`) ends `tq` the conventional way
/// (SIGPIPE), never with a panic message.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // 20,000 result lines (about 2 MB): far more than a pipe holds
    let d = tmpdir("pipe");
    let (xs, idx) = (d.join("x.npy"), d.join("x.tqi"));
    write_npy(&xs, 20_000, 16, &data(20_000, 16));
    assert!(tq(&["index", "build", "--input", p(&xs), "--codec", "tq-mse-2", "--out", p(&idx)]).status.success());
    let args = ["index", "search", "--index", p(&idx), "--queries", p(&xs), "-k", "10"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_tq")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("0\t"), "{first}");
    drop(out); // the reader goes away, like `head -1`
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_eq!(o.status.signal(), Some(13), "status {:?}: {err}", o.status);
}

/// A sweep with cache options one of its precisions refuses fails before any
/// forward pass (not after the f32 reference), and says why once.
#[test]
fn kv_sweep_refuses_options_a_precision_cannot_take_before_running() {
    let out = tmpdir("sweep-refused");
    let o = tq(&["kv", "sweep", "--chunks", "1", "--kv", "tq-mse-4,kivi-4", "--center-keys", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error:") && last.contains("KIVI keeps its own"), "{err}");
    assert_eq!(err.matches("KIVI keeps its own").count(), 1, "the message is repeated: {err}");
    assert!(!out.join("kv_sweep.md").exists() && !err.contains("panicked"));
}
mod rotation_real;
