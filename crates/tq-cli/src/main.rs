//! `tq`: TurboQuant from the command line. Errors are one line on stderr with
//! a non-zero exit status; no command leaves a partial output file.

mod bars;
mod bench;
mod cuda;
mod eval;
mod index;
mod kv;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use tq_core::{registry, RotationKind};
use tq_index::{Metric, RawVectors};

use tq_data::Matrix;
use tq_kv::plan::Weights;
use tq_kv::KvSpec;
use tq_llm::ModelSpec;

#[derive(Parser)]
#[command(name = "tq", version, about = "TurboQuant: near-optimal online vector quantization")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the codec registry: name, id, bits per value, code size formula.
    Codecs {
        /// Dimension at which bits per value and code size are evaluated.
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long)]
        json: bool,
    },
    /// Measure distortion on random unit vectors against the theory.
    Distortion {
        #[arg(long)]
        codec: String,
        #[arg(long)]
        dim: usize,
        #[arg(long, default_value_t = 20_000)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "hadamard")]
        rotation: RotationKind,
        #[arg(long)]
        json: bool,
    },
    /// Encode vectors (.npy float32/float64 or .fvecs) into a .tqc code file.
    Encode {
        #[arg(long)]
        codec: String,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "hadamard")]
        rotation: RotationKind,
        #[arg(long)]
        json: bool,
    },
    /// Decode a .tqc code file into a float32 .npy.
    Decode {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text (greedy), streaming, with a KV cache of any precision.
    Generate {
        /// smollm2, qwen2.5-1.5b or a GGUF file (architecture llama or qwen2).
        #[arg(long, default_value = "smollm2")]
        model: ModelSpec,
        #[arg(long, default_value = "tq-mse-4")]
        kv: KvSpec,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// No chat template: continue the prompt as plain text.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        windows: Windows,
    },
    /// Benchmarks (one core) with quality beside speed.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Real datasets from package registries (cached).
    Data {
        #[command(subcommand)]
        what: DataCmd,
    },
    /// Vector search indexes over codes (.tqi files).
    Index {
        /// When a commit slot is corrupt, load the previous commit instead of
        /// failing (writes committed only by the corrupt slot are not seen).
        #[arg(long, global = true)]
        recover_previous_commit: bool,
        #[command(subcommand)]
        what: IndexCmd,
    },
    /// Side-by-side evaluations on real data.
    Eval {
        #[command(subcommand)]
        what: EvalCmd,
    },
    /// The LLM runtime (candle; SmolLM2, Qwen2.5 or a GGUF) and its KV cache.
    Kv {
        /// smollm2, qwen2.5-1.5b or a GGUF file (architecture llama or qwen2).
        #[arg(long, global = true, default_value = "smollm2")]
        model: ModelSpec,
        #[command(subcommand)]
        what: KvCmd,
    },
    /// KV-cache and total memory for a model at a context length, per precision.
    Vram {
        /// llama-3.1-8b, llama-3.1-70b, qwen2.5-32b, glm-4-9b-chat, mixtral-8x22b,
        /// smollm2-135m, or a GGUF model (smollm2, qwen2.5-1.5b, PATH.gguf: geometry
        /// and parameter count read from its header).
        #[arg(long)]
        model: String,
        /// bf16 (or f16), int8, int4.
        #[arg(long, default_value = "bf16")]
        weights: Weights,
        #[arg(long, default_value_t = 100_000)]
        context: usize,
        /// Comma-separated KV precisions (see `tq_kv::PRECISIONS`).
        #[arg(long, value_delimiter = ',', default_value = "f16,q8_0-rot,q4_0-rot,kivi-2,tq-mse-4,k4v3,tq-mse-3.5,tq-mse-3,tq-mse-2.5")]
        kv: Vec<KvSpec>,
        #[arg(long)]
        json: bool,
    },
    /// The main job: measure everything that exists and write a report directory.
    Report {
        #[arg(long, default_value = "report")]
        out: PathBuf,
        /// Vectors per (codec, dim) at dim <= 128 (fewer at 1536; see the report);
        /// default 4,000, or 20,000 with --full.
        #[arg(long)]
        n: Option<usize>,
        /// The distortion part only, small (seconds; for smoke tests).
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// Every section at the size of the published tables (about 35 minutes
        /// on 2 cores once the data is cached) instead of the smaller default.
        #[arg(long)]
        full: bool,
    },
}

