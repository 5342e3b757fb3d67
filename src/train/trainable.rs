//! Trainable adapter sites: A, B (and DoRA's m) as `Var`s on the base model's projections, or
//! IA³'s vectors, initialised as PEFT does, turned each step into the `AdapterWeights` the one
//! forward uses.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};
use rand::{Rng, SeedableRng};

pub use super::bottleneck_train::{BnTrainSite, FusionTrain, FusionTrainSite};
use super::error::TrainError;
use crate::adapters::config::BnKind;
use crate::adapters::peft::ModuleWeights;
use crate::adapters::{AdapterConfig, PeftAdapter, TargetModules};
use crate::model::adapter_site::Dropout;
use crate::model::{AdapterWeights, Llama, LoraSite, Proj};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Lora,
    Dora,
    /// IA³: a vector per targeted projection (its input for `down_proj`, PEFT's feed-forward
    /// module of Llama; its output otherwise), starting at ones.
    Ia3,
    /// Prompt tuning: `virtual_tokens` input embeddings before every prompt, starting as the
    /// embeddings of tokens drawn from the vocabulary (PEFT's `SAMPLE_VOCAB`).
    PromptTuning,
    /// Prefix tuning: `virtual_tokens` key/value rows at every layer, starting small
    /// (N(0, 0.02²)), without PEFT's projection MLP.
    PrefixTuning,
    /// An AdapterHub bottleneck adapter of one preset in every layer: down-projection to
    /// `hidden / reduction_factor`, non-linearity, up-projection (starting at zero, so the model
    /// starts unchanged), biases.
    Bottleneck(BnKind),
    /// AdapterHub's AdapterFusion (`dynamic`) over existing sequential bottleneck adapters
    /// (`TrainSpec::fuse`), which stay frozen: query, key (N(0, 0.02²), biases zero) and value
    /// (the identity) of every place they share are trained, as `train_adapter_fusion` does.
    Fusion,
}

#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<Proj>,
    pub rslora: bool,
    pub seed: u64,
    pub base_model: String,
    /// Prompt tuning's virtual tokens.
    pub virtual_tokens: usize,
    /// A bottleneck adapter's width is the hidden size over this (0: the preset's).
    pub reduction_factor: usize,
    /// Prefix tuning through PEFT's projection (`--prefix-projection`): the encoder's hidden
    /// size (0: the key/value width, PEFT's `token_dim`).
    pub prefix_projection: Option<usize>,
    /// `Method::Fusion`: the bottleneck adapters' folders, in the order fused.
    pub fuse: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TrainSite {
    pub layer: usize,
    pub proj: Proj,
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    /// DoRA magnitude `[out]`.
    pub m: Option<Var>,
    pub scale: f64,
    /// A module the model stores fused (Phi-3's `self_attn.qkv_proj`, `mlp.gate_up_proj`), as
    /// PEFT trains it: one A for all its parts, B and m over the fused rows, split by rows for
    /// each forward (`adapters::bind::fused_parts`). `proj` is then its first part.
    pub fused: Option<&'static str>,
}

impl TrainSite {
    pub fn module(&self) -> String {
        let name = self.fused.unwrap_or(self.proj.module());
        format!("model.layers.{}.{name}", self.layer)
    }
}

/// The fused modules and the projections each holds, in row order.
const FUSED: [(&str, &[Proj]); 2] = [
    ("self_attn.qkv_proj", &[Proj::Q, Proj::K, Proj::V]),
    ("mlp.gate_up_proj", &[Proj::Gate, Proj::Up]),
];

/// An IA³ vector on one projection.
#[derive(Debug, Clone)]
pub struct Ia3TrainSite {
    pub layer: usize,
    pub proj: Proj,
    /// `[out]`, or `[in]` when it scales the input.
    pub l: Var,
    pub on_input: bool,
    /// A fused module (see `TrainSite::fused`): `l` covers the fused rows, split by rows for
    /// each forward (or, on the input, shared by the parts). `proj` is then its first part.
    pub fused: Option<&'static str>,
}

impl Ia3TrainSite {
    pub fn module(&self) -> String {
        let name = self.fused.unwrap_or(self.proj.module());
        format!("model.layers.{}.{name}", self.layer)
    }
}

