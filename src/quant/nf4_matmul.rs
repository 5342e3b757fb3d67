//! `x · Wᵀ` with W in NF4, never materialising the whole dense weight: 64 output rows at a time
//! are dequantized into a small buffer (L2-sized) and multiplied with gemm, tiles in parallel.
//! The backward goes to the input only (`grad_x = grad_y · W`), tile by tile as well, so QLoRA
//! trains adapters over a frozen NF4 base.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::nf4::Nf4Weight;
use super::nf4_simd::{self, FUSED_ROWS};
use crate::ops::gemm::{gemm_f32, Mat};

const TILE: usize = 64;

/// An NF4 weight with its block scales decoded once.
#[derive(Debug, Clone)]
pub struct Nf4Linear {
    pub weight: Arc<Nf4Weight>,
    scales: Arc<Vec<f32>>,
}

impl Nf4Linear {
    pub fn new(weight: Nf4Weight) -> Self {
        let scales = Arc::new(weight.absmax.values());
        Self {
            weight: Arc::new(weight),
            scales,
        }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.weight.rows, self.weight.cols)
    }

    /// The dense weight (merging, export, the test oracle).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.weight.rows * self.weight.cols];
        self.weight
            .dequantize_rows(&self.scales, 0, self.weight.rows, &mut out);
        out
    }

    /// Dot products straight from the codes, for a few rows (decode): each weight byte is read
    /// once and never written out as a dense tile.
    fn tile_fused(&self, x: &[f32], n: usize, start: usize, rows: usize) -> Vec<f32> {
        use super::nf4::BLOCK;
        let inp = self.weight.cols;
        let mut y = vec![0f32; n * rows];
        let mut part = [0f32; FUSED_ROWS];
        for o in 0..rows {
            let at = (start + o) * inp;
            for r0 in (0..n).step_by(FUSED_ROWS) {
                let m = FUSED_ROWS.min(n - r0);
                nf4_simd::dot_row(
                    &self.weight.packed[at / 2..(at + inp) / 2],
                    &self.scales[at / BLOCK..(at + inp) / BLOCK],
                    &x[r0 * inp..(r0 + m) * inp],
                    m,
                    inp,
                    &mut part,
                );
                for (r, p) in part[..m].iter().enumerate() {
                    y[(r0 + r) * rows + o] = *p;
                }
            }
        }
        y
    }

    /// `y[n, out] = x[n, in] · Wᵀ`.
    pub fn forward_raw(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (out, inp) = self.dims();
        // A few rows (decode): fused dot products; more: dequantize a tile, then gemm.
        let fused = n <= FUSED_ROWS && inp.is_multiple_of(super::nf4::BLOCK);
        let tiles: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(TILE))
            .into_par_iter()
            .map(|t| {
                let start = t * TILE;
                let rows = TILE.min(out - start);
                if fused {
                    return (start, self.tile_fused(x, n, start, rows));
                }
                let mut w = vec![0f32; rows * inp];
                self.weight
                    .dequantize_rows(&self.scales, start, rows, &mut w);
                let mut y = vec![0f32; n * rows];
                // rhs = wᵀ: element (k, j) = w[j * inp + k].
                gemm_f32(
                    (n, rows, inp),
                    &mut y,
                    rows,
                    false,
                    Mat::rows(x, inp),
                    Mat {
                        data: &w,
                        rs: 1,
                        cs: inp,
                    },
                    gemm::Parallelism::None,
                );
                (start, y)
            })
            .collect();
        let mut y = vec![0f32; n * out];
        for (start, tile) in tiles {
            let rows = tile.len() / n.max(1);
            for r in 0..n {
                y[r * out + start..r * out + start + rows]
                    .copy_from_slice(&tile[r * rows..(r + 1) * rows]);
            }
        }
        y
    }

    /// `grad_x[n, in] = grad_y[n, out] · W`.
    pub fn backward_raw(&self, grad_y: &[f32], n: usize) -> Vec<f32> {
        let (out, inp) = self.dims();
        let mut gx = vec![0f32; n * inp];
        let mut w = vec![0f32; TILE * inp];
        for t in 0..out.div_ceil(TILE) {
            let start = t * TILE;
            let rows = TILE.min(out - start);
            self.weight
                .dequantize_rows(&self.scales, start, rows, &mut w);
            // lhs = grad_y[:, start..start+rows] (row stride out), rhs = w[rows, inp] row-major.
            gemm_f32(
                (n, inp, rows),
                &mut gx,
                inp,
                t > 0,
                Mat::rows(&grad_y[start..], out),
                Mat::rows(&w[..rows * inp], inp),
                gemm::Parallelism::None,
            );
        }
        gx
    }

    /// `x · Wᵀ` as a candle op (f32, CPU), differentiable in `x`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(Nf4Op(self.clone()))
    }
}

struct Nf4Op(Nf4Linear);

/// A contiguous f32 CPU input of a custom op (the quantized matmuls'), as a slice.
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("quantized matmul: input must be contiguous".into())
    })?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("quantized matmul: activations must be f32 (use --dtype f32)"),
    }
}

impl CustomOp1 for Nf4Op {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, inp) = l.shape().dims2()?;
        let (out, w_in) = self.0.dims();
        if inp != w_in {
            candle_core::bail!("nf4 matmul: input has {inp} features, the weight {w_in}");
        }
        let y = self.0.forward_raw(f32_slice(s, l)?, n);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, inp) = arg.dims2()?;
        let g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let gx = self.0.backward_raw(&g, n);
        Ok(Some(Tensor::from_vec(gx, (n, inp), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn dense_oracle(q: &Nf4Linear) -> Tensor {
        let (o, i) = q.dims();
        Tensor::from_vec(q.dequantize(), (o, i), &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_dequantize_then_matmul_on_odd_shapes() -> Result<()> {
        // Weights of a real model's scale (|w| ≤ 0.05) and fixed inputs, so outputs are O(1) and
        // the absolute limit measures the kernel, not f32 rounding of large sums.
        for (out, inp) in [(37usize, 70usize), (130, 96), (64, 64), (70, 128)] {
            let vals: Vec<f32> = (0..out * inp)
                .map(|i| (((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0) * 0.05)
                .collect();
            let q = Nf4Linear::new(Nf4Weight::quantize(&vals, out, inp, true));
            let w = dense_oracle(&q);
            for n in [1usize, 3, 8, 9, 32] {
                let xs: Vec<f32> = (0..n * inp)
                    .map(|i| ((i * 7919 + n) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let x = Var::from_tensor(&Tensor::from_vec(xs, (n, inp), &Device::Cpu)?)?;
                let y = q.matmul_t(x.as_tensor())?;
                let want = x.as_tensor().matmul(&w.t()?)?;
                let d = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "{out}x{inp} n={n}: {d}");
                let g = y
                    .sqr()?
                    .sum_all()?
                    .backward()?
                    .get(x.as_tensor())
                    .unwrap()
                    .clone();
                let gw = want
                    .sqr()?
                    .sum_all()?
                    .backward()?
                    .get(x.as_tensor())
                    .unwrap()
                    .clone();
                let d = (g - gw)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-3, "grad {out}x{inp} n={n}: {d}");
            }
        }
        Ok(())
    }
}
