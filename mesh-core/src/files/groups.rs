//! Which chunk groups of a file a receiver holds verified: sorted,
//! disjoint, non-touching ranges of group numbers (a transfer that runs
//! in order is one range, so this stays tiny).

use serde::{Deserialize, Serialize};

/// A set of chunk-group numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSet {
    /// `[start, end)` ranges, sorted, disjoint, not touching.
    ranges: Vec<(u64, u64)>,
}

impl GroupSet {
    /// The empty set.
    pub fn new() -> Self {
        GroupSet::default()
    }

    /// The set of `ranges` (any order, overlapping allowed).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut s = GroupSet::new();
        for (a, b) in ranges {
            s.insert_range(a, b);
        }
        s
    }

    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Adds group `g`.
    pub fn insert(&mut self, g: u64) {
        self.insert_range(g, g.saturating_add(1));
    }

    /// Adds groups `[start, end)`.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Ranges ending before `start` stay; those touching merge.
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let mut last = first;
        let (mut s, mut e) = (start, end);
        while last < self.ranges.len() && self.ranges[last].0 <= e {
            s = s.min(self.ranges[last].0);
            e = e.max(self.ranges[last].1);
            last += 1;
        }
        self.ranges.splice(first..last, [(s, e)]);
    }

    /// Whether `g` is in the set.
    pub fn contains(&self, g: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, e)| e <= g);
        self.ranges.get(i).is_some_and(|&(s, _)| s <= g)
    }

    /// How many groups the set holds.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether all of `[0, total)` is in the set.
    pub fn covers(&self, total: u64) -> bool {
        total == 0 || self.ranges.first() == Some(&(0, total)) || self.count_below(total) == total
    }

    fn count_below(&self, total: u64) -> u64 {
        self.ranges
            .iter()
            .map(|&(s, e)| e.min(total).saturating_sub(s))
            .sum()
    }

    /// The ranges of `[0, total)` not in the set, at most `max` of them.
    pub fn missing(&self, total: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.ranges {
            if out.len() >= max || at >= total {
                break;
            }
            if s > at {
                out.push((at, s.min(total)));
            }
            at = at.max(e);
        }
        if out.len() < max && at < total {
            out.push((at, total));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ranges_merge_and_gaps_are_found() {
        let mut s = GroupSet::new();
        s.insert(5);
        s.insert(3);
        s.insert(4);
        assert_eq!(s.ranges(), &[(3, 6)]);
        s.insert_range(8, 10);
        s.insert_range(0, 1);
        assert_eq!(s.ranges(), &[(0, 1), (3, 6), (8, 10)]);
        assert_eq!(s.missing(12, 10), vec![(1, 3), (6, 8), (10, 12)]);
        assert_eq!(s.missing(12, 2), vec![(1, 3), (6, 8)]);
        assert_eq!(s.missing(4, 10), vec![(1, 3)]);
        s.insert_range(1, 8);
        assert_eq!(s.ranges(), &[(0, 10)]);
        assert!(s.covers(10));
        assert!(!s.covers(11));
        assert!(s.contains(9) && !s.contains(10));
        assert_eq!(s.count(), 10);
    }

    proptest! {
        #[test]
        fn behaves_like_a_set_of_numbers(ops in proptest::collection::vec((0u64..200, 0u64..20), 0..60)) {
            let mut s = GroupSet::new();
            let mut model = std::collections::BTreeSet::new();
            for (a, len) in ops {
                s.insert_range(a, a + len);
                model.extend(a..a + len);
            }
            prop_assert_eq!(s.count(), model.len() as u64);
            for g in 0..230 {
                prop_assert_eq!(s.contains(g), model.contains(&g));
            }
            let gaps: u64 = s.missing(230, usize::MAX).iter().map(|(a, b)| b - a).sum();
            prop_assert_eq!(gaps, 230 - model.len() as u64);
            for w in s.ranges().windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}
