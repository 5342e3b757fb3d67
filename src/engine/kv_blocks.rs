//! Which KV pool block belongs to whom: allocation, reference counts, and the prefix cache.
//!
//! A full block is content-addressed by a hash chain that starts from the tenant and the
//! adapter's identity (its key and version, or the base model) and folds in the token ids of
//! every block up to it, so a block is found again only by a sequence of the same tenant with
//! the same adapter AND the same tokens before it. KV computed under one adapter is never reused
//! under another (llama.cpp's slot cache matches tokens only), and one tenant never gets a
//! faster first token because another sent the same prompt (a timing channel that would tell
//! it what the other asked). Cached blocks nobody references stay until the pool needs room, and go
//! least recently used first. Pure bookkeeping: no tensors; unit-tested alone.

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

/// A block's identity in the prefix cache (SHA-256: a collision would hand one adapter's or one
/// prompt's KV to another request).
pub type BlockHash = [u8; 32];

/// Where a sequence's hash chain starts: its tenant (`""`: none), and `adapter`, the adapter's
/// identity (key and version; `None`: the base model).
pub fn chain_seed(tenant: &str, adapter: Option<&str>) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"loraplex-kv-prefix\0");
    h.update((tenant.len() as u64).to_le_bytes());
    h.update(tenant.as_bytes());
    match adapter {
        Some(a) => {
            h.update(b"adapter\0");
            h.update(a.as_bytes());
        }
        None => h.update(b"base\0"),
    }
    h.finalize().into()
}

