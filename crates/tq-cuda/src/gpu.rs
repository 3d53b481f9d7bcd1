//! The CUDA implementation (feature `cuda`): cudarc with dynamic loading,
//! kernels compiled by NVRTC per configuration and cached per process.
//!
//! Soundness of the `unsafe` blocks here rests on three facts:
//! - every allocation, copy, launch and event of a [`Gpu`] goes through its
//!   one stream (created with the context; not the legacy default stream, so
//!   that a decode step can be captured into a CUDA graph), so stream order
//!   alone orders all device work; that is why cudarc's per-buffer event
//!   tracking may be off;
//! - every launch pushes exactly the arguments of the kernel's parameter list
//!   in `kernels.cu`, in order and with the same types (`i32` for `int`,
//!   `u64` for `u64`, device slices for pointers);
//! - every device buffer a launch passes is at least as large as the kernel
//!   indexes it for the grid launched (sizes from the same shape as the grid).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::CompileOptions;

use crate::{AttnShape, EncodeJob, Error, Result, SideKind, SideSpec, StepPtrs};

const SOURCE: &str = include_str!("kernels.cu");
/// Threads of the SIMT attention kernel and of `tq_prep_q` (NT in kernels.cu).
const NT: usize = 128;
const TILE: usize = 128;
/// Warps of a tensor-core attention block (MW in kernels.cu): 16, or 8 when
/// a block takes more than 8 rows (twice the accumulators per thread).
fn mma_warps(rb: usize) -> usize {
    if rb > 8 {
        8
    } else {
        16
    }
}
/// Steps in flight per warp of the tensor-core kernel (STAGES in kernels.cu).
const MMA_STAGES: usize = 4;
/// Most score rows (query token × head) one block takes: tensor-core kernel
/// (16 rows of one MMA), SIMT kernel (register accumulators per row).
const MMA_ROWS: usize = 16;
const SIMT_ROWS: usize = 8;
/// Threads of `tq_combine` (CT in kernels.cu).
const COMBINE_THREADS: u32 = 256;

fn cu<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| Error::Cuda(e.to_string()))
}

/// One CUDA device with a stream and the kernels compiled for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    sms: usize,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    simt: AtomicBool,
    splits: AtomicUsize,
    ordinal: usize,
}

/// A batch of KV caches on the device (see the crate docs for the planes),
/// `copies` identical-layout replicas (benchmarks cycle through them so that
/// repeated runs do not measure the L2 cache).
pub struct DeviceKv {
    /// The batch geometry the cache was made for.
    pub shape: AttnShape,
    /// How the keys are coded.
    pub k: SideKind,
    /// How the values are coded.
    pub v: SideKind,
    /// Which attention kernel runs: `mma-f16` (tensor cores) or `simt-f32`.
    pub kernel: &'static str,
    plan: AttendPlan,
    copies: usize,
    kc: CudaSlice<u8>,
    ks: CudaSlice<u8>,
    vc: CudaSlice<u8>,
    vs: CudaSlice<u8>,
    lens: CudaSlice<i32>,
    out: CudaSlice<f32>,
    q: CudaSlice<f32>,
}

/// Everything one decode-attention step of a fixed shape launches: the
/// compiled kernels, the split of each sequence, the rotations and codebooks
/// on the device, and the scratch the splits merge through. It owns no
/// cache: the planes, queries, lengths and output are the caller's
/// ([`StepPtrs`]), so a framework's tensors (PyTorch) serve directly. The
/// launch parameters never change, so a step can be captured in a CUDA graph.
pub struct AttendPlan {
    /// Batch, KV heads, query heads, head_dim and query tokens of a step
    /// (the lengths are the cache capacity; the step's own are on the device).
    pub shape: AttnShape,
    /// How the keys are coded.
    pub k: SideKind,
    /// How the values are coded.
    pub v: SideKind,
    /// Token slots per (sequence, KV head) of the planes.
    pub cap: usize,
    /// Which attention kernel runs: `mma-f16` (tensor cores) or `simt-f32`.
    pub kernel: &'static str,
    ctx: Arc<CudaContext>,
    krot: Rot,
    vrot: Rot,
    ktab: Buf<f32>,
    vtab: Buf<f32>,
    nsplit: usize,
    split_len: usize,
    po: Buf<f32>,
    pm: Buf<f32>,
    pl: Buf<f32>,
    /// the queries rotated and scaled (tq_prep_q)
    qr: Buf<f32>,
    prep: CudaFunction,
    attend: CudaFunction,
    combine: CudaFunction,
    smem: u32,
    threads: u32,
    /// row blocks per KV head
    ngr: usize,
}

/// The encode kernel for one TurboQuant side, writing into caller-owned
/// planes ([`Encoder::launch`]).
pub struct Encoder {
    /// The side's head_dim.
    pub head_dim: usize,
    /// Bytes of one code in the code plane.
    pub code_bytes: usize,
    ctx: Arc<CudaContext>,
    f: CudaFunction,
    bits: i32,
    nc: i32,
    bf16: i32,
    rot: Rot,
    cent: Buf<f32>,
    bounds: Buf<f32>,
}

struct Rot {
    s1: Buf<u32>,
    s2: Buf<u32>,
    total: f32,
}

/// A device buffer and its address (taken once: event tracking is off, so
/// the address is all a launch needs).
struct Buf<T> {
    _slice: CudaSlice<T>,
    p: u64,
}

