use std::collections::HashSet;

use tq_core::Codec;
use tq_index::{FlatIndex, Hit, IndexError, IndexSpec, IvfIndex, Metric, RawVectors, SearchParams, SharedIndex};

use crate::data;

/// Brute force over the stored codes with the codec's exact estimator.
fn brute(index: &FlatIndex, q: &[f32], k: usize, allow: Option<&HashSet<u64>>) -> Vec<Hit> {
    let c: &dyn Codec = index.codec();
    let pq = index.prepare(q).unwrap();
    let mut code = vec![0u8; c.code_size()];
    let mut all: Vec<Hit> = Vec::new();
    for (slot, &id) in index.ids().iter().enumerate() {
        if allow.is_some_and(|a| !a.contains(&id)) {
            continue;
        }
        index.code_at(slot, &mut code);
        let score = match index.spec().metric {
            Metric::L2 => c.score_l2(&pq, &code),
            _ => c.score_ip(&pq, &code),
        };
        all.push(Hit { id, score });
    }
    let l2 = index.spec().metric == Metric::L2;
    all.sort_by(|a, b| if l2 { a.score.total_cmp(&b.score) } else { b.score.total_cmp(&a.score) });
    all.truncate(k);
    all
}

fn same_ids(a: &[Hit], b: &[Hit]) -> bool {
    a.iter().map(|h| h.id).collect::<Vec<_>>() == b.iter().map(|h| h.id).collect::<Vec<_>>()
}

fn build(codec: &str, metric: Metric, n: usize, dim: usize) -> (FlatIndex, Vec<f32>) {
    let mut idx = FlatIndex::new(IndexSpec::new(codec, dim, metric)).unwrap();
    let xs = data(n, dim, 1);
    if idx.codec().wants_training() {
        idx.train(&xs).unwrap();
    }
    let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + 7 * i).collect();
    idx.add(&ids, &xs).unwrap();
    (idx, xs)
}

#[test]
fn exact_and_fast_scan_searches_equal_brute_force_over_the_codes() {
    for codec in ["tq-mse-4", "tq-mse-2-nc", "tq-mse-3", "tq-prod-3", "rabitq-4", "rabitq-1", "pq-4", "q4_0-rot"] {
        for metric in [Metric::Ip, Metric::Cosine, Metric::L2] {
            let (idx, _) = build(codec, metric, 700, 48);
            let qs = data(5, 48, 9);
            for q in qs.chunks_exact(48) {
                let want = brute(&idx, q, 10, None);
                let exact = idx.search(q, 10, &SearchParams { exact: true, ..Default::default() }).unwrap();
                assert!(same_ids(&exact, &want), "{codec} {metric:?} exact");
                // every candidate re-scored: fast-scan pre-ranking cannot change the result
                let all = idx.search(q, 10, &SearchParams { rerank: 70, ..Default::default() }).unwrap();
                assert!(same_ids(&all, &want), "{codec} {metric:?} fast-scan with full re-rank");
                for (a, b) in all.iter().zip(&want) {
                    assert!((a.score - b.score).abs() <= 1e-5 * (1.0 + b.score.abs()));
                }
            }
        }
    }
}

#[test]
fn fast_scan_with_default_rerank_finds_the_exact_top_results() {
    let (idx, _) = build("tq-mse-4", Metric::Ip, 5000, 64);
    assert!(idx.is_fast_scan());
    let qs = data(50, 64, 10);
    let mut hits = 0;
    for q in qs.chunks_exact(64) {
        let want = brute(&idx, q, 10, None);
        let got = idx.search(q, 10, &SearchParams::default()).unwrap();
        hits += got.iter().filter(|h| want.iter().any(|w| w.id == h.id)).count();
    }
    // 8-bit tables perturb scores by ~1% rms; 100 re-scored candidates for 10
    // results recover the exact top 10 almost always
    assert!(hits as f64 / 500.0 >= 0.99, "overlap {hits}/500");
}

