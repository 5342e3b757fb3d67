//! bf16 projection weights with f32 activations and f32 accumulation (`--dtype bf16` on CPU):
//! half the bytes of f32 per token, and AVX-512 BF16's `vdpbf16ps` multiplies a pair of bf16
//! weights by a pair of bf16 activations per 32-bit lane.
//!
//! Weights are repacked at load into tiles of 16 output rows × 32 columns, `[pair (16)][row
//! (16)][2 values]`, so one 64-byte load feeds 16 rows × 2 columns; columns are padded with
//! zeros to a multiple of 32. Activations are rounded to bf16 once per matmul (the error against
//! f32: at most 2⁻⁹ of each |x|). Paths: AVX-512 BF16, AVX2 (widening bf16 to f32 and FMA), and
//! a portable one (also `LORAPLEX_NO_SIMD=1`), on the same tiles.

use half::bf16;

use super::int8::{matmul_tiles, Acc, QK, TILE};

/// One block of 32 columns for 16 output rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    w: [u16; 512],
}

/// A weight `[rows, cols]` in bf16, repacked.
#[derive(Clone)]
pub struct Bf16Weight {
    rows: usize,
    cols: usize,
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weight[{}, {}]", self.rows, self.cols)
    }
}

/// Activation rows rounded to bf16 and padded to whole blocks.
struct Act16 {
    cols: usize,
    x: Vec<u16>,
}

impl Act16 {
    fn new(x: &[f32], n: usize, cols: usize) -> Self {
        let padded = cols.div_ceil(QK) * QK;
        let mut out = vec![0u16; n * padded];
        for i in 0..n {
            for (o, v) in out[i * padded..]
                .iter_mut()
                .zip(&x[i * cols..(i + 1) * cols])
            {
                *o = bf16::from_f32(*v).to_bits();
            }
        }
        Self {
            cols: padded,
            x: out,
        }
    }

    fn row(&self, i: usize) -> &[u16] {
        &self.x[i * self.cols..(i + 1) * self.cols]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::ops::cpu_features::avx512_bf16() {
                return Self::Avx512Bf16;
            }
            if crate::ops::cpu_features::avx2_fma() {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut k = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::ops::cpu_features::avx2_fma() {
                k.push(Self::Avx2);
            }
            if crate::ops::cpu_features::avx512_bf16() {
                k.push(Self::Avx512Bf16);
            }
        }
        k
    }
}

impl Bf16Weight {
    /// Rounds a row-major f32 weight `[rows, cols]` to bf16 and repacks it.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "bf16 weight: shape");
        let kb = cols.div_ceil(QK);
        let empty = Tile { w: [0; 512] };
        let mut tiles = vec![empty; rows.div_ceil(TILE) * kb];
        for r in 0..rows {
            let (t, lane) = (r / TILE, r % TILE);
            for (c, v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                let (b, k) = (c / QK, c % QK);
                tiles[t * kb + b].w[(k / 2) * 32 + lane * 2 + k % 2] = bf16::from_f32(*v).to_bits();
            }
        }
        Self { rows, cols, tiles }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// The weight as f32 (the bf16 values exactly).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.cols.div_ceil(QK);
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let (t, lane) = (r / TILE, r % TILE);
            for c in 0..self.cols {
                let (b, k) = (c / QK, c % QK);
                let bits = self.tiles[t * kb + b].w[(k / 2) * 32 + lane * 2 + k % 2];
                out[r * self.cols + c] = bf16::from_bits(bits).to_f32();
            }
        }
        out
    }

    /// `x · Wᵀ` for `x` of `[n, cols]` (row-major) → `[n, rows]`.
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_t_with(x, n, Kernel::detect())
    }

    fn matmul_t_with(&self, x: &[f32], n: usize, kernel: Kernel) -> Vec<f32> {
        let act = Act16::new(x, n, self.cols);
        matmul_tiles(
            &self.tiles,
            self.rows,
            self.cols,
            n,
            4,
            &act,
            |tiles, act, i, k, acc| {
                match kernel {
                    Kernel::Portable => portable(tiles, act, i, k, acc),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: chosen only where the CPU reports the features.
                    Kernel::Avx2 => unsafe { avx2(tiles, act, i, k, acc) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Bf16 => unsafe { avx512(tiles, act, i, k, acc) },
                }
            },
        )
    }
}

