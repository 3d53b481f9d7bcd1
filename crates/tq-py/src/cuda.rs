//! `CudaKv`: the `tq-cuda` kernels on GPU arrays of another framework
//! (PyTorch, CuPy), through the CUDA array interface: no copy through the
//! host, launches on the caller's stream, no synchronisation.
//!
//! Every array argument is an object with `__cuda_array_interface__`
//! (a PyTorch CUDA tensor); its shape, dtype, C-contiguity and writability
//! are checked against what the launch needs, and its device range against
//! the allocation it lies in, before any launch: a CPU tensor, a wrong dtype
//! or shape, a strided view or a too-small buffer is a `ValueError` /
//! `TypeError` naming the argument.

use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tq_core::KvGeometry;
use tq_cuda::{AttendPlan, AttnShape, EncodeJob, Encoder, Gpu, SideKind, SideSpec, StepPtrs};

fn value_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Element types the kernels take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    U8,
    I32,
}

impl Dtype {
    fn typestr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::U8 => "|u1",
            Dtype::I32 => "<i4",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::U8 => "uint8",
            Dtype::I32 => "int32",
        }
    }
    fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::U8 => 1,
        }
    }
}

/// An array's `__cuda_array_interface__`, read once: its shape (empty and no
/// dict when the object has none: a CPU tensor), checked by [`Iface::check`].
struct Iface<'py> {
    what: &'static str,
    obj: Bound<'py, PyAny>,
    dict: Option<Bound<'py, PyDict>>,
    shape: Vec<usize>,
}

impl<'py> Iface<'py> {
    fn read(obj: &Bound<'py, PyAny>, what: &'static str) -> PyResult<Self> {
        let Ok(iface) = obj.getattr("__cuda_array_interface__") else {
            return Ok(Self { what, obj: obj.clone(), dict: None, shape: Vec::new() });
        };
        let dict = iface.cast_into::<PyDict>().map_err(|_| PyTypeError::new_err(format!("{what}: __cuda_array_interface__ is not a dict")))?;
        let shape: Vec<usize> = Self::item(&dict, what, "shape")?.extract()?;
        Ok(Self { what, obj: obj.clone(), dict: Some(dict), shape })
    }