/// The text of a perplexity run.
#[derive(clap::Args)]
struct TextArgs {
    /// `austen`, `shakespeare` or a text file.
    #[arg(long, default_value = "austen")]
    text: String,
    #[arg(long, default_value_t = 200_000)]
    chars: usize,
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[arg(long, default_value_t = 8)]
    chunks: usize,
}

/// Options of a compressed KV cache: full-precision windows, key centering.
#[derive(clap::Args)]
struct Windows {
    /// Also keep the first N tokens (attention sinks) in f32.
    #[arg(long, default_value_t = 0)]
    sink: usize,
    /// Also keep the N most recent tokens in f32.
    #[arg(long, default_value_t = 0)]
    recent: usize,
    /// Encode keys minus a per-stream mean learned from their first 32 tokens
    /// (exact for softmax attention; the codes see smaller vectors).
    #[arg(long)]
    center_keys: bool,
    /// Hold the recent window as q8_0 codes (8.5 bits per value) instead of f32.
    #[arg(long, requires = "recent")]
    recent_q8: bool,
    /// Encode recent-window tokens only when they leave the window (from their
    /// window copy), so the window costs no codes beside its own bytes.
    #[arg(long, requires = "recent")]
    delayed: bool,
    /// Seed of the codecs' random rotations (vary it to see the run-to-run spread).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Calibrated key transforms from a file written by `tq kv calibrate`.
    #[arg(long, conflicts_with_all = ["center_keys", "calib_text"])]
    calib: Option<PathBuf>,
    /// Calibrate the key transforms first on this text (austen, shakespeare or a
    /// file), over chunks as long as the longest context the command holds
    /// (about 8K tokens in all): use a different text than the one evaluated.
    #[arg(long, conflicts_with = "center_keys")]
    calib_text: Option<String>,
}

impl Windows {
    /// The options; `--calib-text` calibrates over chunks of `ctx` tokens (the
    /// longest context the command will hold), about 8K tokens in all.
    fn opts(&self, ctx: usize, model: &kv::Model) -> Result<tq_kv::CacheOptions> {
        let calibration = match (&self.calib, &self.calib_text) {
            (Some(p), _) => Some(std::sync::Arc::new(tq_llm::eval::load_calibration(p)?)),
            (None, Some(t)) => {
                let ctx = ctx.clamp(64, 8192);
                Some(std::sync::Arc::new(tq_llm::eval::calibrate(
                    model.get(true)?,
                    t,
                    (8192 / ctx).max(1),
                    ctx,
                    tq_llm::eval::CALIB_SHRINK,
                    true,
                    &tq_llm::eval::quiet,
                )?))
            }
            (None, None) => None,
        };
        // a window never holds more tokens than the command's longest context
        Ok(tq_kv::CacheOptions {
            sink: self.sink.min(ctx),
            recent: self.recent.min(ctx),
            center_keys: self.center_keys,
            recent_q8: self.recent_q8,
            delayed: self.delayed,
            calibration,
        })
    }
}

