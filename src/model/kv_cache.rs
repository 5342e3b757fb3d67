//! Per-sequence key/value cache. Two forms: for the differentiable path (training, other
//! devices) per layer `[kv_heads, len, head_dim]` tensors; for CPU serving, host vectors of
//! `[len, kv_heads · head_dim]` that grow by appending rows (no copy of the history per step),
//! read by the fused attention in `ops::attention`.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            host: vec![(Vec::new(), Vec::new()); num_layers],
            len: 0,
        }
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

    /// Appends this step's key/value rows for `layer` (host form) and returns the whole
    /// history, `[len, kv_heads · head_dim]` each.
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> (&[f32], &[f32]) {
        if self.host.len() <= layer {
            self.host.resize(layer + 1, (Vec::new(), Vec::new()));
        }
        let (hk, hv) = &mut self.host[layer];
        hk.extend_from_slice(k);
        hv.extend_from_slice(v);
        (hk, hv)
    }

    /// Whether this cache holds tensors (it then stays on the tensor path).
    pub(crate) fn has_tensors(&self) -> bool {
        self.layers.iter().any(Option::is_some)
    }

    /// Records that a forward step of `added` tokens went through every layer.
    pub(crate) fn advance(&mut self, added: usize) {
        self.len += added;
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.host.iter_mut().for_each(|(k, v)| {
            k.clear();
            v.clear();
        });
        self.len = 0;
    }
}
