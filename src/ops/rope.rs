//! Rotary position embedding in Hugging Face layout (rotate-half, not interleaved), with the
//! optional `llama3` frequency scaling.

use candle_core::{DType, Device, Result, Tensor, D};

/// Frequency scaling of Llama 3.x (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim / 2]`, for candle's fused kernel.
    cos_half: Tensor,
    sin_half: Tensor,
    /// `[max_positions, head_dim]`, for the differentiable path.
    cos: Tensor,
    sin: Tensor,
    /// `[max_positions, head_dim / 2]` on the host, for the fused CPU decode path.
    cos_host: std::sync::Arc<Vec<f32>>,
    sin_host: std::sync::Arc<Vec<f32>>,
    max_positions: usize,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&Llama3Scaling>,
        linear: Option<f64>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // Hugging Face computes inv_freq and the angles in f32; do the same so long positions
        // round the same way.
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        if let Some(factor) = linear {
            // Linear scaling (transformers' `linear`): the frequencies divided by the factor.
            for f in inv_freq.iter_mut() {
                *f /= factor as f32;
            }
        }
        if let Some(s) = scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let freq = *f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                };
                *f = scaled as f32;
            }
        }
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let (cos_host, sin_host) = (
            std::sync::Arc::new(cos.clone()),
            std::sync::Arc::new(sin.clone()),
        );
        let cos_half = Tensor::from_vec(cos, (max_positions, half), device)?;
        let sin_half = Tensor::from_vec(sin, (max_positions, half), device)?;
        let cos = Tensor::cat(&[&cos_half, &cos_half], D::Minus1)?.to_dtype(dtype)?;
        let sin = Tensor::cat(&[&sin_half, &sin_half], D::Minus1)?.to_dtype(dtype)?;
        Ok(Self {
            cos_half: cos_half.to_dtype(dtype)?,
            sin_half: sin_half.to_dtype(dtype)?,
            cos,
            sin,
            cos_host,
            sin_host,
            max_positions,
        })
    }

    /// Rotates, in place, rows of `heads × head_dim` values (one token each) whose first row sits
    /// at position `offset` (host data, Hugging Face rotate-half layout).
    pub fn apply_host(
        &self,
        rows: &mut [f32],
        heads: usize,
        head_dim: usize,
        offset: usize,
    ) -> Result<()> {
        let half = head_dim / 2;
        let len = rows.len() / (heads * head_dim);
        if offset + len > self.max_positions {
            candle_core::bail!(
                "position {} is beyond the model's context of {} tokens",
                offset + len,
                self.max_positions
            );
        }
        for (t, token) in rows.chunks_exact_mut(heads * head_dim).enumerate() {
            let cos = &self.cos_host[(offset + t) * half..][..half];
            let sin = &self.sin_host[(offset + t) * half..][..half];
            for head in token.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for d in 0..half {
                    let (a, b) = (x1[d], x2[d]);
                    x1[d] = a * cos[d] - b * sin[d];
                    x2[d] = b * cos[d] + a * sin[d];
                }
            }
        }
        Ok(())
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` of shape `[heads, len, head_dim]` whose rows sit at positions
    /// `offset..offset + len`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, len, dim) = x.dims3()?;
        if offset + len > self.max_positions {
            candle_core::bail!(
                "position {} is beyond the model's context of {} tokens",
                offset + len,
                self.max_positions
            );
        }
        if !x.track_op() {
            let cos = self.cos_half.narrow(0, offset, len)?;
            let sin = self.sin_half.narrow(0, offset, len)?;
            return candle_nn::rotary_emb::rope(&x.unsqueeze(0)?.contiguous()?, &cos, &sin)?
                .squeeze(0);
        }
        if super::fused::applies(x) {
            let cos = self.cos_half.narrow(0, offset, len)?;
            let sin = self.sin_half.narrow(0, offset, len)?;
            return super::fused::rope(x, &cos, &sin);
        }
        let cos = self.cos.narrow(0, offset, len)?;
        let sin = self.sin.narrow(0, offset, len)?;
        let x1 = x.narrow(D::Minus1, 0, dim / 2)?;
        let x2 = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(16, 10000.0, None, None, 64, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &dev)?;
        let fast = rope.apply(&x, 5)?;
        let var = Var::from_tensor(&x)?;
        let slow = rope.apply(var.as_tensor(), 5)?;
        let diff = (fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "paths differ by {diff}");
        assert!(slow.sum_all()?.backward()?.get(var.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn host_rotation_equals_the_fused_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(16, 10000.0, None, None, 64, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &dev)?; // [heads, len, dim]
        let want = rope.apply(&x, 5)?.transpose(0, 1)?.contiguous()?; // [len, heads, dim]
        let mut rows: Vec<f32> = x.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1()?;
        rope.apply_host(&mut rows, 3, 16, 5)?;
        let got = Tensor::from_vec(rows, (7, 3, 16), &dev)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn position_zero_is_identity_and_overflow_errors() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10000.0, None, None, 4, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 8), &dev)?;
        let y = rope.apply(&x, 0)?;
        let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-7);
        let long = Tensor::zeros((2, 3, 8), DType::F32, &dev)?;
        assert!(rope.apply(&long, 2).is_err());
        Ok(())
    }
}
