//! Training-time ops with hand-written backward, for f32 on the CPU: RMSNorm (frozen weight),
//! RoPE and `silu(gate) · up`. Built from candle primitives these are 5–10 graph nodes each, and
//! candle's backward pays an allocation, a zero-fill and an add per node; one node each with its
//! derivative written out costs one pass. The primitive paths stay for other devices and dtypes
//! (`rms_norm`, `Rope::apply` and the MLP choose), and the tests hold both to the same gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The f32 slice a contiguous CPU storage holds, or an error naming `op`.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// Whether the fused ops run for `x`: f32 on the CPU.
pub fn applies(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32 && matches!(x.device(), candle_core::Device::Cpu)
}

/// `w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension; the weight is frozen.
struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-trainable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let h = self.weight.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = self.inv_rms(xr);
            for ((o, v), w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                *o = w * v * r;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// `dx = r·(g⊙w) − x · r³ · Σ(g⊙w⊙x) / h`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (host(arg)?, host(grad)?);
        let h = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(h)
            .zip(g.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
        {
            let r = self.inv_rms(xr);
            let dot: f32 = gr
                .iter()
                .zip(&self.weight)
                .zip(xr)
                .map(|((g, w), x)| g * w * x)
                .sum();
            let k = r * r * r * dot / h as f32;
            for (((d, g), w), x) in dr.iter_mut().zip(gr).zip(&self.weight).zip(xr) {
                *d = r * g * w - k * x;
            }
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm {
        weight: host(weight)?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1(op)
}

/// Rotary embedding of `[heads, len, head_dim]` rows at positions `offset ..` (halves rotated,
/// as Hugging Face's Llama): `cos`, `sin` are `[positions, head_dim / 2]` row-major.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// +1 forward, −1 the inverse rotation (the backward of a rotation is its inverse).
    sign: f32,
}

impl Rope {
    fn rotate(&self, x: &[f32], shape: &Shape) -> Result<Vec<f32>> {
        let (_, len, hd) = shape.dims3()?;
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        for (xh, yh) in x.chunks_exact(len * hd).zip(y.chunks_exact_mut(len * hd)) {
            for t in 0..len {
                let (c, s) = (&self.cos[t * half..][..half], &self.sin[t * half..][..half]);
                let (xr, yr) = (&xh[t * hd..][..hd], &mut yh[t * hd..][..hd]);
                for d in 0..half {
                    let (a, b, sn) = (xr[d], xr[d + half], self.sign * s[d]);
                    yr[d] = a * c[d] - b * sn;
                    yr[d + half] = b * c[d] + a * sn;
                }
            }
        }
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-trainable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        Ok((
            CpuStorage::F32(self.rotate(x, l.shape())?),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sign: -self.sign,
        };
        let g = back.rotate(&host(grad)?, arg.shape())?;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// `x` (`[heads, len, head_dim]`) rotated for positions `offset ..`; `cos`, `sin`: the tables
/// for those positions, `[len, head_dim / 2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = Rope {
        cos: host(cos)?,
        sin: host(sin)?,
        sign: 1.0,
    };
    x.contiguous()?.apply_op1(op)
}

/// `silu(gate) · up`.
struct SiluMul;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-trainable"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        if g.len() != u.len() {
            candle_core::bail!("silu-mul: shapes differ");
        }
        let y = g.iter().zip(u).map(|(g, u)| g * sigmoid(*g) * u).collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `d gate = grad · up · σ(g)(1 + g(1 − σ(g)))`, `d up = grad · silu(g)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, d) = (host(gate)?, host(up)?, host(grad)?);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        for i in 0..g.len() {
            let s = sigmoid(g[i]);
            dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = d[i] * g[i] * s;
        }
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Each fused op against the same function built from candle primitives: values, and the
    /// gradients of a weighted sum of the output (random weights, so every output matters).
    fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[&Tensor]) -> Result<Tensor>,
        plain: impl Fn(&[&Tensor]) -> Result<Tensor>,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (fused(&ts).unwrap(), plain(&ts).unwrap());
        assert!(
            max_diff(&a, &b) < 1e-5,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let w = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for t in &ts {
            let d = max_diff(ga.get(t).unwrap(), gb.get(t).unwrap());
            assert!(d < 1e-4, "gradients differ by {d}");
        }
    }

    #[test]
    fn rms_norm_gradient_equals_the_primitive_path() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 16, &dev).unwrap();
        check(
            &[x],
            |t| rms_norm(t[0], &w, 1e-5),
            |t| {
                let var = t[0].sqr()?.mean_keepdim(D::Minus1)?;
                t[0].broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&w)
            },
        );
    }

    #[test]
    fn rope_gradient_equals_the_primitive_path() {
        let dev = Device::Cpu;
        let (len, hd) = (7, 16);
        let cos = Tensor::randn(0f32, 1.0, (len, hd / 2), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (len, hd / 2), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, len, hd), &dev).unwrap();
        check(
            &[x],
            |t| rope(t[0], &cos, &sin),
            |t| {
                let c = Tensor::cat(&[&cos, &cos], D::Minus1)?;
                let s = Tensor::cat(&[&sin, &sin], D::Minus1)?;
                let x1 = t[0].narrow(D::Minus1, 0, hd / 2)?;
                let x2 = t[0].narrow(D::Minus1, hd / 2, hd / 2)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                t[0].broadcast_mul(&c)? + rotated.broadcast_mul(&s)?
            },
        );
    }

    #[test]
    fn silu_mul_gradient_equals_the_primitive_path() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 2.0, (4, 9), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (4, 9), &dev).unwrap();
        check(&[g, u], |t| silu_mul(t[0], t[1]), |t| t[0].silu()? * t[1]);
    }
}
