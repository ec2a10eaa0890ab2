//! Values made once per key and shared after, within a bound.

use std::{collections::HashMap, hash::Hash, sync::Arc};

/// Whether a kept value and an asked-for one are the same shared value, by
/// address: what rendered or counted for one stands for the other. The
/// keeper must hold its `Arc`, so that its address cannot be reused by
/// another value while kept.
pub fn same_value<T: ?Sized>(kept: Option<&Arc<T>>, asked: Option<&Arc<T>>) -> bool {
    match (kept, asked) {
        (Some(kept), Some(asked)) => Arc::ptr_eq(kept, asked),
        (None, None) => true,
        _ => false,
    }
}

/// A table of values made once per key. Past `max` keys it starts over:
/// inputs that keep bringing new keys cost a refill now and then, never
/// more memory. Every record looks one up (a comm, a set of frames), so it
/// hashes with foldhash, seeded per table, not SipHash: hashing a record's
/// 64 bytes of frames took 2.6 % of a storm's event loop.
pub struct Memo<K, V> {
    made: HashMap<K, V, foldhash::fast::RandomState>,
    max: usize,
}

impl<K: Eq + Hash + Copy, V: Clone> Memo<K, V> {
    pub fn new(max: usize) -> Self {
        Self {
            made: HashMap::default(),
            max,
        }
    }

    pub fn get(&mut self, key: &K, make: impl FnOnce() -> V) -> V {
        if let Some(value) = self.made.get(key) {
            return value.clone();
        }
        if self.made.len() >= self.max {
            self.made.clear();
        }
        let value = make();
        self.made.insert(*key, value.clone());
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn makes_each_value_once_and_starts_over_when_full() {
        let mut memo = Memo::new(2);
        let mut made = 0;
        let mut get = |memo: &mut Memo<u8, Arc<str>>, key: u8| {
            memo.get(&key, || {
                made += 1;
                key.to_string().into()
            })
        };
        let one = get(&mut memo, 1);
        assert!(Arc::ptr_eq(&one, &get(&mut memo, 1)));
        get(&mut memo, 2);
        assert_eq!(memo.made.len(), 2);
        // A third key: the table starts over with it alone.
        get(&mut memo, 3);
        assert_eq!(memo.made.len(), 1);
        assert!(!Arc::ptr_eq(&one, &get(&mut memo, 1)));
        assert_eq!(made, 4);
    }
}
