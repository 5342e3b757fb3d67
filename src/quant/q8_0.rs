//! GGUF Q8_0 weights served as stored (the default model's tied embedding / lm_head), with
//! integer dot products against activations quantized to 8 bits (`int8.rs`).
//!
//! Q8_0 (ggml): blocks of 32 `i8` values with one f16 scale `d`. Repacked at load into tiles of 16
//! output rows × one block, `[group of 4 values (8)][row (16)][4 bytes]`, so one 64-byte load
//! feeds 16 rows × 4 values. AVX-512 VNNI's `vpdpbusd` multiplies unsigned by signed bytes: the
//! weights are flipped to `w + 128` on the fly (xor 0x80) and `128 · Σ xq` is subtracted per
//! block. AVX2 takes `|w|` and moves the sign onto the activation (`psignb`), so `pmaddubsw`
//! cannot saturate. The block's sum is exact in integers either way.

use half::f16;

use super::int8::{self, broadcast4, Acc, Activations, RowOrder, QK, TILE};

/// Bytes of one GGUF Q8_0 block.
pub const BLOCK_BYTES: usize = 34;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tile {
    qs: [i8; 512],
    d: [u16; TILE],
}

/// A Q8_0 weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q80Weight {
    rows: usize,
    cols: usize,
    tiles: Vec<Tile>,
}

impl Q80Weight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q8_0", data, (rows, cols), QK, BLOCK_BYTES)?;
        let empty = Tile {
            qs: [0; 512],
            d: [0; TILE],
        };
        let tiles = int8::build_tiles(
            data,
            rows,
            kb,
            BLOCK_BYTES,
            order,
            &empty,
            |tile, lane, block| {
                tile.d[lane] = u16::from_le_bytes([block[0], block[1]]);
                for g in 0..8 {
                    for j in 0..4 {
                        tile.qs[g * 64 + lane * 4 + j] = block[2 + 4 * g + j] as i8;
                    }
                }
            },
        );
        Ok(Self { rows, cols, tiles })
    }

    /// Rows `ids` as f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let kb = self.cols / QK;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &r) in ids.iter().enumerate() {
            let r = r as usize;
            let (t, lane) = (r / TILE, r % TILE);
            for b in 0..kb {
                let tile = &self.tiles[t * kb + b];
                let d = f16::from_bits(tile.d[lane]).to_f32();
                for g in 0..8 {
                    for j in 0..4 {
                        out[o * self.cols + b * QK + 4 * g + j] =
                            d * tile.qs[g * 64 + lane * 4 + j] as f32;
                    }
                }
            }
        }
        out
    }
}

int8::tile_weight!(Q80Weight, Tile);

fn portable(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    for (b, tile) in tiles.iter().enumerate() {
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            let xq = &act.row(i + r)[b * QK..(b + 1) * QK];
            let (xd, _) = act.scale(i + r, b);
            for lane in 0..TILE {
                let mut isum = 0i32;
                for g in 0..8 {
                    for j in 0..4 {
                        isum += tile.qs[g * 64 + lane * 4 + j] as i32 * xq[4 * g + j] as i32;
                    }
                }
                let d = f16::from_bits(tile.d[lane]).to_f32();
                acc_r[lane] += isum as f32 * (d * xd);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let flip = _mm512_set1_epi8(-128);
    let mut facc = [_mm512_setzero_ps(); 4];
    let xrows: [&[i8]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, tile) in tiles.iter().enumerate() {
        let mut isum = [_mm512_setzero_si512(); 4];
        for g in 0..8 {
            let w = _mm512_xor_si512(
                _mm512_loadu_si512(tile.qs.as_ptr().add(g * 64) as *const _),
                flip,
            );
            for r in 0..rows {
                let x = _mm512_set1_epi32(broadcast4(xrows[r], b * QK + 4 * g));
                isum[r] = _mm512_dpbusd_epi32(isum[r], w, x);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        for r in 0..rows {
            let (xd, _) = act.scale(i + r, b);
            // Σ (w + 128)·x − 128·Σ x = Σ w·x.
            let exact = _mm512_sub_epi32(isum[r], _mm512_set1_epi32(128 * act.sum(i + r, b)));
            facc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(exact),
                _mm512_mul_ps(d, _mm512_set1_ps(xd)),
                facc[r],
            );
        }
    }
    for r in 0..rows {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut facc = [[_mm256_setzero_ps(); 2]; 4];
    let xrows: [&[i8]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, tile) in tiles.iter().enumerate() {
        let mut isum = [[_mm256_setzero_si256(); 2]; 4];
        for g in 0..8 {
            for h in 0..2 {
                let w = _mm256_loadu_si256(tile.qs.as_ptr().add(g * 64 + h * 32) as *const _);
                let aw = _mm256_sign_epi8(w, w);
                for r in 0..rows {
                    let x = _mm256_set1_epi32(broadcast4(xrows[r], b * QK + 4 * g));
                    let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
                    isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(h * 8) as *const _));
            for r in 0..rows {
                let (xd, _) = act.scale(i + r, b);
                facc[r][h] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[r][h]),
                    _mm256_mul_ps(d, _mm256_set1_ps(xd)),
                    facc[r][h],
                );
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
    use crate::quant::int8::checks;

    fn random_q8_0(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_add(99);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 1000.0 * 0.002);
            out.extend_from_slice(&d.to_bits().to_le_bytes());
            // Include the extremes -128 and 127.
            for k in 0..32 {
                out.push(match k {
                    0 => 0x80,
                    1 => 0x7F,
                    _ => (next() & 0xFF) as u8,
                });
            }
        }
        out
    }

    #[test]
    fn matches_dequantized_matmul_within_the_activation_rounding_bound() {
        for (rows, cols) in [(16, 32), (37, 64), (100, 96), (49, 576)] {
            let w =
                Q80Weight::from_gguf(&random_q8_0(rows, cols, rows as u64), rows, cols).unwrap();
            checks::within_rounding_bound(&w);
        }
    }

    #[test]
    fn simd_and_portable_paths_agree() {
        let (rows, cols) = (45, 320);
        checks::simd_matches_portable(
            &Q80Weight::from_gguf(&random_q8_0(rows, cols, 5), rows, cols).unwrap(),
        );
    }

    #[test]
    fn rows_are_independent_of_the_batch() {
        let (rows, cols) = (1000, 576);
        checks::rows_are_independent(
            &Q80Weight::from_gguf(&random_q8_0(rows, cols, 5), rows, cols).unwrap(),
        );
    }
}