    fn item(dict: &Bound<'py, PyDict>, what: &str, k: &str) -> PyResult<Bound<'py, PyAny>> {
        dict.get_item(k).ok().flatten().ok_or_else(|| PyTypeError::new_err(format!("{what}: __cuda_array_interface__ has no '{k}'")))
    }

    /// Checks the array against `dtype` and `shape` (C-contiguous, writable
    /// when `write`), then its device range; returns its device address.
    fn check(&self, gpu: &Gpu, dtype: Dtype, shape: &[usize], write: bool) -> PyResult<u64> {
        let what = self.what;
        let want = || format!("{what} must be a C-contiguous {} CUDA tensor of shape {shape:?}", dtype.name());
        let Some(iface) = &self.dict else {
            return Err(PyTypeError::new_err(format!("{}; got {} (a CPU tensor or array?)", want(), self.obj.get_type().name()?)));
        };
        let typestr: String = Self::item(iface, what, "typestr")?.extract()?;
        if typestr != dtype.typestr() {
            return Err(PyTypeError::new_err(format!("{}; got dtype '{typestr}' (convert with .float(), .to(torch.uint8), .int())", want())));
        }
        if self.shape != shape {
            return Err(PyValueError::new_err(format!("{}; got shape {:?}", want(), self.shape)));
        }
        if let Some(strides) = iface.get_item("strides")?.filter(|s| !s.is_none()) {
            let strides: Vec<isize> = strides.extract()?;
            let mut expect = vec![0isize; shape.len()];
            let mut acc = dtype.size() as isize;
            for i in (0..shape.len()).rev() {
                expect[i] = acc;
                acc *= shape[i] as isize;
            }
            // strides of dimensions of length 1 do not matter
            if strides.iter().zip(&expect).zip(shape).any(|((s, e), &n)| n > 1 && s != e) {
                return Err(PyValueError::new_err(format!("{} (call .contiguous()); got strides {strides:?}", want())));
            }
        }
        let (ptr, readonly): (u64, bool) = Self::item(iface, what, "data")?.extract()?;
        if write && readonly {
            return Err(PyValueError::new_err(format!("{what} is read-only; the kernel writes it")));
        }
        let bytes = shape.iter().product::<usize>() * dtype.size();
        gpu.check_range(ptr, bytes, what).map_err(value_err)?;
        Ok(ptr)
    }
}

/// The device address of `obj` once it passes [`Iface::check`].
fn dev_array(gpu: &Gpu, obj: &Bound<'_, PyAny>, what: &'static str, dtype: Dtype, shape: &[usize], write: bool) -> PyResult<u64> {
    Iface::read(obj, what)?.check(gpu, dtype, shape, write)
}

/// The GPU kernels for one KV precision and head geometry. See the module docs.
#[pyclass(name = "CudaKv", module = "turboquant")]
pub struct PyCudaKv {
    gpu: Gpu,
    name: String,
    heads: KvGeometry,
    k: SideSpec,
    v: SideSpec,
    kenc: Encoder,
    venc: Encoder,
    exact: bool,
    /// attention plans by (batch, query tokens, capacity)
    plans: Mutex<HashMap<(usize, usize, usize), AttendPlan>>,
}

impl PyCudaKv {
    fn side(&self, side: &str) -> PyResult<(&SideSpec, &Encoder)> {
        match side {
            "k" | "keys" => Ok((&self.k, &self.kenc)),
            "v" | "values" => Ok((&self.v, &self.venc)),
            _ => Err(PyValueError::new_err(format!("side '{side}': 'k' or 'v'"))),
        }
    }
}

#[pymethods]
impl PyCudaKv {
    /// `precision`: `tq-mse-B`, `tq-mse-B-nc`, `kBvC` or `kBvC-nc` with B, C
    /// in 2..4 (the GPU encoder codes TurboQuant sides only); `q_heads`,
    /// `kv_heads`, `head_dim` (64 or 128); `seed` of the rotations (values
    /// use `kv_value_seed(seed)`, as the CPU cache does); `device`: the CUDA
    /// ordinal; `bf16_scales`: store each norm rounded to bf16 as the CPU
    /// cache does (attention then sees the CPU cache's values; the scale
    /// plane stays f32); `exact`: attend with the fp32 SIMT kernel instead of
    /// the tensor-core one (f16 operands, f32 accumulation).
    #[new]
    #[pyo3(signature = (precision, q_heads, kv_heads, head_dim, seed = 0, device = 0, bf16_scales = true, exact = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(precision: &str, q_heads: usize, kv_heads: usize, head_dim: usize, seed: u64, device: usize, bf16_scales: bool, exact: bool) -> PyResult<Self> {
        let spec: tq_kv::KvSpec = precision.parse().map_err(value_err)?;
        let heads = KvGeometry::new(1, q_heads, kv_heads, head_dim).map_err(value_err)?;
        let (Some(ke), Some(ve)) = (spec.keys.codec(), spec.values.codec()) else {
            return Err(PyValueError::new_err(format!(
                "KV precision '{precision}': the GPU cache takes tq-mse-B, tq-mse-B-nc, kBvC and kBvC-nc (B, C = 2..4)"
            )));
        };
        let (k, v) = tq_cuda::kv_sides(ke, ve, head_dim, seed).map_err(value_err)?;
        for s in [&k, &v] {
            if !matches!(s.kind, SideKind::Tq { .. }) {
                return Err(PyValueError::new_err(format!("KV precision '{precision}': the GPU encoder codes TurboQuant sides only, not {}", s.name)));
            }
        }
        let gpu = Gpu::new(device).map_err(value_err)?;
        gpu.force_simt(exact);
        let kenc = gpu.encoder(&k, bf16_scales).map_err(value_err)?;
        let venc = gpu.encoder(&v, bf16_scales).map_err(value_err)?;
        Ok(Self { gpu, name: precision.to_string(), heads, k, v, kenc, venc, exact, plans: Mutex::new(HashMap::new()) })
    }

