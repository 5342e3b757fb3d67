//! The one Llama: embeddings, decoder blocks (RMSNorm, RoPE, GQA attention, SiLU-gated MLP),
//! and a batched forward over sequences of different lengths with their own KV caches.
//!
//! A batch is flattened: the rows of all sequences form one `[tokens, hidden]` matrix, so every
//! projection runs as one matmul for the whole batch; only attention runs per sequence.

use candle_core::{DType, Device, Result, Tensor};

use super::adapter_site::{AdapterGroup, AdapterWeights, Proj, Rows};
use super::config::{Activation, LlamaConfig};
use super::embedding::Embedding;
use super::kv_cache::{KvCache, DROPPED};
use super::kv_pool::{KvDtype, KvPool, PoolShape};
use super::linear::Linear;
use crate::ops::attention::Scoring;
use crate::ops::profile::{time, Part};
use crate::ops::rope::RopeSpec;
use crate::ops::{causal_attention, rms_norm, Rope};

/// Which rows' logits a forward returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsRows {
    /// The last position of each sequence (generation).
    Last,
    /// Every position of every sequence, in batch order (scoring).
    All,
    /// These rows of the flattened batch (training: only the positions with a target; a new
    /// prompt-tuning sequence's rows start with its soft prompt's).
    Select(Vec<u32>),
    /// Each sequence's last `n` positions, `n` per sequence in batch order (speculative
    /// decoding: the logits of the last token and of every proposed one).
    Tail(Vec<usize>),
    /// These rows' final hidden states (after the last norm), without the `lm_head`: training
    /// computes their logits in chunks inside its loss (`ops::fused::head_cross_entropy`).
    SelectHidden(Vec<u32>),
}

/// One sequence's new tokens, its cache, and its adapter (if any). Positions continue from
/// `cache.len()`.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a AdapterWeights>,
}

impl<'a> SeqInput<'a> {
    pub fn new(tokens: &'a [u32], cache: &'a mut KvCache) -> Self {
        Self {
            tokens,
            cache,
            adapter: None,
        }
    }

    pub fn with_adapter(mut self, adapter: Option<&'a AdapterWeights>) -> Self {
        self.adapter = adapter;
        self
    }
}

/// What `Llama::begin` worked out about a batch, for its `layer` and `finish` stages.
pub struct Staged<'a> {
    /// Each sequence's `(first row, rows, first position)`.
    spans: Vec<(usize, usize, usize)>,
    groups: Vec<AdapterGroup<'a>>,
    soft: Vec<Option<&'a Tensor>>,
}

/// A batch of sequences for one forward step.
pub struct BatchInput<'a> {
    pub seqs: Vec<SeqInput<'a>>,
    pub logits: LogitsRows,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm weights `[head_dim]` for q and k before RoPE (`Arch::qk_norm`).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    /// The norm before the MLP (Llama's `post_attention_layernorm`; Gemma 2's
    /// `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
    /// `Arch::sandwich_norms`: norms of the attention output and of the MLP output before
    /// their residual adds (Gemma 2's `post_attention_layernorm`, `post_feedforward_layernorm`).
    pub attn_out_norm: Option<Tensor>,
    pub mlp_out_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Linear,
    rope: Rope,
    /// The sliding layers' RoPE where its base differs (`Arch::local_rope_theta`).
    rope_local: Option<Rope>,
    dtype: DType,
    device: Device,
}

