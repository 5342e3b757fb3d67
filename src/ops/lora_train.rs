//! A LoRA projection for training as one candle node: `y = x·Wᵀ + (drop(x)·Aᵀ)·(s·B)ᵀ`, with
//! W frozen and the backward written out. Built from separate candle ops the same site took a
//! dropout copy, two thin matmuls with transposed copies, an add, and in the backward a
//! zero-filled buffer plus an add for every tensor that had a gradient; a general gemm runs
//! the thin products (one side of rank r ≤ 64) at a few GFLOP/s. Here the base products go
//! through [`Frozen`], and everything of rank r runs row by row in one pass: the forward keeps
//! each row's `h = drop(x)·Aᵀ` and the dropout mask (one bit an element) for the backward,
//! which then reads each row of `x` and of the gradient once for `dx`, `dAᵀ` and `d(sB)ᵀ`.
//! The rank-r parts do not depend on the thread count (the weight gradients sum fixed bands of
//! rows in order); the frozen products are the gemm's. Depends on candle only.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A frozen `[out, in]` weight as the two products training needs, on host rows.
pub trait Frozen: Send + Sync {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// `y[n, out] = x[n, in] · Wᵀ`.
    fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>>;
    /// `dx[n, in] = g[n, out] · W`.
    fn backward(&self, g: &[f32], n: usize) -> Result<Vec<f32>>;
}

/// The dropout on the LoRA branch's input, a pure function of the element's index in the
/// row-major `[n, in]` input (so a resumed run draws the same masks).
pub trait Mask: Send + Sync {
    /// `1 / (1 - p)`: what kept elements are multiplied by.
    fn scale(&self) -> f32;
    /// Bit `b` of `bits[w]` set where element `first + 64·w + b` is kept (`first` a multiple
    /// of 64).
    fn fill(&self, first: usize, bits: &mut [u64]);
}

/// What the forward leaves for the backward.
#[derive(Default)]
struct Saved {
    /// `A` (`[r, in]`) and `Bᵀ` (`[r, out]`), row-major.
    a: Vec<f32>,
    bt: Vec<f32>,
    /// `drop(x)·Aᵀ`, `[n, r]`.
    h: Vec<f32>,
    /// The kept elements of `x`, one bit each (empty without dropout).
    bits: Vec<u64>,
}

struct LoraTrain {
    base: Arc<dyn Frozen>,
    mask: Option<Arc<dyn Mask>>,
    saved: Mutex<Saved>,
}

/// A matrix argument as a contiguous row-major copy of `[rows, cols]` (`A` from `Aᵀ`, `Bᵀ`):
/// at most r × 8,192 values.
fn rows_of(s: &CpuStorage, l: &Layout, transpose: bool) -> Result<(Vec<f32>, usize, usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lora-train: adapter weights must be f32");
    };
    let (r, c) = l.shape().dims2()?;
    let (rs, cs) = match l.stride() {
        [a, b] => (*a, *b),
        _ => candle_core::bail!("lora-train: adapter weights must be matrices"),
    };
    let at = |i: usize, j: usize| v[l.start_offset() + i * rs + j * cs];
    Ok(if transpose {
        (
            (0..c)
                .flat_map(|j| (0..r).map(move |i| (i, j)))
                .map(|(i, j)| at(i, j))
                .collect(),
            c,
            r,
        )
    } else {
        (
            (0..r)
                .flat_map(|i| (0..c).map(move |j| (i, j)))
                .map(|(i, j)| at(i, j))
                .collect(),
            r,
            c,
        )
    })
}

/// Runs `f` on `t`'s values (f32, CPU) in row-major order, borrowed from its storage (copied
/// only where `t` is not contiguous).
fn borrowed<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora-train: not contiguous".into()))?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => f(&v[a..b]),
        _ => candle_core::bail!("lora-train: f32 CPU tensors only"),
    }
}

/// Row-wise kernels, compiled twice: portable and with AVX2 + FMA (the same code; the
/// compiler vectorizes the inner loops over independent lanes). `FMA` fuses multiply-adds,
/// only where the CPU has the instruction (elsewhere `mul_add` is a slow library call).
mod rows {
    const LANES: usize = 16;

