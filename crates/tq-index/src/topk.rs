//! Bounded top-k selection (keeps the k largest scores; ties to the lower slot).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub score: f32,
    pub slot: usize,
}

// Heap order: the *worst* entry on top (lowest score; among equal scores the
// higher slot), so it can be replaced in O(log k).
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
    heap: BinaryHeap<Entry>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        // the heap grows as entries arrive; reserving for a huge `k` up front
        // would allocate for results that may never exist
        Self { k, heap: BinaryHeap::with_capacity(k.min(1024) + 1) }
    }

    /// Could an entry of score `score` enter the set (whatever its slot)?
    /// A cheap pre-test for a whole block of candidates (a float comparison:
    /// -0 and +0 pass alike, and `accepts` then decides by the total order).
    #[inline]
    pub fn may_accept(&self, score: f32) -> bool {
        self.k > 0 && (self.heap.len() < self.k || self.heap.peek().is_some_and(|w| score >= w.score))
    }

    /// Would `(score, slot)` enter the set? Exactly when `push` would keep it,
    /// so the set is the k best under (score, then lower slot) whatever the
    /// order entries are offered in (cheap pre-test before filters).
    #[inline]
    pub fn accepts(&self, score: f32, slot: usize) -> bool {
        self.k > 0 && (self.heap.len() < self.k || self.heap.peek().is_some_and(|w| Entry { score, slot } < *w))
    }

    #[inline]
    pub fn push(&mut self, score: f32, slot: usize) {
        if self.k == 0 {
            return;
        }
        let e = Entry { score, slot };
        if self.heap.len() < self.k {
            self.heap.push(e);
        } else if let Some(mut w) = self.heap.peek_mut() {
            if e < *w {
                *w = e;
            }
        }
    }

    /// Adds every entry of `other` (the result equals pushing them one by one:
    /// the k best under (score, then lower slot), whatever the order).
    pub fn merge(&mut self, other: TopK) {
        for e in other.heap {
            self.push(e.score, e.slot);
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Entry> {
        self.heap.into_sorted_vec()
    }
}
