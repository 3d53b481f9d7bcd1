//! `turboquant`: the Rust engine from Python, numpy in and out.
//!
//! Arrays: float32 C-contiguous inputs are used in place (no copy); float64
//! is converted to float32 (a copy); anything else is a `TypeError`, a
//! non-contiguous array a `ValueError`, both naming the expected shape and
//! dtype. Heavy calls release the GIL (the interpreter's other threads run).

use std::path::PathBuf;

mod cuda;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tq_core::RotationKind;
use tq_index::file::{self, AnyIndex};
use tq_index::{FlatIndex, IndexSpec, IvfIndex, Metric, RawVectors, SearchParams};

fn value_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A row-major float32 matrix view of a numpy array: borrowed when it is
/// float32 and C-contiguous, converted when float64. 1-D arrays are one row.
enum Rows<'py> {
    Borrowed(numpy::PyReadonlyArrayDyn<'py, f32>),
    Owned(Vec<f32>),
}

impl Rows<'_> {
    fn slice(&self) -> &[f32] {
        match self {
            Rows::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            Rows::Owned(v) => v,
        }
    }
}

/// The values of a float32 array (borrowed; it must be C-contiguous) or a
/// float64 one (converted), once `shape_of` accepts its shape; anything else
/// is a `TypeError` saying `expect`.
fn float_values<'py, S>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    expect: impl Fn() -> String,
    shape_of: impl Fn(&[usize]) -> PyResult<S>,
) -> PyResult<(S, Rows<'py>)> {
    if let Ok(a) = obj.cast::<numpy::PyArrayDyn<f32>>() {
        let shape = shape_of(a.shape())?;
        if !a.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{what} must be C-contiguous (numpy.ascontiguousarray, or .contiguous() on a torch tensor)")));
        }
        return Ok((shape, Rows::Borrowed(a.readonly())));
    }
    if let Ok(a) = obj.cast::<numpy::PyArrayDyn<f64>>() {
        let shape = shape_of(a.shape())?;
        let v: Vec<f32> = a.readonly().as_array().iter().map(|&x| x as f32).collect();
        return Ok((shape, Rows::Owned(v)));
    }
    Err(PyTypeError::new_err(expect()))
}

fn rows<'py>(obj: &Bound<'py, PyAny>, cols: usize, what: &str) -> PyResult<(usize, Rows<'py>)> {
    let expect = || format!("{what} must be a float32 (or float64) numpy array of shape (n, {cols})");
    float_values(obj, what, expect, |shape| match shape {
        [n, d] if *d == cols => Ok(*n),
        [d] if *d == cols => Ok(1),
        _ => Err(PyValueError::new_err(format!("{}; got shape {shape:?}", expect()))),
    })
}

/// A C-contiguous uint8[n, code_size] array of codes (n, borrowed view).
fn codes_of<'py>(codes: &Bound<'py, PyAny>, cs: usize) -> PyResult<(usize, numpy::PyReadonlyArray2<'py, u8>)> {
    let a = codes.cast::<PyArray2<u8>>().map_err(|_| PyTypeError::new_err(format!("codes must be a uint8 numpy array of shape (n, {cs})")))?;
    if a.shape()[1] != cs || !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("codes must be C-contiguous uint8 of shape (n, {cs}); got {:?}", a.shape())));
    }
    Ok((a.shape()[0], a.readonly()))
}

fn ids_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if let Ok(a) = obj.cast::<numpy::PyArrayDyn<u64>>() {
        return Ok(a.readonly().as_array().iter().copied().collect());
    }
    if let Ok(a) = obj.cast::<numpy::PyArrayDyn<i64>>() {
        return a
            .readonly()
            .as_array()
            .iter()
            .map(|&v| u64::try_from(v).map_err(|_| PyValueError::new_err(format!("ids must be non-negative, got {v}"))))
            .collect();
    }
    obj.extract::<Vec<u64>>().map_err(|_| PyTypeError::new_err("ids must be a sequence or numpy array of non-negative integers"))
}

fn rotation(s: &str) -> PyResult<RotationKind> {
    s.parse().map_err(PyValueError::new_err)
}

