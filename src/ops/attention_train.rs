//! Causal self-attention for training as one candle node: RoPE on q and k, scores, causal
//! (and sliding-window) softmax and the weighted values for every sequence of a batch at once,
//! with the backward written out. Built per sequence from candle ops the same layer took a
//! dozen nodes (narrows, head transposes and their copies, RoPE, the cache append, two batched
//! matmuls, the softmax, the output transpose and a concatenation), each of which in the
//! backward allocated a zeroed gradient and added into it. The forward keeps the rotated q and
//! k, the output and each row's log-sum-exp; the backward recomputes the probabilities from
//! them (as FlashAttention does) instead of keeping `heads × len²` of them. Sequences start at
//! position 0 (no cache before them): the training forward. Depends on candle and `ops`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm_f32, Mat};
use super::rope::Rope;

/// The heads of a layer and how they score.
#[derive(Debug, Clone, Copy)]
pub struct TrainHeads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Scores are `scale · q·k`.
    pub scale: f32,
    /// Keys further back than this are not seen (Mistral's sliding window).
    pub window: Option<usize>,
}

/// What the forward leaves for the backward (its output is the node's own).
#[derive(Default)]
struct Saved {
    /// q and k after RoPE.
    q: Vec<f32>,
    k: Vec<f32>,
    /// `[heads, rows]`: each row's log-sum-exp of its scores, per head.
    lse: Vec<f32>,
}

struct AttnTrain {
    shape: TrainHeads,
    rope: Rope,
    /// Each sequence's `(first row, rows)` in the batch.
    spans: Vec<(usize, usize)>,
    saved: Mutex<Saved>,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("attention-train: {what} not contiguous"))
    })?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("attention-train: {what} must be f32"),
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// Whether key `j` is seen from query `i` (both positions in the sequence).
fn seen(i: usize, j: usize, window: Option<usize>) -> bool {
    j <= i && window.is_none_or(|w| i - j < w)
}

/// Copies `src` (`[len, hd]`) into head `head`'s columns of rows `first ..` of a row-major
/// `[rows, width]` buffer.
fn scatter(dst: &mut [f32], width: usize, src: &[f32], first: usize, head: usize, hd: usize) {
    for (i, row) in src.chunks_exact(hd).enumerate() {
        dst[(first + i) * width + head * hd..][..hd].copy_from_slice(row);
    }
}

/// One head's rows of a row-major `[rows, width]` buffer from `first`, as a `[len, hd]` view.
fn head_rows(buf: &[f32], width: usize, first: usize, head: usize, hd: usize) -> Mat<'_> {
    Mat {
        data: &buf[first * width + head * hd..],
        rs: width,
        cs: 1,
    }
}

/// A task's result: rows of one sequence for the heads of one key head.
struct Part {
    seq: usize,
    kv: usize,
    /// `[group, len, hd]` for the output, or dq in the backward.
    a: Vec<f32>,
    /// `[group, len]` log-sum-exp (forward); `[2, len, hd]` dk and dv (backward).
    b: Vec<f32>,
}

impl AttnTrain {
    fn group(&self) -> usize {
        self.shape.heads / self.shape.kv_heads
    }