/// A module trained: its first projection, the fused module's name where the model stores it
/// fused, and the projections it covers in row order.
type TrainModule = (Proj, Option<&'static str>, Vec<Proj>);

/// The modules `spec` trains: each target, or on a fused model (Phi-3) its fused module once,
/// as PEFT trains it; a part of a fused module without the others is refused by name.
fn train_modules(model: &Llama, spec: &TrainSpec) -> Result<Vec<TrainModule>, TrainError> {
    let mut modules: Vec<TrainModule> = Vec::new();
    for &proj in &spec.targets {
        let group = FUSED
            .iter()
            .find(|(_, parts)| model.config.arch.fused && parts.contains(&proj));
        match group {
            None => modules.push((proj, None, vec![proj])),
            Some((name, parts)) => {
                if modules.iter().any(|m| m.1 == Some(*name)) {
                    continue;
                }
                let short = name.rsplit('.').next().unwrap_or(name);
                if let Some(missing) = parts.iter().find(|p| !spec.targets.contains(p)) {
                    return Err(TrainError::config(
                        "--target-modules",
                        format!(
                            "names {} but not {}: this model stores {} fused as `{short}`, trained as one module (target all of them, or `{short}`)",
                            proj.short(),
                            missing.short(),
                            parts.iter().map(|p| p.short()).collect::<Vec<_>>().join(", "),
                        ),
                    ));
                }
                modules.push((parts[0], Some(*name), parts.to_vec()));
            }
        }
    }
    Ok(modules)
}

/// The names `adapter_config.json` lists for `modules` (a fused module by its own name).
fn target_names(modules: &[TrainModule]) -> Vec<String> {
    let mut targets: Vec<String> = modules
        .iter()
        .map(|(p, fused, _)| match fused {
            Some(name) => name.rsplit('.').next().unwrap_or(name).to_string(),
            None => p.short().to_string(),
        })
        .collect();
    targets.dedup();
    targets
}

/// PEFT's prefix projection: rows = `W2 · tanh(W1 · e + b1) + b2` for each virtual token's
/// embedding `e` (`[kv width]`), giving all layers' key/value rows.
#[derive(Debug, Clone)]
pub struct PrefixMlp {
    /// `[encoder hidden, kv width]`, `[encoder hidden]`
    pub w1: Var,
    pub b1: Var,
    /// `[layers · 2 · kv width, encoder hidden]`, `[layers · 2 · kv width]`
    pub w2: Var,
    pub b2: Var,
}

impl PrefixMlp {
    fn rows(&self, e: &Tensor) -> candle_core::Result<Tensor> {
        let h = e
            .matmul(&self.w1.as_tensor().t()?)?
            .broadcast_add(self.b1.as_tensor())?
            .tanh()?;
        h.matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())
    }
}

#[derive(Debug, Clone)]
pub struct TrainableAdapter {
    pub config: AdapterConfig,
    pub sites: Vec<TrainSite>,
    pub ia3: Vec<Ia3TrainSite>,
    /// Prompt tuning's soft prompt, `[virtual tokens, hidden]`.
    pub soft_prompt: Option<Var>,
    /// Prefix tuning's rows, `[virtual tokens, layers · 2 · kv_heads · head_dim]` (with
    /// `prefix_mlp`: its input embeddings, `[virtual tokens, kv_heads · head_dim]`).
    pub prefix: Option<Var>,
    pub prefix_mlp: Option<PrefixMlp>,
    pub fusion: Option<FusionTrain>,
    /// Bottleneck adapters (their preset is `config.method`'s).
    pub bn: Vec<BnTrainSite>,
    pub dropout: f32,
    pub seed: u64,
}

fn row_norm(t: &Tensor) -> candle_core::Result<Tensor> {
    t.sqr()?.sum(D::Minus1)?.sqrt()
}

impl TrainableAdapter {
    /// An adapter of `config` with nothing to train yet (each method's `init_*` fills its part).
    pub(super) fn bare(config: AdapterConfig, seed: u64) -> Self {
        Self {
            config,
            sites: Vec::new(),
            ia3: Vec::new(),
            soft_prompt: None,
            prefix: None,
            prefix_mlp: None,
            bn: Vec::new(),
            fusion: None,
            dropout: 0.0,
            seed,
        }
    }

