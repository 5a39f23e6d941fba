//! Per-second accounting of refusals that must all be on record without flooding the ledger:
//! the first refusal per individual key in each second gets its own event, the rest are counted
//! per aggregate key and second, and written later as aggregates with exact counts.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// The tally. `I` decides who gets an individual event per second; `K` groups the counts.
#[derive(Debug)]
pub struct PerSecondTally<I, K> {
    second: i64,
    individual: HashSet<I>,
    counts: BTreeMap<(i64, K), u64>,
    max_individual: usize,
    max_keys: usize,
    fold: fn(K) -> K,
}

impl<I: Eq + Hash, K: Ord> PerSecondTally<I, K> {
    /// At most `max_individual` individual events per second; past `max_keys` aggregate keys,
    /// new keys are folded with `fold` so that memory stays bounded.
    pub fn new(max_individual: usize, max_keys: usize, fold: fn(K) -> K) -> Self {
        PerSecondTally {
            second: i64::MIN,
            individual: HashSet::new(),
            counts: BTreeMap::new(),
            max_individual,
            max_keys,
            fold,
        }
    }

    /// True when this is the first refusal of `key` in `second`: it gets its own event.
    pub fn first_in_second(&mut self, key: I, second: i64) -> bool {
        if second != self.second {
            self.second = second;
            self.individual.clear();
        }
        self.individual.len() < self.max_individual && self.individual.insert(key)
    }

    /// Counts `n` refusals of `key` in `second` for a later aggregate.
    pub fn count(&mut self, key: K, second: i64, n: u64) {
        let slot = (second, key);
        let slot = if self.counts.len() >= self.max_keys && !self.counts.contains_key(&slot) {
            (slot.0, (self.fold)(slot.1))
        } else {
            slot
        };
        *self.counts.entry(slot).or_default() += n;
    }

    /// Takes the counts of seconds before `before` (all of them when `None`).
    pub fn take(&mut self, before: Option<i64>) -> Vec<((i64, K), u64)> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.counts)
            .into_iter()
            .partition(|((second, _), _)| before.is_none_or(|b| *second < b));
        self.counts = kept.into_iter().collect();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_per_key_and_second_is_individual_and_the_rest_are_counted() {
        let mut tally = PerSecondTally::new(10, 10, |k| k);
        assert!(tally.first_in_second("a", 10));
        assert!(!tally.first_in_second("a", 10));
        tally.count("a", 10, 1);
        assert!(tally.first_in_second("a", 11), "a new second starts afresh");
        tally.count("a", 11, 5);
        assert_eq!(tally.take(Some(11)), vec![((10, "a"), 1)]);
        assert_eq!(tally.take(None), vec![((11, "a"), 5)]);
    }

    #[test]
    fn individual_events_and_keys_are_bounded() {
        let mut tally = PerSecondTally::new(2, 2, |_| "folded");
        assert!(tally.first_in_second("a", 1) && tally.first_in_second("b", 1));
        assert!(!tally.first_in_second("c", 1), "at most two individual events a second");
        for key in ["a", "b", "c", "d"] {
            tally.count(key, 1, 1);
        }
        let taken = tally.take(None);
        assert_eq!(taken.iter().map(|(_, n)| n).sum::<u64>(), 4, "every refusal is counted");
        assert!(taken.iter().any(|((_, k), n)| *k == "folded" && *n == 2));
    }
}
