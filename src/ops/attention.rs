//! Causal grouped-query attention of one sequence against its cached keys and values.

use candle_core::{DType, Result, Tensor, D};

/// `q`: `[heads, len, head_dim]` for positions `total - len .. total`;
/// `k`, `v`: `[kv_heads, total, head_dim]` (cache plus the new rows).
/// Returns `[len, heads * head_dim]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (heads, len, head_dim) = q.dims3()?;
    let (kv_heads, total, _) = k.dims3()?;
    let group = heads / kv_heads;
    let dtype = q.dtype();
    // Query heads of one group share a key head: fold the group into the row dimension so one
    // batched matmul per key head serves them all, with no copy of the keys.
    let qg = q.reshape((kv_heads, group * len, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (qg.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = if len > 1 {
        let offset = total - len;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, total), q.device())?;
        scores
            .reshape((kv_heads, group, len, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * len, total))?
    } else {
        scores
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let out = probs.to_dtype(dtype)?.matmul(v)?; // [kv_heads, group*len, head_dim]
    out.reshape((heads, len, head_dim))?
        .transpose(0, 1)?
        .reshape((len, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn last_row_of_prefill_equals_decode_step() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (4, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let full = causal_attention(&q, &k, &v)?;
        let last = causal_attention(&q.narrow(1, 4, 1)?.contiguous()?, &k, &v)?;
        let diff = (full.narrow(0, 4, 1)? - last)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // The first row attends to itself only: its output is exactly v[kv(h)][0].
        let first = full.narrow(0, 0, 1)?.reshape((4, 8))?;
        let v0 = v.narrow(1, 0, 1)?.squeeze(1)?;
        let expect = Tensor::stack(&[&v0.get(0)?, &v0.get(0)?, &v0.get(1)?, &v0.get(1)?], 0)?;
        let diff = (first - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