#[derive(Subcommand)]
enum KvCmd {
    /// Perplexity with llama.cpp's convention (second half of each chunk scored).
    Eval {
        #[command(flatten)]
        text: TextArgs,
        #[arg(long, default_value = "f32")]
        kv: KvSpec,
        #[command(flatten)]
        windows: Windows,
        #[arg(long)]
        json: bool,
    },
    /// Decode speed and attention time per token at given context lengths,
    /// against the f32 cache in the same run (JSON lines on stdout).
    Bench {
        #[arg(long, default_value = "tq-mse-4")]
        kv: KvSpec,
        /// Comma-separated context lengths (tokens in the cache).
        #[arg(long, default_value = "1024,2048,4096,8192")]
        ctx: String,
        /// Tokens decoded (timed) per context.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Real keys/values captured from this many tokens of Austen (tiled beyond).
        #[arg(long, default_value_t = 1024)]
        fill: usize,
        #[command(flatten)]
        windows: Windows,
        #[arg(long)]
        json: bool,
    },
    /// `kv eval` for many precisions: a Pareto table (markdown) and an SVG of
    /// KLD and ΔPPL vs bits per value in --out.
    Sweep {
        #[command(flatten)]
        text: TextArgs,
        /// Comma-separated precisions.
        #[arg(long, value_delimiter = ',', default_value = tq_report::SWEEP)]
        kv: Vec<KvSpec>,
        #[command(flatten)]
        windows: Windows,
        #[arg(long, default_value = "report")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Needle in a haystack: a planted fact in Austen filler, retrieved by
    /// greedy answering, with the f32 cache as control (JSON lines).
    Needle {
        #[arg(long, default_value = "tq-mse-4")]
        kv: KvSpec,
        /// Comma-separated prompt lengths in tokens.
        #[arg(long, default_value = "1024,2048,4096,8000")]
        lengths: String,
        /// Comma-separated depths of the fact (0 = start, 1 = end).
        #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
        depths: String,
        /// How the fact is planted and asked for.
        /// chat or passkey.
        #[arg(long, default_value = "chat")]
        format: tq_llm::eval::NeedleFormat,
        #[command(flatten)]
        windows: Windows,
        #[arg(long)]
        json: bool,
    },
    /// Key transforms calibrated on a text (f32 run; per layer and KV head the
    /// key mean and the map balancing key and query covariances), for `--calib`.
    Calibrate {
        #[arg(long, default_value = "shakespeare")]
        text: String,
        /// Chunks of --ctx tokens from the start of the text (each a fresh context).
        #[arg(long, default_value_t = tq_llm::eval::CALIB_CHUNKS)]
        chunks: usize,
        /// Tokens per chunk: cover the positions the cache will hold (keys after
        /// RoPE depend on the position).
        #[arg(long, default_value_t = tq_llm::eval::CALIB_CTX)]
        ctx: usize,
        /// Shrinkage of both covariances toward a scaled identity, in [0, 1).
        #[arg(long, default_value_t = tq_llm::eval::CALIB_SHRINK)]
        shrink: f32,
        #[arg(long)]
        out: PathBuf,
    },
    /// The per-layer plan of a bit budget (`--kv 3.5`): fitted on a text that is
    /// not evaluated (or read from its file next to the model), printed per layer.
    Plan {
        /// Comma-separated budgets (B, budget:B or budget:B:ctx=N).
        #[arg(long, value_delimiter = ',', default_value = "3.5")]
        kv: Vec<KvSpec>,
        /// The context the budget holds at (unless the budget names its own).
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long)]
        json: bool,
    },
    /// Capture real keys, values and last-position queries of the model (f32
    /// cache) for some layers into npy files (`tq bench cuda --check --real DIR`).
    Dump {
        #[arg(long, default_value = "austen")]
        text: String,
        /// Tokens of context to run.
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        /// Comma-separated layer indices.
        #[arg(long, default_value = "0,15,29")]
        layers: String,
        /// Keep the queries of every position, not only the last
        /// (q.npy: [layer][position][q_head][head_dim]).
        #[arg(long)]
        all_queries: bool,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Every codec on one real matrix (rows = tokens): relative MSE vs bits.
    Matrix {
        #[arg(long, default_value = "smollm-embed")]
        data: String,
        /// Comma-separated codec names (matrix codecs or vector codecs, row by row).
        #[arg(long, default_value = "pq-4,qet-4,qet-4-nores,kivi-4,tq-mse-4,q4_0-rot,pq-2,qet-2,kivi-2,tq-mse-2")]
        codecs: String,
        /// Use the first N rows only.
        #[arg(long)]
        rows: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Every codec on the same vectors: MSE, inner-product error, recall, speed.
    Vectors {
        #[arg(long)]
        data: String,
        /// Comma-separated codec names.
        #[arg(long, default_value = "tq-mse-4,tq-mse-4-nc,tq-prod-4,rabitq-4,pq-4,q4_0-rot,mxfp4,nvfp4")]
        codecs: String,
        #[arg(long, default_value_t = 100_000)]
        n_base: usize,
        #[arg(long, default_value_t = 1000)]
        n_queries: usize,
        #[arg(long, default_value = "ip")]
        metric: Metric,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Download a dataset into the cache (pip; sha256 checked).
    Fetch { name: String },
    /// Known datasets and whether they are cached.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Build an index (ids 0..n) and save it atomically.
    Build {
        /// A dataset from `tq data list`.
        #[arg(long)]
        data: Option<String>,
        /// Vectors (.npy or .fvecs).
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long)]
        codec: String,
        /// IVF with this many k-means lists (default: flat).
        #[arg(long)]
        ivf: Option<usize>,
        #[arg(long, default_value = "ip")]
        metric: Metric,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "hadamard")]
        rotation: RotationKind,
        /// Keep full-precision copies (none, f16, f32) for exact re-ranking.
        #[arg(long, default_value = "none")]
        raw: RawVectors,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Append vectors to an index file without rewriting it.
    Add {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// First id of the new vectors (default: largest id + 1).
        #[arg(long)]
        start_id: Option<u64>,
    },
    /// Remove ids (comma-separated) from an index file (appended record).
    Remove {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        ids: String,
    },
    /// Search an index with queries from a file.
    Search {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        queries: PathBuf,
        #[arg(short, default_value_t = 10)]
        k: usize,
        /// IVF lists probed per query.
        #[arg(long, default_value_t = 8)]
        nprobe: usize,
        /// Fast-scan candidates re-scored exactly, per wanted result.
        #[arg(long, default_value_t = 10)]
        rerank: usize,
        /// Score every code exactly (no fast-scan pre-ranking).
        #[arg(long)]
        exact: bool,
        /// Allow-list of ids (comma-separated): only these may be returned.
        #[arg(long)]
        allow: Option<String>,
        /// Re-rank the candidates by the stored raw vectors (index built with --raw).
        #[arg(long)]
        raw_rerank: bool,
        #[arg(long)]
        json: bool,
    },
    /// Describe an index file.
    Info {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Examine an index file: commit slots, records, what is recoverable
    /// (exit status 1 when it does not load as is).
    Check {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Encode, decode and score-from-codes throughput vs f32 dot products.
    Encode {
        #[arg(long)]
        codec: String,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 200_000)]
        n: usize,
        #[arg(long, default_value = "hadamard")]
        rotation: RotationKind,
        /// Time encode only, at each of these dimensions and the powers of two
        /// around them, interleaved in one process; every pass encodes n·128
        /// coordinates (the floats of `--dim 128 --n N`).
        #[arg(long, value_delimiter = ',')]
        dims: Vec<usize>,
        /// With --dims: timed passes per dimension (medians are reported).
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
    /// Index build time, query latency, throughput and recall vs exact f32 search.
    Search {
        #[arg(long)]
        data: String,
        #[arg(long)]
        codec: String,
        /// Held-out queries (disjoint from the base).
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        /// Base vectors (default: every row that is not a query).
        #[arg(long)]
        base: Option<usize>,
        #[arg(short, default_value_t = 10)]
        k: usize,
        #[arg(long)]
        ivf: Option<usize>,
        #[arg(long, default_value_t = 8)]
        nprobe: usize,
        #[arg(long, default_value_t = 10)]
        rerank: usize,
        /// Also keep raw vectors and report re-ranking by them separately.
        #[arg(long, default_value = "none")]
        raw: RawVectors,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// CUDA: with --check, encode bytes and attention vs the CPU reference;
    /// otherwise fused decode-attention timings (JSON lines) vs PyTorch SDPA
    /// timings from `scripts/sdpa_bench.py` (--sdpa).
    Cuda {
        #[arg(long)]
        check: bool,
        /// A `tq kv dump` directory of real keys/values for --check.
        #[arg(long)]
        real: Option<PathBuf>,
        /// SDPA timings (JSON lines) taken on the same card.
        #[arg(long)]
        sdpa: Option<PathBuf>,
        /// One case per geometry and precision (B=8, T=32K).
        #[arg(long)]
        quick: bool,
        /// Batch sizes to time, comma-separated (default 1,8,32; --quick: 8).
        #[arg(long, value_delimiter = ',')]
        batches: Vec<usize>,
        /// Cached tokens per sequence to time, comma-separated (default
        /// 8192,32768,131072; --quick: 32768).
        #[arg(long, value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Query tokens per sequence, comma-separated (default 1).
        #[arg(long, value_delimiter = ',')]
        q_tokens: Vec<usize>,
        /// KV precisions to time, comma-separated (default: all six).
        #[arg(long, value_delimiter = ',')]
        kv: Vec<String>,
        /// Geometries to time, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        geometries: Vec<String>,
        /// Time only the kernel chosen for each precision (no forced SIMT runs
        /// of TurboQuant caches).
        #[arg(long)]
        no_simt: bool,
        /// Also write the JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Writing into a closed pipe (`tq codecs | head -1`) ends the process the
/// conventional way (killed by SIGPIPE, status 141 in a shell) instead of a
/// panic in `println!`: Rust ignores SIGPIPE by default, so restore it.
#[cfg(unix)]
fn default_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13; // Linux and macOS
    const SIG_DFL: usize = 0;
    // SAFETY: `signal` is the C library's, called once at start-up before any
    // thread exists, with a valid signal number and the default disposition.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}
#[cfg(not(unix))]
fn default_sigpipe() {}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // a value that does not parse (a KV precision, a metric, ...): one line
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let msg = e.to_string();
            eprintln!("{}", msg.lines().next().unwrap_or("error: invalid argument"));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // the model of the KV commands, loaded once when first needed
    let model = kv::Model::new(match &cli.cmd {
        Cmd::Kv { model, .. } | Cmd::Generate { model, .. } => model.clone(),
        _ => ModelSpec::default(),
    });
    match cli.cmd {
        Cmd::Codecs { dim, json } => codecs(dim, json),
        Cmd::Distortion { codec, dim, n, seed, rotation, json } => distortion(&codec, dim, n, seed, rotation, json),
        Cmd::Encode { codec, input, out, seed, rotation, json } => encode(&codec, &input, &out, seed, rotation, json),
        Cmd::Decode { input, out } => decode(&input, &out),
        Cmd::Bench { what: BenchCmd::Encode { codec, dim, n, rotation, dims, repeats, json } } => {
            if dims.is_empty() {
                bench::encode(&codec, dim, n, rotation, json)
            } else {
                bench::encode_dims(&codec, &dims, n.saturating_mul(128), rotation, repeats, json)
            }
        }
        Cmd::Report { out, n, quick, full } => {
            tq_report::run(&out, n, tq_report::Size { quick, full }, &|| model.get(true), &bars::Bars::new())?;
            eprintln!("report written to {}/index.md (and index.html, results.json, *.svg)", out.display());
            Ok(())
        }
        Cmd::Vram { model, weights, context, kv, json } => vram(&model, weights, context, &kv, json),
        Cmd::Kv { what: KvCmd::Eval { text: t, kv, windows: w, json }, .. } => {
            let cfg = tq_llm::eval::PplConfig { text: &t.text, chars: t.chars, ctx: t.ctx, chunks: t.chunks, opts: w.opts(t.ctx, &model)?, seed: w.seed };
            kv::eval(&model, &cfg, &kv::resolve(&model, &kv, t.ctx, json)?, json)
        }
        Cmd::Data { what: DataCmd::Fetch { name } } => {
            use tq_data::datasets as ds;
            if name == "austen" || name == "shakespeare" {
                let (t, f) = if name == "austen" { (ds::austen_text(false)?, ds::AUSTEN_FILE) } else { (ds::shakespeare_text(false)?, ds::SHAKESPEARE_FILE) };
                eprintln!("{name}: {} characters in {}", t.len(), ds::cache_dir().join(f).display());
                return Ok(());
            }
            if ds::MODELS.iter().any(|m| m.name == name) {
                eprintln!("{name}: {}", ds::model_gguf(&name, false)?.display());
                return Ok(());
            }
            let pb = embed_bar(false);
            let p = tq_llm::datasets::ensure(&name, false, &|done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64)
            })?;
            pb.finish_and_clear();
            eprintln!("{name}: {}", p.display());
            Ok(())
        }
        Cmd::Data { what: DataCmd::List { json } } => data_list(json),
        Cmd::Eval { what: EvalCmd::Matrix { data, codecs, rows, seed, json } } => {
            let codecs = codecs.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
            eval::matrix(&data, codecs, rows, seed, json)
        }
        Cmd::Eval { what: EvalCmd::Vectors { data, codecs, n_base, n_queries, metric, seed, json } } => {
            let codecs = codecs.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
            eval::vectors(&eval::EvalArgs { data: &data, codecs, n_base, n_queries, metric, seed, json })
        }
        Cmd::Index { recover_previous_commit, what } => {
            let load = tq_index::file::LoadOptions { recover_previous_commit };
            match what {
                IndexCmd::Build { data, input, codec, ivf, metric, seed, rotation, raw, out, json } => {
                    let a = tq_data::eval::BuildArgs { codec: &codec, metric, seed, rotation, ivf, raw };
                    index::build(data.as_deref(), input.as_deref(), &a, &out, json)
                }
                IndexCmd::Add { index, input, start_id } => index::add(&index, &input, start_id, load),
                IndexCmd::Remove { index, ids } => index::remove(&index, &index::parse_ids(&ids)?, load),
                IndexCmd::Search { index, queries, k, nprobe, rerank, exact, allow, raw_rerank, json } => {
                    let a = index::SearchArgs { raw_rerank, k, nprobe, rerank, exact, allow: allow.as_deref(), json };
                    index::search(&index, &queries, &a, load)
                }
                IndexCmd::Info { index, json } => index::info(&index, json, load),
                IndexCmd::Check { index, json } => index::check(&index, json),
            }
        }
        Cmd::Bench { what: BenchCmd::Cuda { check, real, sdpa, quick, batches, contexts, q_tokens, kv, geometries, no_simt, out } } => {
            let lines: Vec<String> = if check {
                vec![serde_json::to_string(&cuda::check(real.as_deref())?)?]
            } else {
                let grid = cuda::GridArgs { quick, batches, contexts, q_tokens, kv, geometries, no_simt };
                cuda::bench(sdpa.as_deref(), grid)?.iter().map(serde_json::to_string).collect::<std::result::Result<_, _>>()?
            };
            for l in &lines {
                println!("{l}");
            }
            if let Some(o) = out {
                tq_io::write_atomic(&o, (lines.join("\n") + "\n").as_bytes()).with_context(|| format!("cannot write {}", o.display()))?;
            }
            Ok(())
        }
        Cmd::Generate { kv, prompt, max_tokens, raw, windows: w, .. } => {
            let kv = kv::resolve(&model, &kv, tq_llm::eval::CALIB_CTX, false)?;
            kv::generate(&model, &kv, &prompt, max_tokens, raw, &w.opts(tq_llm::eval::CALIB_CTX, &model)?, w.seed)
        }
        Cmd::Kv { what: KvCmd::Sweep { text: t, kv, windows: w, out, json }, .. } => {
            let cfg = tq_llm::eval::PplConfig { text: &t.text, chars: t.chars, ctx: t.ctx, chunks: t.chunks, opts: w.opts(t.ctx, &model)?, seed: w.seed };
            let kv = kv.iter().map(|k| kv::resolve(&model, k, t.ctx, true)).collect::<Result<Vec<_>>>()?;
            let (md, rows) = tq_report::sweep(model.get(true)?, model.spec(), &cfg, &kv, &out, &bars::Bars::new())?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!("{md}");
            }
            Ok(())
        }
        Cmd::Kv { what: KvCmd::Needle { kv, lengths, depths, format, windows: w, json }, .. } => {
            let lengths = lengths.split(',').map(|l| l.trim().parse::<usize>().with_context(|| format!("bad length '{l}'"))).collect::<Result<Vec<_>>>()?;
            let depths = depths.split(',').map(|l| l.trim().parse::<f64>().with_context(|| format!("bad depth '{l}'"))).collect::<Result<Vec<_>>>()?;
            let longest = lengths.iter().copied().max().unwrap_or(tq_llm::eval::CALIB_CTX);
            kv::needle(&model, &kv::resolve(&model, &kv, longest, json)?, &lengths, &depths, format, &w.opts(longest, &model)?, w.seed, json)
        }
        Cmd::Kv { what: KvCmd::Bench { kv, ctx, steps, fill, windows: w, json }, .. } => {
            let ctxs = ctx.split(',').map(|l| l.trim().parse::<usize>().with_context(|| format!("bad context length '{l}'"))).collect::<Result<Vec<_>>>()?;
            let longest = ctxs.iter().copied().max().unwrap_or(tq_llm::eval::CALIB_CTX);
            kv::bench(&model, &kv::resolve(&model, &kv, longest, json)?, &ctxs, steps, fill, &w.opts(longest, &model)?, w.seed, json)
        }
        Cmd::Kv { what: KvCmd::Calibrate { text, chunks, ctx, shrink, out }, .. } => {
            let c = tq_llm::eval::calibrate(model.get(false)?, &text, chunks, ctx, shrink, false, &|m| eprintln!("{m}"))?;
            tq_io::write_atomic(&out, &c.to_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("key calibration from {} ({} keys per stream, shrink {}) written to {}", c.source, c.tokens, c.shrink, out.display());
            Ok(())
        }
        Cmd::Kv { what: KvCmd::Plan { kv, ctx, json }, .. } => kv::plan(&model, &kv, ctx, json),
        Cmd::Kv { what: KvCmd::Dump { text, tokens, layers, all_queries, out }, .. } => {
            let layers = layers.split(',').map(|l| l.trim().parse::<usize>().with_context(|| format!("bad layer index '{l}'"))).collect::<Result<Vec<_>>>()?;
            kv::dump(&model, &text, tokens, &layers, all_queries, &out)
        }
        Cmd::Bench { what: BenchCmd::Search { data, codec, queries, base, k, ivf, nprobe, rerank, raw, seed, json } } => {
            let args = tq_data::eval::BenchArgs { codec: &codec, k, ivf, nprobe, rerank, raw, seed };
            index::bench_search(&index::BenchSearch { data: &data, args, queries, base, json })
        }
    }
}