    /// `a · b + c`.
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    #[inline(always)]
    pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..LANES {
                acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
            }
        }
        let mut tail = 0f32;
        for (x, y) in ra.iter().zip(rb) {
            tail = madd::<FMA>(*x, *y, tail);
        }
        acc.iter().sum::<f32>() + tail
    }

    /// `y += a · x`.
    #[inline(always)]
    pub fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
        for (o, v) in y.iter_mut().zip(x) {
            *o = madd::<FMA>(*v, a, *o);
        }
    }

    /// `out[k] = x[k] · scale` where bit `first + k` is set, else 0.
    #[inline(always)]
    pub fn masked(out: &mut [f32], x: &[f32], bits: &[u64], first: usize, scale: f32) {
        for (k, (o, v)) in out.iter_mut().zip(x).enumerate() {
            let i = first + k;
            let keep = (bits[i >> 6] >> (i & 63)) & 1;
            *o = v * (keep as f32 * scale);
        }
    }

    /// What a band of rows reads in the forward: its first row's index in the batch, its rows
    /// of `x`, `A` (`[r, in]`), `Bᵀ` (`[r, out]`), the mask bits with the keep scale, and
    /// `(in, out, r)`.
    #[derive(Clone, Copy)]
    pub struct Fwd<'a> {
        pub first_row: usize,
        pub x: &'a [f32],
        pub a: &'a [f32],
        pub bt: &'a [f32],
        pub mask: Option<(&'a [u64], f32)>,
        pub dims: (usize, usize, usize),
    }

    /// What a band of rows reads in the backward: as [`Fwd`], plus its rows of the output's
    /// gradient `g` and of the saved `h`.
    #[derive(Clone, Copy)]
    pub struct Bwd<'a> {
        pub f: Fwd<'a>,
        pub g: &'a [f32],
        pub h: &'a [f32],
    }

    /// Forward of rows: `h_i = drop(x_i)·Aᵀ`, `y_i += h_i · Bᵀ`.
    #[inline(always)]
    pub fn forward<const FMA: bool>(f: Fwd<'_>, y: &mut [f32], h: &mut [f32]) {
        let Fwd {
            first_row,
            x,
            a,
            bt,
            mask,
            dims: (inp, out, r),
        } = f;
        let mut xd = vec![0f32; if mask.is_some() { inp } else { 0 }];
        for (i, ((x, y), h)) in x
            .chunks_exact(inp)
            .zip(y.chunks_exact_mut(out))
            .zip(h.chunks_exact_mut(r))
            .enumerate()
        {
            let x = match mask {
                Some((bits, scale)) => {
                    masked(&mut xd, x, bits, (first_row + i) * inp, scale);
                    &xd[..]
                }
                None => x,
            };
            for (j, hj) in h.iter_mut().enumerate() {
                *hj = dot::<FMA>(x, &a[j * inp..(j + 1) * inp]);
            }
            for (j, hj) in h.iter().enumerate() {
                axpy::<FMA>(y, *hj, &bt[j * out..(j + 1) * out]);
            }
        }
    }

    /// Backward of rows: `gh_i = g_i · (sB)`, `dx_i += drop'(gh_i · A)`, and the band's
    /// `dA += gh_iᵀ drop(x_i)`, `d(sB)ᵀ += h_iᵀ g_i` (`da`: `[r, in]`, `dbt`: `[r, out]`).
    #[inline(always)]
    pub fn backward<const FMA: bool>(
        b: Bwd<'_>,
        mut dx: Option<&mut [f32]>,
        (da, dbt): (&mut [f32], &mut [f32]),
    ) {
        let Bwd { f, g, h } = b;
        let Fwd {
            first_row,
            x,
            a,
            bt,
            mask,
            dims: (inp, out, r),
        } = f;
        let rows = h.len() / r.max(1);
        let mut xd = vec![0f32; BLOCK * inp];
        let mut t = vec![0f32; inp];
        let mut gh = vec![0f32; BLOCK * r];
        for b0 in (0..rows).step_by(BLOCK) {
            let nb = BLOCK.min(rows - b0);
            // The block's rows of drop(x), and gh = g · (sB).
            for u in 0..nb {
                let (i, row) = (b0 + u, first_row + b0 + u);
                let xr = &x[i * inp..(i + 1) * inp];
                let dst = &mut xd[u * inp..(u + 1) * inp];
                match mask {
                    Some((bits, scale)) => masked(dst, xr, bits, row * inp, scale),
                    None => dst.copy_from_slice(xr),
                }
                let gr = &g[i * out..(i + 1) * out];
                for j in 0..r {
                    gh[u * r + j] = dot::<FMA>(gr, &bt[j * out..(j + 1) * out]);
                }
            }
            // dA_j += Σ_u gh_uj · drop(x_u), d(sB)ᵀ_j += Σ_u h_uj · g_u: each accumulator
            // row is read and written once per block, not once per row.
            let coef = |c: &[f32], j: usize| -> [f32; BLOCK] {
                std::array::from_fn(|u| if u < nb { c[u * r + j] } else { 0.0 })
            };
            let hb = &h[b0 * r..(b0 + nb) * r];
            for j in 0..r {
                let xs: [&[f32]; BLOCK] =
                    std::array::from_fn(|u| &xd[u.min(nb - 1) * inp..][..inp]);
                axpy4::<FMA>(&mut da[j * inp..(j + 1) * inp], coef(&gh, j), xs);
                let gs: [&[f32]; BLOCK] =
                    std::array::from_fn(|u| &g[(b0 + u.min(nb - 1)) * out..][..out]);
                axpy4::<FMA>(&mut dbt[j * out..(j + 1) * out], coef(hb, j), gs);
            }
            let Some(dx) = dx.as_deref_mut() else {
                continue;
            };
            for u in 0..nb {
                let (i, row) = (b0 + u, first_row + b0 + u);
                let dx = &mut dx[i * inp..(i + 1) * inp];
                let ghu = &gh[u * r..(u + 1) * r];
                match mask {
                    None => {
                        for j in 0..r {
                            axpy::<FMA>(dx, ghu[j], &a[j * inp..(j + 1) * inp]);
                        }
                    }
                    Some((bits, scale)) => {
                        t.iter_mut().for_each(|v| *v = 0.0);
                        for j in 0..r {
                            axpy::<FMA>(&mut t, ghu[j], &a[j * inp..(j + 1) * inp]);
                        }
                        let tmp = &mut xd[u * inp..(u + 1) * inp];
                        masked(tmp, &t, bits, row * inp, scale);
                        dx.iter_mut().zip(tmp.iter()).for_each(|(o, v)| *o += v);
                    }
                }
            }
        }
    }

    /// Rows the backward takes together.
    const BLOCK: usize = 4;

    /// `y += Σ_u c_u · x_u`.
    #[inline(always)]
    fn axpy4<const FMA: bool>(y: &mut [f32], c: [f32; BLOCK], x: [&[f32]; BLOCK]) {
        let n = y.len();
        let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
        for k in 0..n {
            let acc = madd::<FMA>(x0[k], c[0], y[k]);
            let acc = madd::<FMA>(x1[k], c[1], acc);
            let acc = madd::<FMA>(x2[k], c[2], acc);
            y[k] = madd::<FMA>(x3[k], c[3], acc);
        }
    }
}

