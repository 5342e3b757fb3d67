//! Rotary position embedding in Hugging Face layout (rotate-half, not interleaved), with the
//! optional `llama3`, `linear` and Phi-3's `longrope` frequency scaling, over the whole head or
//! its first `rotary_dim` dimensions (`partial_rotary_factor`).

use candle_core::{DType, Device, Result, Tensor, D};

/// Frequency scaling of Llama 3.x (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Phi-3's LongRoPE (`rope_type: longrope`): per-frequency divisors, `short` for positions
/// before `original_max` and `long` from there on, and cos/sin scaled by `attention_factor`.
///
/// transformers picks one set per forward pass (long when the pass reaches past
/// `original_max`), and keeps cached keys as they were rotated. Choosing by position is the same
/// for every sequence it decodes token by token and for every prompt within `original_max`; a
/// prompt longer than that, fed in one pass, has its first `original_max` positions rotated by
/// the long set there and by the short set here (vLLM picks per batch, a third way). By position,
/// a position's rotation does not depend on how the prompt was chunked or cached.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short: Vec<f64>,
    pub long: Vec<f64>,
    pub original_max: usize,
    pub attention_factor: f64,
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
    /// Dimensions rotated at the start of each head (the rest pass through).
    rotary_dim: usize,
}

/// How a model rotates: what `Rope::new` builds its tables from.
#[derive(Debug, Clone, Copy)]
pub struct RopeSpec<'a> {
    pub head_dim: usize,
    /// `head_dim` unless `partial_rotary_factor` < 1.
    pub rotary_dim: usize,
    pub theta: f64,
    pub llama3: Option<&'a Llama3Scaling>,
    pub linear: Option<f64>,
    pub longrope: Option<&'a LongRope>,
}

impl Rope {
    /// Rotation over the whole head with the `llama3` or `linear` scaling.
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&Llama3Scaling>,
        linear: Option<f64>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let spec = RopeSpec {
            head_dim,
            rotary_dim: head_dim,
            theta,
            llama3: scaling,
            linear,
            longrope: None,
        };
        Self::of(&spec, max_positions, dtype, device)
    }

    pub fn of(
        spec: &RopeSpec,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let RopeSpec {
            rotary_dim: dim,
            theta,
            llama3: scaling,
            linear,
            ..
        } = *spec;
        if dim == 0 || dim % 2 != 0 || dim > spec.head_dim {
            candle_core::bail!("rotary dimensions {dim} of a head of {}", spec.head_dim);
        }
        let half = dim / 2;
        // Hugging Face computes inv_freq and the angles in f32; do the same so long positions
        // round the same way.
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / dim as f64)) as f32)
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
        // LongRoPE: `1 / (factor · base^(2i/dim))` in f32 as transformers computes it, the short
        // set before `original_max` and the long one after; cos and sin times the factor.
        let longrope = |set: &[f64]| -> Vec<f32> {
            set.iter()
                .enumerate()
                .map(|(i, &f)| 1.0 / (f as f32 * (theta as f32).powf((2 * i) as f32 / dim as f32)))
                .collect()
        };
        let sets = match spec.longrope {
            Some(l) => {
                if l.short.len() != half || l.long.len() != half {
                    candle_core::bail!(
                        "longrope factors: {} short and {} long for {half} frequencies",
                        l.short.len(),
                        l.long.len()
                    );
                }
                Some((
                    longrope(&l.short),
                    longrope(&l.long),
                    l.original_max,
                    l.attention_factor as f32,
                ))
            }
            None => None,
        };
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            let (freqs, gain) = match &sets {
                Some((short, _, orig, gain)) if p < *orig => (short, *gain),
                Some((_, long, _, gain)) => (long, *gain),
                None => (&inv_freq, 1.0),
            };
            for f in freqs {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32 * gain);
                sin.push(angle.sin() as f32 * gain);
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
            rotary_dim: dim,
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
        self.rotate_host(rows, heads, head_dim, offset, false)
    }

    /// [`Rope::apply_host`], or with `inverse` its inverse (the rotation's transpose: how a
    /// gradient goes back through it).
    pub fn rotate_host(
        &self,
        rows: &mut [f32],
        heads: usize,
        head_dim: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()> {
        let sign = if inverse { -1.0 } else { 1.0 };
        let half = self.rotary_dim / 2;
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
                let (x1, x2) = head[..2 * half].split_at_mut(half);
                for d in 0..half {
                    let (a, b, sn) = (x1[d], x2[d], sign * sin[d]);
                    x1[d] = a * cos[d] - b * sn;
                    x2[d] = b * cos[d] + a * sn;
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
        let head_dim = x.dims3()?.2;
        if self.rotary_dim < head_dim {
            // Partial rotary: the first `rotary_dim` dimensions turn, the rest pass.
            let turned = self.apply_whole(&x.narrow(D::Minus1, 0, self.rotary_dim)?, offset)?;
            let kept = x.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
            return Tensor::cat(&[&turned, &kept], D::Minus1);
        }
        self.apply_whole(x, offset)
    }

    fn apply_whole(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
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

    /// Phi-3's LongRoPE over the first 12 of 16 dimensions, rows crossing the original context:
    /// the fused kernel, the differentiable path (training) and the host path agree, the last 4
    /// dimensions pass unchanged, and positions past the original context turn by the long set.
    #[test]
    fn partial_longrope_agrees_on_every_path() -> Result<()> {
        let dev = Device::Cpu;
        let longrope = LongRope {
            short: vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
            long: vec![2.0, 5.0, 8.0, 11.0, 14.0, 17.0],
            original_max: 5,
            attention_factor: 1.3,
        };
        let spec = RopeSpec {
            head_dim: 16,
            rotary_dim: 12,
            theta: 10000.0,
            llama3: None,
            linear: None,
            longrope: Some(&longrope),
        };
        let rope = Rope::of(&spec, 64, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &dev)?;
        let fast = rope.apply(&x, 3)?;
        let var = Var::from_tensor(&x)?;
        let slow = rope.apply(var.as_tensor(), 3)?;
        let diff = (&fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "paths differ by {diff}");
        assert!(slow.sum_all()?.backward()?.get(var.as_tensor()).is_some());
        let kept = (fast.narrow(2, 12, 4)? - x.narrow(2, 12, 4)?)?;
        assert_eq!(kept.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let mut rows: Vec<f32> = x.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1()?;
        rope.apply_host(&mut rows, 3, 16, 3)?;
        let host = Tensor::from_vec(rows, (7, 3, 16), &dev)?.transpose(0, 1)?;
        let diff = (host - &fast)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "host differs by {diff}");
        // Position 6 (past 5) by the long set: x0' = gain · (x0 cos θ − x6 sin θ), θ = 6 / 2.
        let (x0, x6) = (
            x.get(0)?.get(3)?.get(0)?.to_scalar::<f32>()?,
            x.get(0)?.get(3)?.get(6)?.to_scalar::<f32>()?,
        );
        let t = 6.0f32 / 2.0;
        let want = 1.3 * (x0 * t.cos() - x6 * t.sin());
        let got = fast.get(0)?.get(3)?.get(0)?.to_scalar::<f32>()?;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
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
