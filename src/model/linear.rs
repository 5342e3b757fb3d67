//! `Linear`: a frozen base weight plus the adapter sites active for this batch.
//!
//! Every projection of the Llama is one of these, for serving and training alike. The base
//! product runs once for all rows of a batch; each adapter group then adds its low-rank delta
//! on its own rows only (SGMV-style: gather the group's rows, two thin matmuls, scatter-add).
//! Rows without an adapter cost nothing extra.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::adapter_site::{LoraSite, Rows};
use crate::ops::lora_cpu::{self, RowSite};
use crate::ops::lora_train::{lora_train, Frozen, Mask};
use crate::quant::bf16::Bf16Weight;
use crate::quant::gguf::QuantLinear;
use crate::quant::nf4_matmul::Nf4Linear;

/// The frozen base weight of a projection, `[out_features, in_features]` (PyTorch layout).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Dense f32 / bf16 / f16.
    Dense(Tensor),
    /// 4-bit NormalFloat (bitsandbytes layout), dequantized tile by tile inside the matmul.
    Nf4(Nf4Linear),
    /// A GGUF quantized tensor as stored, integer dot products against 8-bit activations.
    Quant(QuantLinear),
    /// bf16 weights, f32 activations and accumulation (`--dtype bf16` on CPU).
    Bf16(std::sync::Arc<Bf16Weight>),
}

