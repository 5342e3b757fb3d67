//! Per-sequence key/value cache. Three forms: for the differentiable path (training, other
//! devices) per layer `[kv_heads, len, head_dim]` tensors; on CPU, host vectors of
//! `[len, kv_heads · head_dim]` that grow by appending rows (`serve generate`, scoring); and for
//! the serving engine a block table into the shared `KvPool` (`KvCache::paged`), whose blocks
//! the engine allocates. Neither host form copies the history per step.

use candle_core::{Result, Tensor};

/// A block table entry whose block was given back (`KvCache::drop_blocks_before`).
pub const DROPPED: u32 = u32::MAX;

/// One layer's history at a point (`KvCache::mark`).
#[derive(Debug, Clone)]
pub struct LayerMark {
    tensors: Option<(Tensor, Tensor)>,
    host: (usize, usize),
}

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    /// `Some`: paged — the pool blocks holding positions `i · block_size ..` in order.
    table: Option<Vec<u32>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            host: vec![(Vec::new(), Vec::new()); num_layers],
            table: None,
            len: 0,
        }
    }

    /// A cache kept in the engine's `KvPool`: starts with no blocks.
    pub fn paged() -> Self {
        Self {
            table: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// The block table of a paged cache.
    pub fn table(&self) -> Option<&[u32]> {
        self.table.as_deref()
    }

    /// Adds a block at the end of a paged cache's table.
    pub fn push_block(&mut self, block: u32) {
        self.table.get_or_insert_with(Vec::new).push(block);
    }

    /// Starts a paged cache from cached blocks that already hold its first `len` positions
    /// (a prefix-cache hit).
    pub fn start_from(&mut self, blocks: Vec<u32>, len: usize) {
        self.table = Some(blocks);
        self.len = len;
    }

    /// Takes the block table out (the sequence ended; its blocks go back to the engine). Blocks
    /// already given back (`drop_blocks_before`) are not in it.
    pub fn take_table(&mut self) -> Vec<u32> {
        let mut t = self.table.as_mut().map(std::mem::take).unwrap_or_default();
        t.retain(|&b| b != DROPPED);
        t
    }

    /// Gives back the table's blocks before block `first` (positions `0 .. first · block_size`,
    /// which no query of this sequence will see again: they left every layer's sliding window).
    /// Their table entries become `DROPPED`, so positions keep their blocks' indices; the
    /// attention kernel reads no block before a query's window. Returns the blocks given back.
    pub fn drop_blocks_before(&mut self, first: usize) -> Vec<u32> {
        let Some(t) = &mut self.table else {
            return Vec::new();
        };
        let first = first.min(t.len());
        t[..first]
            .iter_mut()
            .filter(|b| **b != DROPPED)
            .map(|b| std::mem::replace(b, DROPPED))
            .collect()
    }

    /// Number of positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this step's keys/values for `layer` and returns the whole history.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let entry = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
        };
        self.layers[layer] = Some(entry.clone());
        Ok(entry)
    }

    /// Appends this step's key/value rows for `layer` (host form).
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        if self.host.len() <= layer {
            self.host.resize(layer + 1, (Vec::new(), Vec::new()));
        }
        let (hk, hv) = &mut self.host[layer];
        hk.extend_from_slice(k);
        hv.extend_from_slice(v);
    }

    /// The host form's whole history of `layer`, `[len, kv_heads · head_dim]` each.
    pub(crate) fn host_rows(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.host[layer];
        (k, v)
    }

    /// Whether this cache holds tensors (it then stays on the tensor path).
    pub(crate) fn has_tensors(&self) -> bool {
        self.layers.iter().any(Option::is_some)
    }

    /// Records that a forward step of `added` tokens went through every layer.
    pub(crate) fn advance(&mut self, added: usize) {
        self.len += added;
    }

    /// Where layer `layer`'s history stands now, to `rewind` to (training's recompute of a
    /// layer must find the cache as the first pass did: empty, or a prefix-tuning adapter's rows).
    pub fn mark(&self, layer: usize) -> LayerMark {
        LayerMark {
            tensors: self.layers.get(layer).cloned().flatten(),
            host: self
                .host
                .get(layer)
                .map_or((0, 0), |(k, v)| (k.len(), v.len())),
        }
    }

    /// Takes layer `layer`'s history back to `mark`.
    pub fn rewind(&mut self, layer: usize, mark: &LayerMark) {
        if let Some(slot) = self.layers.get_mut(layer) {
            *slot = mark.tensors.clone();
        }
        if let Some((k, v)) = self.host.get_mut(layer) {
            k.truncate(mark.host.0);
            v.truncate(mark.host.1);
        }
    }

    /// Takes the cache back to its first `len` positions (speculative decoding: the positions
    /// of proposed tokens that were not kept). A paged cache keeps its blocks: the next step
    /// writes over the positions past `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot {
                // `[kv_heads, len, head_dim]`: positions are dimension 1.
                *slot = Some((k.narrow(1, 0, len)?, v.narrow(1, 0, len)?));
            }
        }
        for (k, v) in self.host.iter_mut() {
            let row = k.len() / self.len;
            k.truncate(len * row);
            let row = v.len() / self.len;
            v.truncate(len * row);
        }
        self.len = len;
        Ok(())
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.host.iter_mut().for_each(|(k, v)| {
            k.clear();
            v.clear();
        });
        self.len = 0;
        if let Some(t) = &mut self.table {
            t.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_blocks_keep_their_places_and_are_not_given_back_twice() {
        let mut c = KvCache::paged();
        for b in [7, 3, 9, 4] {
            c.push_block(b);
        }
        assert_eq!(c.drop_blocks_before(2), vec![7, 3]);
        assert_eq!(c.table(), Some(&[DROPPED, DROPPED, 9, 4][..]));
        assert_eq!(c.drop_blocks_before(3), vec![9], "only the newly dropped");
        assert_eq!(c.drop_blocks_before(10), vec![4], "clamped to the table");
        c.push_block(5);
        assert_eq!(c.take_table(), vec![5], "what is still held");
        assert!(
            KvCache::new(2).drop_blocks_before(3).is_empty(),
            "not paged"
        );
    }
}
