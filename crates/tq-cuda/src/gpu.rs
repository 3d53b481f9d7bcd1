//! The CUDA implementation (feature `cuda`): cudarc with dynamic loading,
//! kernels compiled by NVRTC per configuration and cached per process.
//!
//! Soundness of the `unsafe` blocks here rests on three facts:
//! - every allocation, copy, launch and event of a [`Gpu`] goes through its
//!   one stream (`ctx.default_stream()`), so stream order alone orders all
//!   device work; that is why cudarc's per-buffer event tracking may be off;
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

use crate::{AttnShape, Error, Result, SideKind, SideSpec};

const SOURCE: &str = include_str!("kernels.cu");
/// Threads of the SIMT attention kernel and of `tq_prep_q` (NT in kernels.cu).
const NT: usize = 128;
const TILE: usize = 128;
/// Warps of a tensor-core attention block (MW in kernels.cu).
const MMA_WARPS: usize = 8;
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
    cap: usize,
    copies: usize,
    kc: CudaSlice<u8>,
    ks: CudaSlice<u8>,
    vc: CudaSlice<u8>,
    vs: CudaSlice<u8>,
    lens: CudaSlice<i32>,
    krot: Rot,
    vrot: Rot,
    ktab: CudaSlice<f32>,
    vtab: CudaSlice<f32>,
    nsplit: usize,
    split_len: usize,
    po: CudaSlice<f32>,
    pm: CudaSlice<f32>,
    pl: CudaSlice<f32>,
    out: CudaSlice<f32>,
    q: CudaSlice<f32>,
    /// the queries rotated and scaled (tq_prep_q)
    qr: CudaSlice<f32>,
    prep: CudaFunction,
    attend: CudaFunction,
    combine: CudaFunction,
    smem: u32,
    threads: u32,
    /// row blocks per KV head
    ngr: usize,
    /// Which attention kernel runs: `mma-f16` (tensor cores) or `simt-f32`.
    pub kernel: &'static str,
}

