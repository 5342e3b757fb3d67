//! `x · Wᵀ` for a frozen weight W, with a backward to `x` only. candle's own matmul backward
//! also computes the (discarded) gradient of W, a full weight-sized matmul and buffer per
//! projection per step; training the adapters over a frozen base must not pay for that.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::gemm::{matmul_w, matmul_wt};

struct FrozenMatmul {
    /// `[out, in]`
    w: Tensor,
}

/// Runs `f` on `t`'s elements (f32, CPU), contiguous in row-major order.
pub fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (guard, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets().expect("contiguous");
    match &*guard {
        Storage::Cpu(CpuStorage::F32(v)) => f(&v[a..b]),
        _ => candle_core::bail!("frozen-matmul: CPU f32 tensors only"),
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    /// `y[n, out] = x[n, in] · Wᵀ`, straight from the two buffers into the output.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul: input must be contiguous".into())
        })?;
        let x = match storage {
            CpuStorage::F32(v) => &v[start..end],
            _ => candle_core::bail!("frozen-matmul: only f32 is supported for training"),
        };
        let (out, inp) = self.w.dims2()?;
        let n = x.len() / inp.max(1);
        let y = with_f32(&self.w, |w| Ok(matmul_wt(w, (out, inp), x, n)))?;
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("a matrix") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// `dx[n, in] = grad[n, out] · W`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdLora);
        let (out, inp) = self.w.dims2()?;
        let n = grad.elem_count() / out.max(1);
        let dx = with_f32(grad, |g| {
            with_f32(&self.w, |w| Ok(matmul_w(w, (out, inp), g, n)))
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
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