/// The codec registry at `dim`: name, id, bits per value (every overhead
/// included), code size in bytes, description.
#[pyfunction]
#[pyo3(signature = (dim = 128))]
fn codecs<'py>(py: Python<'py>, dim: usize) -> PyResult<Vec<Bound<'py, PyDict>>> {
    tq_core::registry()
        .iter()
        .map(|e| {
            let d = PyDict::new(py);
            d.set_item("name", &e.name)?;
            d.set_item("id", e.id)?;
            d.set_item("bits_per_value", e.bits_per_value(dim))?;
            d.set_item("code_size", e.code_size(dim))?;
            d.set_item("description", e.description())?;
            Ok(d)
        })
        .collect()
}

/// A vector codec from the registry (`turboquant.codecs()`), e.g.
/// `Codec("tq-mse-4", 128)`. Codes are fixed-size byte strings; the same
/// name, dim and seed give the same bytes as the `tq` CLI.
#[pyclass(name = "Codec", module = "turboquant")]
struct PyCodec {
    inner: Box<dyn tq_core::Codec>,
}

#[pymethods]
impl PyCodec {
    #[new]
    #[pyo3(signature = (name, dim, seed = 0, rotation = "hadamard"))]
    fn new(name: &str, dim: usize, seed: u64, rotation: &str) -> PyResult<Self> {
        let r = self::rotation(rotation)?;
        Ok(Self { inner: tq_core::build(name, dim, seed, r).map_err(value_err)? })
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    /// Bytes per code.
    #[getter]
    fn code_size(&self) -> usize {
        self.inner.code_size()
    }
    /// Storage bits per vector coordinate, every per-vector overhead included.
    #[getter]
    fn bits_per_value(&self) -> f64 {
        self.inner.bits_per_value()
    }
    /// Whether `train` must (PQ) or may (RaBitQ's centre, fractional rates) be called first.
    #[getter]
    fn wants_training(&self) -> bool {
        self.inner.wants_training()
    }

    /// Fits data-dependent parameters on `x` (float32[n, dim]).
    fn train(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let (_, r) = rows(x, self.inner.dim(), "x")?;
        let s = r.slice();
        let inner = &mut self.inner;
        py.detach(|| inner.train(s)).map_err(value_err)
    }

    /// float32[n, dim] → uint8[n, code_size].
    fn encode<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let (n, r) = rows(x, self.inner.dim(), "x")?;
        let out = PyArray2::<u8>::zeros(py, [n, self.inner.code_size()], false);
        {
            let mut w = out.readwrite();
            let buf = w.as_slice_mut().expect("fresh array");
            let s = r.slice();
            let c = &self.inner;
            py.detach(|| c.encode_batch(s, buf)).map_err(value_err)?;
        }
        Ok(out)
    }

    /// uint8[n, code_size] → float32[n, dim].
    fn decode<'py>(&self, py: Python<'py>, codes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (n, r) = codes_of(codes, self.inner.code_size())?;
        let src = r.as_slice().expect("contiguous");
        let out = PyArray2::<f32>::zeros(py, [n, self.inner.dim()], false);
        {
            let mut w = out.readwrite();
            let buf = w.as_slice_mut().expect("fresh array");
            let c = &self.inner;
            py.detach(|| c.decode_batch(src, buf)).map_err(value_err)?;
        }
        Ok(out)
    }

    /// Inner-product estimates of queries float32[q, dim] against codes
    /// uint8[n, code_size], computed on the codes: float32[q, n].
    fn inner_product<'py>(&self, py: Python<'py>, queries: &Bound<'py, PyAny>, codes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (nq, r) = rows(queries, self.inner.dim(), "queries")?;
        let (n, cr) = codes_of(codes, self.inner.code_size())?;
        let src = cr.as_slice().expect("contiguous");
        let out = PyArray2::<f32>::zeros(py, [nq, n], false);
        {
            let mut w = out.readwrite();
            let buf = w.as_slice_mut().expect("fresh array");
            let q = r.slice();
            let c = &self.inner;
            let d = c.dim();
            py.detach(|| -> tq_core::Result<()> {
                for (qi, row) in q.chunks_exact(d).zip(buf.chunks_exact_mut(n.max(1))) {
                    let pq = c.prepare(qi)?;
                    c.score_ip_many(&pq, src, row);
                }
                Ok(())
            })
            .map_err(value_err)?;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "Codec('{}', dim={}, code_size={}, bits_per_value={:.3})",
            self.inner.name(),
            self.inner.dim(),
            self.inner.code_size(),
            self.inner.bits_per_value()
        )
    }
}

