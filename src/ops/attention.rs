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

/// A dot product in 8 independent lanes (so the compiler vectorizes it; one running sum cannot
/// be reordered).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Query rows × keys at or below which one task per sequence computes attention row by row
/// (decode steps, short prompts); above, tiles with an online softmax.
const ROW_BY_ROW_UP_TO: usize = 64 * 256;
/// Query rows and keys per tile of the tiled path.
const Q_TILE: usize = 64;
const K_TILE: usize = 256;

/// The head layout of a model's attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Causal attention on host data for one sequence: `q` `[len, heads · head_dim]` (positions
/// `total - len .. total`), `k`, `v` `[total, kv_heads · head_dim]`; writes `[len, heads ·
/// head_dim]` into `out`. The serving path on CPU: no tensor ops, no copies of the cache. Long
/// prompts go by tiles (`Q_TILE` queries × `K_TILE` keys through gemm, online softmax), so memory
/// is bounded by a tile, not by `len × total`, and tiles of different heads run in parallel.
pub fn causal_attention_host(q: &[f32], k: &[f32], v: &[f32], shape: Heads, out: &mut [f32]) {
    let len = q.len() / (shape.heads * shape.head_dim);
    let total = k.len() / (shape.kv_heads * shape.head_dim);
    if len * total <= ROW_BY_ROW_UP_TO {
        row_by_row(q, k, v, shape, out);
    } else {
        tiled(q, k, v, shape, out);
    }
}

fn tiled(q: &[f32], k: &[f32], v: &[f32], shape: Heads, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    use super::gemm::{gemm_f32, Mat};
    use rayon::prelude::*;
    let (width, kv_width) = (heads * hd, kv_heads * hd);
    let len = q.len() / width;
    let total = k.len() / kv_width;
    let offset = total - len;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..heads)
        .flat_map(|h| (0..len).step_by(Q_TILE).map(move |i0| (h, i0)))
        .collect();
    let results: Vec<(usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(h, i0)| {
            let g = h / group;
            let qt = Q_TILE.min(len - i0);
            let mut m = vec![f32::NEG_INFINITY; qt];
            let mut l = vec![0f32; qt];
            let mut o = vec![0f32; qt * hd];
            let mut s = vec![0f32; qt * K_TILE];
            let last = offset + i0 + qt - 1; // the last position this tile's queries see
            for j0 in (0..=last).step_by(K_TILE) {
                let kt = K_TILE.min(last + 1 - j0);
                // s[qt, kt] = Q[qt, hd] · K[kt, hd]ᵀ
                gemm_f32(
                    (qt, kt, hd),
                    &mut s,
                    kt,
                    false,
                    Mat::rows(&q[i0 * width + h * hd..], width),
                    Mat {
                        data: &k[j0 * kv_width + g * hd..],
                        rs: 1,
                        cs: kv_width,
                    },
                    gemm::Parallelism::None,
                );
                for a in 0..qt {
                    let row = &mut s[a * kt..(a + 1) * kt];
                    let pos = offset + i0 + a;
                    let mut max = m[a];
                    for (b, x) in row.iter_mut().enumerate() {
                        *x = if j0 + b <= pos {
                            *x * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        max = max.max(*x);
                    }
                    let factor = (m[a] - max).exp();
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    l[a] = l[a] * factor + sum;
                    m[a] = max;
                    o[a * hd..(a + 1) * hd]
                        .iter_mut()
                        .for_each(|y| *y *= factor);
                }
                // o[qt, hd] += P[qt, kt] · V[kt, hd]
                gemm_f32(
                    (qt, hd, kt),
                    &mut o,
                    hd,
                    true,
                    Mat::rows(&s, kt),
                    Mat::rows(&v[j0 * kv_width + g * hd..], kv_width),
                    gemm::Parallelism::None,
                );
            }
            for a in 0..qt {
                let inv = 1.0 / l[a];
                o[a * hd..(a + 1) * hd].iter_mut().for_each(|y| *y *= inv);
            }
            (h, i0, o)
        })
        .collect();
    for (h, i0, o) in results {
        for (a, row) in o.chunks_exact(hd).enumerate() {
            out[(i0 + a) * width + h * hd..][..hd].copy_from_slice(row);
        }
    }
}

fn row_by_row(q: &[f32], k: &[f32], v: &[f32], shape: Heads, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let width = heads * head_dim;
    let kv_width = kv_heads * head_dim;
    let len = q.len() / width;
    let total = k.len() / kv_width;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut scores = vec![0f32; total];
    for i in 0..len {
        let visible = total - len + i + 1;
        for h in 0..heads {
            let g = h / group;
            let qh = &q[i * width + h * head_dim..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(visible) {
                let kj = &k[j * kv_width + g * head_dim..][..head_dim];
                let dot = dot(qh, kj);
                *s = dot * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut().take(visible) {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[i * width + h * head_dim..][..head_dim];
            o.iter_mut().for_each(|x| *x = 0.0);
            for (j, s) in scores.iter().enumerate().take(visible) {
                let p = s / sum;
                let vj = &v[j * kv_width + g * head_dim..][..head_dim];
                for (x, y) in o.iter_mut().zip(vj) {
                    *x += p * y;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The host path (row by row for short inputs, by tiles for long prompts with earlier
    /// context in the cache, including partial last tiles) equals the tensor path.
    #[test]
    fn host_attention_equals_the_tensor_path() -> Result<()> {
        let dev = Device::Cpu;
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 8,
        };
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            t.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1()
        };
        for (len, total, tiled) in [
            (3, 7, false),
            (1, 300, false),
            (300, 333, true),
            (160, 200, true),
        ] {
            assert_eq!(len * total > ROW_BY_ROW_UP_TO, tiled);
            let q = Tensor::randn(0f32, 1.0, (shape.heads, len, shape.head_dim), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (shape.kv_heads, total, shape.head_dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (shape.kv_heads, total, shape.head_dim), &dev)?;
            let want: Vec<f32> = causal_attention(&q, &k, &v)?.flatten_all()?.to_vec1()?;
            let mut got = vec![0f32; len * shape.heads * shape.head_dim];
            causal_attention_host(&rows(&q)?, &rows(&k)?, &rows(&v)?, shape, &mut got);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "len {len} total {total}: {worst}");
        }
        Ok(())
    }

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