fn vram(model: &str, weights: Weights, context: usize, kv: &[KvSpec], json: bool) -> Result<()> {
    let m = &tq_llm::model::plan_model(model)?;
    let wname = format!("{weights:?}").to_lowercase();
    let plans = kv.iter().map(|spec| tq_kv::plan::vram(m, weights, context, spec)).collect::<tq_core::Result<Vec<_>>>()?;
    if json {
        for p in &plans {
            println!(
                "{}",
                json!({"model": p.model, "weights": wname, "context": p.context, "kv": p.kv, "kv_bits_per_value": p.kv_bits_per_value,
                    "weights_gb": p.weights_gb, "kv_gb": p.kv_gb, "total_gb": p.total_gb, "cards_24gb": p.cards_24gb})
            );
        }
    } else {
        println!("{} ({} weights), {} tokens of context; GB = 10^9 bytes; cards of 24 GB", m.name, wname, context);
        println!("{:<12} {:>9} {:>10} {:>9} {:>9} {:>6}", "kv", "bits/val", "weights", "KV", "total", "cards");
        for p in &plans {
            println!("{:<12} {:>9.3} {:>8.1}GB {:>7.1}GB {:>7.1}GB {:>6}", p.kv, p.kv_bits_per_value, p.weights_gb, p.kv_gb, p.total_gb, p.cards_24gb);
        }
    }
    Ok(())
}

