//! Built without the `cuda` feature: the same API, every entry point returns
//! [`Error::NoCuda`].

use crate::{AttnShape, EncodeJob, Error, Result, SideKind, SideSpec, StepPtrs};

enum Never {}

/// A CUDA device (never constructed in this build).
pub struct Gpu(Never);

/// A batch of KV caches on the device (never constructed in this build).
pub struct DeviceKv {
    /// The batch geometry the cache was made for.
    pub shape: AttnShape,
    /// How the keys are coded.
    pub k: SideKind,
    /// How the values are coded.
    pub v: SideKind,
    /// Which attention kernel runs: `mma-f16` (tensor cores) or `simt-f32`.
    pub kernel: &'static str,
    never: Never,
}

/// The encode kernel of one side (never constructed in this build).
pub struct Encoder {
    /// The side's head_dim.
    pub head_dim: usize,
    /// Bytes of one code in the code plane.
    pub code_bytes: usize,
    never: Never,
}

/// One decode-attention step's kernels and scratch (never constructed in this build).
pub struct AttendPlan {
    /// Batch, heads, head_dim and query tokens of a step.
    pub shape: AttnShape,
    /// How the keys are coded.
    pub k: SideKind,
    /// How the values are coded.
    pub v: SideKind,
    /// Token slots per (sequence, KV head) of the planes.
    pub cap: usize,
    /// Which attention kernel runs.
    pub kernel: &'static str,
    never: Never,
}

impl Encoder {
    /// Queues an encode on `stream`.
    ///
    /// # Safety
    /// As in a CUDA build (nothing runs in this one).
    pub unsafe fn launch(&self, _stream: u64, _job: &EncodeJob) -> Result<()> {
        match self.never {}
    }
}

impl AttendPlan {
    /// Parts each sequence is split into.
    pub fn splits(&self) -> usize {
        match self.never {}
    }
    /// Queues one decode-attention step on `stream`.
    ///
    /// # Safety
    /// As in a CUDA build (nothing runs in this one).
    pub unsafe fn launch(&self, _stream: u64, _p: &StepPtrs) -> Result<()> {
        match self.never {}
    }
}

impl Gpu {
    /// Checks that a device range lies inside one allocation of this device.
    pub fn check_range(&self, _p: u64, _bytes: usize, _what: &str) -> Result<()> {
        match self.0 {}
    }
    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        match self.0 {}
    }
    /// The encode kernel of a TurboQuant side for caller-owned planes.
    pub fn encoder(&self, _side: &SideSpec, _bf16_scales: bool) -> Result<Encoder> {
        match self.0 {}
    }
    /// The plan of one decode-attention step.
    pub fn attend_plan(&self, _shape: &AttnShape, _k: &SideSpec, _v: &SideSpec) -> Result<AttendPlan> {
        match self.0 {}
    }
    /// Opens device `ordinal`. In a CUDA build: without a CUDA driver or
    /// NVRTC, or without a device, returns [`Error::NoDevice`] (never panics).
    /// In this build: always [`Error::NoCuda`].
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::NoCuda)
    }
    /// The device's name (as the driver reports it).
    pub fn name(&self) -> Result<String> {
        match self.0 {}
    }
    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        match self.0 {}
    }
    /// Caches made from now on use the plain fp32 (SIMT) attention kernel even
    /// where the tensor-core one applies (TurboQuant K and V).
    pub fn force_simt(&self, _on: bool) {
        match self.0 {}
    }
    /// Caches made from now on split each sequence into exactly `n` parts
    /// (`None`: chosen from the occupancy). Checks use 1 to run the kernels'
    /// multi-tile loops.
    pub fn force_splits(&self, _n: Option<usize>) {
        match self.0 {}
    }
    /// Encodes row-major `xs` (`n × head_dim`) with a TurboQuant side on the
    /// GPU; returns the CPU codec's code bytes (`[packed][f32 scale]` each).
    pub fn encode(&self, _side: &SideSpec, _xs: &[f32]) -> Result<Vec<u8>> {
        match self.0 {}
    }
    /// Uploads CPU codes: `k_codes`/`v_codes` hold, for every (sequence, KV
    /// head) in order, `max_len` consecutive codes of the side's CPU codec
    /// (slots past a sequence's length are ignored).
    pub fn upload_kv(&self, _: &AttnShape, _: &SideSpec, _: &SideSpec, _: &[u8], _: &[u8]) -> Result<DeviceKv> {
        match self.0 {}
    }
    /// A cache of random valid codes (benchmarks), `copies` replicas.
    pub fn random_kv(&self, _: &AttnShape, _: &SideSpec, _: &SideSpec, _: usize, _: u32) -> Result<DeviceKv> {
        match self.0 {}
    }
    /// Decode attention of the shape's query tokens per sequence: `q` is
    /// `[batch][q_tokens][q_heads][head_dim]`, the result likewise. The output buffer is
    /// poisoned (NaN) first, so an unwritten element cannot pass for a result.
    pub fn attend(&self, _kv: &mut DeviceKv, _q: &[f32]) -> Result<Vec<f32>> {
        match self.0 {}
    }
    /// Median milliseconds of one decode-attention step (attention + split
    /// merge), timed with events, cycling through the cache's copies.
    pub fn time_attend(&self, _kv: &mut DeviceKv, _q: &[f32], _warmup: usize, _iters: usize) -> Result<f64> {
        match self.0 {}
    }
    /// Median milliseconds of one decode-attention step replayed as a CUDA
    /// graph (captured once per cache copy), timed with events.
    pub fn time_attend_graph(&self, _kv: &mut DeviceKv, _q: &[f32], _warmup: usize, _iters: usize) -> Result<f64> {
        match self.0 {}
    }
    /// Device-to-device copy bandwidth in GB/s (bytes read + written), median of 10.
    pub fn copy_gbps(&self, _bytes: usize) -> Result<f64> {
        match self.0 {}
    }
}

impl DeviceKv {
    /// Bytes one attention step must read from the cache: codes and scales of
    /// every cached token, keys and values (one copy).
    pub fn bytes_read(&self) -> usize {
        match self.never {}
    }
    /// Parts each sequence is split into (blocks per sequence-head).
    pub fn splits(&self) -> usize {
        match self.never {}
    }
    /// (registers per thread, local-memory bytes per thread (spills), resident
    /// blocks per multiprocessor) of the attention kernel.
    pub fn occupancy(&self) -> Result<(i32, i32, u32)> {
        match self.never {}
    }
}

/// Compiles every kernel configuration the benchmarks use with NVRTC (no
/// GPU or driver needed) and returns their PTX: a build check. In this
/// build: always [`Error::NoCuda`].
pub fn compile_all(_arch: &'static str) -> Result<Vec<(String, String)>> {
    Err(Error::NoCuda)
}
