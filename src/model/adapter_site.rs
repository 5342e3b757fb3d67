//! Adapter sites: the low-rank weights an adapter attaches to each projection, laid out for the
//! forward pass, and which rows of a batch use which adapter.
//!
//! LoRA: `y = W x + s·B(A x)`. DoRA (PEFT): `y = (m/n) ⊙ (W x + s·B A x) + b` with
//! `n = ‖W + s·B A‖` per output row; at serving time `m/n` is one constant vector per site.
//! IA³: `y = l ⊙ (W x)` (attention modules), or `y = W (l ⊙ x)` (feed-forward modules).

use candle_core::{DType, Result, Tensor};

/// The seven projections of a Llama block, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Module path inside a decoder layer, as in Hugging Face (`self_attn.q_proj`).
    pub fn module(&self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// Short name as in PEFT's `target_modules` (`q_proj`).
    pub fn short(&self) -> &'static str {
        self.module().rsplit('.').next().unwrap_or_default()
    }

    pub fn from_short(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.short() == name)
    }
}

/// Training-time dropout on the LoRA branch's input, from a seeded hash so that a resumed run
/// draws the same masks as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// The factor element `i` is multiplied by: 0 with probability `p` (to 1/65,536), else
    /// `1/(1-p)`; a pure function of the seed and the index, so forward and backward agree
    /// and threads may split the work. One hash draws four elements' 16-bit uniforms.
    #[inline]
    fn factor(&self, i: u64, threshold: u32, keep: f32) -> f32 {
        if self.uniform16(i) < threshold {
            0.0
        } else {
            keep
        }
    }

    /// Element `i`'s 16-bit uniform: a quarter of the hash of `i / 4`.
    #[inline]
    fn uniform16(&self, i: u64) -> u32 {
        let h = splitmix64(self.seed ^ (i >> 2).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        ((h >> ((i & 3) * 16)) & 0xFFFF) as u32
    }

    /// Uniforms below this are dropped.
    fn threshold(&self) -> u32 {
        (self.p as f64 * 65_536.0).round() as u32
    }

    /// `v[i] ← v[i] · factor(i)` for the elements `first ..` that `v` holds.
    fn scale_from(&self, first: usize, v: &mut [f32]) {
        let (threshold, keep) = (self.threshold(), 1.0 / (1.0 - self.p));
        for (j, x) in v.iter_mut().enumerate() {
            *x *= self.factor((first + j) as u64, threshold, keep);
        }
    }

    /// Zeroes each element with probability `p`, scales the rest by `1/(1-p)`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 && matches!(x.device(), candle_core::Device::Cpu) {
            // One node, applied in place over threads, its backward the same mask.
            return x.contiguous()?.apply_op1(*self);
        }
        let keep = 1.0 / (1.0 - self.p);
        let threshold = self.threshold();
        let mask: Vec<f32> = (0..x.elem_count() as u64)
            .map(|i| self.factor(i, threshold, keep))
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl crate::ops::lora_train::Mask for Dropout {
    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// The elements `factor` keeps, as bits: 16 hashes a word.
    fn fill(&self, first: usize, bits: &mut [u64]) {
        let threshold = self.threshold() as u64;
        for (w, word) in bits.iter_mut().enumerate() {
            let quad = (first + w * 64) as u64 >> 2;
            *word = (0..16u64).fold(0, |acc, q| {
                let h = splitmix64(self.seed ^ (quad + q).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                (0..4).fold(acc, |acc, e| {
                    let kept = ((h >> (e * 16)) & 0xFFFF) >= threshold;
                    acc | ((kept as u64) << (q * 4 + e))
                })
            });
        }
    }
}

const DROPOUT_TASK: usize = 16_384;

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input must be contiguous".into()))?;
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("dropout: f32 only");
        };
        let mut y = v[a..b].to_vec();
        y.par_chunks_mut(DROPOUT_TASK)
            .enumerate()
            .for_each(|(c, chunk)| self.scale_from(c * DROPOUT_TASK, chunk));
        Ok((candle_core::CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let mut g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        g.par_chunks_mut(DROPOUT_TASK)
            .enumerate()
            .for_each(|(c, chunk)| self.scale_from(c * DROPOUT_TASK, chunk));
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// One adapter on one projection.
#[derive(Debug, Clone)]
pub struct LoraSite {
    /// `Aᵀ`, `[in, r]`.
    pub a_t: Tensor,
    /// `(s·B)ᵀ`, `[r, out]`: the scale folded in once at load.
    pub b_t: Tensor,
    /// DoRA `m / ‖W + s·B A‖`, `[out]`.
    pub dora_scale: Option<Tensor>,
    /// Training only.
    pub dropout: Option<Dropout>,
}

impl LoraSite {
    pub fn rank(&self) -> usize {
        self.a_t.dims().get(1).copied().unwrap_or(0)
    }

    /// `s·B(A x)` for `x` of shape `[rows, in]`.
    pub fn lora_delta(&self, x: &Tensor) -> Result<Tensor> {
        // A/B may be kept in 16 bits for serving; the candle path computes in x's type.
        let (a, b) = (self.a_t.to_dtype(x.dtype())?, self.b_t.to_dtype(x.dtype())?);
        match &self.dropout {
            Some(d) if d.p > 0.0 => d.apply(x)?.matmul(&a)?.matmul(&b),
            _ => x.matmul(&a)?.matmul(&b),
        }
    }

    /// What this site adds to the base product `base` (without bias) of rows `x`.
    pub fn delta(&self, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        let lora = self.lora_delta(x)?;
        match &self.dora_scale {
            None => Ok(lora),
            // (m/n) ⊙ (Wx + lora) − Wx = (m/n − 1) ⊙ Wx + (m/n) ⊙ lora
            Some(scale) => base.broadcast_mul(&(scale - 1.0)?)? + lora.broadcast_mul(scale)?,
        }
    }

    pub fn bytes(&self) -> usize {
        let n = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        n(&self.a_t) + n(&self.b_t) + self.dora_scale.as_ref().map(n).unwrap_or(0)
    }
}

/// One IA³ vector on one projection: it scales the projection's output (`[out]`) or, for a
/// feed-forward module, its input (`[in]`).
#[derive(Debug, Clone)]
pub struct Ia3Site {
    pub scale: Tensor,
    pub on_input: bool,
}

/// Which hidden state a bottleneck adapter reads (AdapterHub's configurations on Llama): the
/// residual stream after the sublayer is added (`seq_bn`), the sublayer's output (`double_seq_bn`),
/// or the residual stream before the sublayer (`par_bn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnInput {
    AfterResidual,
    SublayerOutput,
    BeforeSublayer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnActivation {
    Relu,
    Silu,
}

/// A bottleneck adapter after one sublayer (attention or MLP): adds
/// `scaling · (act(z Dᵀ + d) Uᵀ + u)` to the residual stream, `z` per `input`.
#[derive(Debug, Clone)]
pub struct BnSite {
    /// `Dᵀ`, `[hidden, r]`.
    pub down_t: Tensor,
    pub down_b: Tensor,
    /// `Uᵀ`, `[r, hidden]`.
    pub up_t: Tensor,
    pub up_b: Tensor,
    pub scaling: f64,
    pub act: BnActivation,
    pub input: BnInput,
}

impl BnSite {
    pub fn delta(&self, z: &Tensor) -> Result<Tensor> {
        let h = z.matmul(&self.down_t)?.broadcast_add(&self.down_b)?;
        let h = match self.act {
            BnActivation::Relu => h.relu()?,
            BnActivation::Silu => h.silu()?,
        };
        h.matmul(&self.up_t)?.broadcast_add(&self.up_b)? * self.scaling
    }
}

/// AdapterFusion after one sublayer: the fused bottleneck adapters (all reading the same
/// input), and the attention over their outputs: scores `(z Qᵀ + q) · (upᵢ Kᵀ + k)`, softmax
/// over the adapters, `Σ pᵢ · upᵢ Vᵀ` (`V` absent: identity) added to the residual stream.
#[derive(Debug, Clone)]
pub struct FusionSite {
    pub adapters: Vec<BnSite>,
    pub query_t: Tensor,
    pub query_b: Tensor,
    pub key_t: Tensor,
    pub key_b: Tensor,
    pub value_t: Option<Tensor>,
}

impl FusionSite {
    /// What the fusion adds for rows whose adapters read `z`.
    pub fn delta(&self, z: &Tensor) -> Result<Tensor> {
        let q = z.matmul(&self.query_t)?.broadcast_add(&self.query_b)?;
        let ups = self
            .adapters
            .iter()
            .map(|a| a.delta(z))
            .collect::<Result<Vec<_>>>()?;
        let scores = ups
            .iter()
            .map(|u| {
                let k = u.matmul(&self.key_t)?.broadcast_add(&self.key_b)?;
                (&q * &k)?.sum_keepdim(1)
            })
            .collect::<Result<Vec<_>>>()?;
        let probs = candle_nn::ops::softmax(&Tensor::cat(&scores, 1)?, 1)?;
        let mut out: Option<Tensor> = None;
        for (i, u) in ups.iter().enumerate() {
            let v = match &self.value_t {
                Some(w) => u.matmul(w)?,
                None => u.clone(),
            };
            let part = v.broadcast_mul(&probs.narrow(1, i, 1)?)?;
            out = Some(match out {
                None => part,
                Some(o) => (o + part)?,
            });
        }
        Ok(out.expect("two or more adapters"))
    }
}

/// Prefix tuning's trained rows for every layer: keys and values `[tokens, kv_heads ·
/// head_dim]` each (the keys as stored: no RoPE is applied to them). A sequence attends to them
/// before its first token, whose position is `tokens`.
#[derive(Debug, Clone)]
pub struct KvPrefix {
    pub tokens: usize,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Training: the same rows as one tensor `[tokens, layers · 2 · kv_heads · head_dim]` (a
    /// variable), put into the cache as tensors so gradients reach it (`layers` is then empty).
    pub tensor: Option<Tensor>,
}

/// An adapter's sites for every layer: `layers[l][proj as usize]` (LoRA / DoRA) and
/// `ia3[l][proj as usize]` (empty for an adapter without IA³ vectors), and prefix tuning's
/// key/value rows.
#[derive(Debug, Clone, Default)]
pub struct AdapterWeights {
    pub layers: Vec<[Option<LoraSite>; 7]>,
    pub ia3: Vec<[Option<Ia3Site>; 7]>,
    pub prefix: Option<KvPrefix>,
    /// Prompt tuning's soft prompt, `[virtual tokens, hidden]`: input rows before a sequence's
    /// first token.
    pub soft_prompt: Option<Tensor>,
    /// Bottleneck adapters per layer: `[after attention, after the MLP]`.
    pub bottleneck: Vec<[Option<BnSite>; 2]>,
    /// AdapterFusion per layer, the same places.
    pub fusion: Vec<[Option<FusionSite>; 2]>,
}

impl AdapterWeights {
    /// An adapter of LoRA / DoRA sites only.
    pub fn from_lora(layers: Vec<[Option<LoraSite>; 7]>) -> Self {
        Self {
            layers,
            ia3: Vec::new(),
            prefix: None,
            soft_prompt: None,
            bottleneck: Vec::new(),
            fusion: Vec::new(),
        }
    }

    pub fn fusion_site(&self, layer: usize, at: usize) -> Option<&FusionSite> {
        self.fusion.get(layer)?[at].as_ref()
    }

    /// The bottleneck adapter after sublayer `at` (0: attention, 1: MLP) of `layer`.
    pub fn bn_site(&self, layer: usize, at: usize) -> Option<&BnSite> {
        self.bottleneck.get(layer)?[at].as_ref()
    }

    /// Positions the adapter takes before a sequence's first token (prefix tuning's rows).
    pub fn virtual_tokens(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.tokens)
            + self.soft_prompt.as_ref().map_or(0, |t| t.dims()[0])
    }

    pub fn ia3_site(&self, layer: usize, proj: Proj) -> Option<&Ia3Site> {
        self.ia3.get(layer)?[proj as usize].as_ref()
    }

    pub fn site(&self, layer: usize, proj: Proj) -> Option<&LoraSite> {
        self.layers.get(layer)?[proj as usize].as_ref()
    }

    pub fn bytes(&self) -> usize {
        let ia3: usize = self
            .ia3
            .iter()
            .flatten()
            .flatten()
            .map(|s| s.scale.elem_count() * s.scale.dtype().size_in_bytes())
            .sum();
        let prefix: usize = self.prefix.as_ref().map_or(0, |p| {
            p.layers.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum()
        });
        prefix
            + ia3
            + self
                .layers
                .iter()
                .flatten()
                .flatten()
                .map(LoraSite::bytes)
                .sum::<usize>()
    }

    pub fn site_count(&self) -> usize {
        self.layers.iter().flatten().flatten().count() + self.ia3.iter().flatten().flatten().count()
    }
}

/// Which rows of the flattened batch one adapter applies to.
#[derive(Debug, Clone)]
pub enum Rows {
    /// Every row of the batch.
    All,
    /// One contiguous run `start..start + len`.
    Range(usize, usize),
    /// Scattered rows: the indices, and the same as a u32 tensor for gather/scatter ops.
    Index(Vec<usize>, Tensor),
}

/// An adapter group of a batch: the adapter and its rows.
#[derive(Debug, Clone)]
pub struct AdapterGroup<'a> {
    pub adapter: &'a AdapterWeights,
    pub rows: Rows,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::lora_train::Mask;

    /// The bits the fused training op reads are the factors the tensor path multiplies by,
    /// and about `p` of the elements are dropped.
    #[test]
    fn dropout_bits_match_factors() {
        let d = Dropout { p: 0.1, seed: 7 };
        let (first, words) = (64 * 5, 40);
        let mut bits = vec![0u64; words];
        d.fill(first, &mut bits);
        let mut v = vec![1f32; words * 64];
        d.scale_from(first, &mut v);
        let mut dropped = 0;
        for (k, f) in v.iter().enumerate() {
            let kept = (bits[k / 64] >> (k % 64)) & 1 == 1;
            assert_eq!(kept, *f != 0.0, "element {k}");
            assert!(!kept || (*f - d.scale()).abs() < 1e-6);
            dropped += !kept as usize;
        }
        let rate = dropped as f64 / v.len() as f64;
        assert!((rate - 0.1).abs() < 0.03, "drop rate {rate}");
    }
}
