//! GGUF Q4_1 weights served as stored, with integer dot products.
//!
//! Q4_1 (ggml): blocks of 32 values along a row, `d` and `m` as f16, 16 bytes of nibbles (low
//! nibbles hold values 0..16, high nibbles 16..32); a value is `d·q + m`, `q` in 0..15.
//!
//! At load the rows are repacked into tiles of 16 output rows × one block, laid out for
//! `vpdpbusd` (AVX-512 VNNI) and `pmaddubsw` (AVX2): for each group of 8 values, 16 rows × 4
//! bytes, byte `j` holding value `j` in its low nibble and value `j + 4` in its high nibble. One
//! 64-byte load then feeds 16 rows × 8 values. The f16 scales stay f16 (320 bytes per tile,
//! exactly the Q4_1 bytes of 16 rows).
//!
//! Activations are quantized once per row and matmul to 8 bits per block of 32 (`xd = max|x| /
//! 127`, `xq = round(x / xd)`, `xs = xd · Σ xq`), so a block's dot product is
//! `d·xd·Σ q·xq + m·xs` with the sum exact in integers. The only error against
//! dequantize-then-f32-matmul is the activations' rounding: at most `xd/2 · Σ|w|` per block.
//!
//! Paths: AVX-512 VNNI, AVX2, and a portable one (also `LORAPLEX_NO_SIMD=1`), all on the same
//! packed tiles. Depends on `ops::cpu_features` and rayon only.

use half::f16;

pub use super::int8::QK;
use super::int8::{self, broadcast4, Acc, Activations, RowOrder, TILE};
/// Bytes of one GGUF Q4_1 block.
pub const BLOCK_BYTES: usize = 20;

/// One block of 32 values for 16 output rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    /// `[group of 8 values (4)][row (16)][4 bytes]`, byte j = q[8g+j] | q[8g+j+4] << 4.
    qs: [u8; 256],
    d: [u16; TILE],
    m: [u16; TILE],
}

impl Tile {
    /// No rows yet.
    pub(crate) const EMPTY: Tile = Tile {
        qs: [0; 256],
        d: [0; TILE],
        m: [0; TILE],
    };

    /// Lane `lane` (an output row): scale `d`, offset `m` (f16 bits) and 32 values below 16.
    pub(crate) fn fill(&mut self, lane: usize, d: u16, m: u16, q: &[u8; QK]) {
        self.d[lane] = d;
        self.m[lane] = m;
        pack_nibbles(&mut self.qs, lane, q);
    }
}

/// A tile in Q4_1's layout with a fifth bit per value (Q5_0, `q5_0.rs`: the value is then
/// `q + 16`) or without (Q4_1, Q4_0): the AVX-512 and portable kernels below serve both, the
/// fifth bits' work compiled away for Q4_1.
pub(crate) trait NibbleTile: Sync {
    /// Whether values carry a fifth bit.
    const FIFTH: bool;
    fn nibbles(&self) -> &Tile;
    /// Group `g` (8 values): bit `4·lane + j` of `[0]` set where value `j` of row `lane` has
    /// its fifth bit, of `[1]` where value `j + 4` has (the byte order of `Tile::qs`).
    fn fifth(&self, g: usize) -> [u64; 2];
}

impl NibbleTile for Tile {
    const FIFTH: bool = false;
    fn nibbles(&self) -> &Tile {
        self
    }
    fn fifth(&self, _g: usize) -> [u64; 2] {
        [0, 0]
    }
}

/// One 32-value block's fifth bits for 16 rows (Q5_0's block, a Q5_K sub-block), in the byte
/// order of `Tile::qs`: `[group of 8][low, high nibbles]`, bit `4·lane + j` for value `j` (low)
/// or `j + 4` (high) of the group.
pub(crate) type FifthBits = [[u64; 2]; 4];

/// Sets value `v`'s (0..32) fifth bit of row `lane`.
pub(crate) fn put_fifth(bits: &mut FifthBits, lane: usize, v: usize, set: bool) {
    bits[v / 8][(v % 8) / 4] |= (set as u64) << (4 * lane + v % 4);
}

