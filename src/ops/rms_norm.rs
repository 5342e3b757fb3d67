//! RMSNorm as in Hugging Face Llama: normalise in f32, cast back, then scale by the weight.

use candle_core::{DType, Result, Tensor, D};

/// `weight * (x / sqrt(mean(x²) + eps))` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.track_op() && !weight.track_op() && x.dtype() == DType::F32 {
        return candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32);
    }
    if !weight.track_op() && super::fused::applies(x) {
        // Training on the CPU: one node with its derivative written out.
        return super::fused::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 16, &dev)?;
        let fast = rms_norm(&x, &w, 1e-5)?;
        let var = Var::from_tensor(&x)?;
        let slow = rms_norm(var.as_tensor(), &w, 1e-5)?;
        let diff = (fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "paths differ by {diff}");
        let grads = slow.sum_all()?.backward()?;
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "gradient must reach the input"
        );
        Ok(())
    }
}
