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

/// Where one sequence's keys and values live: blocks of `block_rows()` positions, each
/// `[rows, kv_heads · head_dim]` row-major, read as f32 (a source stored in another dtype widens
/// a block into `scratch`). A contiguous history is one block; the paged KV pool is many.
pub trait KvSource: Sync {
    /// Positions held (the cache plus this step's rows).
    fn total(&self) -> usize;
    fn block_rows(&self) -> usize;
    fn keys<'s>(&'s self, block: usize, scratch: &'s mut Vec<f32>) -> &'s [f32];
    fn values<'s>(&'s self, block: usize, scratch: &'s mut Vec<f32>) -> &'s [f32];
}

/// A history in one piece: `k`, `v` `[total, kv_heads · head_dim]`.
pub struct Contiguous<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_width: usize,
}

impl KvSource for Contiguous<'_> {
    fn total(&self) -> usize {
        self.k.len() / self.kv_width
    }
    fn block_rows(&self) -> usize {
        self.total().max(1)
    }
    fn keys<'s>(&'s self, _: usize, _: &'s mut Vec<f32>) -> &'s [f32] {
        self.k
    }
    fn values<'s>(&'s self, _: usize, _: &'s mut Vec<f32>) -> &'s [f32] {
        self.v
    }
}

/// Causal attention on host data for one sequence: `q` `[len, heads · head_dim]` (positions
/// `total - len .. total`) against the keys and values of `kv`; writes `[len, heads ·
/// head_dim]` into `out`. The serving path on CPU: no tensor ops, no copies of the cache. Long
/// prompts go by tiles (`Q_TILE` queries × `K_TILE` keys through gemm, online softmax), so memory
/// is bounded by a tile, not by `len × total`, and tiles of different heads run in parallel.
pub fn causal_attention_host(q: &[f32], kv: &dyn KvSource, shape: Heads, out: &mut [f32]) {
    let len = q.len() / (shape.heads * shape.head_dim);
    let total = kv.total();
    assert!(len <= total, "attention: more queries than positions");
    if len * total <= ROW_BY_ROW_UP_TO {
        row_by_row(q, kv, shape, out);
    } else {
        tiled(q, kv, shape, out);
    }
}

/// Copies rows `j0 .. j0 + n` of kv head `g` (keys or values) into `out` `[n, head_dim]`.
fn gather(
    kv: &dyn KvSource,
    values: bool,
    (j0, n, g, hd, kv_width): (usize, usize, usize, usize, usize),
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let bs = kv.block_rows();
    let mut j = j0;
    while j < j0 + n {
        let (b, r0) = (j / bs, j % bs);
        let take = (bs - r0).min(j0 + n - j);
        let block = if values {
            kv.values(b, scratch)
        } else {
            kv.keys(b, scratch)
        };
        for r in 0..take {
            out[(j - j0 + r) * hd..][..hd]
                .copy_from_slice(&block[(r0 + r) * kv_width + g * hd..][..hd]);
        }
        j += take;
    }
}