impl BaseWeight {
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Nf4(q) => Ok(q.dims()),
            Self::Quant(q) => Ok(q.dims()),
            Self::Bf16(w) => Ok(w.dims()),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(w) => w.dtype(),
            Self::Nf4(_) | Self::Quant(_) | Self::Bf16(_) => DType::F32,
        }
    }

    /// The weight as a dense tensor (for merging, export, DoRA norms).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Nf4(q) => Tensor::from_vec(q.dequantize(), q.dims(), &candle_core::Device::Cpu),
            Self::Quant(q) => q.dequantize(),
            Self::Bf16(w) => Tensor::from_vec(w.dequantize(), w.dims(), &candle_core::Device::Cpu),
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Nf4(q) => q.weight.bytes(),
            Self::Quant(q) => q.bytes(),
            Self::Bf16(w) => w.bytes(),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[rows, in_features]`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // Computed as `(W · xᵀ)ᵀ`: with W row-major this is the layout candle's CPU gemm
            // runs fastest (≈1.7× `x · Wᵀ` at 8 rows on the default model's shapes).
            Self::Dense(w) if x.track_op() && matches!(x.device(), candle_core::Device::Cpu) => {
                crate::ops::frozen_matmul::frozen_matmul(x, w)
            }
            Self::Dense(w) => w.matmul(&x.t()?)?.t()?.contiguous(),
            Self::Nf4(q) => q.matmul_t(x),
            Self::Quant(q) => q.matmul_t(x),
            Self::Bf16(w) => {
                if x.track_op() {
                    candle_core::bail!("a bf16 base has no backward; train with `--dtype f32`");
                }
                let n = x.dim(0)?;
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Tensor::from_vec(w.matmul_t(&xs, n), (n, w.dims().0), x.device())
            }
        }
    }
}

/// The frozen base weight as training's two host products (`ops::lora_train`).
struct FrozenBase(BaseWeight);

impl Frozen for FrozenBase {
    fn dims(&self) -> (usize, usize) {
        self.0.dims().unwrap_or((0, 0))
    }

    fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        use crate::ops::{frozen_matmul::with_f32, gemm::matmul_wt};
        match &self.0 {
            BaseWeight::Dense(w) => with_f32(w, |w| Ok(matmul_wt(w, self.dims(), x, n))),
            BaseWeight::Nf4(q) => Ok(q.forward_raw(x, n)),
            BaseWeight::Quant(q) => q.matmul_host(x, n),
            BaseWeight::Bf16(_) => candle_core::bail!("a bf16 base has no backward"),
        }
    }

    fn backward(&self, g: &[f32], n: usize) -> Result<Vec<f32>> {
        use crate::ops::{frozen_matmul::with_f32, gemm::matmul_w};
        match &self.0 {
            BaseWeight::Dense(w) => with_f32(w, |w| Ok(matmul_w(w, self.dims(), g, n))),
            BaseWeight::Nf4(q) => Ok(q.backward_raw(g, n)),
            BaseWeight::Quant(q) => q.backward_raw(g, n),
            BaseWeight::Bf16(_) => candle_core::bail!("a bf16 base has no backward"),
        }
    }
}

/// One projection: `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    base: BaseWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(base: BaseWeight, bias: Option<Tensor>) -> Self {
        Self { base, bias }
    }

    pub fn base(&self) -> &BaseWeight {
        &self.base
    }

    pub fn set_base(&mut self, base: BaseWeight) {
        self.base = base;
    }

    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x`: `[rows, in_features]` → `[rows, out_features]`, base only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &[])
    }

    /// `x[n, in] · Wᵀ` on host rows, without bias (training's written-out backward passes).
    pub fn host_forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        FrozenBase(self.base.clone()).forward(x, n)
    }

    /// `g[n, out] · W` on host rows.
    pub fn host_backward(&self, g: &[f32], n: usize) -> Result<Vec<f32>> {
        FrozenBase(self.base.clone()).backward(g, n)
    }

    /// Base product for all rows, plus each site's delta on its rows, plus bias.
    pub fn forward_with(&self, x: &Tensor, sites: &[(&Rows, &LoraSite)]) -> Result<Tensor> {
        if let Some(y) = self.train_fused(x, sites)? {
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let y = self.base.matmul_t(x)?;
        if sites.is_empty() {
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        crate::ops::profile::time(crate::ops::profile::Part::AdapterDelta, || {
            self.add_deltas(x, y, sites)
        })
    }

    /// Training a LoRA site on all rows over an f32 base on the CPU: base and delta as one
    /// node with its backward written out (`ops::lora_train`); `None` where that does not apply
    /// (serving, DoRA, several sites, a bf16 base).
    fn train_fused(&self, x: &Tensor, sites: &[(&Rows, &LoraSite)]) -> Result<Option<Tensor>> {
        let [(Rows::All, site)] = sites else {
            return Ok(None);
        };
        let tracked = x.track_op() || site.a_t.track_op() || site.b_t.track_op();
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if !tracked
            || site.dora_scale.is_some()
            || !f32_cpu(x)
            || !f32_cpu(&site.a_t)
            || !f32_cpu(&site.b_t)
            || matches!(self.base, BaseWeight::Bf16(_))
            || matches!(&self.base, BaseWeight::Dense(w) if !f32_cpu(w))
        {
            return Ok(None);
        }
        let mask = site
            .dropout
            .filter(|d| d.p > 0.0)
            .map(|d| Arc::new(d) as Arc<dyn Mask>);
        let base = Arc::new(FrozenBase(self.base.clone()));
        lora_train(x, &site.a_t, &site.b_t, base, mask).map(Some)
    }

    /// Each site's delta on its rows, plus bias.
    fn add_deltas(
        &self,
        x: &Tensor,
        mut y: Tensor,
        sites: &[(&Rows, &LoraSite)],
    ) -> Result<Tensor> {
        {
            let n = x.dim(0)?;
            let row_sites = sites
                .iter()
                .map(|(rows, site)| {
                    Ok(RowSite {
                        a_t: &site.a_t,
                        b_t: &site.b_t,
                        dora_scale: site.dora_scale.as_ref(),
                        rows: match rows {
                            Rows::All => (0..n).collect(),
                            Rows::Range(start, len) => (*start..start + len).collect(),
                            Rows::Index(idx, _) => idx.clone(),
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if lora_cpu::applies(x, &row_sites) && sites.iter().all(|(_, s)| s.dropout.is_none()) {
                y = lora_cpu::add_deltas(x, &y, &row_sites)?;
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        }
        for (rows, site) in sites {
            y = match rows {
                Rows::All => (&y + site.delta(x, &y)?)?,
                Rows::Range(start, len) => {
                    let xs = x.narrow(0, *start, *len)?;
                    let delta = site.delta(&xs, &y.narrow(0, *start, *len)?)?;
                    y.slice_scatter0(&(y.narrow(0, *start, *len)? + delta)?, *start)?
                }
                Rows::Index(_, idx) => {
                    let xs = x.index_select(idx, 0)?;
                    let delta = site.delta(&xs, &y.index_select(idx, 0)?)?;
                    y.index_add(idx, &delta, 0)?
                }
            };
        }
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