impl Llama {
    pub fn new(
        config: LlamaConfig,
        embed_tokens: Embedding,
        layers: Vec<Block>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Result<Self> {
        let dtype = embed_tokens.dtype();
        let device = embed_tokens.device();
        let spec = RopeSpec {
            head_dim: config.head_dim,
            rotary_dim: config.arch.rotary_dim.unwrap_or(config.head_dim),
            theta: config.rope_theta,
            llama3: config.rope_scaling.as_ref(),
            linear: config.arch.rope_linear,
            longrope: config.arch.longrope.as_ref(),
        };
        let rope = Rope::of(&spec, config.max_position_embeddings, dtype, &device)?;
        let rope_local = match config.arch.local_rope_theta {
            Some(theta) => Some(Rope::of(
                &RopeSpec {
                    theta,
                    llama3: None,
                    linear: None,
                    ..spec
                },
                config.max_position_embeddings,
                dtype,
                &device,
            )?),
            None => None,
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            rope_local,
            dtype,
            device,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The projection `proj` of decoder layer `layer`.
    pub fn linear(&self, layer: usize, proj: Proj) -> Option<&Linear> {
        let b = self.layers.get(layer)?;
        Some(match proj {
            Proj::Q => &b.self_attn.q_proj,
            Proj::K => &b.self_attn.k_proj,
            Proj::V => &b.self_attn.v_proj,
            Proj::O => &b.self_attn.o_proj,
            Proj::Gate => &b.mlp.gate_proj,
            Proj::Up => &b.mlp.up_proj,
            Proj::Down => &b.mlp.down_proj,
        })
    }

    pub fn linear_mut(&mut self, layer: usize, proj: Proj) -> Option<&mut Linear> {
        let b = self.layers.get_mut(layer)?;
        Some(match proj {
            Proj::Q => &mut b.self_attn.q_proj,
            Proj::K => &mut b.self_attn.k_proj,
            Proj::V => &mut b.self_attn.v_proj,
            Proj::O => &mut b.self_attn.o_proj,
            Proj::Gate => &mut b.mlp.gate_proj,
            Proj::Up => &mut b.mlp.up_proj,
            Proj::Down => &mut b.mlp.down_proj,
        })
    }

    /// Layer `layer`'s RoPE: the local one on a sliding layer where the family has one.
    fn rope_of(&self, layer: usize) -> &Rope {
        match (&self.rope_local, self.config.arch.window(layer)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// Runs one step over the batch; returns f32 logits `[rows, vocab]` for the rows chosen by
    /// `input.logits`.
    pub fn forward(&self, input: &mut BatchInput<'_>) -> Result<Tensor> {
        crate::ops::cpu_features::on_pool(|| self.forward_here(input, None))
    }

    /// `forward` for a batch whose paged caches (`KvCache::paged`) live in `pool`; each paged
    /// cache's table must already cover its new positions.
    pub fn forward_paged(&self, input: &mut BatchInput<'_>, pool: &mut KvPool) -> Result<Tensor> {
        crate::ops::cpu_features::on_pool(|| self.forward_here(input, Some(pool)))
    }

    /// `forward_paged`, asking `stop` between layers: `Ok(None)` when it said stop. The caches
    /// then have not advanced, so the next step writes the same positions again (the step's
    /// work is lost, nothing else; prefix-tuning rows placed first stay placed and counted).
    pub fn forward_paged_until(
        &self,
        input: &mut BatchInput<'_>,
        pool: &mut KvPool,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Tensor>> {
        crate::ops::cpu_features::on_pool(|| {
            let (mut x, staged) = self.begin(input, Some(&mut *pool))?;
            for li in 0..self.layers.len() {
                if li > 0 && stop() {
                    return Ok(None);
                }
                x = self.layer(li, x, &staged, input, Some(&mut *pool))?;
            }
            self.finish(x, &staged, input).map(Some)
        })
    }

    /// Whether `forward_paged` can run: the host attention path (CPU, f32 activations).
    pub fn supports_paged(&self) -> bool {
        matches!(self.device, Device::Cpu) && self.dtype == DType::F32
    }

    /// How far back any query's attention reaches when every layer has a sliding window (the
    /// widest; Mistral, Phi-3): a position that far behind every query to come is never read
    /// again, so its KV may be given back. `None` where some layer sees the whole history.
    pub fn kv_horizon(&self) -> Option<usize> {
        let c = &self.config;
        (0..c.num_hidden_layers)
            .try_fold(0, |widest, l| Some(widest.max(c.arch.window(l)?)))
            .filter(|_| c.num_hidden_layers > 0)
    }

    /// The KV dtype `--kv-cache-dtype auto` picks: int8 (stored rotated, `ops::hadamard`) when the
    /// projections run integer kernels, which already round activations to 8 bits per block (a
    /// GGUF served as stored: the default model); f32 otherwise, so that dense and NF4 models
    /// stay exact against the reference libraries. Measured on the default model: next-token
    /// agreement with float32 is the same with either pool (`tests/smollm2.rs`).
    pub fn auto_kv_dtype(&self) -> KvDtype {
        let integer = self.layers.iter().enumerate().any(|(l, _)| {
            Proj::ALL.iter().any(|&p| {
                self.linear(l, p)
                    .is_some_and(|lin| matches!(lin.base(), super::linear::BaseWeight::Quant(_)))
            })
        });
        if integer {
            KvDtype::Int8
        } else {
            KvDtype::F32
        }
    }

    /// The pool shape for `tokens` positions of this model in blocks of `block_size`.
    pub fn pool_shape(&self, tokens: usize, block_size: usize, dtype: KvDtype) -> PoolShape {
        let c = &self.config;
        PoolShape {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size,
            blocks: tokens.div_ceil(block_size.max(1)),
            dtype,
        }
    }

    /// Puts prefix tuning's rows at positions `0 .. prefix.tokens` of an empty cache (paged: its
    /// table must hold them and the `then` tokens after them).
    fn insert_prefix(
        &self,
        cache: &mut KvCache,
        prefix: &super::adapter_site::KvPrefix,
        pool: Option<&mut KvPool>,
        then: usize,
    ) -> Result<()> {
        let c = &self.config;
        if let Some(rows) = &prefix.tensor {
            // Training: tensors all the way, so the gradient reaches the rows.
            let (n, kvh, hd) = (prefix.tokens, c.num_key_value_heads, c.head_dim);
            let w = kvh * hd;
            for l in 0..c.num_hidden_layers {
                let part = |kv: usize| -> Result<Tensor> {
                    rows.narrow(1, (l * 2 + kv) * w, w)?
                        .reshape((n, kvh, hd))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .to_dtype(self.dtype)
                };
                cache.append(l, part(0)?, part(1)?)?;
            }
            cache.advance(n);
            return Ok(());
        }
        if prefix.layers.len() != c.num_hidden_layers {
            candle_core::bail!(
                "a prefix for {} layers, the model has {}",
                prefix.layers.len(),
                c.num_hidden_layers
            );
        }
        match (cache.table(), pool) {
            (Some(table), Some(pool)) => {
                if table.len() * pool.block_size() < prefix.tokens + then {
                    candle_core::bail!(
                        "a paged KV cache's {} blocks do not hold {} positions",
                        table.len(),
                        prefix.tokens + then
                    );
                }
                let table = table.to_vec();
                for (l, (k, v)) in prefix.layers.iter().enumerate() {
                    pool.write(l, &table, 0, k, v);
                }
            }
            (Some(_), None) => candle_core::bail!("a paged KV cache needs its pool"),
            (None, _) if self.supports_paged() => {
                for (l, (k, v)) in prefix.layers.iter().enumerate() {
                    cache.append_host(l, k, v);
                }
            }
            (None, _) => {
                let (n, kvh, hd) = (prefix.tokens, c.num_key_value_heads, c.head_dim);
                for (l, (k, v)) in prefix.layers.iter().enumerate() {
                    let t = |x: &[f32]| -> Result<Tensor> {
                        Tensor::from_slice(x, (n, kvh, hd), &self.device)?
                            .transpose(0, 1)?
                            .contiguous()?
                            .to_dtype(self.dtype)
                    };
                    cache.append(l, t(k)?, t(v)?)?;
                }
            }
        }
        cache.advance(prefix.tokens);
        Ok(())
    }

    /// The batch's rows with each new prompt-tuning sequence's soft prompt before its tokens:
    /// `x` holds the token rows in batch order; `spans` the rows with the soft prompts.
    fn with_soft_prompts(
        &self,
        x: &Tensor,
        spans: &[(usize, usize, usize)],
        soft: &[Option<&Tensor>],
    ) -> Result<Tensor> {
        let mut pieces = Vec::with_capacity(2 * spans.len());
        let mut at = 0;
        for (&(_, len, _), p) in spans.iter().zip(soft) {
            let v = match p {
                Some(t) => {
                    pieces.push((*t).to_dtype(x.dtype())?);
                    t.dim(0)?
                }
                None => 0,
            };
            pieces.push(x.narrow(0, at, len - v)?);
            at += len - v;
        }
        Tensor::cat(&pieces, 0)
    }

    /// `forward` on the calling thread.
    fn forward_here(
        &self,
        input: &mut BatchInput<'_>,
        mut pool: Option<&mut KvPool>,
    ) -> Result<Tensor> {
        let (mut x, staged) = self.begin(input, pool.as_deref_mut())?;
        for li in 0..self.layers.len() {
            x = self.layer(li, x, &staged, input, pool.as_deref_mut())?;
        }
        self.finish(x, &staged, input)
    }

    /// The first stage of a forward: checks the batch, places prefixes, embeds the tokens
    /// (with soft prompts). Then `layer` for each layer in order, then `finish`; training's
    /// activation checkpointing runs the stages itself to recompute a layer in the backward.
    pub fn begin<'a>(
        &self,
        input: &mut BatchInput<'a>,
        mut pool: Option<&mut KvPool>,
    ) -> Result<(Tensor, Staged<'a>)> {
        let c = &self.config;
        let mut spans = Vec::with_capacity(input.seqs.len());
        let mut ids = Vec::new();
        // Prompt tuning: the soft prompt rows a new sequence starts with (before its tokens).
        let mut soft: Vec<Option<&Tensor>> = Vec::with_capacity(input.seqs.len());
        let mut rows = 0usize;
        for s in input.seqs.iter_mut() {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence in the batch has no tokens");
            }
            let prompt_rows = s
                .adapter
                .and_then(|a| a.soft_prompt.as_ref())
                .filter(|_| s.cache.is_empty());
            let virtual_rows = prompt_rows.map_or(Ok(0), |t| t.dim(0))?;
            // Prefix tuning: a new sequence's cache starts with the adapter's rows.
            if let Some(prefix) = s.adapter.and_then(|a| a.prefix.as_ref()) {
                if s.cache.is_empty() {
                    self.insert_prefix(s.cache, prefix, pool.as_deref_mut(), s.tokens.len())?;
                }
            }
            let offset = s.cache.len();
            let len = virtual_rows + s.tokens.len();
            if offset + len > c.max_position_embeddings {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the context of {} tokens",
                    offset + len,
                    c.max_position_embeddings
                );
            }
            if let Some(bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                candle_core::bail!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab_size
                );
            }
            if let Some(table) = s.cache.table() {
                let Some(p) = pool.as_deref() else {
                    candle_core::bail!("a paged KV cache needs its pool (`forward_paged`)");
                };
                // Blocks given back must be behind the first query's window (none is read).
                let behind = self
                    .kv_horizon()
                    .map_or(0, |w| (offset + 1).saturating_sub(w) / p.block_size());
                let bad = |(i, &b): (usize, &u32)| match b {
                    DROPPED => i >= behind,
                    b => b as usize >= p.blocks(),
                };
                if table.len() * p.block_size() < offset + len || table.iter().enumerate().any(bad)
                {
                    candle_core::bail!(
                        "a paged KV cache's {} blocks do not hold {} positions",
                        table.len(),
                        offset + len
                    );
                }
                if !self.supports_paged() {
                    candle_core::bail!("a paged KV cache needs the CPU f32 path");
                }
            }
            spans.push((rows, len, offset));
            rows += len;
            soft.push(prompt_rows);
            ids.extend_from_slice(s.tokens);
        }
        let total = rows;
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let groups = self.adapter_groups(&input.seqs, &spans, total)?;
        let mut x = time(Part::Embed, || self.embed_tokens.lookup(&ids))?;
        if let Some(s) = c.arch.embed_scale {
            x = (x * f64::from(s))?;
        }
        if soft.iter().any(Option::is_some) {
            x = self.with_soft_prompts(&x, &spans, &soft)?;
        }
        Ok((
            x,
            Staged {
                spans,
                groups,
                soft,
            },
        ))
    }

    /// Decoder layer `li` over the batch's hidden states `x` (appends its keys and values to
    /// each sequence's cache).
    pub fn layer<'a>(
        &self,
        li: usize,
        mut x: Tensor,
        staged: &Staged<'a>,
        input: &mut BatchInput<'a>,
        pool: Option<&mut KvPool>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (groups, spans) = (&staged.groups, &staged.spans);
        let block = &self.layers[li];
        let sites = Sites { groups, layer: li };
        let h = time(Part::Norm, || {
            rms_norm(&x, &block.input_layernorm, c.rms_norm_eps)
        })?;
        let attn = self.attention(&sites, &block.self_attn, &h, spans, &mut input.seqs, pool)?;
        let mut o = time(Part::OProj, || {
            sites.project(&block.self_attn.o_proj, Proj::O, &attn)
        })?;
        if let Some(w) = &block.attn_out_norm {
            o = time(Part::Norm, || rms_norm(&o, w, c.rms_norm_eps))?;
        }
        let before = x.clone();
        x = time(Part::Activation, || x + &o)?;
        x = add_bottlenecks(groups, li, 0, x, &before, &o)?;
        let h = time(Part::Norm, || {
            rms_norm(&x, &block.post_attention_layernorm, c.rms_norm_eps)
        })?;
        let mlp = &block.mlp;
        let (gate, up) = time(Part::GateUpProj, || {
            Ok::<_, candle_core::Error>((
                sites.project(&mlp.gate_proj, Proj::Gate, &h)?,
                sites.project(&mlp.up_proj, Proj::Up, &h)?,
            ))
        })?;
        let act = time(Part::Activation, || match c.arch.activation {
            Activation::GeluTanh => gate.gelu()? * up,
            Activation::Silu
                if (gate.track_op() || up.track_op()) && crate::ops::fused::applies(&gate) =>
            {
                crate::ops::fused::silu_mul(&gate, &up)
            }
            Activation::Silu => gate.silu()? * up,
        })?;
        let mut down = time(Part::DownProj, || {
            sites.project(&mlp.down_proj, Proj::Down, &act)
        })?;
        if let Some(w) = &block.mlp_out_norm {
            down = time(Part::Norm, || rms_norm(&down, w, c.rms_norm_eps))?;
        }
        let before = x.clone();
        x = time(Part::Activation, || x + &down)?;
        x = add_bottlenecks(groups, li, 1, x, &before, &down)?;
        Ok(x)
    }

    /// The last stage: advances the caches past the step and computes the rows' logits (or
    /// hidden states) that `input.logits` asks for.
    pub fn finish(
        &self,
        x: Tensor,
        staged: &Staged<'_>,
        input: &mut BatchInput<'_>,
    ) -> Result<Tensor> {
        for (s, &(_, len, _)) in input.seqs.iter_mut().zip(staged.spans.iter()) {
            s.cache.advance(len);
        }
        self.head(x, staged, &input.logits)
    }

    /// The rows `logits` asks for out of the last layer's output: final norm, then `lm_head`
    /// (not for `SelectHidden`). Leaves the caches as they are.
    pub fn head(&self, x: Tensor, staged: &Staged<'_>, logits: &LogitsRows) -> Result<Tensor> {
        let c = &self.config;
        let (spans, soft) = (&staged.spans, &staged.soft);
        let x = match logits {
            LogitsRows::All if soft.iter().any(Option::is_some) => {
                // The soft prompt's rows are not positions of the text: no logits for them.
                let keep: Vec<u32> = spans
                    .iter()
                    .zip(soft.iter())
                    .flat_map(|(&(start, len, _), p)| {
                        let v = p.map_or(0, |t| t.dim(0).unwrap_or(0));
                        (start + v) as u32..(start + len) as u32
                    })
                    .collect();
                x.index_select(&Tensor::new(keep.as_slice(), &self.device)?, 0)?
            }
            LogitsRows::All => x,
            LogitsRows::Select(rows) | LogitsRows::SelectHidden(rows) => {
                x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
            }
            LogitsRows::Tail(counts) => {
                if counts.len() != spans.len() {
                    candle_core::bail!(
                        "{} row counts for a batch of {} sequences",
                        counts.len(),
                        spans.len()
                    );
                }
                let rows: Vec<u32> = spans
                    .iter()
                    .zip(counts)
                    .flat_map(|(&(start, len, _), &n)| {
                        (start + len - n.clamp(1, len)) as u32..(start + len) as u32
                    })
                    .collect();
                x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
            }
            LogitsRows::Last => {
                let last: Vec<u32> = spans
                    .iter()
                    .map(|&(start, len, _)| (start + len - 1) as u32)
                    .collect();
                x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
        };
        let x = time(Part::Norm, || rms_norm(&x, &self.norm, c.rms_norm_eps))?;
        if matches!(logits, LogitsRows::SelectHidden(_)) {
            return Ok(x);
        }
        let logits = time(Part::LmHead, || {
            self.lm_head.forward(&x)?.to_dtype(DType::F32)
        })?;
        match c.arch.final_softcap {
            Some(cap) => (logits / f64::from(cap))?.tanh()? * f64::from(cap),
            None => Ok(logits),
        }
    }

    /// Groups the batch's sequences by adapter (pointer identity) into row sets.
    fn adapter_groups<'a>(
        &self,
        seqs: &[SeqInput<'a>],
        spans: &[(usize, usize, usize)],
        total: usize,
    ) -> Result<Vec<AdapterGroup<'a>>> {
        let mut members: Vec<(&'a AdapterWeights, Vec<usize>)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let Some(a) = s.adapter else { continue };
            if a.layers.len() != self.layers.len() {
                candle_core::bail!(
                    "adapter has {} layers, the model {}",
                    a.layers.len(),
                    self.layers.len()
                );
            }
            match members.iter_mut().find(|(m, _)| std::ptr::eq(*m, a)) {
                Some((_, list)) => list.push(i),
                None => members.push((a, vec![i])),
            }
        }
        members
            .into_iter()
            .map(|(adapter, list)| {
                let contiguous = list.windows(2).all(|w| w[1] == w[0] + 1);
                let (first, last) = (spans[list[0]], spans[list[list.len() - 1]]);
                let rows = if contiguous && first.0 == 0 && last.0 + last.1 == total {
                    Rows::All
                } else if contiguous {
                    Rows::Range(first.0, last.0 + last.1 - first.0)
                } else {
                    let idx: Vec<u32> = list
                        .iter()
                        .flat_map(|&i| {
                            let (start, len, _) = spans[i];
                            (start as u32)..(start + len) as u32
                        })
                        .collect();
                    let tensor = Tensor::new(idx.as_slice(), &self.device)?;
                    Rows::Index(idx.into_iter().map(|i| i as usize).collect(), tensor)
                };
                Ok(AdapterGroup { adapter, rows })
            })
            .collect()
    }

    fn attention(
        &self,
        sites: &Sites<'_, '_>,
        attn: &Attention,
        h: &Tensor,
        spans: &[(usize, usize, usize)],
        seqs: &mut [SeqInput<'_>],
        pool: Option<&mut KvPool>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let layer = sites.layer;
        let (mut q, mut k, v) = time(Part::QkvProj, || {
            Ok::<_, candle_core::Error>((
                sites.project(&attn.q_proj, Proj::Q, h)?,
                sites.project(&attn.k_proj, Proj::K, h)?,
                sites.project(&attn.v_proj, Proj::V, h)?,
            ))
        })?;
        // Qwen3: each head of q and k normalised before RoPE.
        let head_norm = |x: &Tensor, w: &Tensor, heads: usize| -> Result<Tensor> {
            let n = x.dim(0)?;
            rms_norm(&x.reshape((n * heads, hd))?, w, c.rms_norm_eps)?.reshape((n, heads * hd))
        };
        if let Some(w) = &attn.q_norm {
            q = time(Part::Norm, || head_norm(&q, w, nh))?;
        }
        if let Some(w) = &attn.k_norm {
            k = time(Part::Norm, || head_norm(&k, w, nkv))?;
        }
        let scoring = Scoring {
            window: c.arch.window(layer),
            scale: c.arch.attn_scale,
            softcap: c.arch.attn_softcap,
        };
        let host = !q.track_op()
            && matches!(self.device, Device::Cpu)
            && q.dtype() == DType::F32
            && seqs.iter().all(|s| !s.cache.has_tensors());
        if host {
            return self.attention_host(&q, &k, &v, layer, spans, seqs, pool, scoring);
        }
        // Training on the CPU, every sequence from position 0: RoPE and attention for all
        // of them as one node with its backward written out (`ops::attention_train`). Nothing
        // reads these keys back, so none go to the cache.
        let contiguous = spans
            .iter()
            .scan(0, |next, &(start, len, offset)| {
                let ok = start == *next && offset == 0;
                *next = start + len;
                Some(ok)
            })
            .all(|ok| ok);
        if q.track_op() && crate::ops::fused::applies(&q) && scoring.softcap.is_none() && contiguous
        {
            let shape = crate::ops::attention_train::TrainHeads {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: scoring.scale.unwrap_or(1.0 / (hd as f32).sqrt()),
                window: scoring.window,
            };
            let spans = spans.iter().map(|&(start, len, _)| (start, len)).collect();
            return time(Part::Attention, || {
                crate::ops::attention_train::attention_train(
                    &q,
                    &k,
                    &v,
                    shape,
                    self.rope_of(layer),
                    spans,
                )
            });
        }
        let mut outs = Vec::with_capacity(spans.len());
        for (s, &(start, len, offset)) in seqs.iter_mut().zip(spans) {
            let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                t.narrow(0, start, len)?
                    .reshape((len, n, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (qs, ks, vs) = time(Part::Rope, || {
                Ok::<_, candle_core::Error>((
                    self.rope_of(layer).apply(&heads(&q, nh)?, offset)?,
                    self.rope_of(layer).apply(&heads(&k, nkv)?, offset)?,
                    heads(&v, nkv)?,
                ))
            })?;
            outs.push(time(Part::Attention, || {
                let (kall, vall) = s.cache.append(layer, ks, vs)?;
                causal_attention(&qs, &kall, &vall, scoring)
            })?);
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one output"))
        } else {
            Tensor::cat(&outs, 0)
        }
    }
}

impl Llama {
    /// Serving on CPU: RoPE, cache append and attention on host rows, per sequence, with no
    /// tensor ops in between (`ops::attention::causal_attention_host`).
    fn attention_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        spans: &[(usize, usize, usize)],
        seqs: &mut [SeqInput<'_>],
        mut pool: Option<&mut KvPool>,
        scoring: Scoring,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let (w, kw) = (nh * hd, nkv * hd);
        let (mut qv, mut kv, vv) = time(Part::Rope, || {
            Ok::<_, candle_core::Error>((
                q.flatten_all()?.to_vec1::<f32>()?,
                k.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            ))
        })?;
        let tokens = qv.len() / w;
        let mut out = vec![0f32; tokens * w];
        time(Part::Rope, || {
            spans.iter().try_for_each(|&(start, len, offset)| {
                let rope = self.rope_of(layer);
                rope.apply_host(&mut qv[start * w..(start + len) * w], nh, hd, offset)?;
                rope.apply_host(&mut kv[start * kw..(start + len) * kw], nkv, hd, offset)
            })
        })?;
        // An int8 pool holds its rows rotated: so are the queries that read it (and, below, the
        // outputs weighted from its rotated values are rotated back).
        let rotated = pool.as_deref().is_some_and(|p| p.shape().rotated());
        if rotated {
            for (s, &(start, len, _)) in seqs.iter().zip(spans) {
                if s.cache.table().is_some() {
                    crate::ops::hadamard::rotate_heads(&mut qv[start * w..(start + len) * w], hd);
                }
            }
        }
        // Sequences are independent: one task each (their rows are contiguous and in order).
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(spans.len());
        let mut rest = out.as_mut_slice();
        for &(_, len, _) in spans {
            let (head, tail) = rest.split_at_mut(len * w);
            outs.push(head);
            rest = tail;
        }
        time(Part::Attention, || {
            use crate::ops::attention::{causal_attention_host, Contiguous, Heads};
            use rayon::prelude::*;
            // The new rows go in first (one writer), then sequences read in parallel.
            for (s, &(start, len, offset)) in seqs.iter_mut().zip(spans) {
                let (k_rows, v_rows) = (
                    &kv[start * kw..(start + len) * kw],
                    &vv[start * kw..(start + len) * kw],
                );
                match (s.cache.table(), pool.as_deref_mut()) {
                    (Some(table), Some(p)) => p.write(layer, table, offset, k_rows, v_rows),
                    _ => s.cache.append_host(layer, k_rows, v_rows),
                }
            }
            let pool = pool.as_deref();
            let shape = Heads {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scoring,
            };
            seqs.par_iter()
                .zip(outs)
                .zip(spans)
                .with_min_len(2)
                .for_each(|((s, o), &(start, len, offset))| {
                    let q = &qv[start * w..(start + len) * w];
                    match (s.cache.table(), pool) {
                        (Some(table), Some(p)) => {
                            causal_attention_host(q, &p.view(layer, table, offset + len), shape, o);
                            if rotated {
                                crate::ops::hadamard::rotate_heads(o, hd);
                            }
                        }
                        _ => {
                            let (k, v) = s.cache.host_rows(layer);
                            let kv = Contiguous {
                                k,
                                v,
                                kv_width: kw,
                                head_dim: hd,
                            };
                            causal_attention_host(q, &kv, shape, o)
                        }
                    }
                })
        });
        Tensor::from_vec(out, (tokens, w), &self.device)
    }
}

/// The adapter sites of one layer for this batch.
struct Sites<'g, 'a> {
    groups: &'g [AdapterGroup<'a>],
    layer: usize,
}

impl<'g> Sites<'g, '_> {
    fn of(&self, proj: Proj) -> Vec<(&'g Rows, &'g super::adapter_site::LoraSite)> {
        self.groups
            .iter()
            .filter_map(|g| Some((&g.rows, g.adapter.site(self.layer, proj)?)))
            .collect()
    }

    /// `linear` on `x` with this batch's sites of `proj`: IA³ input scaling of its groups' rows,
    /// the base product and LoRA / DoRA deltas, IA³ output scaling.
    fn project(&self, linear: &Linear, proj: Proj, x: &Tensor) -> Result<Tensor> {
        let ia3: Vec<(&Rows, &super::adapter_site::Ia3Site)> = self
            .groups
            .iter()
            .filter_map(|g| Some((&g.rows, g.adapter.ia3_site(self.layer, proj)?)))
            .collect();
        if ia3.is_empty() {
            return linear.forward_with(x, &self.of(proj));
        }
        let scaled = |t: &Tensor, input: bool| -> Result<Tensor> {
            let mut t = t.clone();
            for (rows, site) in ia3.iter().filter(|(_, s)| s.on_input == input) {
                t = scale_rows(&t, rows, &site.scale)?;
            }
            Ok(t)
        };
        let y = linear.forward_with(&scaled(x, true)?, &self.of(proj))?;
        scaled(&y, false)
    }
}

/// The bottleneck adapters after sublayer `at` of layer `layer`, each on its group's rows:
/// `x` is the residual stream after the sublayer's output `out` was added to `before`.
fn add_bottlenecks(
    groups: &[AdapterGroup<'_>],
    layer: usize,
    at: usize,
    mut x: Tensor,
    before: &Tensor,
    out: &Tensor,
) -> Result<Tensor> {
    for g in groups {
        let fusion = g.adapter.fusion_site(layer, at);
        let Some(site) = g
            .adapter
            .bn_site(layer, at)
            .or(fusion.map(|f| &f.adapters[0]))
        else {
            continue;
        };
        let delta = |z: &Tensor| match fusion {
            Some(f) => f.delta(z),
            None => site.delta(z),
        };
        let z = match site.input {
            super::adapter_site::BnInput::AfterResidual => &x,
            super::adapter_site::BnInput::SublayerOutput => out,
            super::adapter_site::BnInput::BeforeSublayer => before,
        };
        x = match &g.rows {
            Rows::All => (&x + delta(z)?)?,
            Rows::Range(start, len) => {
                let d = delta(&z.narrow(0, *start, *len)?)?;
                x.slice_scatter0(&(x.narrow(0, *start, *len)? + d)?, *start)?
            }
            Rows::Index(_, idx) => x.index_add(idx, &delta(&z.index_select(idx, 0)?)?, 0)?,
        };
    }
    Ok(x)
}

/// `t` with the rows of `rows` multiplied elementwise by `v`.
fn scale_rows(t: &Tensor, rows: &Rows, v: &Tensor) -> Result<Tensor> {
    match rows {
        Rows::All => t.broadcast_mul(v),
        Rows::Range(start, len) => {
            t.slice_scatter0(&t.narrow(0, *start, *len)?.broadcast_mul(v)?, *start)
        }
        Rows::Index(_, idx) => {
            let sel = t.index_select(idx, 0)?;
            t.index_add(idx, &sel.broadcast_mul(&(v - 1.0)?)?, 0)
        }
    }
}