/// A search index over codes (flat with fast-scan where the codec allows,
/// or IVF with `ivf_lists` k-means lists). `metric`: "ip", "cosine" or "l2".
/// IVF lists and codec parameters are trained on the first `add`.
/// Files written by `save` are the `tq index` format (`.tqi`).
#[pyclass(name = "Index", module = "turboquant")]
struct PyIndex {
    spec: IndexSpec,
    ivf_lists: Option<usize>,
    inner: Option<AnyIndex>,
    /// The file this index was loaded from (or last saved to) and its
    /// commit then: a save over that file refuses if another writer
    /// committed since, instead of discarding that writer's records.
    view: Option<(PathBuf, file::Commit)>,
}

fn metric_of(s: &str) -> PyResult<Metric> {
    s.parse().map_err(PyValueError::new_err)
}

impl PyIndex {
    fn all_ids(&self) -> Vec<u64> {
        self.inner.as_ref().map_or_else(Vec::new, AnyIndex::ids)
    }

    /// The file a durable write appends to, and the commit this index has seen.
    fn file_view(&self) -> PyResult<(PathBuf, file::Commit)> {
        self.view.clone().ok_or_else(|| PyValueError::new_err("durable=True needs the index's file: save the index (or load it from a file) first"))
    }

    fn commit_view(&mut self, commit: file::Commit) {
        if let Some((_, c)) = self.view.as_mut() {
            *c = commit;
        }
    }
}

/// `(scores, ids)` of a search.
type SearchResult<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

#[pymethods]
impl PyIndex {
    #[new]
    #[pyo3(signature = (codec, dim, metric = "ip", ivf_lists = None, seed = 0, raw = "none"))]
    fn new(codec: &str, dim: usize, metric: &str, ivf_lists: Option<usize>, seed: u64, raw: &str) -> PyResult<Self> {
        let spec = IndexSpec { seed, raw: raw.parse::<RawVectors>().map_err(PyValueError::new_err)?, ..IndexSpec::new(codec, dim, metric_of(metric)?) };
        // validate now: unknown codec or bad dim fail at construction
        FlatIndex::new(spec.clone()).map_err(value_err)?;
        if ivf_lists == Some(0) {
            return Err(PyValueError::new_err("ivf_lists must be positive"));
        }
        Ok(Self { spec, ivf_lists, inner: None, view: None })
    }

