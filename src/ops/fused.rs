//! Training-time ops with hand-written backward, for f32 on the CPU: RMSNorm (frozen weight),
//! RoPE, `silu(gate) · up` and the causal softmax of attention. Built from candle primitives
//! these are 5–10 graph nodes each, and candle's backward pays an allocation, a zero-fill and an
//! add per node; one node each with its derivative written out costs one pass, split over the
//! threads by rows. The primitive paths stay for other devices and dtypes (`rms_norm`,
//! `Rope::apply`, the MLP and `causal_attention` choose), and the tests hold both to the same
//! gradients. `exp` is `ops::vexp`'s (within 3e-7 of the library's).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vexp::exp;

/// Elements per parallel task: enough work to be worth a task, in whole rows of `row`.
fn per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1) * row.max(1)
}

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

    fn forward_rows(&self, x: &[f32], y: &mut [f32]) {
        let h = self.weight.len();
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = self.inv_rms(xr);
            for ((o, v), w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                *o = w * v * r;
            }
        }
    }

    /// `dx = r·(g⊙w) − x · r³ · Σ(g⊙w⊙x) / h`.
    fn backward_rows(&self, x: &[f32], g: &[f32], dx: &mut [f32]) {
        let h = self.weight.len();
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
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-trainable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        let t = per_task(self.weight.len());
        y.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .for_each(|(yc, xc)| self.forward_rows(xc, yc));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdElementwise);
        let (x, g) = (host(arg)?, host(grad)?);
        let mut dx = vec![0f32; x.len()];
        let t = per_task(self.weight.len());
        dx.par_chunks_mut(t)
            .zip(x.par_chunks(t).zip(g.par_chunks(t)))
            .for_each(|(dc, (xc, gc))| self.backward_rows(xc, gc, dc));
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
        let head = |(xh, yh): (&[f32], &mut [f32])| {
            for t in 0..len {
                let (c, s) = (&self.cos[t * half..][..half], &self.sin[t * half..][..half]);
                let (xr, yr) = (&xh[t * hd..][..hd], &mut yh[t * hd..][..hd]);
                for d in 0..half {
                    let (a, b, sn) = (xr[d], xr[d + half], self.sign * s[d]);
                    yr[d] = a * c[d] - b * sn;
                    yr[d + half] = b * c[d] + a * sn;
                }
            }
        };
        x.par_chunks(len * hd)
            .zip(y.par_chunks_mut(len * hd))
            .for_each(head);
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
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdElementwise);
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
    1.0 / (1.0 + exp(-v))
}