    /// The precision string.
    #[getter]
    fn precision(&self) -> String {
        self.name.clone()
    }
    /// Which attention kernel runs: `mma-f16` (tensor cores) or `simt-f32`.
    #[getter]
    fn kernel(&self) -> &'static str {
        if self.exact {
            "simt-f32"
        } else {
            "mma-f16"
        }
    }
    /// The card's name.
    #[getter]
    fn device_name(&self) -> PyResult<String> {
        self.gpu.name().map_err(value_err)
    }
    /// Bytes of one key code in the code plane.
    #[getter]
    fn key_code_bytes(&self) -> usize {
        self.kenc.code_bytes
    }
    /// Bytes of one value code in the code plane.
    #[getter]
    fn value_code_bytes(&self) -> usize {
        self.venc.code_bytes
    }
    /// Bits per cached value on the GPU (codes and the f32 scale of each side).
    #[getter]
    fn bits_per_value(&self) -> f64 {
        let d = self.heads.head_dim;
        (self.k.kind.bytes_per_vector(d) + self.v.kind.bytes_per_vector(d)) as f64 * 8.0 / (2 * d) as f64
    }

    /// Queues the encode of `x` (float32 `(batch, kv_heads, n, head_dim)`)
    /// into `codes` (uint8 `(batch, kv_heads, cap, code_bytes)`) and `scales`
    /// (float32 `(batch, kv_heads, cap)`) on `stream` (a `cudaStream_t` as an
    /// int: `torch.cuda.current_stream().cuda_stream`). With `lens` (int32
    /// `(batch,)`, on the GPU, already counting these `n` tokens) token `t`
    /// goes to slot `lens[b] − n + t`, else to slot `t`. Returns at once.
    #[pyo3(signature = (side, x, codes, scales, stream, lens = None))]
    fn encode(
        &self,
        side: &str,
        x: &Bound<'_, PyAny>,
        codes: &Bound<'_, PyAny>,
        scales: &Bound<'_, PyAny>,
        stream: u64,
        lens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (_, enc) = self.side(side)?;
        let xi = Iface::read(x, "x")?;
        if xi.dict.is_none() {
            return Err(PyTypeError::new_err("x must be a float32 CUDA tensor (batch, kv_heads, n, head_dim); got a CPU object"));
        }
        let [b, h, n, d] = xi.shape[..] else {
            return Err(PyValueError::new_err(format!("x must be (batch, kv_heads, n, head_dim); got shape {:?}", xi.shape)));
        };
        if h != self.heads.kv_heads || d != self.heads.head_dim {
            return Err(PyValueError::new_err(format!(
                "x has {h} heads of {d}; this cache takes {} KV heads of head_dim {}",
                self.heads.kv_heads, self.heads.head_dim
            )));
        }
        let ci = Iface::read(codes, "codes")?;
        let cap = ci.shape.get(2).copied().unwrap_or(0);
        let xp = xi.check(&self.gpu, Dtype::F32, &[b, h, n, d], false)?;
        let cp = ci.check(&self.gpu, Dtype::U8, &[b, h, cap, enc.code_bytes], true)?;
        let sp = dev_array(&self.gpu, scales, "scales", Dtype::F32, &[b, h, cap], true)?;
        let l = match lens {
            Some(l) => dev_array(&self.gpu, l, "lens", Dtype::I32, &[b], false)?,
            None => 0,
        };
        if n > cap {
            return Err(PyValueError::new_err(format!("{n} tokens for planes of {cap} slots")));
        }
        let job = EncodeJob { x: xp, seqs: b * h, per: n, cap, heads: h, lens: l, codes: cp, scales: sp };
        // SAFETY: every address was checked to lie in device memory of this
        // context with the bytes the job touches (`Iface::check`); the kernel skips
        // slots outside [0, cap); `stream` is the caller's stream of this
        // device (a foreign or dead stream makes the launch fail with a CUDA error).
        unsafe { enc.launch(stream, &job) }.map_err(value_err)
    }

    /// Queues one attention step on the codes on `stream`: `q` float32
    /// `(batch, q_tokens, q_heads, head_dim)` (RoPE applied; 1 to 8 query
    /// tokens, the last ones of each sequence, causal), the planes of
    /// `encode`, `lens` int32 `(batch,)` on the GPU (each ≥ q_tokens and ≤
    /// cap), `out` like `q`. Scores are scaled by 1/sqrt(head_dim). Returns
    /// at once; the kernels' launch parameters depend only on (batch,
    /// q_tokens, cap), so a step can be captured in a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Bound<'_, PyAny>,
        k_codes: &Bound<'_, PyAny>,
        k_scales: &Bound<'_, PyAny>,
        v_codes: &Bound<'_, PyAny>,
        v_scales: &Bound<'_, PyAny>,
        lens: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        stream: u64,
    ) -> PyResult<()> {
        let g = self.heads;
        let qi = Iface::read(q, "q")?;
        if qi.dict.is_none() {
            return Err(PyTypeError::new_err("q must be a float32 CUDA tensor (batch, q_tokens, q_heads, head_dim); got a CPU object"));
        }
        let [b, nq, hq, d] = qi.shape[..] else {
            return Err(PyValueError::new_err(format!("q must be (batch, q_tokens, q_heads, head_dim); got shape {:?}", qi.shape)));
        };
        if hq != g.q_heads || d != g.head_dim {
            return Err(PyValueError::new_err(format!("q has {hq} heads of {d}; this cache takes {} query heads of head_dim {}", g.q_heads, g.head_dim)));
        }
        if !(1..=8).contains(&nq) || b == 0 || b > tq_core::limits::MAX_KV_BATCH {
            return Err(PyValueError::new_err(format!(
                "q: {nq} query tokens for {b} sequences (1 to 8 query tokens, 1 to {} sequences)",
                tq_core::limits::MAX_KV_BATCH
            )));
        }
        let kci = Iface::read(k_codes, "k_codes")?;
        let cap = kci.shape.get(2).copied().unwrap_or(0);
        if cap == 0 || cap % 128 != 0 {
            return Err(PyValueError::new_err(format!("the planes hold {cap} slots per sequence; the kernels take a positive multiple of 128")));
        }
        let h = g.kv_heads;
        let p = StepPtrs {
            q: qi.check(&self.gpu, Dtype::F32, &[b, nq, hq, d], false)?,
            kc: kci.check(&self.gpu, Dtype::U8, &[b, h, cap, self.kenc.code_bytes], false)?,
            ks: dev_array(&self.gpu, k_scales, "k_scales", Dtype::F32, &[b, h, cap], false)?,
            vc: dev_array(&self.gpu, v_codes, "v_codes", Dtype::U8, &[b, h, cap, self.venc.code_bytes], false)?,
            vs: dev_array(&self.gpu, v_scales, "v_scales", Dtype::F32, &[b, h, cap], false)?,
            lens: dev_array(&self.gpu, lens, "lens", Dtype::I32, &[b], false)?,
            out: dev_array(&self.gpu, out, "out", Dtype::F32, &[b, nq, hq, d], true)?,
        };
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans.entry((b, nq, cap)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let shape = AttnShape { heads: g, lens: vec![cap; b], q_tokens: nq };
                e.insert(self.gpu.attend_plan(&shape, &self.k, &self.v).map_err(value_err)?)
            }
        };
        // SAFETY: every address was checked to lie in device memory of this
        // context with the bytes the plan's shape touches (`Iface::check`); the
        // plan's scratch is used by launches on the caller's stream in the
        // order they are queued (the lock orders the queueing). The kernels
        // clamp each length to cap, so a wrong length reads slots of the
        // planes that hold no token, never memory outside them.
        unsafe { plan.launch(stream, &p) }.map_err(value_err)
    }

    fn __repr__(&self) -> String {
        format!("CudaKv({:?}, q_heads={}, kv_heads={}, head_dim={})", self.name, self.heads.q_heads, self.heads.kv_heads, self.heads.head_dim)
    }
}