/// A dataset by name (computing a derived one on first use, with a progress bar).
pub(crate) fn load_dataset(name: &str, quiet: bool) -> Result<Matrix> {
    let pb = embed_bar(quiet);
    let m = tq_llm::datasets::load(name, quiet, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    Ok(m)
}

fn embed_bar(quiet: bool) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(0);
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        pb.set_style(indicatif::ProgressStyle::with_template("embedding Austen with MiniLM {bar:40} {pos}/{len} ({eta})").expect("template"));
    }
    pb
}

fn data_list(json: bool) -> Result<()> {
    let rows = tq_data::datasets::status();
    if json {
        let v: Vec<_> =
            rows.iter().map(|r| json!({"name": r.name, "description": r.description, "cached": r.cached, "path": r.path.display().to_string()})).collect();
        return print_json(&json!(v), false);
    }
    for r in &rows {
        println!("{:<10} {:<8} {}", r.name, if r.cached { "cached" } else { "-" }, r.description);
    }
    println!("cache: {}", tq_data::datasets::cache_dir().display());
    Ok(())
}

fn codecs(dim: usize, json: bool) -> Result<()> {
    let rows: Vec<_> = registry()
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "name": e.name, "nominal_bits": e.nominal_bits(),
                "bits_per_value": e.bits_per_value(dim), "code_size": e.code_size(dim),
                "code_size_formula": e.code_size_formula(), "description": e.description(),
            })
        })
        .collect();
    let matrix: Vec<_> = tq_core::matrix::matrix_registry()
        .iter()
        .map(|e| json!({"id": e.id, "name": e.name, "shape": "matrix (tokens × channels)", "description": e.description}))
        .collect();
    if json {
        return print_json(&json!({"dim": dim, "codecs": rows, "matrix_codecs": matrix}), false);
    }
    println!("{:<4} {:<16} {:>10} {:>10}  {:<40} description", "id", "name", "bits/val", "bytes", "code size (bytes)");
    println!("{:<4} {:<16} {:>10} {:>10}", "", "", format!("@d={dim}"), format!("@d={dim}"));
    for e in registry() {
        println!("{:<4} {:<16} {:>10.4} {:>10}  {:<40} {}", e.id, e.name, e.bits_per_value(dim), e.code_size(dim), e.code_size_formula(), e.description());
    }
    println!("\nmatrix codecs (tokens × channels; `tq eval matrix`; vector codecs also apply row by row):");
    for e in tq_core::matrix::matrix_registry() {
        println!("{:<4} {:<16} {}", e.id, e.name, e.description);
    }
    Ok(())
}