/// Value `v`'s (0..32) fifth bit of row `lane` as its weight, 0 or 16; `group` is `bits[v / 8]`.
pub(crate) fn fifth_weight(group: [u64; 2], lane: usize, v: usize) -> u8 {
    (((group[(v % 8) / 4] >> (4 * lane + v % 4)) & 1) as u8) << 4
}

/// Row `lane`'s 32 values of `tile`, fifth bits included.
fn values_of<T: NibbleTile>(tile: &T, lane: usize) -> [u8; QK] {
    let mut q = unpack_nibbles(&tile.nibbles().qs, lane);
    if T::FIFTH {
        for (v, q) in q.iter_mut().enumerate() {
            *q += fifth_weight(tile.fifth(v / 8), lane, v);
        }
    }
    q
}

/// Rows `ids` of `[row tile][block]` tiles as f32, `[ids.len(), cols]` (`d·q + m`).
pub(crate) fn dequantize_tiles<T: NibbleTile>(tiles: &[T], cols: usize, ids: &[u32]) -> Vec<f32> {
    let kb = cols / QK;
    let mut out = vec![0f32; ids.len() * cols];
    for (o, &r) in ids.iter().enumerate() {
        let r = r as usize;
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..kb {
            let full = &tiles[t * kb + b];
            let tile = full.nibbles();
            let d = f16::from_bits(tile.d[lane]).to_f32();
            let m = f16::from_bits(tile.m[lane]).to_f32();
            let row = &mut out[o * cols + b * QK..][..QK];
            for (y, q) in row.iter_mut().zip(values_of(full, lane)) {
                *y = d * q as f32 + m;
            }
        }
    }
    out
}

/// A Q4_1 weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q41Weight {
    rows: usize,
    cols: usize,
    /// `[row tile][block]`.
    tiles: Vec<Tile>,
}

/// The 32 quant values of one GGUF block.
fn block_values(block: &[u8]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..16 {
        q[j] = block[4 + j] & 0x0F;
        q[j + 16] = block[4 + j] >> 4;
    }
    q
}

/// Writes row `lane`'s 32 values `q` (each below 16) into a tile's nibble bytes `dst` (256 bytes,
/// `[group of 8 (4)][row (16)][4 bytes]`, byte `j` = `q[8g + j] | q[8g + j + 4] << 4`): the
/// layout the Q4_1, Q4_K and Q6_K (low nibbles) tiles share.
pub(super) fn pack_nibbles(dst: &mut [u8], lane: usize, q: &[u8; QK]) {
    let dst = &mut dst[..256];
    for (g, v) in q.chunks_exact(8).enumerate() {
        let out = &mut dst[g * 64 + lane * 4..][..4];
        for j in 0..4 {
            out[j] = v[j] | (v[j + 4] << 4);
        }
    }
}

/// Row `lane`'s 32 values from nibble bytes laid out as `pack_nibbles` writes them.
pub(super) fn unpack_nibbles(src: &[u8], lane: usize) -> [u8; QK] {
    let mut q = [0u8; QK];
    for g in 0..4 {
        for j in 0..4 {
            let byte = src[g * 64 + lane * 4 + j];
            q[8 * g + j] = byte & 0x0F;
            q[8 * g + j + 4] = byte >> 4;
        }
    }
    q
}

/// `Σ q·xq` over row `lane`'s 32 values in such bytes (the portable kernels).
pub(super) fn nibble_dot(src: &[u8], lane: usize, xq: &[i8]) -> i32 {
    unpack_nibbles(src, lane)
        .iter()
        .zip(xq)
        .map(|(&q, &x)| q as i32 * x as i32)
        .sum()
}

