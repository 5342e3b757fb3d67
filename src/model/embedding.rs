//! The token embedding: a dense `[vocab, hidden]` tensor, or a GGUF quantized one whose rows are
//! dequantized only for the tokens looked up (a tied lm_head shares the same quantized bytes).

use candle_core::{DType, Device, Result, Tensor};

use crate::quant::gguf::QuantLinear;

#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// Cloning shares the quantized bytes (a tied lm_head holds a clone).
    Quant(QuantLinear),
}

impl Embedding {
    /// Rows for `ids` (`[n]` u32) → `[n, hidden]`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(ids, 0),
            Self::Quant(q) => q.rows(ids),
        }
    }

    /// The whole table in its element type (dense) or f32 (quantized), e.g. for export.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quant(q) => q.dequantize(),
        }
    }

    /// The element type lookups produce.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quant(_) => DType::F32,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Dense(t) => t.device().clone(),
            Self::Quant(_) => Device::Cpu,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quant(q) => q.bytes(),
        }
    }
}
