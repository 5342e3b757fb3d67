//! Training AdapterHub's bottleneck adapters and AdapterFusion: their sites and how each
//! starts (the rest of training, one forward and the export, is `trainable.rs`'s).

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::error::TrainError;
use super::trainable::{TrainSpec, TrainableAdapter};
use crate::adapters::config::BnKind;
use crate::adapters::{AdapterConfig, PeftAdapter, TargetModules};
use crate::model::{AdapterWeights, Llama};

/// A bottleneck adapter at one place of one layer.
#[derive(Debug, Clone)]
pub struct BnTrainSite {
    pub layer: usize,
    /// 0: after attention, 1: after the MLP.
    pub place: usize,
    /// `[r, hidden]`, `[r]`
    pub down: Var,
    pub down_b: Var,
    /// `[hidden, r]`, `[hidden]`
    pub up: Var,
    pub up_b: Var,
}

/// AdapterHub's module path of a place (`model.layers.L.attention_adapters` for 0, after
/// attention; `.output_adapters` for 1, after the MLP).
fn place_module(layer: usize, place: usize) -> String {
    let place = if place == 0 {
        "attention_adapters"
    } else {
        "output_adapters"
    };
    format!("model.layers.{layer}.{place}")
}

impl BnTrainSite {
    pub fn module(&self) -> String {
        place_module(self.layer, self.place)
    }
}

/// One fusion layer being trained.
#[derive(Debug, Clone)]
pub struct FusionTrainSite {
    pub layer: usize,
    /// 0: after attention, 1: after the MLP.
    pub place: usize,
    /// `[hidden, hidden]` each (torch's `Linear` layout), biases `[hidden]`.
    pub query: Var,
    pub query_b: Var,
    pub key: Var,
    pub key_b: Var,
    pub value: Var,
}

impl FusionTrainSite {
    pub fn module(&self) -> String {
        place_module(self.layer, self.place)
    }
}

/// AdapterFusion training: the frozen fused adapters and the fusion layers.
#[derive(Debug, Clone)]
pub struct FusionTrain {
    /// The fused adapters' names (their folders' names) and contents, in order.
    pub adapters: Vec<(String, PeftAdapter)>,
    pub(super) bound: Vec<AdapterWeights>,
    pub sites: Vec<FusionTrainSite>,
}

impl TrainableAdapter {
    /// Bottleneck adapters of `kind`: down ~ U(±1/sqrt(hidden)), up and biases zero, so the
    /// model starts unchanged and the up-projection gets the first gradient (as LoRA's B).
    pub(super) fn init_bn(
        model: &Llama,
        spec: &TrainSpec,
        kind: BnKind,
    ) -> Result<Self, TrainError> {
        let h = model.config.hidden_size;
        let factor = if spec.reduction_factor == 0 {
            kind.default_reduction_factor()
        } else {
            spec.reduction_factor
        };
        if h % factor != 0 || factor > h {
            return Err(TrainError::config(
                "--reduction-factor",
                format!("{factor} does not divide the hidden size {h}"),
            ));
        }
        let r = h / factor;
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let dev = model.device();
        let bound = 1.0 / (h as f64).sqrt();
        let mut bn = Vec::new();
        for layer in 0..model.layers.len() {
            for &place in kind.places() {
                let down: Vec<f32> = (0..r * h)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let zeros = |shape: &[usize]| -> Result<Var, TrainError> {
                    Ok(Var::from_tensor(&Tensor::zeros(shape, DType::F32, dev)?)?)
                };
                bn.push(BnTrainSite {
                    layer,
                    place,
                    down: Var::from_tensor(&Tensor::from_vec(down, (r, h), dev)?)?,
                    down_b: zeros(&[r])?,
                    up: zeros(&[h, r])?,
                    up_b: zeros(&[h])?,
                });
            }
        }
        let config = AdapterConfig::of(
            crate::adapters::config::Method::Bottleneck(kind.config()),
            TargetModules::List(Vec::new()),
            Some(spec.base_model.clone()),
        );
        Ok(Self {
            bn,
            ..Self::bare(config, spec.seed)
        })
    }

    /// AdapterFusion over `spec.fuse`, initialised as AdapterHub's `dynamic` fusion layer.
    pub(super) fn init_fusion(model: &Llama, spec: &TrainSpec) -> Result<Self, TrainError> {
        use crate::model::BnInput;
        if spec.fuse.len() < 2 {
            return Err(TrainError::config(
                "--fuse",
                "names fewer than two bottleneck adapters",
            ));
        }
        let mut adapters: Vec<(String, PeftAdapter)> = Vec::new();
        let mut bound = Vec::new();
        let mut input = None;
        for dir in &spec.fuse {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| !n.is_empty() && !n.contains(','))
                .ok_or_else(|| {
                    TrainError::config(
                        "--fuse",
                        format!("{}: the folder's name is the adapter's", dir.display()),
                    )
                })?
                .to_string();
            if adapters.iter().any(|(n, _)| *n == name) {
                return Err(TrainError::config(
                    "--fuse",
                    format!("names `{name}` twice"),
                ));
            }
            let peft = PeftAdapter::load(dir)?;
            let crate::adapters::config::Method::Bottleneck(bn) = peft.config.method else {
                return Err(TrainError::config(
                    "--fuse",
                    format!("{} is not a bottleneck adapter", dir.display()),
                ));
            };
            if bn.input == BnInput::BeforeSublayer || input.is_some_and(|i| i != bn.input) {
                return Err(TrainError::config(
                    "--fuse",
                    format!(
                        "{}: the fused adapters must be sequential bottleneck adapters of one kind (seq or double)",
                        dir.display()
                    ),
                ));
            }
            input = Some(bn.input);
            bound.push(crate::adapters::bind(&peft, model, &Default::default())?);
            adapters.push((name, peft));
        }
        let h = model.config.hidden_size;
        let dev = model.device();
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let mut normal = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                    (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        };
        let mut eye = vec![1e-6f32; h * h];
        for i in 0..h {
            eye[i * h + i] = 1.0;
        }
        let var = |v: Vec<f32>, shape: &[usize]| -> Result<Var, TrainError> {
            Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)?)
        };
        let mut sites = Vec::new();
        for layer in 0..model.layers.len() {
            for place in 0..2 {
                let here = bound
                    .iter()
                    .filter(|w| w.bn_site(layer, place).is_some())
                    .count();
                if here == 0 {
                    continue;
                }
                if here < bound.len() {
                    return Err(TrainError::config(
                        "--fuse",
                        format!("the adapters do not all have a bottleneck at layer {layer}"),
                    ));
                }
                sites.push(FusionTrainSite {
                    layer,
                    place,
                    query: var(normal(h * h), &[h, h])?,
                    query_b: var(vec![0.0; h], &[h])?,
                    key: var(normal(h * h), &[h, h])?,
                    key_b: var(vec![0.0; h], &[h])?,
                    value: var(eye.clone(), &[h, h])?,
                });
            }
        }
        let config = AdapterConfig::of(
            crate::adapters::config::Method::Fusion {
                adapters: adapters.iter().map(|(n, _)| n.clone()).collect(),
                value: true,
            },
            TargetModules::List(Vec::new()),
            Some(spec.base_model.clone()),
        );
        Ok(Self {
            fusion: Some(FusionTrain {
                adapters,
                bound,
                sites,
            }),
            ..Self::bare(config, spec.seed)
        })
    }
}