    /// Loads a `.tqi` file (written by `save` or by `tq index build`).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let (idx, commit) = py.detach(|| file::load(&path)).map_err(value_err)?;
        let ivf_lists = match &idx {
            AnyIndex::Ivf(i) => Some(i.nlist()),
            AnyIndex::Flat(_) => None,
        };
        Ok(Self { spec: idx.spec().clone(), ivf_lists, inner: Some(idx), view: Some((path, commit)) })
    }

    /// Writes the index atomically (temp file, fsync, rename) under the
    /// file's write lock (`<path>.lock`, waiting up to 10 s for another
    /// writer). Saving over the file this index was loaded from fails with
    /// "index file changed since it was loaded" if another writer committed
    /// since; load again and retry.
    fn save(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let idx = match &self.inner {
            Some(i) => i,
            None => return Err(PyValueError::new_err("the index is empty: add vectors before saving")),
        };
        let same = |a: &std::path::Path| a == path || matches!((a.canonicalize(), path.canonicalize()), (Ok(x), Ok(y)) if x == y);
        let view = self.view.as_ref().filter(|(p, _)| same(p)).map(|(_, c)| *c);
        let commit = py.detach(|| file::save_over(idx, &path, view, file::LockWait::default())).map_err(value_err)?;
        self.view = Some((path, commit));
        Ok(())
    }

    /// Examines a `.tqi` file without changing it: a dict with the commit
    /// slots, the committed seq and end, records verified, bytes and valid
    /// records after the committed end, whether it loads, and whether the
    /// previous commit is intact when a slot is corrupt (see `tq index check`).
    #[staticmethod]
    fn verify<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
        let r = py.detach(|| file::check(&path)).map_err(value_err)?;
        let d = PyDict::new(py);
        d.set_item("path", path.display().to_string())?;
        d.set_item("file_bytes", r.file_bytes)?;
        d.set_item("header_error", r.header_error.clone())?;
        let slots = pyo3::types::PyList::empty(py);
        for s in &r.slots {
            let sd = PyDict::new(py);
            let (state, seq, end) = match s.state {
                file::SlotState::Empty => ("empty", None, None),
                file::SlotState::Valid { seq, end } => ("valid", Some(seq), Some(end)),
                file::SlotState::Corrupt { seq, end } => ("corrupt", Some(seq), Some(end)),
            };
            sd.set_item("slot", s.name.to_string())?;
            sd.set_item("offset", s.offset)?;
            sd.set_item("state", state)?;
            sd.set_item("seq", seq)?;
            sd.set_item("end", end)?;
            slots.append(sd)?;
        }
        d.set_item("slots", slots)?;
        d.set_item("commit_seq", r.commit.map(|c| c.seq))?;
        d.set_item("committed_bytes", r.commit.map(|c| c.end))?;
        d.set_item("records_verified", r.records_verified)?;
        d.set_item("count", r.count)?;
        d.set_item("records_error", r.records_error.clone())?;
        d.set_item("bytes_after_end", r.bytes_after_end)?;
        d.set_item("records_after_end", r.records_after_end)?;
        d.set_item("loads", r.loads)?;
        d.set_item("load_error", r.load_error.clone())?;
        d.set_item("previous_commit_intact", r.previous_commit_intact)?;
        d.set_item("verdict", r.verdict())?;
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.len())
    }

    #[getter]
    fn codec(&self) -> String {
        self.spec.codec.clone()
    }
    #[getter]
    fn dim(&self) -> usize {
        self.spec.dim
    }
    #[getter]
    fn metric(&self) -> &'static str {
        self.spec.metric.name()
    }

    /// Adds float32[n, dim] vectors with ids (default: after the largest id).
    /// All or nothing: on error nothing is added. `durable=True` also appends
    /// the ADD record to the index's file (the one it was loaded from or last
    /// saved to: fsync, then the commit slot, under the write lock) before
    /// returning; if that append fails (or another writer committed to the
    /// file since) the rows are taken out again and the error is raised.
    #[pyo3(signature = (x, ids = None, durable = false))]
    fn add(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>, ids: Option<&Bound<'_, PyAny>>, durable: bool) -> PyResult<()> {
        let (n, r) = rows(x, self.spec.dim, "x")?;
        let ids = match ids {
            Some(o) => ids_of(o)?,
            None => {
                let start = self.all_ids().into_iter().max().map_or(0, |m| m + 1);
                (start..start + n as u64).collect()
            }
        };
        if ids.len() != n {
            return Err(PyValueError::new_err(format!("{} ids for {n} vectors", ids.len())));
        }
        let view = if durable { Some(self.file_view()?) } else { None };
        let s = r.slice();
        let (spec, lists) = (self.spec.clone(), self.ivf_lists);
        let inner = &mut self.inner;
        let committed = py
            .detach(|| -> tq_index::Result<Option<file::Commit>> {
                if inner.is_none() {
                    let mut f = FlatIndex::new(spec)?;
                    if f.codec().wants_training() {
                        f.train(s)?;
                    }
                    *inner = Some(match lists {
                        None => AnyIndex::Flat(f),
                        Some(l) => AnyIndex::Ivf(IvfIndex::train(f.spec().clone(), l, s, 10)?),
                    });
                }
                let idx = inner.as_mut().expect("built above");
                let payload = idx.add(&ids, s)?;
                let Some((path, commit)) = view else { return Ok(None) };
                let mut app = file::Appender::new(&path, commit);
                match app.append_add(&payload) {
                    Ok(()) => Ok(Some(app.commit())),
                    Err(e) => {
                        // newest first: each removed row holds the last slot of
                        // its list, so the older rows keep their slots
                        let newest_first: Vec<u64> = ids.iter().rev().copied().collect();
                        idx.remove(&newest_first)?;
                        Err(e)
                    }
                }
            })
            .map_err(value_err)?;
        if let Some(c) = committed {
            self.commit_view(c);
        }
        Ok(())
    }

    /// Removes ids (all or nothing: an unknown id raises and removes none).
    /// `durable=True` also appends the REMOVE record to the index's file
    /// before returning (as `add`); if that append fails the index is loaded
    /// again from its file (where the ids are still present) and the error
    /// is raised.
    #[pyo3(signature = (ids, durable = false))]
    fn remove(&mut self, py: Python<'_>, ids: &Bound<'_, PyAny>, durable: bool) -> PyResult<()> {
        let ids = ids_of(ids)?;
        let view = if durable { Some(self.file_view()?) } else { None };
        let Some(inner) = self.inner.as_mut() else {
            return Err(PyValueError::new_err("the index is empty"));
        };
        let payload = py.detach(|| inner.remove(&ids)).map_err(value_err)?;
        let Some((path, commit)) = view else { return Ok(()) };
        let mut app = file::Appender::new(&path, commit);
        match py.detach(|| app.append_remove(&payload)) {
            Ok(()) => {
                self.commit_view(app.commit());
                Ok(())
            }
            Err(e) => match py.detach(|| file::load(&path)) {
                Ok((idx, c)) => {
                    self.inner = Some(idx);
                    self.view = Some((path, c));
                    Err(value_err(e))
                }
                Err(e2) => Err(PyValueError::new_err(format!(
                    "{e}; loading the file again also failed ({e2}): the index in memory no longer matches its file, load it again"
                ))),
            },
        }
    }

    /// Every id held (uint64): the flat index's slot order, or IVF list after list.
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_vec(py, self.all_ids())
    }

    /// Whether each of `ids` is in the index (bool array, same length).
    fn contains<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<bool>>> {
        let ids = ids_of(ids)?;
        let held: Vec<bool> = ids.iter().map(|&i| self.inner.as_ref().is_some_and(|x| x.contains(i))).collect();
        Ok(PyArray1::from_vec(py, held))
    }

    /// The `k` best results per query, FAISS's `(D, I)` convention:
    /// scores float32[q, k] (similarity for ip/cosine, squared distance for
    /// l2) and ids int64[q, k], padded with -1 (and -inf / +inf) when fewer
    /// than `k` vectors qualify. `filter`: ids allowed in the results.
    #[pyo3(signature = (queries, k, nprobe = None, filter = None, exact = false, rerank = 10, raw_rerank = false))]
    #[allow(clippy::too_many_arguments)]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: usize,
        nprobe: Option<usize>,
        filter: Option<&Bound<'py, PyAny>>,
        exact: bool,
        rerank: usize,
        raw_rerank: bool,
    ) -> PyResult<SearchResult<'py>> {
        let (nq, r) = rows(queries, self.spec.dim, "queries")?;
        let allow: Option<std::collections::HashSet<u64>> = filter.map(ids_of).transpose()?.map(|v| v.into_iter().collect());
        let pad = if self.spec.metric == Metric::L2 { f32::INFINITY } else { f32::NEG_INFINITY };
        let dists = PyArray1::<f32>::from_vec(py, vec![pad; nq * k]).reshape([nq, k])?;
        let labels = PyArray1::<i64>::from_vec(py, vec![-1; nq * k]).reshape([nq, k])?;
        if let Some(idx) = &self.inner {
            let s = r.slice();
            let p = SearchParams { allow: allow.as_ref(), rerank, exact, nprobe: nprobe.unwrap_or(8), raw_rerank };
            let res = py.detach(|| idx.search_batch(s, k, &p)).map_err(value_err)?;
            let mut dw = dists.readwrite();
            let mut lw = labels.readwrite();
            let (d, l) = (dw.as_slice_mut().expect("fresh"), lw.as_slice_mut().expect("fresh"));
            for (qi, hits) in res.iter().enumerate() {
                for (j, h) in hits.iter().enumerate() {
                    d[qi * k + j] = h.score;
                    l[qi * k + j] = h.id as i64;
                }
            }
        } else {
            // still validate the queries
            tq_core::codec::check_vectors(r.slice(), self.spec.dim).map_err(value_err)?;
        }
        Ok((dists, labels))
    }

    fn __repr__(&self) -> String {
        format!(
            "Index(codec='{}', dim={}, metric='{}', ivf_lists={:?}, len={})",
            self.spec.codec,
            self.spec.dim,
            self.spec.metric.name(),
            self.ivf_lists,
            self.__len__()
        )
    }
}

