//! Byte-level BPE that topcoat trains itself: the trainer (incremental pair counts) and the
//! encoder (merges applied by rank, per pre-token).
//!
//! Ids `0..256` are the bytes; merge `i` creates id `256 + i` from a pair of earlier ids. Special
//! tokens are not handled here (see `tokenizer.rs`, which puts them after the merges).
//!
//! Training (Sennrich et al. 2016, byte-level as in GPT-2): pre-tokenize, count unique pre-tokens,
//! keep a count for every adjacent pair and an index pair -> words holding it; each step takes the
//! most frequent pair (ties: the smallest pair of ids, so the result is deterministic), rewrites
//! only the words that hold it, and updates the counts of the pairs those words gained or lost. A
//! max-heap with lazy deletion finds the best pair.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use super::pretok::pretokenize;

/// FxHash (rustc's hasher): much faster than SipHash for the small integer keys used here.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const FX_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.add(b as u64);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64)
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

type Pair = (u32, u32);

/// A trained byte-level BPE: the ordered merges and the bytes of every id.
#[derive(Clone, Debug)]
pub struct Bpe {
    merges: Vec<Pair>,
    ranks: FxMap<Pair, u32>,
    token_bytes: Vec<Vec<u8>>,
}

impl Bpe {
    /// Rebuilds a BPE from its merges; merge `i` may only use ids `< 256 + i`.
    pub fn from_merges(merges: Vec<Pair>) -> Result<Self, String> {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut ranks = FxMap::default();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let limit = 256 + i as u32;
            if a >= limit || b >= limit {
                return Err(format!(
                    "merge {i} is [{a}, {b}] but may only use ids below {limit}"
                ));
            }
            if ranks.insert((a, b), i as u32).is_some() {
                return Err(format!("merge {i} [{a}, {b}] repeats an earlier merge"));
            }
            let mut t = token_bytes[a as usize].clone();
            t.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(t);
        }
        Ok(Self {
            merges,
            ranks,
            token_bytes,
        })
    }

    pub fn merges(&self) -> &[Pair] {
        &self.merges
    }

    /// Ids this BPE produces: 256 bytes + one per merge.
    pub fn num_tokens(&self) -> usize {
        self.token_bytes.len()
    }

    /// Bytes of id `id`, or `None` when it is not one of this BPE's ids.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|v| v.as_slice())
    }

    /// Learns up to `n_merges` merges from `texts`; stops early when no pair occurs any more.
    /// `progress(done, n_merges)` is called every 64 merges and at the end.
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str>,
        n_merges: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Self {
        let (mut words, freq) = count_pretokens(texts);
        let (mut pair_count, mut where_) = index_pairs(&words, &freq);
        let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
            pair_count.iter().map(|(&p, &c)| (c, Reverse(p))).collect();

        // 3. Merge loop.
        let mut bpe = Bpe::from_merges(Vec::new()).unwrap();
        let mut delta: FxMap<Pair, i64> = FxMap::default();
        let mut merged: Vec<u32> = Vec::new();
        while bpe.merges.len() < n_merges {
            let Some((c, Reverse(p))) = heap.pop() else {
                break;
            };
            if c <= 0 || pair_count.get(&p) != Some(&c) {
                continue; // stale heap entry
            }
            let new = bpe.token_bytes.len() as u32;
            let (a, b) = p;
            let mut t = bpe.token_bytes[a as usize].clone();
            t.extend_from_slice(&bpe.token_bytes[b as usize]);
            bpe.token_bytes.push(t);
            bpe.ranks.insert(p, bpe.merges.len() as u32);
            bpe.merges.push(p);

            delta.clear();
            for wi in where_.remove(&p).unwrap_or_default() {
                let word = &mut words[wi as usize];
                merge_pair(word, p, new, &mut merged);
                if merged.len() == word.len() {
                    continue;
                }
                let f = freq[wi as usize];
                for q in word.windows(2) {
                    *delta.entry((q[0], q[1])).or_insert(0) -= f;
                }
                for q in merged.windows(2) {
                    let q = (q[0], q[1]);
                    *delta.entry(q).or_insert(0) += f;
                    if q.0 == new || q.1 == new {
                        let list = where_.entry(q).or_default();
                        if list.last() != Some(&wi) {
                            list.push(wi);
                        }
                    }
                }
                std::mem::swap(word, &mut merged);
            }
            for (&q, &d) in delta.iter() {
                if d == 0 {
                    continue;
                }
                let e = pair_count.entry(q).or_insert(0);
                *e += d;
                if *e > 0 {
                    heap.push((*e, Reverse(q)));
                }
            }
            pair_count.remove(&p);
            if bpe.merges.len().is_multiple_of(64) {
                progress(bpe.merges.len(), n_merges);
            }
        }
        progress(bpe.merges.len(), n_merges);
        bpe
    }

    /// Appends the ids of one pre-token: merges applied lowest rank first, as in training.
    pub fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = word.iter().map(|&b| b as u32).collect();
        while syms.len() >= 2 {
            let best = syms
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0], p[1])).copied())
                .min();
            let Some(rank) = best else { break };
            let (a, b) = self.merges[rank as usize];
            let new = 256 + rank;
            let mut w = 0;
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    syms[w] = new;
                    i += 2;
                } else {
                    syms[w] = syms[i];
                    i += 1;
                }
                w += 1;
            }
            syms.truncate(w);
        }
        out.extend_from_slice(&syms);
    }

    /// Encodes ordinary text (no special tokens), caching the ids of repeated pre-tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut cache: FxMap<&str, (u32, u32)> = FxMap::default();
        for w in pretokenize(text) {
            if let Some(&(s, e)) = cache.get(w) {
                out.extend_from_within(s as usize..e as usize);
                continue;
            }
            let s = out.len();
            self.encode_word(w.as_bytes(), &mut out);
            if out.len() <= u32::MAX as usize {
                cache.insert(w, (s as u32, out.len() as u32));
            }
        }
        out
    }
}