fn portable(tiles: &[Tile], act: &Act16, i: usize, rows: usize, acc: &mut Acc) {
    let f = |bits: u16| bf16::from_bits(bits).to_f32();
    for (b, tile) in tiles.iter().enumerate() {
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            let x = &act.row(i + r)[b * QK..(b + 1) * QK];
            for (lane, a) in acc_r.iter_mut().enumerate() {
                let mut sum = 0f32;
                for p in 0..QK / 2 {
                    let w = &tile.w[p * 32 + lane * 2..][..2];
                    sum += f(w[0]) * f(x[2 * p]) + f(w[1]) * f(x[2 * p + 1]);
                }
                *a += sum;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512(tiles: &[Tile], act: &Act16, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let mut facc = [_mm512_setzero_ps(); 4];
    let xrows: [&[u16]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, tile) in tiles.iter().enumerate() {
        for p in 0..QK / 2 {
            let w: __m512bh =
                std::mem::transmute(_mm512_load_si512(tile.w.as_ptr().add(p * 32) as *const _));
            for r in 0..rows {
                let at = b * QK + 2 * p;
                let pair = (xrows[r][at] as u32) | ((xrows[r][at + 1] as u32) << 16);
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                facc[r] = _mm512_dpbf16_ps(facc[r], w, x);
            }
        }
    }
    for r in 0..rows {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(tiles: &[Tile], act: &Act16, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut facc = [[_mm256_setzero_ps(); 2]; 4];
    let xrows: [&[u16]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    let f = |bits: u16| f32::from_bits((bits as u32) << 16);
    for (b, tile) in tiles.iter().enumerate() {
        for p in 0..QK / 2 {
            for h in 0..2 {
                // 8 rows × (even, odd) column: the even value is the low half of each lane.
                let v = _mm256_loadu_si256(tile.w.as_ptr().add(p * 32 + h * 16) as *const _);
                let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                for r in 0..rows {
                    let at = b * QK + 2 * p;
                    let x0 = _mm256_set1_ps(f(xrows[r][at]));
                    let x1 = _mm256_set1_ps(f(xrows[r][at + 1]));
                    facc[r][h] = _mm256_fmadd_ps(even, x0, facc[r][h]);
                    facc[r][h] = _mm256_fmadd_ps(odd, x1, facc[r][h]);
                }
            }
        }
    }
    for r in 0..rows {
        for h in 0..2 {
            _mm256_storeu_ps(acc[r].as_mut_ptr().add(h * 8), facc[r][h]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + salt) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect()
    }

    #[test]
    fn matches_the_f32_product_of_its_values_within_activation_rounding() {
        // 176 columns is not a whole number of blocks (the tiny model's down projection).
        for (rows, cols) in [(16, 32), (37, 176), (100, 96), (48, 576)] {
            let w = Bf16Weight::from_f32(&values(rows * cols, 1), rows, cols);
            let dense = w.dequantize();
            for n in [1, 3, 8, 9, 32] {
                let x: Vec<f32> = values(n * cols, 7).iter().map(|v| v * 10.0).collect();
                let y = w.matmul_t(&x, n);
                for i in 0..n {
                    for r in 0..rows {
                        let (wr, xr) = (
                            &dense[r * cols..(r + 1) * cols],
                            &x[i * cols..(i + 1) * cols],
                        );
                        let exact: f64 =
                            wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        // bf16 rounding of each activation: at most 2^-9 relative.
                        let bound: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum::<f64>()
                            / 512.0;
                        let err = (y[i * rows + r] as f64 - exact).abs();
                        assert!(
                            err <= bound + 1e-5,
                            "{rows}x{cols} n={n} [{i},{r}]: {err} > {bound}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_paths_agree() {
        let (rows, cols) = (45, 320);
        let w = Bf16Weight::from_f32(&values(rows * cols, 3), rows, cols);
        for n in [1, 3, 8, 9] {
            let x = values(n * cols, 11);
            let reference = w.matmul_t_with(&x, n, Kernel::Portable);
            for k in Kernel::available() {
                let y = w.matmul_t_with(&x, n, k);
                for (a, b) in y.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{k:?} n={n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