/// A float32 (or float64, converted) C-contiguous array of `dims.len()`
/// dimensions, each equal to its `Some` entry: (shape, values).
fn nd_f32<'py>(obj: &Bound<'py, PyAny>, dims: &[Option<usize>], what: &str, layout: &str) -> PyResult<(Vec<usize>, Rows<'py>)> {
    let expect = || format!("{what} must be a C-contiguous float32 numpy array of shape {layout}");
    float_values(obj, what, expect, |shape| {
        if shape.len() != dims.len() || shape.iter().zip(dims).any(|(s, d)| d.is_some_and(|d| d != *s)) {
            return Err(PyValueError::new_err(format!("{}; got shape {shape:?}", expect())));
        }
        Ok(shape.to_vec())
    })
}

/// A compressed KV cache for a batch of sequences of one model, attention
/// computed on the codes (the Rust CPU caches of `tq kv`, one per sequence:
/// the same codecs, seeds and results as the CPU runtime).
#[pyclass(name = "KvCache", module = "turboquant")]
struct PyKvCache {
    /// One cache per sequence (in a `Mutex` to make the class `Sync`; Python
    /// holds the object's borrow while a method runs, so it is never contended).
    caches: std::sync::Mutex<Vec<Box<dyn tq_kv::KvCache>>>,
    shape: tq_kv::KvGeometry,
    spec: tq_kv::KvSpec,
    options: tq_kv::CacheOptions,
    seed: u64,
}

