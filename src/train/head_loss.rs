//! The training loss through the frozen `lm_head`, in chunks of rows: mean cross-entropy of
//! `h · Wᵀ` against the targets, without ever holding a `rows × vocab` logits tensor (at the
//! default model's 49,152-token vocabulary that is 196 KB a row: a batch of 64 examples of 500
//! tokens held 6 GB of logits and as much again for their gradient). The forward keeps only the
//! loss; the backward recomputes each chunk's logits and turns `(softmax − onehot) / n` into
//! `dL/dh = dlogits · W` with the weight dequantized once. Depends on `model` (the `Linear`).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::Linear;
use crate::ops::vexp::exp;

/// Rows whose logits exist at once: 128 × 49,152 × 4 bytes = 25 MB on the default model.
pub const CHUNK_ROWS: usize = 128;

struct HeadCrossEntropy {
    head: Linear,
    targets: Vec<u32>,
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

impl HeadCrossEntropy {
    /// The logits of rows `start..start + len` of `h` (`[n, hidden]`), on the host.
    fn logits(&self, h: &Tensor, start: usize, len: usize) -> Result<Vec<f32>> {
        let x = h.narrow(0, start, len)?.contiguous()?;
        self.head
            .forward(&x)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()
    }

    fn vocab(&self) -> Result<usize> {
        Ok(self.head.base().dims()?.0)
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hidden) = l.shape().dims2()?;
        let vocab = self.vocab()?;
        if n != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!("head cross-entropy: targets do not fit the rows");
        }
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("head cross-entropy: not contiguous".into()))?;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("head cross-entropy: f32 only");
        };
        let h = Tensor::from_slice(&v[a..b], (n, hidden), &candle_core::Device::Cpu)?;
        let mut total = 0f64;
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let mut logits = self.logits(&h, start, len)?;
            total += logits
                .par_chunks_mut(vocab)
                .zip(self.targets[start..start + len].par_iter())
                .map(|(row, &t)| row_loss(row, t as usize, None))
                .sum::<f64>();
        }
        Ok((
            CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, _) = arg.dims2()?;
        let vocab = self.vocab()?;
        let g = grad.to_scalar::<f32>()? / n.max(1) as f32;
        let h = arg.detach().contiguous()?;
        let weight = self
            .head
            .base()
            .dense()?
            .to_dtype(candle_core::DType::F32)?;
        let mut pieces = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let mut logits = self.logits(&h, start, len)?;
            logits
                .par_chunks_mut(vocab)
                .zip(self.targets[start..start + len].par_iter())
                .for_each(|(row, &t)| {
                    row_loss(row, t as usize, Some(g));
                });
            let dlogits = Tensor::from_vec(logits, (len, vocab), arg.device())?;
            pieces.push(dlogits.matmul(&weight)?);
        }
        Ok(Some(Tensor::cat(&pieces, 0)?))
    }
}

/// Mean cross-entropy of `head(h)` (`h`: `[n, hidden]`, f32 on the CPU) against `targets`,
/// differentiable in `h`.
pub fn head_cross_entropy(h: &Tensor, head: &Linear, targets: &[u32]) -> Result<Tensor> {
    h.contiguous()?.apply_op1(HeadCrossEntropy {
        head: head.clone(),
        targets: targets.to_vec(),
    })
}