struct Rot {
    s1: CudaSlice<u32>,
    s2: CudaSlice<u32>,
    total: f32,
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
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream, arch, sms, modules: Mutex::new(HashMap::new()), simt: AtomicBool::new(false), splits: AtomicUsize::new(0) })
    }

    /// The device's name (as the driver reports it).
    pub fn name(&self) -> Result<String> {
        cu(self.ctx.name())
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sms
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
            Some((s1, s2, total)) => Ok(Rot { s1: self.upload(s1)?, s2: self.upload(s2)?, total }),
            None => Ok(Rot { s1: self.upload(&[0u32])?, s2: self.upload(&[0u32])?, total: 1.0 }),
        }
    }

    fn table(&self, side: &SideSpec) -> Result<CudaSlice<f32>> {
        match side.codebook() {
            Some((c, _)) => self.upload(c),
            None => self.upload(&[0.0f32]),
        }
    }

    /// Encodes row-major `xs` (`n × head_dim`) with a TurboQuant side on the
    /// GPU; returns the CPU codec's code bytes (`[packed][f32 scale]` each).
    pub fn encode(&self, side: &SideSpec, xs: &[f32]) -> Result<Vec<u8>> {
        let d = side.head_dim;
        let SideKind::Tq { bits, nc } = side.kind else {
            return Err(Error::Unsupported(format!("GPU encode takes tq-mse-B sides, not {}", side.name)));
        };
        tq_core::codec::check_vectors(xs, d)?;
        let n = xs.len() / d;
        let module = self.module(&format!("#define D {d}\n#define G 1\n"))?;
        let f = cu(module.load_function("tq_encode"))?;
        let (s1, s2, total) = side.hadamard().expect("TurboQuant sides are rotated");
        let (cent, bounds) = side.codebook().expect("TurboQuant sides have a codebook");
        let x = self.upload(xs)?;
        let (s1, s2) = (self.upload(s1)?, self.upload(s2)?);
        let (cent, bounds) = (self.upload(cent)?, self.upload(bounds)?);
        let pb = side.kind.code_bytes(d);
        let mut codes = cu(self.stream.alloc_zeros::<u8>(n * pb))?;
        let mut scales = cu(self.stream.alloc_zeros::<f32>(n))?;
        let (n32, bits32, nc32) = (n as i32, bits as i32, nc as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x).arg(&n32).arg(&s1).arg(&s2).arg(&total).arg(&bounds).arg(&cent).arg(&bits32).arg(&nc32);
        b.arg(&mut codes).arg(&mut scales);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are `tq_encode`'s parameters in order and type
        // (xs, n, s1, s2, total, boundaries, centroids, bits, nc, codes, scales);
        // block i < n encodes x[i·D..][..D] into codes[i·pb..][..pb] and
        // scales[i], and the buffers hold n vectors, d signs each, the side's
        // 2^bits - 1 boundaries and 2^bits centroids.
        cu(unsafe { b.launch(cfg) })?;
        let codes = cu(self.stream.clone_dtoh(&codes))?;
        let scales = cu(self.stream.clone_dtoh(&scales))?;
        Ok(crate::join_tq_codes(d, bits, &codes, &scales))
    }

    fn device_kv(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec, copies: usize) -> Result<DeviceKv> {
        shape.check()?;
        let d = shape.heads.head_dim;
        if k.head_dim != d || v.head_dim != d {
            return Err(Error::Shape(format!("sides built for head_dim {}/{}, shape has {d}", k.head_dim, v.head_dim)));
        }
        let (b, h, nr) = (shape.batch(), shape.heads.kv_heads, shape.rows());
        let cap = shape.max_len().div_ceil(TILE) * TILE;
        let rows = copies * b * h * cap;
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
        let (smem, threads) = if mma { (mma_smem(d, rb, kvsame, k.kind, v.kind), 32 * MMA_WARPS) } else { (attend_smem(d, rb, k.kind, v.kind), NT) };
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
        let z8 = |n: usize| cu(self.stream.alloc_zeros::<u8>(n));
        let (hq, nq) = (shape.heads.q_heads, shape.q_tokens);
        let lens: Vec<i32> = shape.lens.iter().map(|&l| l as i32).collect();
        Ok(DeviceKv {
            shape: shape.clone(),
            k: k.kind,
            v: v.kind,
            cap,
            copies,
            kc: z8(rows * k.kind.code_bytes(d))?,
            ks: z8(rows * k.kind.scale_bytes(d))?,
            vc: z8(rows * v.kind.code_bytes(d))?,
            vs: z8(rows * v.kind.scale_bytes(d))?,
            lens: self.upload(&lens)?,
            krot: self.rot(k)?,
            vrot: self.rot(v)?,
            ktab: self.table(k)?,
            vtab: self.table(v)?,
            nsplit,
            split_len,
            po: cu(self.stream.alloc_zeros::<f32>(b * h * nr * nsplit * d))?,
            pm: cu(self.stream.alloc_zeros::<f32>(b * h * nr * nsplit))?,
            pl: cu(self.stream.alloc_zeros::<f32>(b * h * nr * nsplit))?,
            out: cu(self.stream.alloc_zeros::<f32>(b * nq * hq * d))?,
            q: cu(self.stream.alloc_zeros::<f32>(b * nq * hq * d))?,
            prep,
            attend,
            combine,
            qr: cu(self.stream.alloc_zeros::<f32>(b * nq * hq * d))?,
            smem: smem as u32,
            threads: threads as u32,
            ngr,
            kernel: if mma { "mma-f16" } else { "simt-f32" },
        })
    }

    /// Uploads CPU codes: `k_codes`/`v_codes` hold, for every (sequence, KV
    /// head) in order, `max_len` consecutive codes of the side's CPU codec
    /// (slots past a sequence's length are ignored).
    pub fn upload_kv(&self, shape: &AttnShape, k: &SideSpec, v: &SideSpec, k_codes: &[u8], v_codes: &[u8]) -> Result<DeviceKv> {
        let mut kv = self.device_kv(shape, k, v, 1)?;
        let (d, t) = (shape.heads.head_dim, shape.max_len());
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
                let mut o = vec![0u8; seqs * kv.cap * per];
                for (s, src) in x.chunks_exact(t * per).enumerate() {
                    o[s * kv.cap * per..s * kv.cap * per + t * per].copy_from_slice(src);
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
        let per = kv.shape.batch() * kv.shape.heads.kv_heads * kv.cap;
        let (kcb, ksb, vcb, vsb) = (kv.k.code_bytes(d), kv.k.scale_bytes(d), kv.v.code_bytes(d), kv.v.scale_bytes(d));
        let kc = kv.kc.slice(copy * per * kcb..(copy + 1) * per * kcb);
        let ks = kv.ks.slice(copy * per * ksb..(copy + 1) * per * ksb);
        let vc = kv.vc.slice(copy * per * vcb..(copy + 1) * per * vcb);
        let vs = kv.vs.slice(copy * per * vsb..(copy + 1) * per * vsb);
        let (cap, heads, split_len) = (kv.cap as i32, kv.shape.heads.kv_heads as i32, kv.split_len as i32);
        let mut b = self.stream.launch_builder(&kv.prep);
        b.arg(&kv.q).arg(&kv.krot.s1).arg(&kv.krot.s2).arg(&kv.krot.total).arg(&heads).arg(&mut kv.qr);
        let cfg = LaunchConfig { grid_dim: ((kv.shape.batch() * kv.shape.heads.kv_heads) as u32, 1, 1), block_dim: (NT as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `tq_prep_q(q, ks1, ks2, ktotal, kv_heads, qr)` in order and type;
        // block i < batch·kv_heads reads the NQ·G query vectors of its sequence
        // and KV head from `q` and writes the NR·D floats at i·NR·D of `qr`
        // (batch·q_tokens·q_heads·D each); the signs hold D entries (or 1,
        // unused unless ROTK).
        cu(unsafe { b.launch(cfg) })?;
        let mut b = self.stream.launch_builder(&kv.attend);
        b.arg(&kv.qr).arg(&kc).arg(&ks).arg(&vc).arg(&vs).arg(&kv.lens).arg(&cap).arg(&heads).arg(&split_len);
        b.arg(&kv.krot.s1).arg(&kv.krot.s2).arg(&kv.krot.total).arg(&kv.ktab).arg(&kv.vtab);
        b.arg(&mut kv.po).arg(&mut kv.pm).arg(&mut kv.pl);
        let cfg = LaunchConfig {
            grid_dim: (kv.nsplit as u32, (kv.shape.heads.kv_heads * kv.ngr) as u32, kv.shape.batch() as u32),
            block_dim: (kv.threads, 1, 1),
            shared_mem_bytes: kv.smem,
        };
        // SAFETY: the arguments are the parameter list shared by `tq_attend` and
        // `tq_attend_mma` (q, kc, ks, vc, vs, lens, cap, kv_heads, split_len,
        // ks1, ks2, ktotal, ktab, vtab, po, pm, pl) in order and type. The code
        // and scale views are one copy of batch·kv_heads·cap slots (cap a
        // multiple of TILE, so every 16-token bulk copy of the tensor-core
        // kernel stays inside them), `lens` has batch entries <= cap, the
        // partial buffers hold batch·kv_heads·NR·nsplit (·D) floats for the
        // nsplit·split_len >= cap grid, the grid's y is kv_heads·NGR with the
        // NGR and RB of the defines, and the dynamic shared memory is what
        // `mma_smem` / `attend_smem` compute (the limit raised above 48 KiB in
        // `device_kv`).
        cu(unsafe { b.launch(cfg) })?;
        let nsplit = kv.nsplit as i32;
        let mut b = self.stream.launch_builder(&kv.combine);
        b.arg(&kv.po).arg(&kv.pm).arg(&kv.pl).arg(&nsplit).arg(&kv.vrot.s1).arg(&kv.vrot.s2).arg(&kv.vrot.total).arg(&heads);
        b.arg(&mut kv.out);
        let cfg = LaunchConfig {
            grid_dim: ((kv.shape.batch() * kv.shape.heads.kv_heads * kv.shape.rows()) as u32, 1, 1),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 4 * kv.nsplit as u32,
        };
        // SAFETY: `tq_combine(po, pm, pl, nsplit, vs1, vs2, vtotal, kv_heads, out)`
        // in order and type; block i < batch·kv_heads·NR reads its nsplit
        // partials and writes one D-vector of `out` (batch·q_tokens·q_heads·D);
        // `wsplit` gets its nsplit floats of shared memory.
        cu(unsafe { b.launch(cfg) })?;
        Ok(())
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
        self.nsplit
    }
    /// (registers per thread, local-memory bytes per thread (spills), resident
    /// blocks per multiprocessor) of the attention kernel.
    pub fn occupancy(&self) -> Result<(i32, i32, u32)> {
        let regs = cu(self.attend.num_regs())?;
        let local = cu(self.attend.get_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES))?;
        let blocks = cu(self.attend.occupancy_max_active_blocks_per_multiprocessor(self.threads, self.smem as usize, None))?;
        Ok((regs, local, blocks))
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
/// pair tables (32 copies of each entry; one table when K and V share it) and
/// every warp's stages, or the merge area that reuses them if larger, then
/// one mbarrier per stage.
fn mma_smem(d: usize, rb: usize, kvsame: bool, k: SideKind, v: SideKind) -> usize {
    let (kb, vb) = (k.bits() as usize, v.bits() as usize);
    let stage = 16 * (k.code_bytes(d) + v.code_bytes(d)) + 16 * 8;
    let tab = ((1 << (2 * kb)) + if kvsame && kb == vb { 0 } else { 1 << (2 * vb) }) * 32 * 4;
    let pipe = MMA_WARPS * MMA_STAGES * stage;
    let merge = MMA_WARPS * rb * (d + 2) * 4;
    (tab + pipe).max(merge) + MMA_WARPS * MMA_STAGES * 8
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
