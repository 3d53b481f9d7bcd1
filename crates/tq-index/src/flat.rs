//! The flat index: all codes in one store, scanned per query.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use rayon::prelude::*;
use tq_core::codec::check_vectors;
use tq_core::fastscan::{FastScanCodes, QuantizedLut, BLOCK};
use tq_core::{lookup, Codec, PreparedQuery};

use crate::topk::{Entry, TopK};
use crate::{IndexError, IndexSpec, Metric, RawVectors, Result};

/// Queries per work item of a batched fast-scan search (a multiple of the
/// kernels' query groups: 2 on AVX2, 6 on AVX-512, 12 with VBMI/VNNI): every tile is read from
/// memory once per chunk, then from L2 by the chunk's other query groups.
const QCHUNK: usize = 48;

/// Bytes of codes per tile: a tile stays in L2 while a chunk of queries passes over it.
const TILE_BYTES: usize = 256 << 10;

/// Bytes of the integer sums of a chunk of queries over a tile (the tile is
/// shortened for short codes so that these stay in L2 too).
const SUMS_BYTES: usize = 256 << 10;

/// Codes per call of the selection kernel (the heap's threshold is read anew for each call).
const SELECT: usize = 256;

/// (candidate, query) pairs a batched search re-scores at once per group of queries.
const GROUP_PAIRS: usize = 1 << 16;

/// One search result. `score` is the similarity (inner product / cosine;
/// larger is better) or the squared distance (L2; smaller is better).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The caller's id of the vector.
    pub id: u64,
    /// Similarity or squared distance, as above.
    pub score: f32,
}

/// Per-search options.
#[derive(Clone, Copy)]
pub struct SearchParams<'a> {
    /// Only ids in this set may be returned (checked inside the scan).
    pub allow: Option<&'a HashSet<u64>>,
    /// Fast-scan stores: candidates re-scored exactly per wanted result.
    pub rerank: usize,
    /// Score every code with the exact estimator, even in a fast-scan store.
    pub exact: bool,
    /// Re-rank the `rerank·k` best candidates by the stored full-precision
    /// vectors (only for indexes built with raw vectors).
    pub raw_rerank: bool,
    /// IVF: lists probed per query.
    pub nprobe: usize,
}

impl Default for SearchParams<'_> {
    fn default() -> Self {
        Self { allow: None, rerank: 10, exact: false, nprobe: 8, raw_rerank: false }
    }
}

enum Store {
    /// Codes split into fast-scan sub-codes, the per-code factor, and the
    /// rest of each code (`tail` bytes: the factor and any other per-code values).
    Fast { codes: FastScanCodes, factors: Vec<f32>, tails: Vec<u8>, tail: usize },
    /// Packed codes, `code_size` bytes each.
    Plain { codes: Vec<u8> },
}

/// A flat index over any registered codec (see the crate docs).
pub struct FlatIndex {
    spec: IndexSpec,
    codec: Box<dyn Codec>,
    ids: Vec<u64>,
    slot_of: HashMap<u64, usize>,
    store: Store,
    /// L2 only: ‖x̂‖² per code (the fast-scan pre-ranking needs it).
    sqnorms: Vec<f32>,
    /// Full-precision copies (`spec.raw` bytes per vector), slot order.
    raw: Vec<u8>,
}

impl FlatIndex {
    /// An empty index. Codecs with data-dependent parameters (`tq-mse-2.5/3.5`)
    /// take them from `spec.params`, or from `train` before the first add.
    pub fn new(spec: IndexSpec) -> Result<Self> {
        if spec.dim == 0 || spec.dim > tq_core::limits::MAX_DIM {
            return Err(IndexError::Invalid(format!("dimension {} is outside 1..={}", spec.dim, tq_core::limits::MAX_DIM)));
        }
        let codec = lookup(&spec.codec)?.build(spec.dim, spec.seed, spec.rotation, &spec.params)?;
        let store = match codec.fastscan_m() {
            Some(m) => Store::Fast { codes: FastScanCodes::new(m)?, factors: Vec::new(), tails: Vec::new(), tail: codec.code_size() - m / 2 },
            None => Store::Plain { codes: Vec::new() },
        };
        Ok(Self { spec, codec, ids: Vec::new(), slot_of: HashMap::new(), store, sqnorms: Vec::new(), raw: Vec::new() })
    }

    /// Fits codec parameters on a sample (only codecs that have any, only while empty).
    pub fn train(&mut self, sample: &[f32]) -> Result<()> {
        if !self.ids.is_empty() {
            return Err(IndexError::Invalid("train must come before the first add".into()));
        }
        let xs = self.prepare_vectors(sample)?;
        self.codec.train(&xs)?;
        self.spec.params = self.codec.params();
        Ok(())
    }

