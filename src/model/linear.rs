//! `Linear`: a frozen base weight plus the place where adapter sites attach.
//!
//! Every projection of the Llama is one of these, for serving and training alike. The base
//! product runs once for all rows of a batch; adapter deltas (next to come) add per row group.

use candle_core::{DType, Result, Tensor};

/// The frozen base weight of a projection, `[out_features, in_features]` (PyTorch layout).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Dense f32 / bf16 / f16.
    Dense(Tensor),
}

impl BaseWeight {
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(w) => w.dtype(),
        }
    }

    /// The weight as a dense tensor (for merging and export).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[rows, in_features]`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
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

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x`: `[rows, in_features]` → `[rows, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.matmul_t(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