impl Gpu {
    /// Opens device `ordinal`. Without a CUDA driver or NVRTC, or without a
    /// device, returns [`Error::NoDevice`] (never panics).
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc's dynamic loader panics when a library is missing: look first.
        // SAFETY: the probe only opens (and closes) the first `libcuda` found
        // on the loader path, running its initialisers; no symbol is called.
        // Loading it is what every later cudarc call does anyway.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDevice("libcuda (the NVIDIA driver) was not found".into()));
        }
        // SAFETY: as above, for `libnvrtc`.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::NoDevice("libnvrtc (the CUDA runtime compiler) was not found".into()));
        }
        let n = CudaContext::device_count().map_err(|e| Error::NoDevice(e.to_string()))?;
        if ordinal >= n.max(0) as usize {
            return Err(Error::NoDevice(format!("device {ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice(e.to_string()))?;
        // Launch arguments here are never shared across streams: skip cudarc's
        // per-argument event bookkeeping (it would sit inside every timed launch).
        // SAFETY: cudarc requires the caller to order the uses of every buffer
        // across streams; this context is used through one stream only (the
        // `stream` below: every allocation, copy, launch and event of `Gpu`),
        // so stream order already orders them, and no buffer is freed before
        // the work queued on it (a free is queued on the same stream).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = cu(ctx.compute_capability())?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let sms = cu(ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT))? as usize;
        // a stream of our own (the legacy default stream cannot be captured into a graph)
        let stream = cu(ctx.new_stream())?;
        Ok(Self { ctx, stream, arch, sms, modules: Mutex::new(HashMap::new()), simt: AtomicBool::new(false), splits: AtomicUsize::new(0), ordinal })
    }

    /// The device's name (as the driver reports it).
    pub fn name(&self) -> Result<String> {
        cu(self.ctx.name())
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Checks that `bytes` bytes from device address `p` lie inside one
    /// allocation of this device (a PyTorch tensor's storage, say): an error
    /// naming `what` for host memory, memory of another device, or a buffer
    /// too small for what a launch will touch.
    pub fn check_range(&self, p: u64, bytes: usize, what: &str) -> Result<()> {
        use cudarc::driver::sys;
        if bytes == 0 {
            return Ok(());
        }
        cu(self.ctx.bind_to_thread())?;
        let (mut base, mut size, mut ordinal) = (0u64, 0usize, -1i32);
        // SAFETY: out-pointers to locals of the types the driver writes
        // (CUdeviceptr, size_t, int); `p` is only looked up, never accessed.
        let found = unsafe {
            sys::cuPointerGetAttribute((&mut ordinal as *mut i32).cast(), sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p as sys::CUdeviceptr)
                .result()
                .and_then(|_| sys::cuMemGetAddressRange_v2(&mut base, &mut size, p as sys::CUdeviceptr).result())
        };
        if found.is_err() {
            return Err(Error::Shape(format!("{what}: address {p:#x} is not CUDA device memory (a CPU tensor?)")));
        }
        if ordinal != self.ordinal as i32 {
            return Err(Error::Shape(format!("{what} is on CUDA device {ordinal}, this cache on device {}", self.ordinal)));
        }
        if p.checked_add(bytes as u64).is_none_or(|e| e > base + size as u64) {
            return Err(Error::Shape(format!("{what}: {bytes} bytes from {p:#x} run past the end of its allocation ({size} bytes at {base:#x})")));
        }
        Ok(())
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Caches made from now on use the plain fp32 (SIMT) attention kernel even
    /// where the tensor-core one applies (TurboQuant K and V).
    pub fn force_simt(&self, on: bool) {
        self.simt.store(on, Ordering::Relaxed);
    }

    /// Caches made from now on split each sequence into exactly `n` parts
    /// (`None`: chosen from the occupancy). Checks use 1 to run the kernels'
    /// multi-tile loops.
    pub fn force_splits(&self, n: Option<usize>) {
        self.splits.store(n.unwrap_or(0), Ordering::Relaxed);
    }

    fn module(&self, defines: &str) -> Result<Arc<CudaModule>> {
        let mut m = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = m.get(defines) {
            return Ok(x.clone());
        }
        let ptx = compile(defines, self.arch)?;
        let module = cu(self.ctx.load_module(ptx))?;
        m.insert(defines.to_string(), module.clone());
        Ok(module)
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        cu(self.stream.clone_htod(x))
    }

    fn rot(&self, side: &SideSpec) -> Result<Rot> {
        match side.hadamard() {
            Some((s1, s2, total)) => Ok(Rot { s1: self.buf(s1)?, s2: self.buf(s2)?, total }),
            None => Ok(Rot { s1: self.buf(&[0u32])?, s2: self.buf(&[0u32])?, total: 1.0 }),
        }
    }

    fn table(&self, side: &SideSpec) -> Result<Buf<f32>> {
        match side.codebook() {
            Some((c, _)) => self.buf(c),
            None => self.buf(&[0.0f32]),
        }
    }

    fn buf<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<Buf<T>> {
        let s = self.upload(x)?;
        Ok(Buf { p: self.ptr(&s), _slice: s })
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<Buf<T>> {
        let s = cu(self.stream.alloc_zeros::<T>(n.max(1)))?;
        Ok(Buf { p: self.ptr(&s), _slice: s })
    }

    /// The encode kernel of a TurboQuant side, for planes the caller owns
    /// ([`Encoder::launch`]). `bf16_scales`: store each norm rounded to bf16
    /// (round to nearest even) and widened back to f32 — the values the CPU KV
    /// cache (`tq-kv`, [`tq_core::KvLayout`]) stores and attends with.
    pub fn encoder(&self, side: &SideSpec, bf16_scales: bool) -> Result<Encoder> {
        let d = side.head_dim;
        let SideKind::Tq { bits, nc } = side.kind else {
            return Err(Error::Unsupported(format!("GPU encode takes tq-mse-B sides, not {}", side.name)));
        };
        let module = self.module(&format!("#define D {d}\n#define G 1\n"))?;
        let f = cu(module.load_function("tq_encode"))?;
        let (cent, bounds) = side.codebook().expect("TurboQuant sides have a codebook");
        let enc = Encoder {
            head_dim: d,
            code_bytes: side.kind.code_bytes(d),
            ctx: self.ctx.clone(),
            f,
            bits: bits as i32,
            nc: nc as i32,
            bf16: bf16_scales as i32,
            rot: self.rot(side)?,
            cent: self.buf(cent)?,
            bounds: self.buf(bounds)?,
        };
        // the uploads are complete before any other stream launches with them
        cu(self.stream.synchronize())?;
        Ok(enc)
    }

    /// Encodes row-major `xs` (`n × head_dim`) with a TurboQuant side on the
    /// GPU; returns the CPU codec's code bytes (`[packed][f32 scale]` each).
    pub fn encode(&self, side: &SideSpec, xs: &[f32]) -> Result<Vec<u8>> {
        let d = side.head_dim;
        let SideKind::Tq { bits, .. } = side.kind else {
            return Err(Error::Unsupported(format!("GPU encode takes tq-mse-B sides, not {}", side.name)));
        };
        tq_core::codec::check_vectors(xs, d)?;
        let n = xs.len() / d;
        let enc = self.encoder(side, false)?;
        let x = self.upload(xs)?;
        let pb = side.kind.code_bytes(d);
        let codes = cu(self.stream.alloc_zeros::<u8>(n * pb))?;
        let scales = cu(self.stream.alloc_zeros::<f32>(n))?;
        let job = EncodeJob { x: self.ptr(&x), seqs: 1, per: n, cap: n, heads: 1, lens: 0, codes: self.ptr(&codes), scales: self.ptr(&scales) };
        // SAFETY: `x` holds n vectors of d floats, `codes` n·pb bytes and
        // `scales` n floats: one sequence of n slots, no lengths; all three were
        // made on this stream, which the launch uses.
        unsafe { enc.launch(self.stream.cu_stream() as u64, &job) }?;
        let codes = cu(self.stream.clone_dtoh(&codes))?;
        let scales = cu(self.stream.clone_dtoh(&scales))?;
        Ok(crate::join_tq_codes(d, bits, &codes, &scales))
    }

    fn ptr<T>(&self, x: &CudaSlice<T>) -> u64 {
        use cudarc::driver::DevicePtr;
        // event tracking is off (see `new`): the guard records nothing
        let (p, _guard) = x.device_ptr(&self.stream);
        p
    }

    /// The plan of one decode-attention step: `shape` gives batch, heads,
    /// head_dim and query tokens, and its longest length the planes' capacity
    /// (rounded up to whole 128-token tiles: [`AttendPlan::cap`]).
    pub fn attend_plan(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec) -> Result<AttendPlan> {
        shape.check()?;
        let d = shape.heads.head_dim;
        if k.head_dim != d || v.head_dim != d {
            return Err(Error::Shape(format!("sides built for head_dim {}/{}, shape has {d}", k.head_dim, v.head_dim)));
        }
        let (b, h, nr) = (shape.batch(), shape.heads.kv_heads, shape.rows());
        let cap = shape.max_len().div_ceil(TILE) * TILE;
        let mma = k.rotated() && v.rotated() && !self.simt.load(Ordering::Relaxed);
        // the rows of a KV head in as few equal blocks as the kernel takes
        let ngr = nr.div_ceil(if mma { MMA_ROWS } else { SIMT_ROWS });
        let rb = nr.div_ceil(ngr);
        let kvsame = k.rotated() && v.rotated() && k.kind.bits() == v.kind.bits() && k.codebook().map(|c| c.0) == v.codebook().map(|c| c.0);
        let defines = attention_defines(d, shape.group(), shape.q_tokens, rb, kvsame, k.kind, v.kind);
        let module = self.module(&defines)?;
        let attend = cu(module.load_function(if mma { "tq_attend_mma" } else { "tq_attend" }))?;
        let combine = cu(module.load_function("tq_combine"))?;
        let prep = cu(module.load_function("tq_prep_q"))?;
        let (smem, threads) = if mma { (mma_smem(d, rb, kvsame, k.kind, v.kind), 32 * mma_warps(rb)) } else { (attend_smem(d, rb, k.kind, v.kind), NT) };
        if smem > 48 * 1024 {
            cu(attend.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32))?;
        }
        // splits: as few (long) blocks as fill whole waves of resident blocks
        // to 90% at least (measured: short blocks lose to their setup, and a
        // nearly empty last wave costs a whole block's time)
        let tiles = cap / TILE;
        let per_sm = cu(attend.occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None))?.max(1) as usize;
        let want = match self.splits.load(Ordering::Relaxed) {
            0 => split_count(self.sms * per_sm, b * h * ngr),
            n => n,
        }
        .clamp(1, tiles);
        let split_len = tiles.div_ceil(want) * TILE;
        let nsplit = cap.div_ceil(split_len);
        let (hq, nq) = (shape.heads.q_heads, shape.q_tokens);
        let plan = AttendPlan {
            shape: shape.clone(),
            k: k.kind,
            v: v.kind,
            cap,
            kernel: if mma { "mma-f16" } else { "simt-f32" },
            ctx: self.ctx.clone(),
            krot: self.rot(k)?,
            vrot: self.rot(v)?,
            ktab: self.table(k)?,
            vtab: self.table(v)?,
            nsplit,
            split_len,
            po: self.zeros(b * h * nr * nsplit * d)?,
            pm: self.zeros(b * h * nr * nsplit)?,
            pl: self.zeros(b * h * nr * nsplit)?,
            qr: self.zeros(b * nq * hq * d)?,
            prep,
            attend,
            combine,
            smem: smem as u32,
            threads: threads as u32,
            ngr,
        };
        // the uploads are complete before any other stream launches with them
        cu(self.stream.synchronize())?;
        Ok(plan)
    }

    fn device_kv(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec, copies: usize) -> Result<DeviceKv> {
        let plan = self.attend_plan(shape, k, v)?;
        let (d, rows) = (shape.heads.head_dim, copies * shape.batch() * shape.heads.kv_heads * plan.cap);
        let z8 = |n: usize| cu(self.stream.alloc_zeros::<u8>(n));
        let (hq, nq) = (shape.heads.q_heads, shape.q_tokens);
        let lens: Vec<i32> = shape.lens.iter().map(|&l| l as i32).collect();
        Ok(DeviceKv {
            shape: shape.clone(),
            k: k.kind,
            v: v.kind,
            kernel: plan.kernel,
            copies,
            kc: z8(rows * k.kind.code_bytes(d))?,
            ks: z8(rows * k.kind.scale_bytes(d))?,
            vc: z8(rows * v.kind.code_bytes(d))?,
            vs: z8(rows * v.kind.scale_bytes(d))?,
            lens: self.upload(&lens)?,
            out: cu(self.stream.alloc_zeros::<f32>(shape.batch() * nq * hq * d))?,
            q: cu(self.stream.alloc_zeros::<f32>(shape.batch() * nq * hq * d))?,
            plan,
        })
    }

    /// Uploads CPU codes: `k_codes`/`v_codes` hold, for every (sequence, KV
    /// head) in order, `max_len` consecutive codes of the side's CPU codec
    /// (slots past a sequence's length are ignored).
    pub fn upload_kv(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec, k_codes: &[u8], v_codes: &[u8]) -> Result<DeviceKv> {
        let mut kv = self.device_kv(shape, k, v, 1)?;
        let (d, t, cap) = (shape.heads.head_dim, shape.max_len(), kv.plan.cap);
        let seqs = shape.batch() * shape.heads.kv_heads;
        for (side, codes, is_k) in [(k, k_codes, true), (v, v_codes, false)] {
            let want = seqs * t * side.kind.bytes_per_vector(d);
            if codes.len() != want {
                return Err(Error::Shape(format!(
                    "{} codes: {} bytes given, {want} expected ({seqs} sequences × {t} tokens × {} bytes)",
                    if is_k { "key" } else { "value" },
                    codes.len(),
                    side.kind.bytes_per_vector(d)
                )));
            }
            let (plane, scales) = crate::split_codes(side.kind, d, codes)?;
            // pad every sequence from t to cap slots
            let pad = |x: &[u8], per: usize| {
                let mut o = vec![0u8; seqs * cap * per];
                for (s, src) in x.chunks_exact(t * per).enumerate() {
                    o[s * cap * per..s * cap * per + t * per].copy_from_slice(src);
                }
                o
            };
            let (pc, ps) = (pad(&plane, side.kind.code_bytes(d)), pad(&scales, side.kind.scale_bytes(d)));
            if is_k {
                cu(self.stream.memcpy_htod(&pc, &mut kv.kc))?;
                cu(self.stream.memcpy_htod(&ps, &mut kv.ks))?;
            } else {
                cu(self.stream.memcpy_htod(&pc, &mut kv.vc))?;
                cu(self.stream.memcpy_htod(&ps, &mut kv.vs))?;
            }
        }
        Ok(kv)
    }

    /// A cache of random valid codes (benchmarks), `copies` replicas.
    pub fn random_kv(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec, copies: usize, seed: u32) -> Result<DeviceKv> {
        let mut kv = self.device_kv(shape, k, v, copies.max(1))?;
        let module = self.module(&format!("#define D {}\n#define G 1\n", shape.heads.head_dim))?;
        let fill = cu(module.load_function("fill_random"))?;
        let fill_scales = cu(module.load_function("fill_scales"))?;
        for (i, (codes, scales, kind)) in [(&mut kv.kc, &mut kv.ks, kv.k), (&mut kv.vc, &mut kv.vs, kv.v)].into_iter().enumerate() {
            let words = (codes.len() / 4) as u64;
            let s = seed.wrapping_mul(2).wrapping_add(i as u32);
            let mut b = self.stream.launch_builder(&fill);
            b.arg(&mut *codes).arg(&words).arg(&s);
            // SAFETY: `fill_random(u32* p, u64 n, u32 seed)`: `words` u32 fit in
            // the codes buffer (its length / 4; device allocations are aligned).
            cu(unsafe { b.launch(grid_for(words)) })?;
            let half = matches!(kind, SideKind::Tq { .. }) as i32 ^ 1;
            let n = (scales.len() / if half == 1 { 2 } else { 4 }) as u64;
            let s2 = s ^ 0x9e37_79b9;
            let mut b = self.stream.launch_builder(&fill_scales);
            b.arg(&mut *scales).arg(&n).arg(&half).arg(&s2);
            // SAFETY: `fill_scales(void* p, u64 n, int f16, u32 seed)`: `n` f16 or
            // f32 scales (as `half` says) fit in the scales buffer (its length / 2 or / 4).
            cu(unsafe { b.launch(grid_for(n)) })?;
        }
        cu(self.stream.synchronize())?;
        Ok(kv)
    }

    fn launch_attend(&self, kv: &mut DeviceKv, copy: usize) -> Result<()> {
        let d = kv.shape.heads.head_dim;
        let per = (kv.shape.batch() * kv.shape.heads.kv_heads * kv.plan.cap) as u64;
        let (kcb, ksb, vcb, vsb) = (kv.k.code_bytes(d), kv.k.scale_bytes(d), kv.v.code_bytes(d), kv.v.scale_bytes(d));
        let c = copy as u64;
        let p = StepPtrs {
            q: self.ptr(&kv.q),
            kc: self.ptr(&kv.kc) + c * per * kcb as u64,
            ks: self.ptr(&kv.ks) + c * per * ksb as u64,
            vc: self.ptr(&kv.vc) + c * per * vcb as u64,
            vs: self.ptr(&kv.vs) + c * per * vsb as u64,
            lens: self.ptr(&kv.lens),
            out: self.ptr(&kv.out),
        };
        // SAFETY: the planes hold `copies` replicas of batch·kv_heads·cap slots
        // of the plan's sides (`device_kv` sized them from the same plan) and
        // copy < copies; q and out hold batch·q_tokens·q_heads·head_dim floats,
        // lens batch lengths ≤ cap (`AttnShape::check`); everything was made on
        // this stream, which the launch uses.
        unsafe { kv.plan.launch(self.stream.cu_stream() as u64, &p) }
    }

    fn set_query(&self, kv: &mut DeviceKv, q: &[f32]) -> Result<()> {
        let want = kv.shape.batch() * kv.shape.q_tokens * kv.shape.heads.q_heads * kv.shape.heads.head_dim;
        if q.len() != want {
            return Err(Error::Shape(format!("{} query values given, {want} expected (batch × q_tokens × q_heads × head_dim)", q.len())));
        }
        tq_core::codec::check_vectors(q, kv.shape.heads.head_dim)?;
        cu(self.stream.memcpy_htod(q, &mut kv.q))
    }

    /// Decode attention of the shape's query tokens per sequence: `q` is
    /// `[batch][q_tokens][q_heads][head_dim]`, the result likewise. The output buffer is
    /// poisoned (NaN) first, so an unwritten element cannot pass for a result.
    pub fn attend(&self, kv: &mut DeviceKv, q: &[f32]) -> Result<Vec<f32>> {
        self.set_query(kv, q)?;
        let poison = vec![f32::NAN; kv.out.len()];
        cu(self.stream.memcpy_htod(&poison, &mut kv.out))?;
        self.launch_attend(kv, 0)?;
        cu(self.stream.synchronize())?;
        cu(self.stream.clone_dtoh(&kv.out))
    }

    /// Median milliseconds of one decode-attention step (attention + split
    /// merge), timed with events, cycling through the cache's copies.
    pub fn time_attend(&self, kv: &mut DeviceKv, q: &[f32], warmup: usize, iters: usize) -> Result<f64> {
        self.set_query(kv, q)?;
        for i in 0..warmup {
            self.launch_attend(kv, i % kv.copies)?;
        }
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters {
            let (a, b) = (cu(self.ctx.new_event(flags))?, cu(self.ctx.new_event(flags))?);
            cu(a.record(&self.stream))?;
            self.launch_attend(kv, i % kv.copies)?;
            cu(b.record(&self.stream))?;
            cu(b.synchronize())?;
            times.push(cu(a.elapsed_ms(&b))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    /// Median milliseconds of one decode-attention step replayed as a CUDA
    /// graph (the step's three launches captured once per cache copy, then
    /// replayed cycling through the copies), timed with events: the step
    /// without launch gaps. The launch parameters of a cache are fixed when it
    /// is made, so one capture serves every step of its shape.
    pub fn time_attend_graph(&self, kv: &mut DeviceKv, q: &[f32], warmup: usize, iters: usize) -> Result<f64> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.set_query(kv, q)?;
        cu(self.stream.synchronize())?;
        let mut graphs = Vec::with_capacity(kv.copies);
        for c in 0..kv.copies {
            cu(self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED))?;
            let launched = self.launch_attend(kv, c);
            // end the capture whatever happened, so that the stream is usable again
            let graph = cu(self.stream.end_capture(CUgraphInstantiate_flags(0)))?;
            launched?;
            graphs.push(graph.ok_or_else(|| Error::Cuda("stream capture of a decode step produced no graph".into()))?);
        }
        for g in &graphs {
            cu(g.upload())?;
        }
        for i in 0..warmup {
            cu(graphs[i % graphs.len()].launch())?;
        }
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters {
            let (a, b) = (cu(self.ctx.new_event(flags))?, cu(self.ctx.new_event(flags))?);
            cu(a.record(&self.stream))?;
            cu(graphs[i % graphs.len()].launch())?;
            cu(b.record(&self.stream))?;
            cu(b.synchronize())?;
            times.push(cu(a.elapsed_ms(&b))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + written), median of 10.
    pub fn copy_gbps(&self, bytes: usize) -> Result<f64> {
        let src = cu(self.stream.alloc_zeros::<u8>(bytes))?;
        let mut dst = cu(self.stream.alloc_zeros::<u8>(bytes))?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::new();
        for i in 0..13 {
            let (a, b) = (cu(self.ctx.new_event(flags))?, cu(self.ctx.new_event(flags))?);
            cu(a.record(&self.stream))?;
            cu(self.stream.memcpy_dtod(&src, &mut dst))?;
            cu(b.record(&self.stream))?;
            cu(b.synchronize())?;
            if i >= 3 {
                times.push(cu(a.elapsed_ms(&b))? as f64);
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(2.0 * bytes as f64 / (times[times.len() / 2] * 1e-3) / 1e9)
    }
}

fn compile(defines: &str, arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    let src = format!("{defines}\n{SOURCE}");
    let opts = CompileOptions { arch: Some(arch), options: vec!["--std=c++17".into()], ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| Error::Compile(format!("{defines}: {e:?}")))
}

fn attention_defines(d: usize, g: usize, nq: usize, rb: usize, kvsame: bool, k: SideKind, v: SideKind) -> String {
    format!(
        "#define ATTENTION\n#define D {d}\n#define G {g}\n#define NQ {nq}\n#define RB {rb}\n#define KVSAME {}\n#define KMODE {}\n#define VMODE {}\n#define KB {}\n#define VB {}\n#define ROTK {}\n#define ROTV {}\n",
        kvsame as u32,
        k.mode(),
        v.mode(),
        k.bits(),
        v.bits(),
        k.rotated() as u32,
        v.rotated() as u32
    )
}

/// Compiles every kernel configuration the benchmarks use with NVRTC (no
/// GPU or driver needed) and returns their PTX: a build check. For each
/// tensor-core configuration it also checks that the shared memory the host
/// gives a block (`mma_smem`) is what the kernel's carve-up needs (the
/// module's `tq_mma_smem_bytes`).
pub fn compile_all(arch: &'static str) -> Result<Vec<(String, String)>> {
    // SAFETY: the probe only opens (and closes) the first `libnvrtc` found on
    // the loader path, running its initialisers; no symbol is called.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NoDevice("libnvrtc (the CUDA runtime compiler) was not found".into()));
    }
    let tq = |b| SideKind::Tq { bits: b, nc: false };
    let pairs = [(tq(4), tq(4)), (tq(3), tq(3)), (tq(2), tq(2)), (tq(4), tq(3)), (SideKind::Q8_0, SideKind::Q8_0), (SideKind::Q4_0, SideKind::Q4_0)];
    // (defines, shared memory the host gives a tensor-core block)
    let mut defines: Vec<(String, Option<usize>)> = Vec::new();
    for d in [64usize, 128] {
        defines.push((format!("#define D {d}\n#define G 1\n"), None));
        // (group, query tokens): one-token steps for the group sizes of the
        // benchmark geometries (3, 4, 6 query heads per KV head) and others;
        // multi-token steps at the geometries' own head_dim (SmolLM2 64,
        // Llama 128); rows per block as `device_kv` picks them (the SIMT
        // kernel forced on TurboQuant sides takes fewer rows per block)
        let multi: &[(usize, usize)] = if d == 64 { &[(3, 4)] } else { &[(4, 2), (4, 8), (6, 2)] };
        for &(g, nq) in [(1usize, 1usize), (3, 1), (4, 1), (6, 1), (8, 1)].iter().chain(multi) {
            for &(k, v) in &pairs {
                let tq = k.rotated() && v.rotated();
                if nq > 1 && !tq {
                    continue;
                }
                let rb = |cap: usize| (g * nq).div_ceil((g * nq).div_ceil(cap));
                let kvsame = tq && k.bits() == v.bits();
                let mut blocks = vec![rb(if tq { MMA_ROWS } else { SIMT_ROWS })];
                if tq && rb(SIMT_ROWS) != blocks[0] {
                    blocks.push(rb(SIMT_ROWS));
                }
                defines.extend(blocks.into_iter().map(|rb| (attention_defines(d, g, nq, rb, kvsame, k, v), tq.then(|| mma_smem(d, rb, kvsame, k, v)))));
            }
        }
    }
    // 4-bit K and V with two codebooks (no table shared, none on a 64 KiB boundary)
    defines.push((attention_defines(128, 4, 1, 4, false, tq(4), tq(4)), Some(mma_smem(128, 4, false, tq(4), tq(4)))));
    // NVRTC is thread-safe: compile on every core
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(defines.len());
    let chunks: Vec<&[(String, Option<usize>)]> = defines.chunks(defines.len().div_ceil(workers)).collect();
    let one = |defs: &str, smem: Option<usize>| -> Result<(String, String)> {
        let ptx = compile(defs, arch)?.to_src();
        if let Some(host) = smem {
            let kernel = ptx.split("tq_mma_smem_bytes = ").nth(1).and_then(|x| x.split(';').next()).and_then(|x| x.trim().parse::<usize>().ok());
            if kernel != Some(host) {
                return Err(Error::Compile(format!("{defs}: the host gives the tensor-core block {host} bytes of shared memory, the kernel needs {kernel:?}")));
            }
        }
        Ok((defs.to_string(), ptx))
    };
    let done: Vec<Result<Vec<(String, String)>>> = std::thread::scope(|s| {
        let hs: Vec<_> = chunks.iter().map(|c| s.spawn(move || c.iter().map(|(d, m)| one(d, *m)).collect())).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::Compile("an NVRTC worker thread panicked".into())))).collect()
    });
    let mut out = Vec::new();
    for r in done {
        out.extend(r?);
    }
    Ok(out)
}

impl DeviceKv {
    /// Bytes one attention step must read from the cache: codes and scales of
    /// every cached token, keys and values (one copy).
    pub fn bytes_read(&self) -> usize {
        let d = self.shape.heads.head_dim;
        let toks: usize = self.shape.lens.iter().sum::<usize>() * self.shape.heads.kv_heads;
        toks * (self.k.bytes_per_vector(d) + self.v.bytes_per_vector(d))
    }
    /// Parts each sequence is split into (blocks per sequence-head).
    pub fn splits(&self) -> usize {
        self.plan.nsplit
    }
    /// (registers per thread, local-memory bytes per thread (spills), resident
    /// blocks per multiprocessor) of the attention kernel.
    pub fn occupancy(&self) -> Result<(i32, i32, u32)> {
        let regs = cu(self.plan.attend.num_regs())?;
        let local = cu(self.plan.attend.get_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES))?;
        let blocks = cu(self.plan.attend.occupancy_max_active_blocks_per_multiprocessor(self.plan.threads, self.plan.smem as usize, None))?;
        Ok((regs, local, blocks))
    }
}

/// Launches `f` on the raw stream with `args` (pointers to each parameter's value).
///
/// # Safety
/// `args` are the kernel's parameters in order and type, every device
/// address among them is valid on `stream` for what the grid indexes, and
/// `stream` is a live stream of the context current on this thread.
unsafe fn launch_raw(f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32, stream: u64, args: &mut [*mut std::ffi::c_void]) -> Result<()> {
    let stream = stream as cudarc::driver::sys::CUstream;
    // SAFETY: the caller's contract.
    cu(unsafe { cudarc::driver::result::launch_kernel(f.cu_function(), grid, (block, 1, 1), smem, stream, args) })
}

macro_rules! params {
    ($($x:expr),* $(,)?) => { [$((&$x) as *const _ as *mut std::ffi::c_void),*] };
}

impl Encoder {
    /// Queues the encode of `job` on `stream` (a `CUstream` of this device's
    /// primary context, e.g. PyTorch's current stream); returns at once.
    ///
    /// # Safety
    /// The job's addresses are device memory of this context, valid on
    /// `stream`: `x` holds `seqs · per · head_dim` f32, the planes `seqs ·
    /// cap` slots (`code_bytes` and 4 bytes each), `lens` (if not 0) `seqs /
    /// heads` i32. The kernel skips any slot outside `[0, cap)`.
    pub unsafe fn launch(&self, stream: u64, job: &EncodeJob) -> Result<()> {
        let n = job.seqs * job.per;
        if n == 0 {
            return Ok(());
        }
        if job.heads == 0 || !job.seqs.is_multiple_of(job.heads) || job.per > job.cap || n > i32::MAX as usize || job.seqs * job.cap > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "encode of {} sequences × {} vectors into {} slots ({} heads per length)",
                job.seqs, job.per, job.cap, job.heads
            )));
        }
        cu(self.ctx.bind_to_thread())?;
        let (n, per, cap, heads) = (n as i32, job.per as i32, job.cap as i32, job.heads as i32);
        let mut args = params![
            job.x,
            n,
            per,
            cap,
            heads,
            job.lens,
            self.rot.s1.p,
            self.rot.s2.p,
            self.rot.total,
            self.bounds.p,
            self.cent.p,
            self.bits,
            self.nc,
            self.bf16,
            job.codes,
            job.scales
        ];
        // SAFETY: the arguments are `tq_encode`'s parameters in order and type
        // (xs, n, per, cap, heads, lens, s1, s2, total, boundaries, centroids,
        // bits, nc, bf16, codes, scales); block v < n reads x[v·D..][..D] and
        // writes one slot < seqs·cap of each plane (the kernel checks the slot);
        // the signs and codebook are this encoder's, uploaded and synchronized.
        unsafe { launch_raw(&self.f, (n as u32, 1, 1), self.head_dim as u32, 0, stream, &mut args) }
    }
}