/// The hash of a block holding `tokens` after the blocks whose chain ends in `prev`.
pub fn next_hash(prev: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(prev);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

#[derive(Debug)]
pub struct KvBlocks {
    block_size: usize,
    refs: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    last_use: Vec<u64>,
    /// Blocks holding nothing reusable.
    free: Vec<u32>,
    cached: HashMap<BlockHash, u32>,
    /// Cached blocks nobody references, by last use: evicted from the front.
    idle: BTreeSet<(u64, u32)>,
    tick: u64,
    prefix_caching: bool,
}

impl KvBlocks {
    pub fn new(blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            refs: vec![0; blocks],
            hash: vec![None; blocks],
            last_use: vec![0; blocks],
            // Lowest ids first out, so a lightly used pool touches little memory.
            free: (0..blocks as u32).rev().collect(),
            cached: HashMap::new(),
            idle: BTreeSet::new(),
            tick: 0,
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// The longest run of cached blocks that `tokens` starts with under `seed`, in whole blocks
    /// and leaving at least one token to feed (its logits start the generation). The blocks
    /// returned are referenced by the caller now; also returns their hashes (the chain so far).
    pub fn lookup(&mut self, seed: &BlockHash, tokens: &[u32]) -> (Vec<u32>, Vec<BlockHash>) {
        let (mut blocks, mut chain) = (Vec::new(), Vec::new());
        if !self.prefix_caching || tokens.is_empty() {
            return (blocks, chain);
        }
        let whole = (tokens.len() - 1) / self.block_size;
        let mut prev = *seed;
        for i in 0..whole {
            let h = next_hash(
                &prev,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            let Some(&b) = self.cached.get(&h) else { break };
            self.reference(b);
            blocks.push(b);
            chain.push(h);
            prev = h;
        }
        (blocks, chain)
    }

    fn reference(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.idle.remove(&(self.last_use[i], b));
        }
        self.refs[i] += 1;
    }

    /// A block for one sequence's new positions: a free one, else the least recently used
    /// cached block nobody references (its cache entry goes). `None`: every block is in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (t, b) = self.idle.pop_first()?;
                debug_assert_eq!(t, self.last_use[b as usize]);
                if let Some(h) = self.hash[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// `block` (referenced by the caller) is full and holds the positions that `hash` names:
    /// later sequences may reuse it. If another block already holds the same, this one stays
    /// private.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if !self.prefix_caching || self.hash[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash[block as usize] = Some(hash);
        }
    }

    /// The caller's references to `blocks` end (its sequence finished or was dropped).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            debug_assert!(self.refs[i] > 0, "block {b} released twice");
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] == 0 {
                self.tick += 1;
                self.last_use[i] = self.tick;
                if self.hash[i].is_some() {
                    self.idle.insert((self.tick, b));
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Blocks some sequence references.
    pub fn used(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// Blocks holding a reusable prefix.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Forgets everything (the engine is rebuilt after a fault).
    pub fn reset(&mut self) {
        *self = Self::new(self.refs.len(), self.block_size, self.prefix_caching);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(kv: &mut KvBlocks, seed: &BlockHash, tokens: &[u32]) -> Vec<u32> {
        let bs = kv.block_size();
        let mut prev = *seed;
        let mut blocks = Vec::new();
        for chunk in tokens.chunks(bs) {
            let b = kv.allocate().expect("room");
            if chunk.len() == bs {
                prev = next_hash(&prev, chunk);
                kv.register(b, prev);
            }
            blocks.push(b);
        }
        blocks
    }

    #[test]
    fn a_prefix_is_found_under_the_same_adapter_only() {
        let mut kv = KvBlocks::new(16, 4, true);
        let (a, b) = (chain_seed("t1", Some("x@1")), chain_seed("t1", Some("x@2")));
        let prompt: Vec<u32> = (0..11).collect();
        let blocks = fill(&mut kv, &a, &prompt);
        kv.release(&blocks);
        // 11 tokens: two whole blocks are reusable; the third is partial.
        let (hit, chain) = kv.lookup(&a, &prompt);
        assert_eq!(hit, blocks[..2]);
        assert_eq!(chain.len(), 2);
        kv.release(&hit);
        // Another version of the adapter, or the base model: nothing.
        assert!(kv.lookup(&b, &prompt).0.is_empty());
        assert!(kv.lookup(&chain_seed("t1", None), &prompt).0.is_empty());
        // The same adapter for another tenant: nothing either.
        assert!(kv
            .lookup(&chain_seed("t2", Some("x@1")), &prompt)
            .0
            .is_empty());
        assert!(kv
            .lookup(&chain_seed("", Some("x@1")), &prompt)
            .0
            .is_empty());
        // A prompt that differs in its first block shares nothing after it either.
        let mut other = prompt.clone();
        other[0] = 99;
        assert!(kv.lookup(&a, &other).0.is_empty());
        // A prompt of exactly 8 tokens reuses one block: one token must remain to feed.
        assert_eq!(kv.lookup(&a, &prompt[..8]).0.len(), 1);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recently_used_first() {
        let mut kv = KvBlocks::new(3, 2, true);
        let s = chain_seed("", None);
        let x = fill(&mut kv, &s, &[1, 2]);
        let y = fill(&mut kv, &s, &[3, 4]);
        kv.release(&x);
        kv.release(&y);
        assert_eq!((kv.used(), kv.cached()), (0, 2));
        // The free block goes first, then x (released before y).
        let f = kv.allocate().unwrap();
        assert!(!x.contains(&f) && !y.contains(&f));
        assert_eq!(kv.allocate(), Some(x[0]));
        assert!(kv.lookup(&s, &[1, 2, 0]).0.is_empty());
        assert_eq!(kv.lookup(&s, &[3, 4, 0]).0, y);
        // Everything is referenced now.
        assert_eq!(kv.allocate(), None);
        kv.reset();
        assert_eq!((kv.used(), kv.cached()), (0, 0));
    }

    #[test]
    fn shared_blocks_stay_until_the_last_reference_and_off_means_off() {
        let mut kv = KvBlocks::new(4, 2, true);
        let s = chain_seed("", None);
        let x = fill(&mut kv, &s, &[1, 2]);
        let (hit, _) = kv.lookup(&s, &[1, 2, 3]);
        assert_eq!(hit, x);
        kv.release(&x);
        assert_eq!(kv.used(), 1);
        kv.release(&hit);
        assert_eq!(kv.used(), 0);
        let mut off = KvBlocks::new(4, 2, false);
        let x = fill(&mut off, &s, &[1, 2]);
        off.release(&x);
        assert!(off.lookup(&s, &[1, 2, 3]).0.is_empty());
        assert_eq!(off.cached(), 0);
    }
}