/// The row kernels with AVX2 + FMA (the same code, vectorized by the compiler).
#[cfg(target_arch = "x86_64")]
mod rows_avx2 {
    use super::rows::{Bwd, Fwd};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward(f: Fwd<'_>, y: &mut [f32], h: &mut [f32]) {
        super::rows::forward::<true>(f, y, h)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward(b: Bwd<'_>, dx: Option<&mut [f32]>, grads: (&mut [f32], &mut [f32])) {
        super::rows::backward::<true>(b, dx, grads)
    }
}

/// [`rows::forward`] on the fastest path this CPU has.
fn forward_rows(f: rows::Fwd<'_>, y: &mut [f32], h: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_features::avx2_fma() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { rows_avx2::forward(f, y, h) };
    }
    rows::forward::<false>(f, y, h)
}

/// [`rows::backward`] on the fastest path this CPU has.
fn backward_rows(b: rows::Bwd<'_>, dx: Option<&mut [f32]>, grads: (&mut [f32], &mut [f32])) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_features::avx2_fma() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { rows_avx2::backward(b, dx, grads) };
    }
    rows::backward::<false>(b, dx, grads)
}

/// Rows a task takes: the weight gradients are summed per band of this many rows, bands in
/// order.
fn band_rows(n: usize) -> usize {
    n.div_ceil(16).max(64)
}

const MASK_WORDS: usize = 256;