impl AttendPlan {
    /// Parts each sequence is split into.
    pub fn splits(&self) -> usize {
        self.nsplit
    }

    /// Queues one decode-attention step (rotate the queries, attend per
    /// split, merge and rotate back) on `stream` (a `CUstream` of this
    /// device's primary context, e.g. PyTorch's current stream); returns at
    /// once, synchronizes nothing. Query token `i` of `q_tokens` sees the
    /// first `lens[b] − q_tokens + 1 + i` tokens of its sequence.
    ///
    /// # Safety
    /// Every address of `p` is device memory of this context, valid on
    /// `stream`, as large as [`StepPtrs`] says for this plan's shape and
    /// `cap`; the lengths are ≥ q_tokens and ≤ cap. The plan's scratch is
    /// reused by every launch: launches of one plan must be ordered (one
    /// stream, or synchronized).
    pub unsafe fn launch(&self, stream: u64, p: &StepPtrs) -> Result<()> {
        cu(self.ctx.bind_to_thread())?;
        let (b, h) = (self.shape.batch(), self.shape.heads.kv_heads);
        let (cap, heads, split_len, nsplit) = (self.cap as i32, h as i32, self.split_len as i32, self.nsplit as i32);
        let (qr, po, pm, pl) = (self.qr.p, self.po.p, self.pm.p, self.pl.p);
        let (k, v) = (&self.krot, &self.vrot);
        let mut args = params![p.q, k.s1.p, k.s2.p, k.total, heads, qr];
        // SAFETY: `tq_prep_q(q, ks1, ks2, ktotal, kv_heads, qr)` in order and type;
        // block i < batch·kv_heads reads the NQ·G query vectors of its sequence
        // and KV head from `q` and writes the NR·D floats at i·NR·D of `qr`
        // (batch·q_tokens·q_heads·D each); the signs hold D entries (or 1,
        // unused unless ROTK).
        unsafe { launch_raw(&self.prep, ((b * h) as u32, 1, 1), NT as u32, 0, stream, &mut args) }?;
        let mut args = params![qr, p.kc, p.ks, p.vc, p.vs, p.lens, cap, heads, split_len, k.s1.p, k.s2.p, k.total, self.ktab.p, self.vtab.p, po, pm, pl];
        // SAFETY: the arguments are the parameter list shared by `tq_attend` and
        // `tq_attend_mma` (q, kc, ks, vc, vs, lens, cap, kv_heads, split_len,
        // ks1, ks2, ktotal, ktab, vtab, po, pm, pl) in order and type. The code
        // and scale planes hold batch·kv_heads·cap slots (the caller's
        // contract; cap a multiple of TILE, so every 16-token bulk copy of the
        // tensor-core kernel stays inside them), `lens` has batch entries <=
        // cap, the partial buffers hold batch·kv_heads·NR·nsplit (·D) floats
        // for the nsplit·split_len >= cap grid, the grid's y is kv_heads·NGR
        // with the NGR and RB of the defines, and the dynamic shared memory is
        // what `mma_smem` / `attend_smem` compute (the limit raised above 48
        // KiB in `attend_plan`).
        unsafe { launch_raw(&self.attend, (self.nsplit as u32, (h * self.ngr) as u32, b as u32), self.threads, self.smem, stream, &mut args) }?;
        let mut args = params![po, pm, pl, nsplit, v.s1.p, v.s2.p, v.total, heads, p.out];
        // SAFETY: `tq_combine(po, pm, pl, nsplit, vs1, vs2, vtotal, kv_heads, out)`
        // in order and type; block i < batch·kv_heads·NR reads its nsplit
        // partials and writes one D-vector of `out` (batch·q_tokens·q_heads·D);
        // `wsplit` gets its nsplit floats of shared memory.
        unsafe { launch_raw(&self.combine, ((b * h * self.shape.rows()) as u32, 1, 1), COMBINE_THREADS, 4 * self.nsplit as u32, stream, &mut args) }
    }
}