fn distortion(name: &str, dim: usize, n: usize, seed: u64, rot: RotationKind, json: bool) -> Result<()> {
    let bars = bars::Bars::new();
    let v = tq_report::distortion(name, dim, n, seed, rot, if json { &tq_report::Silent } else { &bars })?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let d = dim as f64;
    println!("{} dim={} n={} rotation={} bits/value={:.4}", name, dim, n, rot.name(), f("bits_per_value"));
    println!("  d_mse  = {:.6} ± {:.6}   theory {:.6}", f("d_mse"), f("d_mse_stderr"), f("d_mse_theory"));
    println!("  d_prod·dim = {:.5} ± {:.5}   theory {:.5}", f("d_prod") * d, f("d_prod_stderr") * d, f("d_prod_theory") * d);
    println!("  ip_bias = {:+.6} ± {:.6} (independent q)", f("ip_bias"), f("ip_bias_stderr"));
    println!(
        "  planted q (ρ={}): bias {:+.6} ± {:.6}, gain {:.5} (theory {:.5})",
        f("rho"),
        f("ip_bias_rho"),
        f("ip_bias_rho_stderr"),
        f("ip_gain"),
        f("ip_gain_theory")
    );
    Ok(())
}

fn encode(name: &str, input: &Path, out: &Path, seed: u64, rot: RotationKind, json: bool) -> Result<()> {
    let e = tq_data::tqc::encode_file(name, input, out, seed, rot)?;
    if json {
        let info = json!({"codec": name, "dim": e.dim, "count": e.count, "code_size": e.code_size, "bits_per_value": e.bits_per_value,
            "file_bytes": e.file_bytes, "encode_seconds": e.encode_seconds, "out": out.display().to_string()});
        println!("{}", serde_json::to_string(&info)?);
    } else {
        let (n, d, b, bpv, s) = (e.count, e.dim, e.file_bytes, e.bits_per_value, e.encode_seconds);
        eprintln!("encoded {n} × {d} with {name} into {} ({b} bytes, {bpv:.3} bits/value, {s:.3} s)", out.display());
    }
    Ok(())
}

fn decode(input: &Path, out: &Path) -> Result<()> {
    let f = tq_data::tqc::decode_file(input, out)?;
    eprintln!("decoded {} × {} ({}) into {}", f.count, f.dim, f.codec_name, out.display());
    Ok(())
}

/// A JSON value on stdout: one line when `compact`, else indented.
pub(crate) fn print_json(v: &serde_json::Value, compact: bool) -> Result<()> {
    println!("{}", if compact { serde_json::to_string(v)? } else { serde_json::to_string_pretty(v)? });
    Ok(())
}