#[test]
fn removed_ids_never_come_back_and_filters_exclude_exactly() {
    for codec in ["tq-mse-4", "tq-mse-3"] {
        let (mut idx, _) = build(codec, Metric::Ip, 400, 32);
        let removed: Vec<u64> = idx.ids().iter().copied().step_by(3).collect();
        idx.remove(&removed).unwrap();
        assert_eq!(idx.len(), 400 - removed.len());
        assert!(matches!(idx.remove(&[removed[0]]), Err(IndexError::UnknownId(_))));
        let allow: HashSet<u64> = idx.ids().iter().copied().filter(|i| i % 2 == 0).collect();
        for q in data(10, 32, 3).chunks_exact(32) {
            let got = idx.search(q, 400, &SearchParams::default()).unwrap();
            assert_eq!(got.len(), idx.len(), "k larger than the index returns everything once");
            assert!(got.iter().all(|h| !removed.contains(&h.id)));
            let p = SearchParams { allow: Some(&allow), ..Default::default() };
            let f = idx.search(q, 20, &p).unwrap();
            assert!(f.iter().all(|h| allow.contains(&h.id)));
            assert!(same_ids(&idx.search(q, 20, &SearchParams { exact: true, ..p }).unwrap(), &brute(&idx, q, 20, Some(&allow))));
        }
        // re-adding a removed id works, adding a present one does not (and adds nothing)
        idx.add(&[removed[0]], &data(1, 32, 4)).unwrap();
        let n = idx.len();
        assert!(matches!(idx.add(&[5, removed[0]], &data(2, 32, 4)), Err(IndexError::DuplicateId(_))));
        assert_eq!(idx.len(), n);
    }
}

#[test]
fn bad_input_is_refused() {
    let (mut idx, _) = build("tq-mse-4", Metric::Ip, 10, 16);
    assert!(idx.search(&[0.0; 15], 5, &SearchParams::default()).is_err());
    assert!(idx.search(&[f32::NAN; 16], 5, &SearchParams::default()).is_err());
    assert!(idx.add(&[1], &[1.0; 15]).is_err());
    assert!(idx.add(&[1], &[f32::INFINITY; 16]).is_err());
    assert_eq!(idx.len(), 10);
    assert!(FlatIndex::new(IndexSpec::new("tq-mse-9", 16, Metric::Ip)).is_err());
    assert!(FlatIndex::new(IndexSpec::new("tq-mse-4", 1, Metric::Ip)).is_err());
}

#[test]
fn ivf_probing_every_list_equals_the_flat_index() {
    for metric in [Metric::Ip, Metric::L2] {
        let spec = IndexSpec::new("tq-mse-4", 32, metric);
        let xs = data(600, 32, 5);
        let ids: Vec<u64> = (0..600).collect();
        let mut ivf = IvfIndex::train(spec.clone(), 8, &xs, 5).unwrap();
        ivf.add(&ids, &xs).unwrap();
        let mut flat = FlatIndex::new(spec).unwrap();
        flat.add(&ids, &xs).unwrap();
        let sizes: Vec<usize> = (0..8).map(|l| ivf.list(l).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 600);
        assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
        for q in data(5, 32, 6).chunks_exact(32) {
            let p = SearchParams { exact: true, nprobe: 8, ..Default::default() };
            assert!(same_ids(&ivf.search(q, 10, &p).unwrap(), &flat.search(q, 10, &p).unwrap()));
            // fewer lists: a subset of the candidates, still well-formed
            let few = ivf.search(q, 10, &SearchParams { nprobe: 2, ..Default::default() }).unwrap();
            assert_eq!(few.len(), 10);
        }
        ivf.remove(&[0, 1, 2]).unwrap();
        assert_eq!(ivf.len(), 597);
        let all = ivf.search(&xs[..32], 600, &SearchParams { nprobe: 8, ..Default::default() }).unwrap();
        assert!(all.iter().all(|h| h.id > 2));
    }
}

/// Concurrent readers during adds: every result they get is well-formed and
/// only holds ids that were completely added (never a half-written entry).
#[test]
fn concurrent_searches_during_adds_see_whole_entries() {
    let dim = 32;
    let (idx, _) = build("tq-mse-4", Metric::Ip, 200, dim);
    let shared = SharedIndex::new(idx);
    let extra = data(2000, dim, 7);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for (b, chunk) in extra.chunks(dim * 100).enumerate() {
                let ids: Vec<u64> = (0..100).map(|i| 1_000_000 + (b * 100 + i) as u64).collect();
                shared.add(&ids, chunk).unwrap();
            }
        });
        for t in 0..3 {
            let shared = &shared;
            s.spawn(move || {
                let qs = data(200, dim, 100 + t);
                for q in qs.chunks_exact(dim) {
                    let n_before = shared.len();
                    let hits = shared.search(q, 5, &SearchParams::default()).unwrap();
                    assert!(n_before >= 200);
                    assert_eq!(hits.len(), 5);
                    let mut seen = HashSet::new();
                    for h in &hits {
                        assert!(h.score.is_finite());
                        assert!(seen.insert(h.id), "duplicate id in one result");
                        assert!(h.id < 1000 + 7 * 200 || (1_000_000..1_002_000).contains(&h.id));
                    }
                }
            });
        }
        writer.join().unwrap();
    });
    let idx = shared.into_inner();
    assert_eq!(idx.len(), 2200);
    // after all adds, the shared index equals one built in a single call
    let q = data(1, dim, 8);
    let got = idx.search(&q, 10, &SearchParams { exact: true, ..Default::default() }).unwrap();
    assert!(same_ids(&got, &brute(&idx, &q, 10, None)));
}

