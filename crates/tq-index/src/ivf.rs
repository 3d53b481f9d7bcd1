//! IVF: coarse k-means partitions with one flat store per list.
//!
//! The coarse quantizer is trained with `tq_core::kmeans` (L2, seeded).
//! Vectors go to their nearest centroid
//! (L2). Queries probe the `nprobe` lists whose centroids are nearest (L2) or
//! have the largest inner product (ip, cosine), the FAISS convention.

use std::collections::HashMap;

use rayon::prelude::*;
use tq_core::codec::check_vectors;
use tq_core::fastscan::QuantizedLut;
use tq_core::kmeans::{nearest, row_norms};
use tq_core::PreparedQuery;

use crate::flat::{FlatIndex, Hit, SearchParams};
use crate::topk::TopK;
use crate::{normalize_rows, IndexError, IndexSpec, Metric, Result};

/// Tagged slots: list number above this bit, slot below (lists hold < 2^32 codes).
const LIST_SHIFT: u32 = 32;

/// An IVF index: `nlist` coarse centroids, one [`FlatIndex`] per list (see the module docs).
pub struct IvfIndex {
    spec: IndexSpec,
    /// `nlist × dim`, row-major.
    centroids: Vec<f32>,
    lists: Vec<FlatIndex>,
    list_of: HashMap<u64, u32>,
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl IvfIndex {
    /// Trains `nlist` centroids on `sample` (row-major; at least `nlist` rows)
    /// with `iters` Lloyd iterations, deterministically from `spec.seed`.
    pub fn train(spec: IndexSpec, nlist: usize, sample: &[f32], iters: usize) -> Result<Self> {
        let dim = spec.dim;
        check_vectors(sample, dim)?;
        let n = sample.len() / dim;
        if nlist == 0 || nlist > n {
            return Err(IndexError::Invalid(format!("IVF needs 1 <= lists <= training rows, got {nlist} lists and {n} rows")));
        }
        let mut data = sample.to_vec();
        if spec.metric == Metric::Cosine {
            normalize_rows(&mut data, dim);
        }
        let cent = tq_core::kmeans::kmeans(&data, dim, nlist, iters, tq_core::rng::derive_seed(spec.seed, 0x1F));
        Self::with_centroids(spec, cent)
    }

    /// An empty index over given centroids (e.g. read back from a file).
    pub fn with_centroids(spec: IndexSpec, centroids: Vec<f32>) -> Result<Self> {
        if spec.dim == 0 || centroids.is_empty() || !centroids.len().is_multiple_of(spec.dim) || centroids.iter().any(|v| !v.is_finite()) {
            return Err(IndexError::Invalid("IVF centroids must be a non-empty finite nlist × dim matrix".into()));
        }
        let nlist = centroids.len() / spec.dim;
        if nlist > tq_core::limits::MAX_NLIST {
            return Err(IndexError::Invalid(format!("{nlist} IVF lists, over the limit of {}", tq_core::limits::MAX_NLIST)));
        }
        let lists = (0..nlist).map(|_| FlatIndex::new(spec.clone())).collect::<Result<Vec<_>>>()?;
        Ok(Self { spec, centroids, lists, list_of: HashMap::new() })
    }

    /// The spec shared by all lists.
    pub fn spec(&self) -> &IndexSpec {
        &self.spec
    }
    /// Number of lists (centroids).
    pub fn nlist(&self) -> usize {
        self.lists.len()
    }
    /// The centroids, `nlist × dim`, row-major.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Number of vectors held, over all lists.
    pub fn len(&self) -> usize {
        self.list_of.len()
    }
    /// Whether the index holds no vector.
    pub fn is_empty(&self) -> bool {
        self.list_of.is_empty()
    }
    /// The flat store of list `i` (panics if `i >= nlist`).
    pub fn list(&self, i: usize) -> &FlatIndex {
        &self.lists[i]
    }
    /// Whether `id` is in the index.
    pub fn contains(&self, id: u64) -> bool {
        self.list_of.contains_key(&id)
    }

    /// The list each vector goes to.
    pub fn assign(&self, xs: &[f32]) -> Result<Vec<u32>> {
        check_vectors(xs, self.spec.dim)?;
        let mut v = xs.to_vec();
        if self.spec.metric == Metric::Cosine {
            normalize_rows(&mut v, self.spec.dim);
        }
        let norms = row_norms(&self.centroids, self.spec.dim);
        Ok(v.par_chunks(self.spec.dim).map(|x| nearest(&self.centroids, &norms, self.spec.dim, x) as u32).collect())
    }

    /// Encodes and adds (atomic: on error nothing is added).
    pub fn add(&mut self, ids: &[u64], xs: &[f32]) -> Result<()> {
        let lists = self.assign(xs)?;
        let codes = self.lists[0].encode(ids, xs)?;
        self.add_codes(ids, &lists, &codes)
    }

    /// Encodes without adding: (list per vector, codes).
    pub fn encode(&self, ids: &[u64], xs: &[f32]) -> Result<(Vec<u32>, Vec<u8>)> {
        let lists = self.assign(xs)?;
        let codes = self.lists[0].encode(ids, xs)?;
        Ok((lists, codes))
    }

    /// Adds encoded vectors to the given lists (atomic).
    pub fn add_codes(&mut self, ids: &[u64], lists: &[u32], codes: &[u8]) -> Result<()> {
        let cs = self.lists[0].entry_size();
        if lists.len() != ids.len() || codes.len() != ids.len() * cs {
            return Err(IndexError::Invalid("ids, lists and codes disagree in count".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (&id, &l) in ids.iter().zip(lists) {
            if !seen.insert(id) {
                return Err(IndexError::RepeatedId(id));
            }
            if self.list_of.contains_key(&id) {
                return Err(IndexError::DuplicateId(id));
            }
            if l as usize >= self.lists.len() {
                return Err(IndexError::Invalid(format!("list {l} out of range ({} lists)", self.lists.len())));
            }
        }
        for ((&id, &l), code) in ids.iter().zip(lists).zip(codes.chunks_exact(cs)) {
            self.lists[l as usize].add_codes(&[id], code)?;
            self.list_of.insert(id, l);
        }
        Ok(())
    }

    /// Removes ids (all or nothing).
    pub fn remove(&mut self, ids: &[u64]) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for &id in ids {
            if !seen.insert(id) {
                return Err(IndexError::RepeatedId(id));
            }
            if !self.list_of.contains_key(&id) {
                return Err(IndexError::UnknownId(id));
            }
        }
        for &id in ids {
            let l = self.list_of.remove(&id).expect("checked above");
            self.lists[l as usize].remove(&[id])?;
        }
        Ok(())
    }

    /// The `k` best hits, probing `p.nprobe` lists.
    pub fn search(&self, q: &[f32], k: usize, p: &SearchParams<'_>) -> Result<Vec<Hit>> {
        let (pq, qv) = self.lists[0].prepare_query(q)?;
        // one candidate set across the probed lists, tagged with the list
        // number in the high bits, then (fast-scan) one exact re-score and
        // (raw vectors) one re-rank by the stored copies
        let lut = self.lists[0].lut(&pq);
        let sizes = self.sizes(k, p);
        let mut heap = TopK::new(sizes.2);
        for l in self.probes(&qv, p) {
            self.lists[l].scan_into(&pq, lut.as_ref(), p, l << LIST_SHIFT, &mut heap);
        }
        Ok(self.finish(&pq, &qv, heap, sizes, p))
    }

    /// The lists a query probes, best first.
    fn probes(&self, qv: &[f32], p: &SearchParams<'_>) -> Vec<usize> {
        let mut probe = TopK::new(p.nprobe.clamp(1, self.lists.len()));
        for (c, cen) in self.centroids.chunks_exact(self.spec.dim).enumerate() {
            let s = match self.spec.metric {
                Metric::L2 => -l2(qv, cen),
                _ => dot(qv, cen),
            };
            probe.push(s, c);
        }
        probe.into_sorted().into_iter().map(|e| e.slot).collect()
    }

    /// `(k, kk, kc)`: results, results of the code stage (`rerank·k` for a
    /// raw re-rank), candidates of the scan (`rerank·k` when fast-scan
    /// pre-ranks). Nothing is sized by more than the live vectors (a huge `k`
    /// is no allocation).
    fn sizes(&self, k: usize, p: &SearchParams<'_>) -> (usize, usize, usize) {
        let n = self.len();
        let k = k.min(n);
        let kk = if self.lists[0].raw_rerank(p) { k.saturating_mul(p.rerank.max(1)).min(n) } else { k };
        let kc = if self.lists[0].approximate(p) { k.saturating_mul(p.rerank.max(1)).min(n) } else { kk };
        (k, kk, kc)
    }

    /// The hits from the scan's candidates (`sizes` as from [`Self::sizes`]).
    fn finish(&self, pq: &PreparedQuery, qv: &[f32], heap: TopK, (k, kk, _): (usize, usize, usize), p: &SearchParams<'_>) -> Vec<Hit> {
        let split = |tagged: usize| (tagged >> LIST_SHIFT, tagged & ((1 << LIST_SHIFT) - 1));
        let mut best = if self.lists[0].approximate(p) {
            let mut top = TopK::new(kk);
            let mut buf = vec![0u8; self.lists[0].codec().code_size()];
            for e in heap.into_sorted() {
                let (l, slot) = split(e.slot);
                top.push(self.lists[l].rescore(pq, slot, &mut buf), e.slot);
            }
            top.into_sorted()
        } else {
            heap.into_sorted()
        };
        if self.lists[0].raw_rerank(p) {
            let mut top = TopK::new(k);
            for e in best {
                let (l, slot) = split(e.slot);
                top.push(self.lists[l].raw_similarity(qv, slot), e.slot);
            }
            best = top.into_sorted();
        }
        best.into_iter()
            .map(|e| {
                let (l, slot) = split(e.slot);
                self.lists[l].hit(slot, e.score)
            })
            .collect()
    }

    /// Searches many queries (row-major) on the rayon pool. Fast-scan
    /// searches scan each list once for all the queries that probe it (many
    /// queries per pass over its codes, see [`FlatIndex::search_batch`]),
    /// threaded over lists, and merge each query's candidates across its
    /// lists: the same hits and scores as one `search` per query.
    pub fn search_batch(&self, qs: &[f32], k: usize, p: &SearchParams<'_>) -> Result<Vec<Vec<Hit>>> {
        check_vectors(qs, self.spec.dim)?;
        let first = &self.lists[0];
        if !first.approximate(p) {
            return qs.par_chunks(self.spec.dim).map(|q| self.search(q, k, p)).collect();
        }
        let prepared = qs.par_chunks(self.spec.dim).map(|q| first.prepare_query(q)).collect::<Result<Vec<_>>>()?;
        let luts: Vec<QuantizedLut> = prepared.par_iter().map(|(pq, _)| first.lut(pq).expect("fast-scan lists")).collect();
        let probes: Vec<Vec<usize>> = prepared.par_iter().map(|(_, qv)| self.probes(qv, p)).collect();
        let sizes = self.sizes(k, p);
        let mut by_list: Vec<Vec<usize>> = vec![Vec::new(); self.lists.len()];
        for (qi, pr) in probes.iter().enumerate() {
            for &l in pr {
                by_list[l].push(qi);
            }
        }
        let per_list: Vec<Vec<TopK>> = by_list
            .par_iter()
            .enumerate()
            .map(|(l, qis)| {
                let refs: Vec<&QuantizedLut> = qis.iter().map(|&q| &luts[q]).collect();
                self.lists[l].scan_many(&refs, p, l << LIST_SHIFT, sizes.2)
            })
            .collect();
        let mut heaps: Vec<TopK> = (0..prepared.len()).map(|_| TopK::new(sizes.2)).collect();
        for (qis, hs) in by_list.iter().zip(per_list) {
            for (&qi, h) in qis.iter().zip(hs) {
                heaps[qi].merge(h);
            }
        }
        Ok(prepared.par_iter().zip(heaps).map(|((pq, qv), h)| self.finish(pq, qv, h, sizes, p)).collect())
    }
}