    /// PEFT's initialisation: A ~ U(±1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0,
    /// DoRA m = ‖W‖ per output row.
    pub fn init(model: &Llama, spec: &TrainSpec) -> Result<Self, TrainError> {
        if spec.method == Method::Ia3 {
            return Self::init_ia3(model, spec);
        }
        if matches!(spec.method, Method::PromptTuning | Method::PrefixTuning) {
            return Self::init_prompt(model, spec);
        }
        if let Method::Bottleneck(kind) = spec.method {
            return Self::init_bn(model, spec, kind);
        }
        if spec.method == Method::Fusion {
            return Self::init_fusion(model, spec);
        }
        if spec.rank == 0 {
            return Err(TrainError::config("--rank", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&spec.dropout) {
            return Err(TrainError::config("--dropout", "must be in [0, 1)"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let scale = if spec.rslora {
            spec.alpha / (spec.rank as f64).sqrt()
        } else {
            spec.alpha / spec.rank as f64
        };
        let dev = model.device();
        let modules = train_modules(model, spec)?;
        let mut sites = Vec::new();
        for layer in 0..model.layers.len() {
            for (proj, fused, parts) in &modules {
                let ws = parts
                    .iter()
                    .map(|&p| {
                        model
                            .linear(layer, p)
                            .expect("layer exists")
                            .base()
                            .dense()?
                            .to_dtype(DType::F32)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let w = Tensor::cat(&ws, 0)?;
                let (out, inp) = w.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..spec.rank * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let m = match spec.method {
                    Method::Dora => Some(Var::from_tensor(&row_norm(&w)?)?),
                    _ => None,
                };
                sites.push(TrainSite {
                    layer,
                    proj: *proj,
                    a: Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), dev)?)?,
                    b: Var::from_tensor(&Tensor::zeros((out, spec.rank), DType::F32, dev)?)?,
                    m,
                    scale,
                    fused: *fused,
                });
            }
        }
        let targets = target_names(&modules);
        let config = AdapterConfig {
            method: crate::adapters::config::Method::Lora,
            r: spec.rank,
            lora_alpha: spec.alpha,
            target_modules: TargetModules::List(targets),
            use_rslora: spec.rslora,
            use_dora: spec.method == Method::Dora,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            lora_dropout: spec.dropout as f64,
            layers_to_transform: None,
            base_model_name_or_path: Some(spec.base_model.clone()),
            prefix_encoder_hidden: None,
        };
        Ok(Self {
            config,
            sites,
            ia3: Vec::new(),
            soft_prompt: None,
            prefix: None,
            bn: Vec::new(),
            prefix_mlp: None,
            fusion: None,
            dropout: spec.dropout,
            seed: spec.seed,
        })
    }

    /// Prompt tuning started from the embeddings of `virtual_tokens` tokens drawn (seeded) from
    /// the vocabulary; prefix tuning from small random rows.
    fn init_prompt(model: &Llama, spec: &TrainSpec) -> Result<Self, TrainError> {
        if spec.virtual_tokens == 0 {
            return Err(TrainError::config(
                "--num-virtual-tokens",
                "must be at least 1",
            ));
        }
        let n = spec.virtual_tokens;
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let c = &model.config;
        let (mut soft_prompt, mut prefix, mut prefix_mlp) = (None, None, None);
        let dev = model.device();
        let method = if let (Method::PrefixTuning, Some(e)) = (spec.method, spec.prefix_projection)
        {
            // PEFT's PrefixEncoder with projection: embedding N(0, 1), then torch's Linear
            // initialisation (weights and biases U(±1/sqrt(in))).
            let d = c.num_key_value_heads * c.head_dim;
            let e = if e == 0 { d } else { e };
            let out = c.num_hidden_layers * 2 * d;
            let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
                let b = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
            };
            let (w1, b1, w2, b2) = (
                uniform(e * d, d),
                uniform(e, d),
                uniform(out * e, e),
                uniform(out, e),
            );
            let var = |v: Vec<f32>, shape: &[usize]| -> Result<Var, TrainError> {
                Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)?)
            };
            prefix_mlp = Some(PrefixMlp {
                w1: var(w1, &[e, d])?,
                b1: var(b1, &[e])?,
                w2: var(w2, &[out, e])?,
                b2: var(b2, &[out])?,
            });
            let emb: Vec<f32> = (0..n * d)
                .map(|_| {
                    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect();
            prefix = Some(var(emb, &[n, d])?);
            crate::adapters::config::Method::PrefixTuning {
                num_virtual_tokens: n,
            }
        } else if spec.method == Method::PrefixTuning {
            let width = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim;
            let rows: Vec<f32> = (0..n * width)
                .map(|_| {
                    // Box-Muller from two uniforms.
                    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                    (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect();
            prefix = Some(Var::from_tensor(&Tensor::from_vec(
                rows,
                (n, width),
                model.device(),
            )?)?);
            crate::adapters::config::Method::PrefixTuning {
                num_virtual_tokens: n,
            }
        } else {
            let ids: Vec<u32> = (0..n)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect();
            let rows = model
                .embed_tokens
                .lookup(&Tensor::new(ids.as_slice(), model.device())?)?
                .to_dtype(DType::F32)?;
            soft_prompt = Some(Var::from_tensor(&rows)?);
            crate::adapters::config::Method::PromptTuning {
                num_virtual_tokens: n,
            }
        };
        let mut config = AdapterConfig::of(
            method,
            TargetModules::List(Vec::new()),
            Some(spec.base_model.clone()),
        );
        config.prefix_encoder_hidden = prefix_mlp.as_ref().map(|m| m.b1.as_tensor().dims()[0]);
        Ok(Self {
            soft_prompt,
            prefix,
            prefix_mlp,
            ..Self::bare(config, spec.seed)
        })
    }

    /// IA³ as PEFT starts it: every vector ones (the model unchanged). On a fused module
    /// (Phi-3's `qkv_proj`, `gate_up_proj`) one vector over the fused rows, as PEFT has it.
    fn init_ia3(model: &Llama, spec: &TrainSpec) -> Result<Self, TrainError> {
        let modules = train_modules(model, spec)?;
        let mut ia3 = Vec::new();
        for layer in 0..model.layers.len() {
            for (proj, fused, parts) in &modules {
                let mut out = 0;
                let mut inp = 0;
                for &p in parts {
                    let (o, i) = model
                        .linear(layer, p)
                        .expect("layer exists")
                        .base()
                        .dims()?;
                    (out, inp) = (out + o, i);
                }
                let on_input = *proj == Proj::Down;
                let n = if on_input { inp } else { out };
                ia3.push(Ia3TrainSite {
                    layer,
                    proj: *proj,
                    l: Var::from_tensor(&Tensor::ones(n, DType::F32, model.device())?)?,
                    on_input,
                    fused: *fused,
                });
            }
        }
        let targets = target_names(&modules);
        let feedforward: Vec<String> = targets
            .iter()
            .filter(|t| *t == "down_proj")
            .cloned()
            .collect();
        let config = AdapterConfig::of(
            crate::adapters::config::Method::Ia3 {
                feedforward_modules: TargetModules::List(feedforward),
            },
            TargetModules::List(targets),
            Some(spec.base_model.clone()),
        );
        Ok(Self {
            ia3,
            ..Self::bare(config, spec.seed)
        })
    }

    /// Continues from saved PEFT weights (resume, or tests with non-zero B).
    pub fn from_peft(
        peft: &PeftAdapter,
        model: &Llama,
        dropout: f32,
        seed: u64,
    ) -> Result<Self, TrainError> {
        crate::adapters::bind(peft, model, &Default::default())?;
        let (mut sites, mut ia3, mut bn) = (Vec::new(), Vec::new(), Vec::new());
        let f32_var = |t: &Option<Tensor>| -> Result<Var, TrainError> {
            let t = t.as_ref().expect("validated by bind");
            Ok(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(model.device())?,
            )?)
        };
        for (module, w) in &peft.modules {
            if let crate::adapters::config::Method::Bottleneck(_) = peft.config.method {
                let (layer, place) = module
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(l, p)| Some((l.parse().ok()?, usize::from(p == "output_adapters"))))
                    .expect("validated by bind");
                bn.push(BnTrainSite {
                    layer,
                    place,
                    down: f32_var(&w.lora_a)?,
                    down_b: f32_var(&w.down_bias)?,
                    up: f32_var(&w.lora_b)?,
                    up_b: f32_var(&w.up_bias)?,
                });
                continue;
            }
            let (layer, proj, fused) = match crate::adapters::bind::fused_parts(module, model) {
                Some((layer, parts)) => {
                    let name = FUSED
                        .iter()
                        .find(|(_, ps)| ps[0] == parts[0].0)
                        .map(|(n, _)| *n)
                        .expect("a fused module");
                    (layer, parts[0].0, Some(name))
                }
                None => {
                    let (layer, proj) =
                        crate::adapters::bind::parse_module(module).expect("validated by bind");
                    (layer, proj, None)
                }
            };
            if let Some(l) = &w.ia3 {
                ia3.push(Ia3TrainSite {
                    layer,
                    proj,
                    l: Var::from_tensor(
                        &l.flatten_all()?
                            .to_dtype(DType::F32)?
                            .to_device(model.device())?,
                    )?,
                    on_input: peft.config.is_feedforward(module),
                    fused,
                });
                continue;
            }
            let var = |t: &Option<Tensor>| -> Result<Option<Var>, TrainError> {
                Ok(match t {
                    Some(t) => Some(Var::from_tensor(
                        &t.to_dtype(DType::F32)?.to_device(model.device())?,
                    )?),
                    None => None,
                })
            };
            sites.push(TrainSite {
                layer,
                proj,
                a: var(&w.lora_a)?.expect("validated"),
                b: var(&w.lora_b)?.expect("validated"),
                m: var(&w.magnitude)?,
                scale: peft.config.scale_for(module),
                fused,
            });
        }
        let var = |p: &Tensor| -> Result<Var, TrainError> {
            Ok(Var::from_tensor(
                &p.to_dtype(DType::F32)?.to_device(model.device())?,
            )?)
        };
        let (mut soft_prompt, mut prefix) = (None, None);
        match (&peft.config.method, &peft.prompt_embeddings) {
            (crate::adapters::config::Method::PromptTuning { .. }, Some(p)) => {
                soft_prompt = Some(var(p)?)
            }
            (crate::adapters::config::Method::PrefixTuning { .. }, Some(p)) => {
                prefix = Some(var(p)?)
            }
            _ => {}
        }
        Ok(Self {
            config: peft.config.clone(),
            sites,
            ia3,
            soft_prompt,
            prefix,
            bn,
            prefix_mlp: None,
            fusion: None,
            dropout,
            seed,
        })
    }

    /// The sites for one forward: differentiable in A, B and m; DoRA's norm is detached, as
    /// in PEFT. `step` seeds the dropout masks (`None`: no dropout, for evaluation).
    pub fn weights(
        &self,
        model: &Llama,
        step: Option<usize>,
    ) -> Result<AdapterWeights, TrainError> {
        let mut layers: Vec<[Option<LoraSite>; 7]> = (0..model.layers.len())
            .map(|_| Default::default())
            .collect();
        for (i, s) in self.sites.iter().enumerate() {
            let a = s.a.as_tensor();
            // The projections this site covers and their rows of B and m (a fused module's
            // parts share A, and one dropout mask on their shared input, as in PEFT).
            let parts = match s.fused {
                None => vec![(s.proj, 0, s.b.as_tensor().dims()[0])],
                Some(_) => {
                    crate::adapters::bind::fused_parts(&s.module(), model)
                        .expect("a fused model")
                        .1
                }
            };
            for (proj, from, rows) in parts {
                let b = s.b.as_tensor().narrow(0, from, rows)?;
                let m =
                    s.m.as_ref()
                        .map(|m| m.as_tensor().narrow(0, from, rows))
                        .transpose()?;
                let site = self.site(model, s, i, proj, a, &b, m.as_ref(), step)?;
                layers[s.layer][proj as usize] = Some(site);
            }
        }
        let mut weights = AdapterWeights::from_lora(layers);
        weights.soft_prompt = self.soft_prompt.as_ref().map(|v| v.as_tensor().clone());
        if let Some(rows) = self.prefix_rows()? {
            weights.prefix = Some(crate::model::KvPrefix {
                tokens: rows.dims()[0],
                layers: Vec::new(),
                tensor: Some(rows),
            });
        }
        if let crate::adapters::config::Method::Bottleneck(cfg) = self.config.method {
            weights.bottleneck = (0..model.layers.len())
                .map(|_| Default::default())
                .collect();
            for s in &self.bn {
                weights.bottleneck[s.layer][s.place] = Some(crate::model::BnSite {
                    down_t: s.down.as_tensor().t()?,
                    down_b: s.down_b.as_tensor().clone(),
                    up_t: s.up.as_tensor().t()?,
                    up_b: s.up_b.as_tensor().clone(),
                    scaling: cfg.scaling,
                    act: cfg.act,
                    input: cfg.input,
                });
            }
        }
        if let Some(f) = &self.fusion {
            weights.fusion = (0..model.layers.len())
                .map(|_| Default::default())
                .collect();
            for s in &f.sites {
                let adapters = f
                    .bound
                    .iter()
                    .map(|w| {
                        w.bn_site(s.layer, s.place)
                            .cloned()
                            .expect("checked at init")
                    })
                    .collect();
                weights.fusion[s.layer][s.place] = Some(crate::model::FusionSite {
                    adapters,
                    query_t: s.query.as_tensor().t()?,
                    query_b: s.query_b.as_tensor().clone(),
                    key_t: s.key.as_tensor().t()?,
                    key_b: s.key_b.as_tensor().clone(),
                    value_t: Some(s.value.as_tensor().t()?),
                });
            }
        }
        if !self.ia3.is_empty() {
            weights.ia3 = (0..model.layers.len())
                .map(|_| Default::default())
                .collect();
            for s in &self.ia3 {
                let l = s.l.as_tensor();
                // A fused module's parts: their rows of an output vector, or all of an input
                // one (they share their input).
                let parts = match s.fused {
                    None => vec![(s.proj, 0, l.dims()[0])],
                    Some(_) => {
                        crate::adapters::bind::fused_parts(&s.module(), model)
                            .expect("a fused model")
                            .1
                    }
                };
                for (proj, from, rows) in parts {
                    let scale = if s.on_input {
                        l.clone()
                    } else {
                        l.narrow(0, from, rows)?
                    };
                    weights.ia3[s.layer][proj as usize] = Some(crate::model::Ia3Site {
                        scale,
                        on_input: s.on_input,
                    });
                }
            }
        }
        Ok(weights)
    }

    /// One projection's LoRA site for a forward: `b` and `m` are its rows of site `s`'s (the
    /// `i`-th, which seeds its dropout mask).
    #[allow(clippy::too_many_arguments)]
    fn site(
        &self,
        model: &Llama,
        s: &TrainSite,
        i: usize,
        proj: Proj,
        a: &Tensor,
        b: &Tensor,
        m: Option<&Tensor>,
        step: Option<usize>,
    ) -> Result<LoraSite, TrainError> {
        let dora_scale = match m {
            None => None,
            Some(m) => {
                let w = model
                    .linear(s.layer, proj)
                    .expect("layer")
                    .base()
                    .dense()?
                    .to_dtype(DType::F32)?;
                let ba = (b.detach().matmul(&a.detach())? * s.scale)?;
                let norm = row_norm(&(w + ba)?)?.detach();
                Some(m.broadcast_div(&norm)?)
            }
        };
        let dropout = match step {
            Some(step) if self.dropout > 0.0 => Some(Dropout {
                p: self.dropout,
                seed: self.seed
                    ^ ((step as u64) << 20)
                    ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            }),
            _ => None,
        };
        Ok(LoraSite {
            a_t: a.t()?,
            b_t: (b * s.scale)?.t()?,
            dora_scale,
            dropout,
        })
    }

    /// Prefix tuning's key/value rows (through the projection when there is one).
    fn prefix_rows(&self) -> candle_core::Result<Option<Tensor>> {
        let Some(p) = &self.prefix else {
            return Ok(None);
        };
        Ok(Some(match &self.prefix_mlp {
            Some(mlp) => mlp.rows(p.as_tensor())?,
            None => p.as_tensor().clone(),
        }))
    }

    /// Every trainable tensor under its PEFT key.
    pub fn vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for s in &self.sites {
            let module = s.module();
            out.push((format!("base_model.model.{module}.lora_A.weight"), &s.a));
            out.push((format!("base_model.model.{module}.lora_B.weight"), &s.b));
            if let Some(m) = &s.m {
                out.push((
                    format!("base_model.model.{module}.lora_magnitude_vector"),
                    m,
                ));
            }
        }
        for s in &self.ia3 {
            out.push((format!("base_model.model.{}.ia3_l", s.module()), &s.l));
        }
        if let Some(p) = self.soft_prompt.as_ref().or(self.prefix.as_ref()) {
            out.push((crate::adapters::peft::PROMPT_EMBEDDINGS.to_string(), p));
        }
        if let Some(m) = &self.prefix_mlp {
            out.push(("prompt_encoder.transform.0.weight".into(), &m.w1));
            out.push(("prompt_encoder.transform.0.bias".into(), &m.b1));
            out.push(("prompt_encoder.transform.2.weight".into(), &m.w2));
            out.push(("prompt_encoder.transform.2.bias".into(), &m.b2));
        }
        for s in self.fusion.iter().flat_map(|f| &f.sites) {
            let key = |t: &str| format!("{}.adapter_fusion_layer.fusion.{t}", s.module());
            out.push((key("query.weight"), &s.query));
            out.push((key("query.bias"), &s.query_b));
            out.push((key("key.weight"), &s.key));
            out.push((key("key.bias"), &s.key_b));
            out.push((key("value.weight"), &s.value));
        }
        for s in &self.bn {
            let key = |t: &str| format!("{}.adapters.adapter.{t}", s.module());
            out.push((key("adapter_down.0.weight"), &s.down));
            out.push((key("adapter_down.0.bias"), &s.down_b));
            out.push((key("adapter_up.weight"), &s.up));
            out.push((key("adapter_up.bias"), &s.up_b));
        }
        out
    }

    /// Writes the adapter into `dir`: PEFT's format, AdapterHub's for bottleneck adapters, an
    /// AdapterHub fusion setup (the fused adapters copied in) for a fusion.
    pub fn export(
        &self,
        dir: &std::path::Path,
        model: &Llama,
        proj_names: &[&str],
    ) -> Result<(), TrainError> {
        let Some(f) = &self.fusion else {
            return Ok(self.to_peft(dir).save(dir, proj_names)?);
        };
        let layers = f
            .sites
            .iter()
            .map(|s| {
                (
                    s.module(),
                    crate::adapters::peft::FusionTensors {
                        query_w: s.query.as_tensor().clone(),
                        query_b: s.query_b.as_tensor().clone(),
                        key_w: s.key.as_tensor().clone(),
                        key_b: s.key_b.as_tensor().clone(),
                        value_w: Some(s.value.as_tensor().clone()),
                    },
                )
            })
            .collect();
        Ok(PeftAdapter::save_fusion_setup(
            dir,
            &f.adapters,
            &layers,
            model.config.hidden_size,
            self.config.base_model_name_or_path.as_deref(),
        )?)
    }

    pub fn to_peft(&self, dir: &std::path::Path) -> PeftAdapter {
        let modules: BTreeMap<String, ModuleWeights> = self
            .sites
            .iter()
            .map(|s| {
                (
                    s.module(),
                    ModuleWeights {
                        lora_a: Some(s.a.as_tensor().clone()),
                        lora_b: Some(s.b.as_tensor().clone()),
                        magnitude: s.m.as_ref().map(|m| m.as_tensor().clone()),
                        ..Default::default()
                    },
                )
            })
            .chain(self.ia3.iter().map(|s| {
                let l = s.l.as_tensor();
                // PEFT's shapes: `[1, in]` on a feed-forward module, `[out, 1]` otherwise.
                let shaped = if s.on_input {
                    l.unsqueeze(0)
                } else {
                    l.unsqueeze(1)
                }
                .expect("a vector");
                (
                    s.module(),
                    ModuleWeights {
                        ia3: Some(shaped),
                        ..Default::default()
                    },
                )
            }))
            .chain(self.bn.iter().map(|s| {
                (
                    s.module(),
                    ModuleWeights {
                        lora_a: Some(s.down.as_tensor().clone()),
                        lora_b: Some(s.up.as_tensor().clone()),
                        down_bias: Some(s.down_b.as_tensor().clone()),
                        up_bias: Some(s.up_b.as_tensor().clone()),
                        ..Default::default()
                    },
                )
            }))
            .collect();
        PeftAdapter {
            dir: dir.to_path_buf(),
            config: self.config.clone(),
            modules,
            prompt_embeddings: match self.soft_prompt.as_ref() {
                Some(v) => Some(v.as_tensor().clone()),
                None => self
                    .prefix_rows()
                    .expect("the projection's shapes were set at init")
                    .map(|t| t.detach()),
            },
            fusion: None,
        }
    }
}
