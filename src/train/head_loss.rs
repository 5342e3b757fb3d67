//! The training loss through the frozen `lm_head`, in chunks of rows: mean cross-entropy of
//! `h · Wᵀ` against the targets, without ever holding a `rows × vocab` logits tensor (at the
//! default model's 49,152-token vocabulary that is 196 KB a row: a batch of 64 examples of 500
//! tokens held 6 GB of logits and as much again for their gradient). Where `h` tracks a
//! gradient the forward also turns each chunk's `(softmax − onehot) / n` into `dL/dh =
//! dlogits · W` while the chunk's logits are at hand, and keeps that `[n, hidden]` for the
//! backward, which only scales it: the logits are computed once, not again in the backward.
//! Depends on `model` (the `Linear`).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::Linear;
use crate::ops::gemm::matmul_w;
use crate::ops::vexp::exp;

/// Rows whose logits exist at once: 128 × 49,152 × 4 bytes = 25 MB on the default model.
pub const CHUNK_ROWS: usize = 128;

struct HeadCrossEntropy {
    head: Linear,
    targets: Vec<u32>,
    /// `dL/dh` for an upstream gradient of 1, made by the forward when `h` tracks one.
    grad: Option<Mutex<Vec<f32>>>,
}

/// Each row's `logsumexp` and, with `grad`, its `softmax − onehot(target)` scaled by `grad`.
fn row_loss(row: &mut [f32], target: usize, grad: Option<f32>) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let sum: f32 = row.iter().map(|v| exp(v - max)).sum();
    let loss = (max + sum.ln() - row[target]) as f64;
    if let Some(g) = grad {
        let inv = g / sum;
        for v in row.iter_mut() {
            *v = exp(*v - max) * inv;
        }
        row[target] -= g;
    }
    loss
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hidden) = l.shape().dims2()?;
        let vocab = self.head.base().dims()?.0;
        if n != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!("head cross-entropy: targets do not fit the rows");
        }
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("head cross-entropy: not contiguous".into()))?;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("head cross-entropy: f32 only");
        };
        let h = &v[a..b];
        let share = 1.0 / n.max(1) as f32;
        let mut dh = Vec::with_capacity(if self.grad.is_some() { n * hidden } else { 0 });
        // A quantized head is dequantized once for all chunks' `dlogits · W` (transient, as
        // the chunks' logits are), not band by band per chunk.
        let dense = match self.head.base() {
            crate::model::BaseWeight::Dense(_) => None,
            _ if self.grad.is_some() => Some(
                self.head
                    .base()
                    .dense()?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            _ => None,
        };
        let mut total = 0f64;
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let mut logits = self
                .head
                .host_forward(&h[start * hidden..(start + len) * hidden], len)?;
            let grad = self.grad.as_ref().map(|_| share);
            total += logits
                .par_chunks_mut(vocab)
                .zip(self.targets[start..start + len].par_iter())
                .map(|(row, &t)| row_loss(row, t as usize, grad))
                .sum::<f64>();
            if self.grad.is_some() {
                dh.extend(match &dense {
                    Some(w) => matmul_w(w, (vocab, hidden), &logits, len),
                    None => self.head.host_backward(&logits, len)?,
                });
            }
        }
        if let Some(slot) = &self.grad {
            *slot.lock().expect("head loss state") = dh;
        }
        Ok((
            CpuStorage::F32(vec![(total * share as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _region = crate::ops::profile::region(crate::ops::profile::Part::BwdHead);
        let g = grad.to_scalar::<f32>()?;
        let Some(slot) = &self.grad else {
            candle_core::bail!("head cross-entropy: backward of an input without a gradient");
        };
        let mut dh = std::mem::take(&mut *slot.lock().expect("head loss state"));
        if dh.len() != arg.elem_count() {
            candle_core::bail!("head cross-entropy: backward without its forward");
        }
        if g != 1.0 {
            dh.par_iter_mut().for_each(|v| *v *= g);
        }
        Ok(Some(Tensor::from_vec(dh, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of `head(h)` (`h`: `[n, hidden]`, f32 on the CPU) against `targets`,
/// differentiable in `h`.
pub fn head_cross_entropy(h: &Tensor, head: &Linear, targets: &[u32]) -> Result<Tensor> {
    h.contiguous()?.apply_op1(HeadCrossEntropy {
        head: head.clone(),
        targets: targets.to_vec(),
        grad: h.track_op().then(|| Mutex::new(Vec::new())),
    })
}