const ELEMS_PER_TASK: usize = 16_384;

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
        let n = ELEMS_PER_TASK;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(n)
            .zip(g.par_chunks(n).zip(u.par_chunks(n)))
            .for_each(|(yc, (gc, uc))| {
                for ((o, g), u) in yc.iter_mut().zip(gc).zip(uc) {
                    *o = g * sigmoid(*g) * u;
                }
            });
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
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdElementwise);
        let (g, u, d) = (host(gate)?, host(up)?, host(grad)?);
        let n = ELEMS_PER_TASK;
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(n)
            .zip(du.par_chunks_mut(n))
            .zip(g.par_chunks(n).zip(u.par_chunks(n)).zip(d.par_chunks(n)))
            .for_each(|((dgc, duc), ((gc, uc), dc))| {
                for i in 0..gc.len() {
                    let s = sigmoid(gc[i]);
                    dgc[i] = dc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                    duc[i] = dc[i] * gc[i] * s;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// `softmax(scale · s + causal mask)` over the last dimension of scores `[b, rows, total]`, row
/// `r` being query `r % len` (the group's heads are folded into the rows) at position
/// `total − len + r % len`, which sees keys `0 ..= position`.
struct CausalSoftmax {
    scale: f32,
    len: usize,
}

impl CausalSoftmax {
    /// Rows `first ..` of the scores.
    fn forward_rows(&self, first: usize, x: &[f32], p: &mut [f32], total: usize) {
        for (i, (xr, pr)) in x
            .chunks_exact(total)
            .zip(p.chunks_exact_mut(total))
            .enumerate()
        {
            let seen = total - self.len + (first + i) % self.len + 1;
            let max = xr[..seen]
                .iter()
                .fold(f32::NEG_INFINITY, |m, v| m.max(v * self.scale));
            let mut sum = 0f32;
            for (o, v) in pr[..seen].iter_mut().zip(&xr[..seen]) {
                *o = exp(v * self.scale - max);
                sum += *o;
            }
            let inv = 1.0 / sum;
            pr[..seen].iter_mut().for_each(|o| *o *= inv);
        }
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax-trainable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let total = *l.shape().dims().last().expect("scores");
        let mut p = vec![0f32; x.len()];
        let t = per_task(total);
        p.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .enumerate()
            .for_each(|(c, (pc, xc))| self.forward_rows(c * t / total, xc, pc, total));
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    /// `ds = scale · p ⊙ (dp − Σ dp⊙p)` per row (masked entries have p = 0).
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdElementwise);
        let (p, g) = (host(res)?, host(grad)?);
        let total = *arg.dims().last().expect("scores");
        let mut ds = vec![0f32; p.len()];
        let t = per_task(total);
        ds.par_chunks_mut(t)
            .zip(p.par_chunks(t).zip(g.par_chunks(t)))
            .for_each(|(dc, (pc, gc))| {
                for ((pr, gr), dr) in pc
                    .chunks_exact(total)
                    .zip(gc.chunks_exact(total))
                    .zip(dc.chunks_exact_mut(total))
                {
                    let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p * g).sum();
                    for ((d, p), g) in dr.iter_mut().zip(pr).zip(gr) {
                        *d = self.scale * p * (g - dot);
                    }
                }
            });
        Ok(Some(Tensor::from_vec(ds, arg.shape(), arg.device())?))
    }
}

/// Causal attention weights from raw scores `[b, group · len, total]` (see `CausalSoftmax`).
pub fn causal_softmax(scores: &Tensor, scale: f64, len: usize) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        len,
    })
}

/// Mean cross-entropy of logits `[n, vocab]` against `targets`: `mean(logsumexp(row) −
/// row[target])`; its derivative `(softmax(row) − onehot(target)) / n`.
struct CrossEntropy {
    targets: Vec<u32>,
}

impl CrossEntropy {
    /// Each row's max and `Σ exp(x − max)`.
    fn row_stats(row: &[f32]) -> (f32, f32) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        (max, row.iter().map(|v| exp(v - max)).sum())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-trainable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (n, vocab) = l.shape().dims2()?;
        if n != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: targets do not fit the logits");
        }
        let total: f64 = x
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let (max, sum) = Self::row_stats(row);
                (max + sum.ln() - row[t as usize]) as f64
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdElementwise);
        let x = host(arg)?;
        let (n, vocab) = arg.dims2()?;
        let g = grad.to_scalar::<f32>()? / n.max(1) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab).zip(self.targets.par_iter()))
            .for_each(|(dr, (row, &t))| {
                let (max, sum) = Self::row_stats(row);
                let inv = g / sum;
                for (d, v) in dr.iter_mut().zip(row) {
                    *d = exp(v - max) * inv;
                }
                dr[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` `[n, vocab]` (f32, CPU) against `targets` `[n]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
    })
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
    fn causal_softmax_gradient_equals_the_primitive_path() {
        // Small, and large enough to be split into tasks (rows 0.. of each task offset right).
        for (b, group, len, total) in [(2, 3, 4, 6), (2, 3, 120, 130)] {
            causal_softmax_case(b, group, len, total);
        }
    }

    fn causal_softmax_case(b: usize, group: usize, len: usize, total: usize) {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 2.0, (b, group * len, total), &dev).unwrap();
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= total - len + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, total), &dev).unwrap();
        check(
            &[scores],
            |t| causal_softmax(t[0], 0.3, len),
            |t| {
                let s = (t[0] * 0.3)?
                    .reshape((b, group, len, total))?
                    .broadcast_add(&mask)?
                    .reshape((b, group * len, total))?;
                candle_nn::ops::softmax(&s, D::Minus1)
            },
        );
    }

    #[test]
    fn cross_entropy_gradient_equals_candle_nn() {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (5, 40), &dev).unwrap();
        let targets = [3u32, 0, 39, 17, 17];
        let t = Tensor::new(&targets[..], &dev).unwrap();
        check(
            &[logits],
            |x| cross_entropy(x[0], &targets),
            |x| candle_nn::loss::cross_entropy(x[0], &t),
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