impl CustomOp3 for LoraTrain {
    fn name(&self) -> &'static str {
        "lora-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.base.dims();
        let (n, x_in) = l1.shape().dims2()?;
        let (a, r, a_in) = rows_of(s2, l2, true)?;
        let (bt, b_r, b_out) = rows_of(s3, l3, false)?;
        if x_in != inp || a_in != inp || b_r != r || b_out != out {
            candle_core::bail!(
                "lora-train: shapes x {:?}, Aᵀ {:?}, Bᵀ {:?} for a [{out}, {inp}] weight",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (start, end) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("lora-train: x must be contiguous".into()))?;
        let CpuStorage::F32(xv) = s1 else {
            candle_core::bail!("lora-train: x must be f32");
        };
        let x = &xv[start..end];
        let mut y = self.base.forward(x, n)?;
        let mut bits = Vec::new();
        if let Some(mask) = &self.mask {
            bits = vec![0u64; (n * inp).div_ceil(64)];
            bits.par_chunks_mut(MASK_WORDS)
                .enumerate()
                .for_each(|(c, w)| mask.fill(c * MASK_WORDS * 64, w));
        }
        let scale = self.mask.as_ref().map(|m| m.scale());
        let mask = scale.map(|s| (&bits[..], s));
        let mut h = vec![0f32; n * r];
        let band = band_rows(n);
        y.par_chunks_mut(band * out)
            .zip(h.par_chunks_mut(band * r))
            .enumerate()
            .for_each(|(b, (y, h))| {
                let first = b * band;
                let x = &x[first * inp..(first + h.len() / r.max(1)) * inp];
                let f = rows::Fwd {
                    first_row: first,
                    x,
                    a: &a,
                    bt: &bt,
                    mask,
                    dims: (inp, out, r),
                };
                forward_rows(f, y, h);
            });
        *self.saved.lock().expect("lora-train state") = Saved { a, bt, h, bits };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        _b_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdLora);
        let (out, inp) = self.base.dims();
        let n = x_t.dims2()?.0;
        let r = a_t.dims2()?.1;
        let dev = x_t.device();
        // The gradient and x are read where they lie (no copy when contiguous).
        borrowed(grad, |g| {
            borrowed(x_t, |x| {
                self.backward(x_t.track_op(), x, g, (n, out, inp, r), dev)
            })
        })
    }
}

impl LoraTrain {
    /// The backward on host rows `x` (`[n, in]`) and `g` (`[n, out]`); `dx` only where
    /// `x_grad`.
    fn backward(
        &self,
        x_grad: bool,
        x: &[f32],
        g: &[f32],
        (n, out, inp, r): (usize, usize, usize, usize),
        dev: &candle_core::Device,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("lora-train state");
        let (a, bt) = (&saved.a, &saved.bt);
        if saved.h.len() != n * r {
            candle_core::bail!("lora-train: backward without its forward");
        }
        let mask = self.mask.as_ref().map(|m| (&saved.bits[..], m.scale()));
        let mut dx = if x_grad {
            Some(self.base.backward(g, n)?)
        } else {
            None
        };
        let band = band_rows(n);
        let bands = n.div_ceil(band);
        let dims = (inp, out, r);
        let mut dx_bands: Vec<Option<&mut [f32]>> = match dx.as_mut() {
            Some(dx) => dx.chunks_mut(band * inp).map(Some).collect(),
            None => (0..bands).map(|_| None).collect(),
        };
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx_bands
            .par_iter_mut()
            .enumerate()
            .map(|(b, dx)| {
                let first = b * band;
                let rows = band.min(n - first);
                let (x, g, h) = (
                    &x[first * inp..(first + rows) * inp],
                    &g[first * out..(first + rows) * out],
                    &saved.h[first * r..(first + rows) * r],
                );
                let (mut da, mut dbt) = (vec![0f32; r * inp], vec![0f32; r * out]);
                let b = rows::Bwd {
                    f: rows::Fwd {
                        first_row: first,
                        x,
                        a,
                        bt,
                        mask,
                        dims,
                    },
                    g,
                    h,
                };
                backward_rows(b, dx.as_deref_mut(), (&mut da, &mut dbt));
                (da, dbt)
            })
            .collect();
        let (mut da, mut dbt) = (vec![0f32; r * inp], vec![0f32; r * out]);
        for (pa, pb) in &partial {
            da.iter_mut().zip(pa).for_each(|(o, v)| *o += v);
            dbt.iter_mut().zip(pb).for_each(|(o, v)| *o += v);
        }
        drop(dx_bands);
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, (n, inp), dev))
                .transpose()?,
            Some(Tensor::from_vec(da, (r, inp), dev)?.t()?),
            Some(Tensor::from_vec(dbt, (r, out), dev)?),
        ))
    }
}