impl Q41Weight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q4_1", data, (rows, cols), QK, BLOCK_BYTES)?;
        let empty = Tile {
            qs: [0; 256],
            d: [0; TILE],
            m: [0; TILE],
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
                tile.m[lane] = u16::from_le_bytes([block[2], block[3]]);
                pack_nibbles(&mut tile.qs, lane, &block_values(block));
            },
        );
        Ok(Self { rows, cols, tiles })
    }

    /// Repacks GGUF Q4_0 data (blocks of 32: `d` as f16 and 16 bytes of nibbles in Q4_1's
    /// order; a value is `d·(q − 8)`) as Q4_1 with `m = −8·d`, which is exact in f16 (a power
    /// of two times `d`), so the Q4_1 kernels serve it unchanged.
    pub fn from_gguf_q4_0(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        const Q4_0_BYTES: usize = 18;
        if cols % QK != 0 || data.len() != rows * (cols / QK) * Q4_0_BYTES {
            return Err(format!(
                "Q4_0 data of {} bytes does not hold {rows} × {cols} values in blocks of {QK}",
                data.len()
            ));
        }
        let mut q41 = Vec::with_capacity(data.len() / Q4_0_BYTES * BLOCK_BYTES);
        for block in data.chunks_exact(Q4_0_BYTES) {
            let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
            let m = f16::from_f32(-8.0 * d.to_f32());
            if m.is_infinite() && d.is_finite() {
                return Err("a Q4_0 block scale times 8 overflows f16".into());
            }
            q41.extend_from_slice(&block[..2]);
            q41.extend_from_slice(&m.to_bits().to_le_bytes());
            q41.extend_from_slice(&block[2..]);
        }
        Self::from_gguf_ordered(&q41, rows, cols, order)
    }

    /// Rows `ids` as f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        dequantize_tiles(&self.tiles, self.cols, ids)
    }
}

int8::tile_weight!(Q41Weight, Tile);

pub(crate) fn portable<T: NibbleTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    for (b, full) in tiles.iter().enumerate() {
        let tile = full.nibbles();
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            let xq = &act.row(i + r)[b * QK..(b + 1) * QK];
            let (xd, xs) = act.scale(i + r, b);
            for lane in 0..TILE {
                let isum: i32 = if T::FIFTH {
                    values_of(full, lane)
                        .iter()
                        .zip(xq)
                        .map(|(&q, &x)| q as i32 * x as i32)
                        .sum()
                } else {
                    nibble_dot(&tile.qs, lane, xq)
                };
                let d = f16::from_bits(tile.d[lane]).to_f32();
                let m = f16::from_bits(tile.m[lane]).to_f32();
                acc_r[lane] += isum as f32 * (d * xd) + m * xs;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn avx512<T: NibbleTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    avx512_rows::<T, 4>(tiles, act, i, rows, acc)
}

/// The AVX-512 VNNI kernel for up to `N` activation rows a call (a row's arithmetic is the
/// same whatever `N` and its neighbours).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn avx512_rows<T: NibbleTile, const N: usize>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let mut facc = [_mm512_setzero_ps(); N];
    let xrows: [&[i8]; N] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, full) in tiles.iter().enumerate() {
        let tile = full.nibbles();
        let mut isum = [_mm512_setzero_si512(); N];
        for g in 0..4 {
            let (lo, hi) = unpack(full, tile, g);
            for r in 0..rows {
                let at = b * QK + 8 * g;
                let xa = _mm512_set1_epi32(broadcast4(xrows[r], at));
                let xb = _mm512_set1_epi32(broadcast4(xrows[r], at + 4));
                isum[r] = _mm512_dpbusd_epi32(isum[r], lo, xa);
                isum[r] = _mm512_dpbusd_epi32(isum[r], hi, xb);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        let m = _mm512_cvtph_ps(_mm256_loadu_si256(tile.m.as_ptr() as *const _));
        for r in 0..rows {
            let (xd, xs) = act.scale(i + r, b);
            let sum = _mm512_cvtepi32_ps(isum[r]);
            facc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(xd)), facc[r]);
            facc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs), facc[r]);
        }
    }
    for r in 0..rows {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

/// Group `g`'s low and high nibbles of `tile` (`full`'s) as bytes, the fifth bits added where
/// `T` has them: the values 0..31 of 16 rows × 4 consecutive columns each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn unpack<T: NibbleTile>(
    full: &T,
    tile: &Tile,
    g: usize,
) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(0x0F);
    let v = _mm512_loadu_si512(tile.qs.as_ptr().add(g * 64) as *const _);
    let mut lo = _mm512_and_si512(v, mask);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    if T::FIFTH {
        let sixteen = _mm512_set1_epi8(16);
        let [f_lo, f_hi] = full.fifth(g);
        lo = _mm512_mask_add_epi8(lo, f_lo, lo, sixteen);
        hi = _mm512_mask_add_epi8(hi, f_hi, hi, sixteen);
    }
    (lo, hi)
}