/// With stored raw vectors and every candidate re-ranked by them, the result
/// is the exact f32 top-k (flat and IVF); f16 copies give the same ids here.
#[test]
fn raw_vector_rerank_gives_the_exact_top_k() {
    use tq_index::RawVectors;
    let dim = 32;
    let xs = data(400, dim, 11);
    let ids: Vec<u64> = (0..400).collect();
    for raw in [RawVectors::F32, RawVectors::F16] {
        for metric in [Metric::Ip, Metric::L2] {
            let spec = IndexSpec { raw, ..IndexSpec::new("tq-mse-2", dim, metric) };
            let mut flat = FlatIndex::new(spec.clone()).unwrap();
            flat.add(&ids, &xs).unwrap();
            let mut ivf = IvfIndex::train(spec, 4, &xs, 4).unwrap();
            ivf.add(&ids, &xs).unwrap();
            flat.remove(&[5, 6]).unwrap();
            ivf.remove(&[5, 6]).unwrap();
            for q in data(5, dim, 12).chunks_exact(dim) {
                let mut want: Vec<(f32, u64)> = xs
                    .chunks_exact(dim)
                    .enumerate()
                    .filter(|(i, _)| *i != 5 && *i != 6)
                    .map(|(i, x)| {
                        let s = match metric {
                            Metric::L2 => -x.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                            _ => x.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(),
                        };
                        (s, i as u64)
                    })
                    .collect();
                want.sort_by(|a, b| b.0.total_cmp(&a.0));
                let want: Vec<u64> = want.iter().take(5).map(|w| w.1).collect();
                let p = SearchParams { raw_rerank: true, rerank: 80, nprobe: 4, ..Default::default() };
                let f: Vec<u64> = flat.search(q, 5, &p).unwrap().iter().map(|h| h.id).collect();
                let v: Vec<u64> = ivf.search(q, 5, &p).unwrap().iter().map(|h| h.id).collect();
                assert_eq!(f, want, "{raw:?} {metric:?} flat");
                assert_eq!(v, want, "{raw:?} {metric:?} ivf");
            }
            assert_eq!(flat.entry_size(), flat.codec().code_size() + raw.bytes(dim));
        }
    }
}

/// IVF batch search (each list scanned once for all the queries probing it,
/// threaded over lists) returns the ids and score bits of one `search` per
/// query, on any number of threads, with filters, removals and raw re-ranking.
#[test]
fn ivf_batch_search_equals_per_query_search_on_any_thread_count() {
    let (n, dim) = (4000, 32);
    let xs = data(n, dim, 31);
    let qs = data(17, dim, 32);
    for (codec, metric, raw) in
        [("tq-mse-4", Metric::Ip, RawVectors::None), ("tq-mse-2-nc", Metric::L2, RawVectors::F32), ("tq-mse-4-nc", Metric::Cosine, RawVectors::None)]
    {
        let mut spec = IndexSpec::new(codec, dim, metric);
        spec.raw = raw;
        let mut ivf = IvfIndex::train(spec, 9, &xs[..2000 * dim], 4).unwrap();
        let ids: Vec<u64> = (0..n as u64).map(|i| 11 * i + 3).collect();
        ivf.add(&ids, &xs).unwrap();
        ivf.remove(&[ids[0], ids[1234], ids[3999]]).unwrap();
        let allow: HashSet<u64> = ids.iter().copied().filter(|i| i % 3 != 0).collect();
        let bits = |r: &[Vec<Hit>]| r.iter().map(|h| h.iter().map(|h| (h.id, h.score.to_bits())).collect::<Vec<_>>()).collect::<Vec<_>>();
        for p in [
            SearchParams { nprobe: 3, ..Default::default() },
            SearchParams { nprobe: 9, rerank: 2, allow: Some(&allow), ..Default::default() },
            SearchParams { nprobe: 4, raw_rerank: true, ..Default::default() },
        ] {
            for k in [1usize, 10, 300] {
                let want: Vec<Vec<Hit>> = qs.chunks_exact(dim).map(|q| ivf.search(q, k, &p).unwrap()).collect();
                assert!(want.iter().all(|h| h.len() == k), "{codec} k={k}");
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| ivf.search_batch(&qs, k, &p).unwrap());
                    assert_eq!(bits(&got), bits(&want), "{codec} {metric:?} k={k} threads={threads}");
                }
            }
        }
    }
}
