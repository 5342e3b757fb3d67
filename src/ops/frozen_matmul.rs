//! `x · Wᵀ` for a frozen weight W, with a backward to `x` only. candle's own matmul backward
//! also computes the (discarded) gradient of W, a full weight-sized matmul and buffer per
//! projection per step; training the adapters over a frozen base must not pay for that.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `[out, in]`
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul: input must be contiguous".into())
        })?;
        let x = match storage {
            CpuStorage::F32(v) => {
                Tensor::from_slice(&v[start..end], layout.shape(), &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("frozen-matmul: only f32 is supported for training"),
        };
        let y = self
            .w
            .to_dtype(DType::F32)?
            .matmul(&x.t()?)?
            .t()?
            .contiguous()?;
        let (guard, y_layout) = y.storage_and_layout();
        let (s, e) = y_layout.contiguous_offsets().expect("contiguous");
        match &*guard {
            Storage::Cpu(CpuStorage::F32(v)) => {
                Ok((CpuStorage::F32(v[s..e].to_vec()), y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-matmul: unexpected storage"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w.to_dtype(grad.dtype())?)?))
    }
}

/// `x · wᵀ` (`x`: `[rows, in]`, `w`: `[out, in]`), differentiable in `x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_plain_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev)?)?;
        let y1 = frozen_matmul(x.as_tensor(), &w)?;
        let y2 = x.as_tensor().matmul(&w.t()?)?;
        assert!((&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let g1 = y1
            .sqr()?
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let g2 = y2
            .sqr()?
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .clone();
        assert!((g1 - g2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        Ok(())
    }
}