fn tiled(q: &[f32], kv: &dyn KvSource, shape: Heads, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    use super::gemm::{gemm_f32, Mat};
    use rayon::prelude::*;
    let width = heads * hd;
    let len = q.len() / width;
    let total = kv.total();
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
            let (mut kt_rows, mut vt_rows) = (vec![0f32; K_TILE * hd], vec![0f32; K_TILE * hd]);
            let mut scratch = Vec::new();
            let last = offset + i0 + qt - 1; // the last position this tile's queries see
            for j0 in (0..=last).step_by(K_TILE) {
                let kt = K_TILE.min(last + 1 - j0);
                let at = (j0, kt, g, hd, kv_heads * hd);
                gather(kv, false, at, &mut scratch, &mut kt_rows);
                gather(kv, true, at, &mut scratch, &mut vt_rows);
                // s[qt, kt] = Q[qt, hd] · K[kt, hd]ᵀ
                gemm_f32(
                    (qt, kt, hd),
                    &mut s,
                    kt,
                    false,
                    Mat::rows(&q[i0 * width + h * hd..], width),
                    Mat {
                        data: &kt_rows,
                        rs: 1,
                        cs: hd,
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
                    Mat::rows(&vt_rows, hd),
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

/// Query row by query row, block by block: each block of keys/values is read (and widened, if
/// stored narrower) once per query row for all heads.
fn row_by_row(q: &[f32], kv: &dyn KvSource, shape: Heads, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let (width, kv_width) = (heads * hd, kv_heads * hd);
    let len = q.len() / width;
    let total = kv.total();
    let bs = kv.block_rows();
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; heads * total];
    let mut scratch = Vec::new();
    for i in 0..len {
        let visible = total - len + i + 1;
        let blocks = visible.div_ceil(bs);
        for b in 0..blocks {
            let kb = kv.keys(b, &mut scratch);
            let n = bs.min(visible - b * bs);
            for h in 0..heads {
                let g = h / group;
                let qh = &q[i * width + h * hd..][..hd];
                let sh = &mut scores[h * total + b * bs..][..n];
                for (r, s) in sh.iter_mut().enumerate() {
                    *s = dot(qh, &kb[r * kv_width + g * hd..][..hd]) * scale;
                }
            }
        }
        for h in 0..heads {
            let sh = &mut scores[h * total..][..visible];
            let max = sh.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in sh.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            sh.iter_mut().for_each(|s| *s *= inv);
            out[i * width + h * hd..][..hd]
                .iter_mut()
                .for_each(|x| *x = 0.0);
        }
        for b in 0..blocks {
            let vb = kv.values(b, &mut scratch);
            let n = bs.min(visible - b * bs);
            for h in 0..heads {
                let g = h / group;
                let o = &mut out[i * width + h * hd..][..hd];
                for r in 0..n {
                    let p = scores[h * total + b * bs + r];
                    let vj = &vb[r * kv_width + g * hd..][..hd];
                    for (x, y) in o.iter_mut().zip(vj) {
                        *x += p * y;
                    }
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
            let (kr, vr) = (rows(&k)?, rows(&v)?);
            let kv_width = shape.kv_heads * shape.head_dim;
            causal_attention_host(
                &rows(&q)?,
                &Contiguous {
                    k: &kr,
                    v: &vr,
                    kv_width,
                },
                shape,
                &mut got,
            );
            // The same history in blocks of 7 rows (a paged cache's view) gives the same result.
            let blocks = Blocks7 {
                k: &kr,
                v: &vr,
                kv_width,
            };
            let mut paged = vec![0f32; got.len()];
            causal_attention_host(&rows(&q)?, &blocks, shape, &mut paged);
            let apart = got
                .iter()
                .zip(&paged)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(apart < 1e-5, "len {len} total {total} paged: {apart}");
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "len {len} total {total}: {worst}");
        }
        Ok(())
    }

    /// A history cut into blocks of 7 rows, each handed out through the scratch buffer (as a
    /// narrower stored dtype would be).
    struct Blocks7<'a> {
        k: &'a [f32],
        v: &'a [f32],
        kv_width: usize,
    }

    impl Blocks7<'_> {
        fn block<'s>(&self, data: &[f32], b: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
            let rows = 7.min(self.total() - b * 7);
            scratch.clear();
            scratch.extend_from_slice(&data[b * 7 * self.kv_width..][..rows * self.kv_width]);
            scratch.resize(7 * self.kv_width, f32::NAN); // rows past the end must not be read
            scratch
        }
    }

    impl KvSource for Blocks7<'_> {
        fn total(&self) -> usize {
            self.k.len() / self.kv_width
        }
        fn block_rows(&self) -> usize {
            7
        }
        fn keys<'s>(&'s self, b: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
            self.block(self.k, b, scratch)
        }
        fn values<'s>(&'s self, b: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
            self.block(self.v, b, scratch)
        }
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