impl PyKvCache {
    fn fresh(shape: tq_kv::KvGeometry, spec: &tq_kv::KvSpec, seed: u64, options: &tq_kv::CacheOptions, batch: usize) -> PyResult<Vec<Box<dyn tq_kv::KvCache>>> {
        (0..batch).map(|_| tq_kv::cache_with(shape, spec, seed, options).map_err(value_err)).collect()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn tq_kv::KvCache>>> {
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyKvCache {
    /// `precision`: a KV precision string (`kv_precisions()`; budget
    /// precisions need a fitted plan and are refused here); the model's
    /// `layers`, `q_heads`, `kv_heads`, `head_dim`; `batch` sequences; `seed`
    /// of the codecs' rotations; the windows and key centering of `tq kv`.
    #[new]
    #[pyo3(signature = (precision, layers, q_heads, kv_heads, head_dim, batch = 1, seed = 0, sink = 0, recent = 0, center_keys = false, recent_q8 = false, delayed = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        precision: &str,
        layers: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        batch: usize,
        seed: u64,
        sink: usize,
        recent: usize,
        center_keys: bool,
        recent_q8: bool,
        delayed: bool,
    ) -> PyResult<Self> {
        let spec: tq_kv::KvSpec = precision.parse().map_err(value_err)?;
        let shape = tq_kv::KvGeometry::new(layers, q_heads, kv_heads, head_dim).map_err(value_err)?;
        if batch == 0 || batch > tq_core::limits::MAX_KV_BATCH {
            return Err(PyValueError::new_err(format!("batch {batch}: 1 to {} sequences", tq_core::limits::MAX_KV_BATCH)));
        }
        // the recent windows are allocated up front, per stream and sequence
        let window_bytes = (batch as u128) * (shape.streams() as u128) * (recent.min(tq_core::limits::MAX_WINDOW_TOKENS) as u128) * (head_dim as u128) * 8;
        if window_bytes > 1 << 36 {
            return Err(PyValueError::new_err(format!(
                "recent windows of {recent} tokens for {batch} sequences × {} streams would take {} GiB",
                shape.streams(),
                window_bytes >> 30
            )));
        }
        let options = tq_kv::CacheOptions { sink, recent, center_keys, recent_q8, delayed, calibration: None };
        let caches = Self::fresh(shape, &spec, seed, &options, batch)?.into();
        Ok(Self { caches, shape, spec, options, seed })
    }

    /// Appends `n` new tokens of every sequence to `layer` and returns the
    /// attention of their queries over the cache (each query attends to the
    /// cached tokens up to and including its own, causally, on the codes).
    /// `keys`, `values`: float32 `(batch, n, kv_heads, head_dim)`; `queries`:
    /// `(batch, n, q_heads, head_dim)` (RoPE applied); returns
    /// `(batch, n, q_heads, head_dim)` float32. Scores are scaled by
    /// 1/sqrt(head_dim).
    fn update<'py>(
        &mut self,
        py: Python<'py>,
        layer: usize,
        keys: &Bound<'py, PyAny>,
        values: &Bound<'py, PyAny>,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, numpy::PyArrayDyn<f32>>> {
        let g = self.shape;
        if layer >= g.layers {
            return Err(PyValueError::new_err(format!("layer {layer} of a cache of {} layers", g.layers)));
        }
        let mut caches = self.lock();
        let b = caches.len();
        let kv_layout = format!("(batch={b}, n, kv_heads={}, head_dim={})", g.kv_heads, g.head_dim);
        let (ks, k) = nd_f32(keys, &[Some(b), None, Some(g.kv_heads), Some(g.head_dim)], "keys", &kv_layout)?;
        let n = ks[1];
        if n == 0 {
            return Err(PyValueError::new_err("keys hold no token (n = 0)"));
        }
        let (_, v) = nd_f32(values, &[Some(b), Some(n), Some(g.kv_heads), Some(g.head_dim)], "values", &kv_layout.replace(", n,", &format!(", n={n},")))?;
        let q_layout = format!("(batch={b}, n={n}, q_heads={}, head_dim={})", g.q_heads, g.head_dim);
        let (_, q) = nd_f32(queries, &[Some(b), Some(n), Some(g.q_heads), Some(g.head_dim)], "queries", &q_layout)?;
        let len = caches[0].len(layer, 0);
        if len + n > tq_core::limits::MAX_KV_TOKENS {
            return Err(PyValueError::new_err(format!("{} tokens exceed the largest context of {}", len + n, tq_core::limits::MAX_KV_TOKENS)));
        }
        let (kd, qd) = (n * g.kv_heads * g.head_dim, n * g.q_heads * g.head_dim);
        for (what, x) in [("keys", k.slice()), ("values", v.slice()), ("queries", q.slice())] {
            if let Some(i) = x.iter().position(|x| !x.is_finite()) {
                return Err(PyValueError::new_err(format!("{what} hold a non-finite value ({}) at flat index {i}", x[i])));
            }
        }
        let mut out = vec![0.0f32; b * qd];
        let group = g.q_heads / g.kv_heads;
        let (ks, vs, qs) = (k.slice(), v.slice(), q.slice());
        let seqs: &mut Vec<Box<dyn tq_kv::KvCache>> = &mut caches;
        py.detach(|| -> tq_core::Result<()> {
            for (s, cache) in seqs.iter_mut().enumerate() {
                let (kr, qr) = (s * kd..(s + 1) * kd, s * qd..(s + 1) * qd);
                tq_kv::append_attend(cache.as_mut(), layer, &ks[kr.clone()], &vs[kr], &qs[qr.clone()], g.kv_heads, group, g.head_dim, &mut out[qr])?;
            }
            Ok(())
        })
        .map_err(value_err)?;
        let arr = numpy::PyArray1::from_vec(py, out);
        arr.reshape(vec![b, n, g.q_heads, g.head_dim])
    }

    /// Tokens held by `layer` (the same for every sequence).
    fn seq_len(&self, layer: usize) -> PyResult<usize> {
        if layer >= self.shape.layers {
            return Err(PyValueError::new_err(format!("layer {layer} of a cache of {} layers", self.shape.layers)));
        }
        Ok(self.lock()[0].len(layer, 0))
    }

    /// Bytes held for keys and values, every layer, head and sequence.
    #[getter]
    fn nbytes(&self) -> usize {
        self.lock().iter().map(|c| c.bytes()).sum()
    }

    /// Bits per value of the precision (codes and scales, no windows).
    #[getter]
    fn bits_per_value(&self) -> PyResult<f64> {
        self.spec.bits_per_value(self.shape.head_dim).map_err(value_err)
    }

    /// Sequences in the batch.
    #[getter]
    fn batch(&self) -> usize {
        self.lock().len()
    }

    /// The precision string.
    #[getter]
    fn precision(&self) -> String {
        self.spec.to_string()
    }

    /// Empties the cache (every layer and sequence), keeping its settings;
    /// `batch` changes the number of sequences.
    #[pyo3(signature = (batch = None))]
    fn reset(&mut self, batch: Option<usize>) -> PyResult<()> {
        let b = batch.unwrap_or(self.lock().len());
        if b == 0 || b > tq_core::limits::MAX_KV_BATCH {
            return Err(PyValueError::new_err(format!("batch {b}: 1 to {} sequences", tq_core::limits::MAX_KV_BATCH)));
        }
        *self.lock() = Self::fresh(self.shape, &self.spec, self.seed, &self.options, b)?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let g = self.shape;
        let caches = self.lock();
        let bytes: usize = caches.iter().map(|c| c.bytes()).sum();
        format!(
            "KvCache(precision='{}', layers={}, q_heads={}, kv_heads={}, head_dim={}, batch={}, len={}, nbytes={bytes})",
            self.spec,
            g.layers,
            g.q_heads,
            g.kv_heads,
            g.head_dim,
            caches.len(),
            caches[0].len(0, 0),
        )
    }
}

/// The codec seed of a KV cache's values when its keys use `seed` (a cache
/// seeded `s` codes keys with `Codec(keys, d, seed=s)` and values with
/// `Codec(values, d, seed=kv_value_seed(s))`).
#[pyfunction]
fn kv_value_seed(seed: u64) -> u64 {
    tq_core::rng::kv_value_seed(seed)
}

/// The KV-cache precision strings (`f32`, `tq-mse-4`, `k4v3`, ...).
#[pyfunction]
fn kv_precisions() -> &'static str {
    tq_kv::PRECISIONS
}