/// The unique pre-tokens of `texts` as byte ids, sorted, with their frequencies (counted in
/// parallel).
fn count_pretokens<'a>(texts: impl Iterator<Item = &'a str>) -> (Vec<Vec<u32>>, Vec<i64>) {
    let texts: Vec<&str> = texts.collect();
    let counts: FxMap<&str, i64> = texts
        .par_iter()
        .fold(FxMap::default, |mut m: FxMap<&str, i64>, t| {
            for w in pretokenize(t) {
                *m.entry(w).or_insert(0) += 1;
            }
            m
        })
        .reduce(FxMap::default, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (k, v) in small {
                *big.entry(k).or_insert(0) += v;
            }
            big
        });
    let mut entries: Vec<(&str, i64)> = counts.into_iter().collect();
    entries.sort_unstable();
    let words = entries
        .iter()
        .map(|(w, _)| w.bytes().map(|b| b as u32).collect())
        .collect();
    let freq = entries.iter().map(|&(_, c)| c).collect();
    (words, freq)
}

/// Pair counts over `words` (weighted by `freq`), and the index pair -> words holding it.
#[allow(clippy::type_complexity)]
fn index_pairs(words: &[Vec<u32>], freq: &[i64]) -> (FxMap<Pair, i64>, FxMap<Pair, Vec<u32>>) {
    let mut pair_count: FxMap<Pair, i64> = FxMap::default();
    let mut where_: FxMap<Pair, Vec<u32>> = FxMap::default();
    for (wi, w) in words.iter().enumerate() {
        for p in w.windows(2) {
            let p = (p[0], p[1]);
            *pair_count.entry(p).or_insert(0) += freq[wi];
            let list = where_.entry(p).or_default();
            if list.last() != Some(&(wi as u32)) {
                list.push(wi as u32);
            }
        }
    }
    (pair_count, where_)
}

/// Writes `word` into `merged` with every occurrence of `pair` (left to right) replaced by `new`.
fn merge_pair(word: &[u32], pair: Pair, new: u32, merged: &mut Vec<u32>) {
    let (a, b) = pair;
    merged.clear();
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
            merged.push(new);
            i += 2;
        } else {
            merged.push(word[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_most_frequent_pair_first_and_round_trips() {
        let text = "low lower lowest low low";
        let bpe = Bpe::train(std::iter::once(text), 10, &mut |_, _| {});
        assert!(!bpe.merges().is_empty());
        // " l" + "o" or "l"+"o": the first merge is the most frequent pair.
        let ids = bpe.encode(text);
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| bpe.token_bytes(i).unwrap().to_vec())
            .collect();
        assert_eq!(bytes, text.as_bytes());
        assert!(ids.len() < text.len());
        let again = Bpe::from_merges(bpe.merges().to_vec()).unwrap();
        assert_eq!(again.encode(text), ids);
    }

    #[test]
    fn from_merges_rejects_forward_references() {
        assert!(Bpe::from_merges(vec![(0, 300)]).is_err());
    }
}