    /// `scale · q kᵀ` of one head over one sequence, `[len, len]`.
    fn scores(&self, q: &[f32], k: &[f32], first: usize, len: usize, h: usize) -> Vec<f32> {
        let TrainHeads {
            heads,
            kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let mut s = vec![0f32; len * len];
        let kv = h / self.group();
        gemm_f32(
            (len, len, hd),
            &mut s,
            len,
            false,
            head_rows(q, heads * hd, first, h, hd),
            head_rows(k, kv_heads * hd, first, kv, hd).t(),
            gemm::Parallelism::None,
        );
        let scale = self.shape.scale;
        s.iter_mut().for_each(|v| *v *= scale);
        s
    }

    fn forward_part(&self, q: &[f32], k: &[f32], v: &[f32], seq: usize, kv: usize) -> Part {
        let TrainHeads {
            kv_heads,
            head_dim: hd,
            window,
            ..
        } = self.shape;
        let (first, len) = self.spans[seq];
        let group = self.group();
        let mut out = vec![0f32; group * len * hd];
        let mut lse = vec![0f32; group * len];
        for u in 0..group {
            let h = kv * group + u;
            let mut p = self.scores(q, k, first, len, h);
            for i in 0..len {
                let row = &mut p[i * len..(i + 1) * len];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in row.iter().enumerate() {
                    if seen(i, j, window) {
                        max = max.max(*s);
                    }
                }
                let mut sum = 0f32;
                for (j, s) in row.iter_mut().enumerate() {
                    *s = if seen(i, j, window) {
                        super::vexp::exp(*s - max)
                    } else {
                        0.0
                    };
                    sum += *s;
                }
                row.iter_mut().for_each(|s| *s /= sum);
                lse[u * len + i] = max + sum.ln();
            }
            gemm_f32(
                (len, hd, len),
                &mut out[u * len * hd..(u + 1) * len * hd],
                hd,
                false,
                Mat::rows(&p, len),
                head_rows(v, kv_heads * hd, first, kv, hd),
                gemm::Parallelism::None,
            );
        }
        Part {
            seq,
            kv,
            a: out,
            b: lse,
        }
    }

    fn backward_part(
        &self,
        saved: &Saved,
        v: &[f32],
        dout: &[f32],
        delta: &[f32],
        seq: usize,
        kv: usize,
    ) -> Part {
        let TrainHeads {
            heads,
            kv_heads,
            head_dim: hd,
            window,
            scale,
        } = self.shape;
        let (first, len) = self.spans[seq];
        let (group, width, rows) = (self.group(), heads * hd, self.rows());
        let mut dq = vec![0f32; group * len * hd];
        let mut dkv = vec![0f32; 2 * len * hd];
        let (dk, dv) = dkv.split_at_mut(len * hd);
        for u in 0..group {
            let h = kv * group + u;
            // P from the saved log-sum-exp.
            let mut p = self.scores(&saved.q, &saved.k, first, len, h);
            for i in 0..len {
                let l = saved.lse[h * rows + first + i];
                for (j, s) in p[i * len..(i + 1) * len].iter_mut().enumerate() {
                    *s = if seen(i, j, window) {
                        super::vexp::exp(*s - l)
                    } else {
                        0.0
                    };
                }
            }
            let d_o = head_rows(dout, width, first, h, hd);
            // dV += Pᵀ · dO
            gemm_f32(
                (len, hd, len),
                dv,
                hd,
                true,
                Mat::rows(&p, len).t(),
                d_o,
                gemm::Parallelism::None,
            );
            // dP = dO · Vᵀ, then dS = P ⊙ (dP − Δ) · scale
            let mut ds = vec![0f32; len * len];
            gemm_f32(
                (len, len, hd),
                &mut ds,
                len,
                false,
                d_o,
                head_rows(v, kv_heads * hd, first, kv, hd).t(),
                gemm::Parallelism::None,
            );
            for i in 0..len {
                let d = delta[h * rows + first + i];
                let (pr, dr) = (&p[i * len..(i + 1) * len], &mut ds[i * len..(i + 1) * len]);
                for (o, pv) in dr.iter_mut().zip(pr) {
                    *o = pv * (*o - d) * scale;
                }
            }
            // dQ = dS · K, dK += dSᵀ · Q
            gemm_f32(
                (len, hd, len),
                &mut dq[u * len * hd..(u + 1) * len * hd],
                hd,
                false,
                Mat::rows(&ds, len),
                head_rows(&saved.k, kv_heads * hd, first, kv, hd),
                gemm::Parallelism::None,
            );
            gemm_f32(
                (len, hd, len),
                dk,
                hd,
                true,
                Mat::rows(&ds, len).t(),
                head_rows(&saved.q, width, first, h, hd),
                gemm::Parallelism::None,
            );
        }
        Part {
            seq,
            kv,
            a: dq,
            b: dkv,
        }
    }

    fn rows(&self) -> usize {
        self.spans.last().map_or(0, |(s, l)| s + l)
    }

    fn tasks(&self) -> Vec<(usize, usize)> {
        (0..self.spans.len())
            .flat_map(|s| (0..self.shape.kv_heads).map(move |g| (s, g)))
            .collect()
    }

    /// Rotates (or, `inverse`, rotates back) each sequence's rows from position 0.
    fn rope(&self, rows: &mut [f32], heads: usize, inverse: bool) -> Result<()> {
        let width = heads * self.shape.head_dim;
        self.spans.iter().try_for_each(|&(first, len)| {
            self.rope.rotate_host(
                &mut rows[first * width..(first + len) * width],
                heads,
                self.shape.head_dim,
                0,
                inverse,
            )
        })
    }
}

impl CustomOp3 for AttnTrain {
    fn name(&self) -> &'static str {
        "attention-train"
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
        let TrainHeads {
            heads,
            kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let rows = self.rows();
        if l1.dims() != [rows, heads * hd]
            || l2.dims() != [rows, kv_heads * hd]
            || l3.dims() != [rows, kv_heads * hd]
        {
            candle_core::bail!(
                "attention-train: q {:?}, k {:?}, v {:?} for {rows} rows",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut q = slice(s1, l1, "q")?.to_vec();
        let mut k = slice(s2, l2, "k")?.to_vec();
        let v = slice(s3, l3, "v")?;
        self.rope(&mut q, heads, false)?;
        self.rope(&mut k, kv_heads, false)?;
        let parts: Vec<Part> = self
            .tasks()
            .into_par_iter()
            .map(|(s, g)| self.forward_part(&q, &k, v, s, g))
            .collect();
        let width = heads * hd;
        let mut out = vec![0f32; rows * width];
        let mut lse = vec![0f32; heads * rows];
        let group = self.group();
        for p in parts {
            let (first, len) = self.spans[p.seq];
            for u in 0..group {
                let h = p.kv * group + u;
                scatter(
                    &mut out,
                    width,
                    &p.a[u * len * hd..][..len * hd],
                    first,
                    h,
                    hd,
                );
                lse[h * rows + first..][..len].copy_from_slice(&p.b[u * len..][..len]);
            }
        }
        *self.saved.lock().expect("attention state") = Saved { q, k, lse };
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        v_t: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _region = super::profile::region(super::profile::Part::BwdElementwise);
        let TrainHeads {
            heads,
            kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let (rows, width, kw, group) = (self.rows(), heads * hd, kv_heads * hd, self.group());
        let saved = self.saved.lock().expect("attention state");
        if saved.lse.len() != heads * rows {
            candle_core::bail!("attention-train: backward without its forward");
        }
        let (dout, out, v) = (host(grad)?, host(res)?, host(v_t)?);
        // Δ_i = dO_i · O_i per head.
        let mut delta = vec![0f32; heads * rows];
        delta.par_chunks_mut(rows).enumerate().for_each(|(h, d)| {
            for (i, o) in d.iter_mut().enumerate() {
                let at = i * width + h * hd;
                *o = dout[at..at + hd]
                    .iter()
                    .zip(&out[at..at + hd])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        });
        let parts: Vec<Part> = self
            .tasks()
            .into_par_iter()
            .map(|(s, g)| self.backward_part(&saved, &v, &dout, &delta, s, g))
            .collect();
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; rows * width],
            vec![0f32; rows * kw],
            vec![0f32; rows * kw],
        );
        for p in parts {
            let (first, len) = self.spans[p.seq];
            for u in 0..group {
                let h = p.kv * group + u;
                scatter(
                    &mut dq,
                    width,
                    &p.a[u * len * hd..][..len * hd],
                    first,
                    h,
                    hd,
                );
            }
            let (pk, pv) = p.b.split_at(len * hd);
            scatter(&mut dk, kw, pk, first, p.kv, hd);
            scatter(&mut dv, kw, pv, first, p.kv, hd);
        }
        self.rope(&mut dq, heads, true)?;
        self.rope(&mut dk, kv_heads, true)?;
        let dev = grad.device();
        Ok((
            Some(Tensor::from_vec(dq, (rows, width), dev)?),
            Some(Tensor::from_vec(dk, (rows, kw), dev)?),
            Some(Tensor::from_vec(dv, (rows, kw), dev)?),
        ))
    }
}

/// Attention over `q` `[rows, heads·hd]`, `k`, `v` `[rows, kv_heads·hd]` (f32, CPU, before
/// RoPE), each sequence `(first row, rows)` of `spans` from position 0; returns
/// `[rows, heads·hd]`, differentiable in all three.
pub fn attention_train(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: TrainHeads,
    rope: &Rope,
    spans: Vec<(usize, usize)>,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttnTrain {
            shape,
            rope: rope.clone(),
            spans,
            saved: Mutex::new(Saved::default()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{causal_attention, Scoring};
    use candle_core::{DType, Device, Var};

    /// The same layer through the per-sequence candle path (RoPE, then `causal_attention`):
    /// output and the gradients of q, k and v, with grouped heads, several sequences of odd
    /// lengths, with and without a sliding window, and a partial rotary dimension.
    #[test]
    fn equals_the_candle_path_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (heads, kv_heads, hd, rotary, window, lens) in [
            (4usize, 2usize, 8usize, 8usize, None, vec![5usize, 1, 9]),
            (6, 3, 16, 8, Some(4), vec![13, 7]),
            (2, 2, 4, 4, None, vec![33]),
        ] {
            let spec = super::super::rope::RopeSpec {
                head_dim: hd,
                rotary_dim: rotary,
                theta: 10_000.0,
                llama3: None,
                linear: None,
                longrope: None,
            };
            let rope = Rope::of(&spec, 64, DType::F32, &dev)?;
            let rows: usize = lens.iter().sum();
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, heads * hd), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, kv_heads * hd), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, kv_heads * hd), &dev)?)?;
            let up = Tensor::randn(0f32, 1.0, (rows, heads * hd), &dev)?;
            let mut spans = Vec::new();
            let mut first = 0;
            for &len in &lens {
                spans.push((first, len));
                first += len;
            }
            let shape = TrainHeads {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
            };
            let fused = attention_train(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                shape,
                &rope,
                spans.clone(),
            )?;
            let mut outs = Vec::new();
            for &(first, len) in &spans {
                let split = |t: &Tensor, n: usize| -> Result<Tensor> {
                    t.narrow(0, first, len)?
                        .reshape((len, n, hd))?
                        .transpose(0, 1)?
                        .contiguous()
                };
                let qs = rope.apply(&split(q.as_tensor(), heads)?, 0)?;
                let ks = rope.apply(&split(k.as_tensor(), kv_heads)?, 0)?;
                let vs = split(v.as_tensor(), kv_heads)?;
                let scoring = Scoring {
                    window,
                    scale: None,
                    softcap: None,
                };
                outs.push(causal_attention(&qs, &ks, &vs, scoring)?);
            }
            let plain = Tensor::cat(&outs, 0)?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(diff(&fused, &plain)? < 1e-5, "forward, heads {heads}");
            let g1 = (&fused * &up)?.sum_all()?.backward()?;
            let g2 = (&plain * &up)?.sum_all()?.backward()?;
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (
                    g1.get(t.as_tensor()).expect("fused gradient"),
                    g2.get(t.as_tensor()).expect("plain gradient"),
                );
                assert!(
                    diff(a, b)? < 1e-4,
                    "{name} gradient, heads {heads}, window {window:?}"
                );
            }
        }
        Ok(())
    }
}