/// `x·Wᵀ + (drop(x)·a_t)·b_t` for `x` `[n, in]` (f32, CPU), `a_t` `[in, r]`, `b_t` `[r, out]`
/// (any strides), differentiable in all three; W frozen.
pub fn lora_train(
    x: &Tensor,
    a_t: &Tensor,
    b_t: &Tensor,
    base: Arc<dyn Frozen>,
    mask: Option<Arc<dyn Mask>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_arc(
        a_t,
        b_t,
        Arc::new(Box::new(LoraTrain {
            base,
            mask,
            saved: Mutex::new(Saved::default()),
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    struct Dense(Tensor);

    impl Frozen for Dense {
        fn dims(&self) -> (usize, usize) {
            self.0.dims2().expect("a matrix")
        }
        fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
            let w: Vec<f32> = self.0.flatten_all()?.to_vec1()?;
            Ok(crate::ops::gemm::matmul_wt(&w, self.dims(), x, n))
        }
        fn backward(&self, g: &[f32], n: usize) -> Result<Vec<f32>> {
            let w: Vec<f32> = self.0.flatten_all()?.to_vec1()?;
            Ok(crate::ops::gemm::matmul_w(&w, self.dims(), g, n))
        }
    }

    /// Keeps elements whose index is not a multiple of 3 (a mask the test can rebuild).
    struct EveryThird;

    impl Mask for EveryThird {
        fn scale(&self) -> f32 {
            1.5
        }
        fn fill(&self, first: usize, bits: &mut [u64]) {
            for (w, word) in bits.iter_mut().enumerate() {
                *word = (0..64).fold(0, |acc, b| {
                    acc | (((first + w * 64 + b) % 3 != 0) as u64) << b
                });
            }
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Output and all three gradients against the same site built from candle's own ops,
    /// at odd shapes (rows not a multiple of a band or of 16, widths not of 64), with and
    /// without dropout, with `x` tracked or not.
    #[test]
    fn equals_candle_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (n, out, inp, r, dropout, track_x) in [
            (5usize, 7usize, 9usize, 2usize, false, true),
            (70, 33, 130, 8, true, true),
            (300, 64, 96, 16, true, false),
            (131, 20, 45, 4, false, true),
        ] {
            let w = (Tensor::randn(0f32, 1.0, (out, inp), &dev)? * 0.1)?;
            let xv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev)?)?;
            let a = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (r, inp), &dev)? * 0.2)?)?;
            let b = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (out, r), &dev)? * 0.2)?)?;
            let up = Tensor::randn(0f32, 1.0, (n, out), &dev)?;
            let x = if track_x {
                xv.as_tensor().clone()
            } else {
                xv.as_tensor().detach()
            };
            let a_t = a.as_tensor().t()?;
            let b_t = (b.as_tensor() * 0.5)?.t()?;
            let mask: Option<Arc<dyn Mask>> = dropout.then(|| Arc::new(EveryThird) as _);
            let fused = lora_train(&x, &a_t, &b_t, Arc::new(Dense(w.clone())), mask)?;
            let xd = if dropout {
                let m: Vec<f32> = (0..n * inp)
                    .map(|i| if i % 3 != 0 { 1.5 } else { 0.0 })
                    .collect();
                (&x * Tensor::from_vec(m, (n, inp), &dev)?)?
            } else {
                x.clone()
            };
            let plain = (x.matmul(&w.t()?)? + xd.matmul(&a_t)?.matmul(&b_t)?)?;
            assert!(max_diff(&fused, &plain) < 1e-4, "forward {n}x{out}x{inp}");
            let g1 = (&fused * &up)?.sum_all()?.backward()?;
            let g2 = (&plain * &up)?.sum_all()?.backward()?;
            for (name, v) in [("x", &xv), ("A", &a), ("B", &b)] {
                match (g1.get(v.as_tensor()), g2.get(v.as_tensor())) {
                    (Some(p), Some(q)) => {
                        let scale = q.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                        assert!(
                            max_diff(p, q) <= 1e-4 * scale.max(1.0),
                            "{name} gradient, {n}x{out}x{inp} r{r}"
                        );
                    }
                    (None, None) => assert!(!track_x && name == "x"),
                    _ => panic!("{name}: a gradient on one side only"),
                }
            }
        }
        Ok(())
    }
}
