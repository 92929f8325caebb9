//! Fleet patch: the children of a node in the topic trees (subscriptions in `trie`,
//! retained messages in `retain`).
//!
//! Most nodes of a broker's trees have one or two children: below `fleet/<robot>` come
//! that robot's few topics. A `HashMap`'s smallest table has room for four entries, and
//! an entry here holds a whole child node, so each of those nodes took several times the
//! room its children needed (about 1 KiB per robot for its two subscriptions). Up to
//! `FEW` children are kept in a `Vec` that is searched in order and holds exactly as many
//! as there are; past that, in a `HashMap`, as before.

use std::borrow::Borrow;
use std::hash::Hash;

use serde::de::{Deserialize, Deserializer};
use serde::ser::{Serialize, Serializer};

type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// Children kept in order before they move to a `HashMap`.
const FEW: usize = 8;

// `Many` is boxed: a `HashMap` (with its hasher's keys) is 64 bytes, and every node would
// carry that room, most of them for nothing.
pub enum Branches<K, N> {
    Few(Vec<(K, N)>),
    Many(Box<HashMap<K, N>>),
}

impl<K, N> Default for Branches<K, N> {
    #[inline]
    fn default() -> Self {
        Branches::Few(Vec::new())
    }
}

impl<K: Eq + Hash, N> Branches<K, N> {
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Branches::Few(v) => v.len(),
            Branches::Many(m) => m.len(),
        }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get<Q>(&self, k: &Q) -> Option<&N>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            Branches::Few(v) => v.iter().find(|(key, _)| key.borrow() == k).map(|(_, n)| n),
            Branches::Many(m) => m.get(k),
        }
    }

    #[inline]
    pub fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut N>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            Branches::Few(v) => v.iter_mut().find(|(key, _)| key.borrow() == k).map(|(_, n)| n),
            Branches::Many(m) => m.get_mut(k),
        }
    }

    #[inline]
    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.get(k).is_some()
    }

    /// The child under `k`, made with `N::default()` if there was none.
    #[inline]
    pub fn entry_or_default(&mut self, k: K) -> &mut N
    where
        N: Default,
    {
        if let Branches::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(key, _)| *key == k) {
                let mut m = HashMap::with_capacity_and_hasher(v.len() + 1, ahash::RandomState::default());
                m.extend(v.drain(..));
                *self = Branches::Many(Box::new(m));
            }
        }
        match self {
            Branches::Few(v) => {
                let i = match v.iter().position(|(key, _)| *key == k) {
                    Some(i) => i,
                    None => {
                        // Exactly one more: `push` would double the room.
                        v.reserve_exact(1);
                        v.push((k, N::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Branches::Many(m) => m.entry(k).or_default(),
        }
    }

    #[inline]
    pub fn remove<Q>(&mut self, k: &Q) -> Option<N>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            Branches::Few(v) => {
                let i = v.iter().position(|(key, _)| key.borrow() == k)?;
                let (_, n) = v.swap_remove(i);
                v.shrink_to_fit();
                Some(n)
            }
            Branches::Many(m) => m.remove(k),
        }
    }

    #[inline]
    pub fn retain<F>(&mut self, mut f: F)
    where
        F: FnMut(&K, &mut N) -> bool,
    {
        match self {
            Branches::Few(v) => {
                v.retain_mut(|(k, n)| f(k, n));
                v.shrink_to_fit();
            }
            Branches::Many(m) => m.retain(|k, n| f(k, n)),
        }
    }

    #[inline]
    pub fn iter(&self) -> Iter<'_, K, N> {
        match self {
            Branches::Few(v) => Iter::Few(v.iter()),
            Branches::Many(m) => Iter::Many(m.iter()),
        }
    }

    #[inline]
    pub fn values(&self) -> impl Iterator<Item = &N> + '_ {
        self.iter().map(|(_, n)| n)
    }
}

pub enum Iter<'a, K, N> {
    Few(std::slice::Iter<'a, (K, N)>),
    Many(std::collections::hash_map::Iter<'a, K, N>),
}

impl<'a, K, N> Iterator for Iter<'a, K, N> {
    type Item = (&'a K, &'a N);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(i) => i.next().map(|(k, n)| (k, n)),
            Iter::Many(i) => i.next(),
        }
    }

    // Exact: serializers that write a map's length first (postcard) need it.
    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Few(i) => i.size_hint(),
            Iter::Many(i) => i.size_hint(),
        }
    }
}

impl<K, N> ExactSizeIterator for Iter<'_, K, N> {}

impl<K: Serialize + Eq + Hash, N: Serialize> Serialize for Branches<K, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The same form as the `HashMap` it replaces.
        serializer.collect_map(self.iter())
    }
}

impl<'de, K: Deserialize<'de> + Eq + Hash, N: Deserialize<'de>> Deserialize<'de> for Branches<K, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let m = HashMap::<K, N>::deserialize(deserializer)?;
        Ok(if m.len() <= FEW { Branches::Few(m.into_iter().collect()) } else { Branches::Many(Box::new(m)) })
    }
}

#[cfg(test)]
mod tests {
    use super::Branches;

    #[test]
    fn few_children_stay_in_order_and_many_move_to_a_map() {
        let mut b: Branches<String, u32> = Branches::default();
        for i in 0..20u32 {
            *b.entry_or_default(format!("k{i}")) += i;
            *b.entry_or_default(format!("k{i}")) += 1;
            assert_eq!(b.len(), i as usize + 1);
            assert!(matches!(b, Branches::Few(_)) == (i < 8), "{i}");
        }
        assert_eq!(b.get("k3"), Some(&4));
        assert!(b.contains_key("k19"));
        assert_eq!(b.remove("k19"), Some(20));
        assert_eq!(b.remove("k19"), None);
        b.retain(|_, n| *n % 2 == 0);
        assert!(b.values().all(|n| n % 2 == 0));
        let mut small: Branches<String, u32> = Branches::default();
        *small.entry_or_default("a".into()) = 1;
        *small.entry_or_default("b".into()) = 2;
        assert_eq!(small.remove("a"), Some(1));
        assert_eq!(small.iter().collect::<Vec<_>>(), vec![(&"b".to_string(), &2)]);
        if let Branches::Few(v) = &small {
            assert_eq!(v.capacity(), 1);
        }
    }
}