/// Splits per sequence-head so that `seqs · splits` blocks fill whole waves of
/// `slots` resident blocks to 90% or more, with the fewest splits.
fn split_count(slots: usize, seqs: usize) -> usize {
    for waves in 1..=16 {
        let n = waves * slots / seqs;
        if n == 0 {
            continue;
        }
        let blocks = n * seqs;
        if blocks as f64 / (blocks.div_ceil(slots) * slots) as f64 >= 0.9 {
            return n;
        }
    }
    (8 * slots).div_ceil(seqs)
}

fn grid_for(n: u64) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).min(65_535 * 8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Dynamic shared memory of `tq_attend_mma` (MMA_SMEM in kernels.cu): the
/// pair tables (32 copies of each entry, 256 or 128 bytes per entry; one
/// table when K and V share it) and every warp's stages (with one stage of
/// slack where the tables sit on a 64 KiB boundary), or the merge area that
/// reuses them if larger, then one mbarrier per stage.
fn mma_smem(d: usize, rb: usize, kvsame: bool, k: SideKind, v: SideKind) -> usize {
    let (kb, vb) = (k.bits() as usize, v.bits() as usize);
    let share = kvsame && kb == vb;
    // the K table on a 64 KiB boundary, stages before and after it; 4-bit
    // keys (unless K and V are 4-bit with two codebooks) 256 bytes per entry
    let kstride = if kb == 4 && (share || vb != 4) { 256 } else { 128 };
    let stage = 16 * (k.code_bytes(d) + v.code_bytes(d)) + 16 * 8;
    let tab = (1 << (2 * kb)) * kstride + if share { 0 } else { (1 << (2 * vb)) * 128 };
    let mw = mma_warps(rb);
    let pipe = mw * MMA_STAGES * stage;
    let layout = tab + (pipe + stage).max(65536);
    let merge = mw * rb * (d + 2) * 4;
    layout.max(merge) + mw * MMA_STAGES * 8
}

/// Dynamic shared memory of `tq_attend` (mirrors the carve-up in kernels.cu).
fn attend_smem(d: usize, g: usize, k: SideKind, v: SideKind) -> usize {
    let rsw = |p: usize| {
        if (p / 4).is_multiple_of(2) {
            p / 4 + 1
        } else {
            p / 4
        }
    };
    let sc = |s: SideKind| {
        if matches!(s, SideKind::Tq { .. }) {
            1
        } else {
            d / 32
        }
    };
    let words = TILE * rsw(k.code_bytes(d)) + 4 + TILE * rsw(v.code_bytes(d)) + 4 + TILE * sc(v) + g * TILE + g * d + 512 + 3 * g;
    let groups = NT / (d / 8);
    4 * words.max(groups * g * d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor-core configuration `compile_all` builds asks for no more
    /// dynamic shared memory than a Hopper multiprocessor gives one block
    /// (227 KiB), so its launch cannot fail for want of shared memory.
    #[test]
    fn tensor_core_blocks_fit_in_shared_memory() {
        let tq = |b| SideKind::Tq { bits: b, nc: false };
        for d in [64usize, 128] {
            for (k, v) in [(tq(4), tq(4)), (tq(3), tq(3)), (tq(2), tq(2)), (tq(4), tq(3))] {
                for rows in 1..=8 * 16usize {
                    let rb = rows.div_ceil(rows.div_ceil(MMA_ROWS));
                    for kvsame in [false, true] {
                        let smem = mma_smem(d, rb, kvsame, k, v);
                        assert!(smem <= 227 * 1024, "d={d} {k:?}/{v:?} rows={rows}: {smem} bytes of shared memory");
                    }
                }
            }
        }
    }
}