/// Intel AMX for groups of 16 activation rows (prefill), two blocks of 32 columns a pair of
/// tile products: the nibbles (and fifth bits) unpacked into B tiles in the layout the tiles
/// already have, the activations' rows as A tiles, the exact integer sums scaled per block and
/// row in the AVX-512 kernel's operations and order (a row's result is the same by either).
/// Fewer than 16 rows: the AVX-512 kernel, four at a time.
///
/// # Safety
/// `amx::available()`; AVX-512 VNNI (the scaling's instructions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn amx<T: NibbleTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    use super::amx::{two_products, Tiles};
    use std::arch::x86_64::*;
    const AMX_ROWS: usize = 16;
    if rows < AMX_ROWS || tiles.is_empty() {
        for start in (0..rows).step_by(4) {
            let k = (rows - start).min(4);
            avx512_rows::<T, 4>(tiles, act, i + start, k, &mut acc[start..start + k]);
        }
        return;
    }
    #[repr(C, align(64))]
    struct Scratch {
        /// B tiles: `[block (2)][group (4)][low, high][row (16)][4 bytes]`.
        w: [u8; 2 * 512],
        /// C tiles: `[block (2)][activation row (16)][weight row (16)]`.
        c: [i32; 2 * 256],
    }
    let cols = tiles.len() * QK;
    let (x0, _) = super::amx::rows16(act, i, cols);
    let mut facc = [_mm512_setzero_ps(); AMX_ROWS];
    let mut scratch = Scratch {
        w: [0; 2 * 512],
        c: [0; 2 * 256],
    };
    let _tiles = Tiles::load(&super::amx::PAIR_OF_32);
    for first in (0..tiles.len()).step_by(2) {
        // An odd last block is multiplied twice and counted once.
        let blocks = [first, (first + 1).min(tiles.len() - 1)];
        for (k, &b) in blocks.iter().enumerate() {
            let full = &tiles[b];
            let tile = full.nibbles();
            for g in 0..4 {
                let (lo, hi) = unpack(full, tile, g);
                let out = scratch.w.as_mut_ptr().add(k * 512 + g * 128);
                _mm512_store_si512(out as *mut _, lo);
                _mm512_store_si512(out.add(64) as *mut _, hi);
            }
        }
        let c = scratch.c.as_mut_ptr();
        two_products(
            [x0.add(blocks[0] * QK), x0.add(blocks[1] * QK)],
            cols,
            [scratch.w.as_ptr(), scratch.w.as_ptr().add(512)],
            [c, c.add(256)],
        );
        let count = if blocks[1] == blocks[0] { 1 } else { 2 };
        for (k, &b) in blocks.iter().enumerate().take(count) {
            let tile = tiles[b].nibbles();
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(tile.m.as_ptr() as *const _));
            for (r, f) in facc.iter_mut().enumerate() {
                let (xd, xs) = act.scale(i + r, b);
                let isum = _mm512_load_si512(scratch.c.as_ptr().add(k * 256 + r * 16) as *const _);
                let sum = _mm512_cvtepi32_ps(isum);
                *f = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(xd)), *f);
                *f = _mm512_fmadd_ps(m, _mm512_set1_ps(xs), *f);
            }
        }
    }
    for (r, f) in facc.iter().enumerate() {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), *f);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut facc = [[_mm256_setzero_ps(); 2]; 4];
    let xrows: [&[i8]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, tile) in tiles.iter().enumerate() {
        let mut isum = [[_mm256_setzero_si256(); 2]; 4];
        for g in 0..4 {
            for h in 0..2 {
                let v = _mm256_loadu_si256(tile.qs.as_ptr().add(g * 64 + h * 32) as *const _);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for r in 0..rows {
                    let at = b * QK + 8 * g;
                    let xa = _mm256_set1_epi32(broadcast4(xrows[r], at));
                    let xb = _mm256_set1_epi32(broadcast4(xrows[r], at + 4));
                    // u8 × i8 pairs to i16 (|15·127·2| fits), then pairs of i16 to i32: each
                    // 32-bit lane sums its row's 4 products.
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, xa),
                        _mm256_maddubs_epi16(hi, xb),
                    );
                    isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(h * 8) as *const _));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(tile.m.as_ptr().add(h * 8) as *const _));
            for r in 0..rows {
                let (xd, xs) = act.scale(i + r, b);
                let sum = _mm256_cvtepi32_ps(isum[r][h]);
                facc[r][h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(xd)), facc[r][h]);
                facc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs), facc[r][h]);
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

    /// GGUF Q4_1 bytes of `rows × cols` pseudo-random blocks.
    pub(crate) fn random_q4_1(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 1000.0 * 0.01);
            let m = f16::from_f32(-((next() % 1000) as f32 / 1000.0) * 0.08);
            out.extend_from_slice(&d.to_bits().to_le_bytes());
            out.extend_from_slice(&m.to_bits().to_le_bytes());
            for _ in 0..16 {
                out.push((next() & 0xFF) as u8);
            }
        }
        out
    }

    #[test]
    fn matches_dequantized_matmul_within_the_activation_rounding_bound() {
        for (rows, cols) in [(16, 32), (37, 64), (100, 96), (576, 1536), (48, 576)] {
            let w =
                Q41Weight::from_gguf(&random_q4_1(rows, cols, rows as u64), rows, cols).unwrap();
            checks::within_rounding_bound(&w);
        }
    }

    #[test]
    fn simd_and_portable_paths_agree() {
        let (rows, cols) = (45, 320);
        checks::simd_matches_portable(
            &Q41Weight::from_gguf(&random_q4_1(rows, cols, 3), rows, cols).unwrap(),
        );
    }

    #[test]
    fn rows_are_independent_of_the_batch() {
        let (rows, cols) = (45, 320);
        checks::rows_are_independent(
            &Q41Weight::from_gguf(&random_q4_1(rows, cols, 3), rows, cols).unwrap(),
        );
    }

    /// Q4_0 served by the Q4_1 tiles: exactly ggml's dequantization (candle's port), and the
    /// kernels' shared checks.
    #[test]
    fn q4_0_as_q4_1_is_exact() {
        use candle_core::quantized::GgmlDType;
        for (rows, cols) in [(3, 64), (37, 320)] {
            let data = checks::ggml_quantized(rows, cols, 7, GgmlDType::Q4_0);
            let ours = Q41Weight::from_gguf_q4_0(&data, rows, cols, RowOrder::STORED).unwrap();
            let theirs = checks::ggml_dequantized(&data, rows, cols, GgmlDType::Q4_0);
            assert_eq!(ours.dequantize(), theirs);
            checks::within_rounding_bound(&ours);
            checks::simd_matches_portable(&ours);
        }
        assert!(Q41Weight::from_gguf_q4_0(&[0; 17], 1, 32, RowOrder::STORED).is_err());
    }

    #[test]
    fn dequantize_follows_ggml() {
        let data = random_q4_1(2, 64, 9);
        let w = Q41Weight::from_gguf(&data, 2, 64).unwrap();
        let dense = w.dequantize();
        for r in 0..2 {
            for b in 0..2 {
                let block = &data[(r * 2 + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
                let m = f16::from_bits(u16::from_le_bytes([block[2], block[3]])).to_f32();
                for j in 0..16 {
                    assert_eq!(
                        dense[r * 64 + b * 32 + j],
                        d * (block[4 + j] & 15) as f32 + m
                    );
                    assert_eq!(
                        dense[r * 64 + b * 32 + j + 16],
                        d * (block[4 + j] >> 4) as f32 + m
                    );
                }
            }
        }
        assert!(Q41Weight::from_gguf(&data, 2, 60).is_err());
        assert!(Q41Weight::from_gguf(&data[1..], 2, 64).is_err());
    }
}
