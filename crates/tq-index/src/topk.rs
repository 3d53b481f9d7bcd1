//! Bounded top-k selection (keeps the k largest scores; ties to the lower slot).
//!
//! Entries go into an unsorted buffer; when it holds `2k` of them it is cut
//! back to its `k` best (`select_nth_unstable`, linear time) and the worst
//! kept entry becomes the *floor*: nothing that is not better than the floor
//! can be among the k best any more, so later entries are rejected by one
//! comparison. Amortized O(1) per entry instead of a heap's O(log k) sift,
//! and the same set as a heap under the same total order, whatever the order
//! the entries arrive in.

use std::cmp::Ordering;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub score: f32,
    pub slot: usize,
}

// Order: better entries first (higher score; among equal scores the lower
// slot), so `a < b` reads "a ranks before b" and a sort is best first.
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        o.score.total_cmp(&self.score).then(self.slot.cmp(&o.slot))
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}

pub(crate) struct TopK {
    k: usize,
    /// Holds the k best of everything pushed (and possibly worse entries).
    buf: Vec<Entry>,
    /// The k-th best entry at the last cut: an entry must rank before it to enter.
    floor: Option<Entry>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        // the buffer grows as entries arrive; reserving for a huge `k` up front
        // would allocate for results that may never exist
        Self { k, buf: Vec::with_capacity(k.min(512) * 2), floor: None }
    }

    /// The lowest score that may still enter (`-inf` until the first cut):
    /// every entry of a lower score is rejected (a float comparison, so -0
    /// and +0 pass alike and `push` then decides by the total order). A
    /// cheap pre-test for whole blocks of candidates.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.k == 0 {
            return f32::INFINITY;
        }
        self.floor.map_or(f32::NEG_INFINITY, |f| f.score)
    }

    /// Could `(score, slot)` enter the set? True whenever `push` would keep
    /// it (a cheap pre-test before filters; it may also say true for an entry
    /// that a later cut drops).
    #[inline]
    pub fn accepts(&self, score: f32, slot: usize) -> bool {
        self.k > 0 && self.floor.is_none_or(|f| Entry { score, slot } < f)
    }

    #[inline]
    pub fn push(&mut self, score: f32, slot: usize) {
        if !self.accepts(score, slot) {
            return;
        }
        self.buf.push(Entry { score, slot });
        if self.buf.len() >= 2 * self.k.max(8) {
            self.cut();
        }
    }

    /// Keeps the k best of the buffer; the k-th becomes the floor.
    fn cut(&mut self) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable(self.k - 1);
            self.buf.truncate(self.k);
            // after the selection, buf[k-1] ranks after every other kept entry
            self.floor = Some(self.buf[self.k - 1]);
        }
    }

    /// Adds every entry of `other` (the result equals pushing them one by one:
    /// the k best under (score, then lower slot), whatever the order).
    pub fn merge(&mut self, other: TopK) {
        for e in other.buf {
            self.push(e.score, e.slot);
        }
    }

    /// The k best, in no particular order.
    pub fn into_best(mut self) -> Vec<Entry> {
        self.cut();
        self.buf
    }

    /// The k best, best first.
    pub fn into_sorted(mut self) -> Vec<Entry> {
        self.buf.sort_unstable();
        self.buf.truncate(self.k);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tq_core::rng::Xoshiro256;

    /// The k best under (score descending, slot ascending), by a full sort.
    fn by_sort(mut v: Vec<(f32, usize)>, k: usize) -> Vec<(u32, usize)> {
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().take(k).map(|(s, i)| (s.to_bits(), i)).collect()
    }

    /// Whatever the order and split of the entries (many ties, ±0, one
    /// buffer or several merged), the set is the k best of a full sort.
    #[test]
    fn equals_a_full_sort() {
        let mut r = Xoshiro256::new(3);
        for n in [0usize, 1, 7, 50, 1000] {
            // few distinct scores: ties are decided by the slot
            let v: Vec<(f32, usize)> = (0..n)
                .map(|i| {
                    let s = match r.below(5) {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (r.below(9) as f32 - 4.0) * 0.25,
                    };
                    (s, i)
                })
                .collect();
            let mut shuffled = v.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, r.below(i as u64 + 1) as usize);
            }
            for k in [0usize, 1, 3, 10, 64, 2000] {
                let want = by_sort(v.clone(), k);
                let mut one = TopK::new(k);
                shuffled.iter().for_each(|&(s, i)| one.push(s, i));
                let got: Vec<(u32, usize)> = one.into_sorted().iter().map(|e| (e.score.to_bits(), e.slot)).collect();
                assert_eq!(got, want, "n={n} k={k}");
                let mut parts: Vec<TopK> = (0..3).map(|_| TopK::new(k)).collect();
                shuffled.iter().enumerate().for_each(|(j, &(s, i))| parts[j % 3].push(s, i));
                let mut all = TopK::new(k);
                parts.into_iter().for_each(|p| all.merge(p));
                let got: Vec<(u32, usize)> = all.into_sorted().iter().map(|e| (e.score.to_bits(), e.slot)).collect();
                assert_eq!(got, want, "merged n={n} k={k}");
            }
        }
    }

    /// Nothing the final set holds is ever refused by the pre-tests.
    #[test]
    fn pre_tests_never_refuse_a_result() {
        let mut r = Xoshiro256::new(4);
        let v: Vec<(f32, usize)> = (0..5000).map(|i| (r.gaussian() as f32, i)).collect();
        let want = by_sort(v.clone(), 25);
        let mut t = TopK::new(25);
        for &(s, i) in &v {
            if want.iter().any(|&(b, j)| b == s.to_bits() && j == i) {
                assert!(s >= t.threshold() && t.accepts(s, i), "a result was refused");
            }
            t.push(s, i);
        }
        assert!(t.threshold() > f32::NEG_INFINITY, "the floor rises once the buffer is cut");
    }
}