/// Bytes per token per layer and bits per value of a KV precision for
/// `kv_heads` heads of `head_dim`: `{"bytes_per_token_per_layer": .., "bits_per_value": ..}`.
#[pyfunction]
fn kv_bytes<'py>(py: Python<'py>, precision: &str, kv_heads: usize, head_dim: usize) -> PyResult<Bound<'py, PyDict>> {
    let s: tq_kv::KvSpec = precision.parse().map_err(value_err)?;
    let d = PyDict::new(py);
    d.set_item("bytes_per_token_per_layer", s.bytes_per_token_per_layer(kv_heads, head_dim).map_err(value_err)?)?;
    d.set_item("bits_per_value", s.bits_per_value(head_dim).map_err(value_err)?)?;
    Ok(d)
}

/// Memory plan of `model` (see `tq vram`): weights, KV cache and total in GB
/// (10^9 bytes), and the number of 24 GB cards.
#[pyfunction]
#[pyo3(signature = (model, context, kv, weights = "bf16"))]
fn vram<'py>(py: Python<'py>, model: &str, context: usize, kv: &str, weights: &str) -> PyResult<Bound<'py, PyDict>> {
    let m = tq_kv::plan::model(model).map_err(value_err)?;
    let w: tq_kv::plan::Weights = weights.parse().map_err(value_err)?;
    let spec: tq_kv::KvSpec = kv.parse().map_err(value_err)?;
    let p = tq_kv::plan::vram(m, w, context, &spec).map_err(value_err)?;
    let d = PyDict::new(py);
    d.set_item("model", p.model)?;
    d.set_item("kv", p.kv)?;
    d.set_item("context", p.context)?;
    d.set_item("kv_bits_per_value", p.kv_bits_per_value)?;
    d.set_item("weights_gb", p.weights_gb)?;
    d.set_item("kv_gb", p.kv_gb)?;
    d.set_item("total_gb", p.total_gb)?;
    d.set_item("cards_24gb", p.cards_24gb)?;
    Ok(d)
}

/// The native module; the `turboquant` package re-exports it (`turboquant/__init__.py`).
#[pymodule]
fn _turboquant(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(codecs, m)?)?;
    m.add_function(wrap_pyfunction!(kv_precisions, m)?)?;
    m.add_function(wrap_pyfunction!(kv_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(kv_value_seed, m)?)?;
    m.add_function(wrap_pyfunction!(vram, m)?)?;
    m.add_class::<PyCodec>()?;
    m.add_class::<PyIndex>()?;
    m.add_class::<PyKvCache>()?;
    m.add_class::<cuda::PyCudaKv>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