    /// The spec (with the codec params `train` fitted, if any).
    pub fn spec(&self) -> &IndexSpec {
        &self.spec
    }
    /// The codec the codes are encoded with.
    pub fn codec(&self) -> &dyn Codec {
        self.codec.as_ref()
    }
    /// Number of vectors held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether the index holds no vector.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.spec.dim
    }
    /// Ids in slot order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
    /// Whether `id` is in the index.
    pub fn contains(&self, id: u64) -> bool {
        self.slot_of.contains_key(&id)
    }
    /// Whether scans use the fast-scan layout.
    pub fn is_fast_scan(&self) -> bool {
        matches!(self.store, Store::Fast { .. })
    }
    /// Bytes of code storage per vector (codes and factors; ids and raw copies excluded).
    pub fn bytes_per_vector(&self) -> usize {
        self.codec.code_size()
    }
    /// Bytes of one stored entry: the code, then the raw copy if kept.
    pub fn entry_size(&self) -> usize {
        self.codec.code_size() + self.spec.raw.bytes(self.spec.dim)
    }

    /// Checks and (for cosine) normalizes a row-major batch.
    fn prepare_vectors(&self, xs: &[f32]) -> Result<Vec<f32>> {
        check_vectors(xs, self.spec.dim)?;
        let mut v = xs.to_vec();
        if self.spec.metric == Metric::Cosine {
            crate::normalize_rows(&mut v, self.spec.dim);
        }
        Ok(v)
    }

    /// Encodes `xs` (row-major, `ids.len()` rows) and adds them. Atomic: on
    /// error nothing is added. Encoding runs on the rayon pool.
    pub fn add(&mut self, ids: &[u64], xs: &[f32]) -> Result<()> {
        let codes = self.encode(ids, xs)?;
        self.add_codes(ids, &codes)
    }

    /// Encodes without adding: the entries `add` would store (`entry_size`
    /// bytes each: the code, then the raw copy when the index keeps one).
    pub fn encode(&self, ids: &[u64], xs: &[f32]) -> Result<Vec<u8>> {
        if xs.len() != ids.len() * self.spec.dim {
            return Err(IndexError::Invalid(format!("{} ids for {} values of dimension {}", ids.len(), xs.len(), self.spec.dim)));
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let v = self.prepare_vectors(xs)?;
        let mut codes = vec![0u8; ids.len() * self.codec.code_size()];
        self.codec.encode_batch(&v, &mut codes)?;
        if self.spec.raw == RawVectors::None {
            return Ok(codes);
        }
        let (cs, es) = (self.codec.code_size(), self.entry_size());
        let mut out = Vec::with_capacity(ids.len() * es);
        for (c, x) in codes.chunks_exact(cs).zip(v.chunks_exact(self.spec.dim)) {
            out.extend_from_slice(c);
            match self.spec.raw {
                RawVectors::F16 => x.iter().for_each(|&t| out.extend_from_slice(&half::f16::from_f32(t).to_le_bytes())),
                _ => x.iter().for_each(|&t| out.extend_from_slice(&t.to_le_bytes())),
            }
        }
        Ok(out)
    }

    /// Adds already-encoded entries (from `encode`, or replayed from a file). Atomic.
    pub fn add_codes(&mut self, ids: &[u64], entries: &[u8]) -> Result<()> {
        let (cs, es) = (self.codec.code_size(), self.entry_size());
        if entries.len() != ids.len() * es {
            return Err(IndexError::Invalid(format!("{} ids for {} bytes of {es}-byte entries", ids.len(), entries.len())));
        }
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                return Err(IndexError::RepeatedId(id));
            }
            if self.slot_of.contains_key(&id) {
                return Err(IndexError::DuplicateId(id));
            }
        }
        let zero = if self.spec.metric == Metric::L2 { Some(self.codec.prepare_unchecked(&vec![0.0; self.spec.dim])) } else { None };
        self.ids.reserve(ids.len());
        self.slot_of.reserve(ids.len());
        for (&id, entry) in ids.iter().zip(entries.chunks_exact(es)) {
            let code = &entry[..cs];
            self.raw.extend_from_slice(&entry[cs..]);
            self.slot_of.insert(id, self.ids.len());
            self.ids.push(id);
            match &mut self.store {
                Store::Fast { codes, factors, tails, .. } => {
                    let h = codes.m() / 2;
                    codes.push(&code[..h]);
                    factors.push(self.codec.fastscan_factor(code));
                    tails.extend_from_slice(&code[h..]);
                }
                Store::Plain { codes } => codes.extend_from_slice(code),
            }
            if let Some(z) = &zero {
                self.sqnorms.push(self.codec.score_l2(z, code));
            }
        }
        Ok(())
    }

    /// The stored code of slot `slot` (exactly the encoder's bytes).
    pub fn code_at(&self, slot: usize, out: &mut [u8]) {
        match &self.store {
            Store::Fast { codes, tails, tail, .. } => {
                let h = codes.m() / 2;
                codes.get(slot, &mut out[..h]);
                out[h..].copy_from_slice(&tails[slot * tail..(slot + 1) * tail]);
            }
            Store::Plain { codes } => {
                let cs = self.codec.code_size();
                out.copy_from_slice(&codes[slot * cs..(slot + 1) * cs]);
            }
        }
    }

    /// Removes ids (all or nothing: an unknown id is an error and removes none).
    /// The last code moves into each freed slot.
    pub fn remove(&mut self, ids: &[u64]) -> Result<()> {
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                return Err(IndexError::RepeatedId(id));
            }
            if !self.slot_of.contains_key(&id) {
                return Err(IndexError::UnknownId(id));
            }
        }
        let cs = self.codec.code_size();
        let mut buf = vec![0u8; cs];
        for &id in ids {
            let slot = self.slot_of.remove(&id).expect("checked above");
            let last = self.ids.len() - 1;
            if slot != last {
                let moved = self.ids[last];
                self.ids[slot] = moved;
                self.slot_of.insert(moved, slot);
                self.code_at(last, &mut buf);
                match &mut self.store {
                    Store::Fast { codes, factors, tails, tail } => {
                        codes.set(slot, &buf[..codes.m() / 2]);
                        factors[slot] = factors[last];
                        tails.copy_within(last * *tail..(last + 1) * *tail, slot * *tail);
                    }
                    Store::Plain { codes } => codes.copy_within(last * cs..(last + 1) * cs, slot * cs),
                }
                if !self.sqnorms.is_empty() {
                    self.sqnorms[slot] = self.sqnorms[last];
                }
                let rb = self.spec.raw.bytes(self.spec.dim);
                self.raw.copy_within(last * rb..(last + 1) * rb, slot * rb);
            }
            self.ids.pop();
            match &mut self.store {
                Store::Fast { codes, factors, tails, tail } => {
                    codes.pop();
                    factors.pop();
                    tails.truncate(last * *tail);
                }
                Store::Plain { codes } => codes.truncate(last * cs),
            }
            self.sqnorms.truncate(self.ids.len());
            self.raw.truncate(self.ids.len() * self.spec.raw.bytes(self.spec.dim));
        }
        Ok(())
    }

    /// Prepares a query (checked; normalized for cosine).
    pub fn prepare(&self, q: &[f32]) -> Result<PreparedQuery> {
        Ok(self.prepare_query(q)?.0)
    }

    /// The prepared query and the (checked, for cosine normalized) query vector.
    pub(crate) fn prepare_query(&self, q: &[f32]) -> Result<(PreparedQuery, Vec<f32>)> {
        if q.len() != self.spec.dim {
            return Err(tq_core::TqError::DimMismatch { expected: self.spec.dim, got: q.len() }.into());
        }
        let v = self.prepare_vectors(q)?;
        Ok((self.codec.prepare_unchecked(&v), v))
    }

    /// The `k` best hits for one query, best first. A fast-scan search of a
    /// large store splits the scan into tiles over the rayon pool (the result
    /// does not depend on the number of threads).
    pub fn search(&self, q: &[f32], k: usize, p: &SearchParams<'_>) -> Result<Vec<Hit>> {
        let (pq, qv) = self.prepare_query(q)?;
        let lut = self.lut(&pq);
        if let (true, Some(lut)) = (self.approximate(p), &lut) {
            let k = k.min(self.len());
            let cand = self.scan_many(&[lut], p, 0, self.candidates(k, p)).pop().expect("one query, one heap");
            return Ok(self.finish_candidates(&pq, &qv, cand, k, p));
        }
        Ok(self.search_prepared(&pq, &qv, lut.as_ref(), k, p))
    }

    /// Searches many queries (row-major) on the rayon pool. Fast-scan searches
    /// score blocks of queries against tiles of codes held in cache (each code
    /// block is loaded once per group of queries), threaded over query chunks
    /// and code tiles, with one bounded top-k per query and tile range merged
    /// afterwards: the same hits and scores as one `search` per query.
    pub fn search_batch(&self, qs: &[f32], k: usize, p: &SearchParams<'_>) -> Result<Vec<Vec<Hit>>> {
        check_vectors(qs, self.spec.dim)?;
        if !self.approximate(p) {
            return qs.par_chunks(self.spec.dim).map(|q| self.search(q, k, p)).collect();
        }
        let prepared = qs.par_chunks(self.spec.dim).map(|q| self.prepare_query(q)).collect::<Result<Vec<_>>>()?;
        let luts: Vec<QuantizedLut> = prepared.par_iter().map(|(pq, _)| self.lut(pq).expect("fast-scan store")).collect();
        let k = k.min(self.len());
        let kc = self.candidates(k, p);
        let lut_refs: Vec<&QuantizedLut> = luts.iter().collect();
        let cands = self.scan_many(&lut_refs, p, 0, kc);
        Ok(self.finish_batch(&prepared, cands, k, p))
    }

    /// [`Self::finish_candidates`] for a batch: queries in groups (threaded
    /// over groups), each group re-scored in slot order ([`Self::finish_group`]).
    fn finish_batch(&self, prepared: &[(PreparedQuery, Vec<f32>)], cands: Vec<TopK>, k: usize, p: &SearchParams<'_>) -> Vec<Vec<Hit>> {
        let kc = self.candidates(k, p).max(1);
        // (slot, query) pairs held at once per group: at most about GROUP_PAIRS
        let per = (GROUP_PAIRS / kc).clamp(1, prepared.len().div_ceil(rayon::current_num_threads()).max(1));
        let cands: Vec<Vec<Entry>> = cands.into_par_iter().map(TopK::into_best).collect();
        prepared
            .par_chunks(per)
            .zip(cands.par_chunks(per))
            .flat_map_iter(|(qs, cs)| {
                let qs: Vec<(&PreparedQuery, &[f32])> = qs.iter().map(|(pq, qv)| (pq, &qv[..])).collect();
                self.finish_group(&qs, cs, k, p)
            })
            .collect()
    }

    /// Candidates a fast-scan search of `k` (≤ len) results pre-ranks by the
    /// tables: `rerank` per code-stage result, the code stage keeping
    /// `rerank·k` results for a raw-vector re-rank.
    pub(crate) fn candidates(&self, k: usize, p: &SearchParams<'_>) -> usize {
        let n = self.len();
        let kr = if self.raw_rerank(p) { k.saturating_mul(p.rerank.max(1)).min(n) } else { k };
        kr.saturating_mul(p.rerank.max(1)).min(n)
    }

    /// The hits of a fast-scan search from its candidates: exact re-score to
    /// `k` (or `rerank·k` for a raw re-rank, then the raw vectors decide `k`).
    pub(crate) fn finish_candidates(&self, pq: &PreparedQuery, qv: &[f32], cand: TopK, k: usize, p: &SearchParams<'_>) -> Vec<Hit> {
        self.finish_group(&[(pq, qv)], &[cand.into_best()], k, p).pop().expect("one query, one result")
    }

    /// The hits of queries `qs` from their candidates `cands` (one list per
    /// query): every candidate code is read from the store once for all the
    /// queries of the group that hold it, in slot order (consecutive codes of
    /// one block are read while the block is in cache), and re-scored exactly
    /// for each of them; the order of the pushes does not change a top-k.
    fn finish_group(&self, qs: &[(&PreparedQuery, &[f32])], cands: &[Vec<Entry>], k: usize, p: &SearchParams<'_>) -> Vec<Vec<Hit>> {
        let raw = self.raw_rerank(p);
        let kr = if raw { k.saturating_mul(p.rerank.max(1)).min(self.len()) } else { k };
        let mut pairs: Vec<(usize, u32)> = cands.iter().enumerate().flat_map(|(q, c)| c.iter().map(move |e| (e.slot, q as u32))).collect();
        pairs.sort_unstable();
        let mut tops: Vec<TopK> = qs.iter().map(|_| TopK::new(kr)).collect();
        let mut code = vec![0u8; self.codec.code_size()];
        for run in pairs.chunk_by(|a, b| a.0 == b.0) {
            let slot = run[0].0;
            self.code_at(slot, &mut code);
            for &(_, q) in run {
                tops[q as usize].push(self.exact_similarity(qs[q as usize].0, &code), slot);
            }
        }
        tops.into_iter()
            .zip(qs)
            .map(|(mut top, &(_, qv))| {
                if raw {
                    let mut by_raw = TopK::new(k);
                    for e in top.into_sorted() {
                        by_raw.push(self.raw_similarity(qv, e.slot), e.slot);
                    }
                    top = by_raw;
                }
                top.into_sorted().into_iter().map(|e| self.hit(e.slot, e.score)).collect()
            })
            .collect()
    }

    /// The `kc` best fast-scan candidates (tags `tag + slot`) of every query,
    /// in query order. Work items are (chunk of `QCHUNK` queries, range of
    /// tiles); a single query or a small batch splits the tiles over every
    /// thread, a large batch only the queries. Per-item heaps are merged per
    /// query; a heap keeps the `kc` best under (score, then lower tag), so the
    /// merge equals one sequential scan whatever the split.
    pub(crate) fn scan_many(&self, luts: &[&QuantizedLut], p: &SearchParams<'_>, tag: usize, kc: usize) -> Vec<TopK> {
        self.scan_many_tiled(luts, p, tag, kc, TILE_BYTES)
    }

    /// [`Self::scan_many`] with tiles of about `tile_bytes` bytes of codes.
    fn scan_many_tiled(&self, luts: &[&QuantizedLut], p: &SearchParams<'_>, tag: usize, kc: usize, tile_bytes: usize) -> Vec<TopK> {
        let Store::Fast { codes, .. } = &self.store else { unreachable!("scan_many on a fast-scan store") };
        let nq = luts.len();
        let nb = codes.blocks();
        // codes of a tile in L2, and the integer sums of a chunk over it too
        let tile = (tile_bytes / codes.block_bytes()).min(SUMS_BYTES / (QCHUNK * BLOCK * 4)).clamp(1, nb.max(1));
        let ntiles = nb.div_ceil(tile);
        let nchunks = nq.div_ceil(QCHUNK);
        if nq == 0 || nb == 0 {
            return (0..nq).map(|_| TopK::new(kc)).collect();
        }
        let parts = (2 * rayon::current_num_threads()).div_ceil(nchunks).clamp(1, ntiles);
        let item = |w: usize| {
            let (c, part) = (w / parts, w % parts);
            let qs = &luts[c * QCHUNK..((c + 1) * QCHUNK).min(nq)];
            let mut heaps: Vec<TopK> = qs.iter().map(|_| TopK::new(kc)).collect();
            self.scan_tiles(qs, part * ntiles / parts..(part + 1) * ntiles / parts, tile, p, tag, &mut heaps);
            heaps
        };
        let mut per: Vec<Vec<TopK>> = if nchunks * parts == 1 { vec![item(0)] } else { (0..nchunks * parts).into_par_iter().map(item).collect() };
        let mut out = Vec::with_capacity(nq);
        for c in 0..nchunks {
            let mut first = std::mem::take(&mut per[c * parts]);
            for part in 1..parts {
                for (h, o) in first.iter_mut().zip(std::mem::take(&mut per[c * parts + part])) {
                    h.merge(o);
                }
            }
            out.extend(first);
        }
        out
    }

    /// Offers the allowed codes of tiles `tiles` (of `tile` blocks) to the
    /// heap of each query, scoring every tile for all queries in one pass.
    fn scan_tiles(&self, luts: &[&QuantizedLut], tiles: std::ops::Range<usize>, tile: usize, p: &SearchParams<'_>, tag: usize, heaps: &mut [TopK]) {
        let Store::Fast { codes, .. } = &self.store else { unreachable!("scan_tiles on a fast-scan store") };
        let mut tables = Vec::with_capacity(luts.iter().map(|l| l.tables().len()).sum());
        luts.iter().for_each(|l| tables.extend_from_slice(l.tables()));
        let mut sums = vec![0u32; luts.len() * tile * BLOCK];
        for t in tiles {
            let (b0, b1) = (t * tile, ((t + 1) * tile).min(codes.blocks()));
            let s = &mut sums[..luts.len() * (b1 - b0) * BLOCK];
            codes.scan_blocks_multi(b0, b1, &tables, s);
            let live = (b1 * BLOCK).min(self.ids.len()) - b0 * BLOCK;
            for (qi, (lut, heap)) in luts.iter().zip(heaps.iter_mut()).enumerate() {
                let at = qi * (b1 - b0) * BLOCK;
                self.offer_sums(lut, &s[at..at + live], b0 * BLOCK, p, tag, heap);
            }
        }
    }

    /// Offers the allowed codes of slots `base..base + sums.len()` to `heap`
    /// as `(similarity estimate, tag + slot)`, from their integer table sums:
    /// the estimates not below the heap's threshold are selected in one
    /// vectorized pass (`QuantizedLut::select`, the threshold refreshed every
    /// `SELECT` codes), and only those meet the heap and the filter.
    #[inline]
    fn offer_sums(&self, lut: &QuantizedLut, sums: &[u32], base: usize, p: &SearchParams<'_>, tag: usize, heap: &mut TopK) {
        let Store::Fast { factors, .. } = &self.store else { unreachable!("offer_sums on a fast-scan store") };
        let (mut vals, mut idx) = ([0.0f32; SELECT], [0u32; SELECT]);
        for (c, part) in sums.chunks(SELECT).enumerate() {
            let b = base + c * SELECT;
            let f = &factors[b..b + part.len()];
            let sq = (self.spec.metric == Metric::L2).then(|| &self.sqnorms[b..b + part.len()]);
            let got = lut.select(part, f, sq, heap.threshold(), &mut vals, &mut idx);
            for (&v, &i) in vals[..got].iter().zip(&idx[..got]) {
                let slot = b + i as usize;
                if heap.accepts(v, tag + slot) && p.allow.is_none_or(|a| a.contains(&self.ids[slot])) {
                    heap.push(v, tag + slot);
                }
            }
        }
    }

    /// Exact re-score of one code: similarity (larger is better) for ranking.
    fn exact_similarity(&self, pq: &PreparedQuery, code: &[u8]) -> f32 {
        match self.spec.metric {
            Metric::L2 => -self.codec.score_l2(pq, code),
            _ => self.codec.score_ip(pq, code),
        }
    }

    /// The fast-scan tables of a prepared query (None for other stores).
    pub(crate) fn lut(&self, pq: &PreparedQuery) -> Option<QuantizedLut> {
        self.is_fast_scan().then(|| QuantizedLut::new(&self.codec.fastscan_tables(pq)))
    }

    /// Whether a search with `p` pre-ranks approximately (fast-scan) and re-scores.
    pub(crate) fn approximate(&self, p: &SearchParams<'_>) -> bool {
        self.is_fast_scan() && !p.exact
    }

    /// Search with a query prepared by this codec (or one with the same spec)
    /// and, for fast-scan stores, its tables (`lut`).
    pub(crate) fn search_prepared(&self, pq: &PreparedQuery, qv: &[f32], lut: Option<&QuantizedLut>, k: usize, p: &SearchParams<'_>) -> Vec<Hit> {
        // nothing is sized by more than the live vectors (a huge `k` is no allocation)
        let n = self.len();
        let k = k.min(n);
        if self.approximate(p) {
            let mut cand = TopK::new(self.candidates(k, p));
            self.scan_into(pq, lut, p, 0, &mut cand);
            return self.finish_candidates(pq, qv, cand, k, p);
        }
        if self.raw_rerank(p) {
            // candidates by the codes (as configured), final order by the raw vectors
            let kk = k.saturating_mul(p.rerank.max(1)).min(n);
            let cand = self.search_prepared(pq, qv, lut, kk, &SearchParams { raw_rerank: false, ..*p });
            let mut top = TopK::new(k);
            for h in cand {
                let slot = self.slot_of[&h.id];
                top.push(self.raw_similarity(qv, slot), slot);
            }
            return top.into_sorted().into_iter().map(|e| self.hit(e.slot, e.score)).collect();
        }
        let mut top = TopK::new(k);
        self.scan_into(pq, lut, p, 0, &mut top);
        top.into_sorted().into_iter().map(|e| self.hit(e.slot, e.score)).collect()
    }

    /// Whether a search re-ranks by raw vectors.
    pub(crate) fn raw_rerank(&self, p: &SearchParams<'_>) -> bool {
        p.raw_rerank && self.spec.raw != RawVectors::None
    }

    /// The stored full-precision copy of slot `slot`.
    pub fn raw_vector(&self, slot: usize) -> Option<Vec<f32>> {
        let d = self.spec.dim;
        match self.spec.raw {
            RawVectors::None => None,
            RawVectors::F16 => {
                Some(self.raw[slot * 2 * d..(slot + 1) * 2 * d].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            RawVectors::F32 => Some(self.raw[slot * 4 * d..(slot + 1) * 4 * d].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()),
        }
    }

    /// Exact similarity from the raw copy (larger is better).
    pub(crate) fn raw_similarity(&self, qv: &[f32], slot: usize) -> f32 {
        let x = self.raw_vector(slot).expect("raw vectors stored");
        match self.spec.metric {
            Metric::L2 => -qv.iter().zip(&x).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
            _ => (tq_core::kernels::kernels().dot)(qv, &x),
        }
    }

    /// The hit for slot `slot` with ranking similarity `sim`.
    pub(crate) fn hit(&self, slot: usize, sim: f32) -> Hit {
        Hit { id: self.ids[slot], score: if self.spec.metric == Metric::L2 { -sim } else { sim } }
    }

    /// Exact similarity (larger is better) of slot `slot`; `buf` holds a code.
    pub(crate) fn rescore(&self, pq: &PreparedQuery, slot: usize, buf: &mut [u8]) -> f32 {
        self.code_at(slot, buf);
        self.exact_similarity(pq, buf)
    }

    /// Offers every allowed code to `heap` as `(similarity, tag + slot)`:
    /// fast-scan estimates when `approximate(p)`, exact scores otherwise.
    pub(crate) fn scan_into(&self, pq: &PreparedQuery, lut: Option<&QuantizedLut>, p: &SearchParams<'_>, tag: usize, heap: &mut TopK) {
        let n = self.ids.len();
        let allowed = |slot: usize| p.allow.is_none_or(|a| a.contains(&self.ids[slot]));
        match &self.store {
            Store::Fast { codes, .. } if !p.exact => {
                let lut = lut.expect("fast-scan tables for a fast-scan store");
                let mut sums = [0u32; BLOCK];
                for b in 0..codes.blocks() {
                    codes.scan_block(b, lut, &mut sums);
                    let live = BLOCK.min(n - b * BLOCK);
                    self.offer_sums(lut, &sums[..live], b * BLOCK, p, tag, heap);
                }
            }
            _ => {
                let mut buf = vec![0u8; self.codec.code_size()];
                for slot in 0..n {
                    if allowed(slot) {
                        let s = self.rescore(pq, slot, &mut buf);
                        if heap.accepts(s, tag + slot) {
                            heap.push(s, tag + slot);
                        }
                    }
                }
            }
        }
    }

    /// Entries of all slots in order, `entry_size` bytes each (for saving).
    pub fn all_codes(&self) -> Vec<u8> {
        let (cs, es) = (self.codec.code_size(), self.entry_size());
        let rb = es - cs;
        let mut out = vec![0u8; self.len() * es];
        for (slot, e) in out.chunks_exact_mut(es).enumerate() {
            self.code_at(slot, &mut e[..cs]);
            e[cs..].copy_from_slice(&self.raw[slot * rb..(slot + 1) * rb]);
        }
        out
    }
}

/// A flat index shared between threads: any number of concurrent searches,
/// adds and removes take the write lock, so a reader never sees a half-added
/// entry (each search sees the index before or after a whole `add`).
pub struct SharedIndex {
    inner: RwLock<FlatIndex>,
}

impl SharedIndex {
    /// Shares `index`.
    pub fn new(index: FlatIndex) -> Self {
        Self { inner: RwLock::new(index) }
    }
    /// [`FlatIndex::search`] under the read lock.
    pub fn search(&self, q: &[f32], k: usize, p: &SearchParams<'_>) -> Result<Vec<Hit>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).search(q, k, p)
    }
    /// Encodes outside the lock, then inserts under it.
    pub fn add(&self, ids: &[u64], xs: &[f32]) -> Result<()> {
        let codes = self.inner.read().unwrap_or_else(PoisonError::into_inner).encode(ids, xs)?;
        self.inner.write().unwrap_or_else(PoisonError::into_inner).add_codes(ids, &codes)
    }
    /// [`FlatIndex::remove`] under the write lock.
    pub fn remove(&self, ids: &[u64]) -> Result<()> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner).remove(ids)
    }
    /// Number of vectors held.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).len()
    }
    /// Whether the index holds no vector.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The index back (a lock poisoned by a panicking thread is ignored).
    pub fn into_inner(self) -> FlatIndex {
        self.inner.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tq_core::rng::Xoshiro256;

    fn gaussian(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut r = Xoshiro256::new(seed);
        (0..n * dim).map(|_| r.gaussian() as f32).collect()
    }

    /// The per-query sequential scan (one block kernel call per code block).
    fn sequential(idx: &FlatIndex, q: &[f32], k: usize, p: &SearchParams<'_>) -> Vec<Hit> {
        let (pq, qv) = idx.prepare_query(q).unwrap();
        let lut = idx.lut(&pq);
        idx.search_prepared(&pq, &qv, lut.as_ref(), k, p)
    }

    /// The search by its definition, with none of the scan's machinery: every
    /// code's estimate `factor · (bias + Δ · Σ table bytes)` (for L2 `2·v −
    /// ‖x̂‖²`) from its nibbles, a full sort by (estimate, then lower slot),
    /// the `rerank·k` best re-scored exactly, a full sort again, `k` kept.
    fn by_definition(idx: &FlatIndex, q: &[f32], k: usize, p: &SearchParams<'_>) -> Vec<(u64, u32)> {
        let (pq, _) = idx.prepare_query(q).unwrap();
        let lut = idx.lut(&pq).unwrap();
        let Store::Fast { codes, factors, .. } = &idx.store else { panic!("a fast-scan store") };
        let t = lut.tables();
        let mut nib = vec![0u8; codes.m() / 2];
        let mut est: Vec<(f32, usize)> = (0..idx.len())
            .map(|slot| {
                codes.get(slot, &mut nib);
                let sum: u32 = nib.iter().enumerate().map(|(k, &b)| t[32 * k + (b & 15) as usize] as u32 + t[32 * k + 16 + (b >> 4) as usize] as u32).sum();
                let v = factors[slot] * (lut.bias + lut.delta * sum as f32);
                (if idx.spec.metric == Metric::L2 { 2.0 * v - idx.sqnorms[slot] } else { v }, slot)
            })
            .filter(|&(_, slot)| p.allow.is_none_or(|a| a.contains(&idx.ids[slot])))
            .collect();
        let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        est.sort_by(order);
        let mut buf = vec![0u8; idx.codec.code_size()];
        let mut exact: Vec<(f32, usize)> = est.iter().take(k * p.rerank.max(1)).map(|&(_, slot)| (idx.rescore(&pq, slot, &mut buf), slot)).collect();
        exact.sort_by(order);
        exact.iter().take(k).map(|&(s, slot)| (idx.ids[slot], if idx.spec.metric == Metric::L2 { -s } else { s }.to_bits())).collect()
    }

    /// The scan (single and batched, any thread count) equals the search's
    /// definition: the same candidates as a full sort of all estimates, the
    /// same exact re-scores, for every metric, with filters and removals.
    #[test]
    fn search_equals_its_definition() {
        let (n, dim) = (2500, 48);
        let xs = gaussian(n, dim, 5);
        let qs = gaussian(20, dim, 6);
        for (codec, metric) in [("tq-mse-4-nc", Metric::Ip), ("tq-mse-2", Metric::Cosine), ("tq-mse-4", Metric::L2)] {
            let mut idx = FlatIndex::new(IndexSpec::new(codec, dim, metric)).unwrap();
            let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + 7 * i).collect();
            idx.add(&ids, &xs).unwrap();
            idx.remove(&[ids[3], ids[1234]]).unwrap();
            let allow: HashSet<u64> = ids.iter().copied().filter(|i| i % 3 != 0).collect();
            for p in [
                SearchParams::default(),
                SearchParams { rerank: 1, ..Default::default() },
                SearchParams { allow: Some(&allow), rerank: 4, ..Default::default() },
            ] {
                for k in [1usize, 10, 33] {
                    let want: Vec<Vec<(u64, u32)>> = qs.chunks_exact(dim).map(|q| by_definition(&idx, q, k, &p)).collect();
                    let bits =
                        |r: Vec<Vec<Hit>>| r.into_iter().map(|h| h.into_iter().map(|h| (h.id, h.score.to_bits())).collect::<Vec<_>>()).collect::<Vec<_>>();
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        pool.install(|| {
                            assert_eq!(bits(idx.search_batch(&qs, k, &p).unwrap()), want, "{codec} k={k} threads={threads}");
                            let one: Vec<Vec<Hit>> = qs.chunks_exact(dim).map(|q| idx.search(q, k, &p).unwrap()).collect();
                            assert_eq!(bits(one), want, "{codec} single k={k} threads={threads}");
                        });
                    }
                }
            }
        }
    }

    /// Batched, tiled, threaded fast-scan search returns exactly the ids and
    /// score bits of the sequential per-query scan: for every metric, with
    /// filters, raw re-ranking, after removals, any tile size, any number of
    /// threads and any number of queries (a partial chunk, one query).
    #[test]
    fn tiled_batched_search_equals_the_sequential_scan() {
        let (n, dim) = (3000, 40);
        let xs = gaussian(n, dim, 1);
        // more than one chunk of QCHUNK queries, the last one partial
        let qs = gaussian(QCHUNK + 5, dim, 2);
        for (codec, metric, raw) in [
            ("tq-mse-4", Metric::Ip, RawVectors::None),
            ("tq-mse-2-nc", Metric::Cosine, RawVectors::None),
            ("tq-mse-4-nc", Metric::L2, RawVectors::F16),
            ("tq-mse-1", Metric::Ip, RawVectors::None),
        ] {
            let mut spec = IndexSpec::new(codec, dim, metric);
            spec.raw = raw;
            let mut idx = FlatIndex::new(spec).unwrap();
            let ids: Vec<u64> = (0..n as u64).map(|i| 5 + 3 * i).collect();
            idx.add(&ids, &xs).unwrap();
            // duplicate scores: the same vector under two ids (ties broken by slot)
            idx.add(&[1, 2], &[&xs[..dim], &xs[..dim]].concat()).unwrap();
            idx.remove(&[ids[7], ids[100], ids[2999]]).unwrap();
            assert!(idx.is_fast_scan());
            let allow: HashSet<u64> = ids.iter().copied().filter(|i| i % 5 != 0).chain([2]).collect();
            for p in [
                SearchParams::default(),
                SearchParams { rerank: 3, ..Default::default() },
                SearchParams { allow: Some(&allow), ..Default::default() },
                SearchParams { raw_rerank: true, rerank: 2, ..Default::default() },
            ] {
                for k in [1usize, 10, 57] {
                    let want: Vec<Vec<Hit>> = qs.chunks_exact(dim).map(|q| sequential(&idx, q, k, &p)).collect();
                    let bits = |r: &[Vec<Hit>]| r.iter().map(|h| h.iter().map(|h| (h.id, h.score.to_bits())).collect::<Vec<_>>()).collect::<Vec<_>>();
                    for threads in [1, 3, 8] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        pool.install(|| {
                            assert_eq!(bits(&idx.search_batch(&qs, k, &p).unwrap()), bits(&want), "{codec} k={k} threads={threads}");
                            let one: Vec<Vec<Hit>> = qs.chunks_exact(dim).take(3).map(|q| idx.search(q, k, &p).unwrap()).collect();
                            assert_eq!(bits(&one), bits(&want[..3]), "{codec} single k={k} threads={threads}");
                            // small tiles: many tiles per work item and many work items per query
                            let prepared: Vec<_> = qs.chunks_exact(dim).map(|q| idx.prepare_query(q).unwrap()).collect();
                            let luts: Vec<QuantizedLut> = prepared.iter().map(|(pq, _)| idx.lut(pq).unwrap()).collect();
                            let refs: Vec<&QuantizedLut> = luts.iter().collect();
                            let kk = k.min(idx.len());
                            for tile_bytes in [1, 3 * idx.bytes_per_vector() * BLOCK] {
                                let cands = idx.scan_many_tiled(&refs, &p, 0, idx.candidates(kk, &p), tile_bytes);
                                let got: Vec<Vec<Hit>> = prepared.iter().zip(cands).map(|((pq, qv), c)| idx.finish_candidates(pq, qv, c, kk, &p)).collect();
                                assert_eq!(bits(&got), bits(&want), "{codec} k={k} threads={threads} tile={tile_bytes}");
                            }
                        });
                    }
                }
            }
        }
    }
}
