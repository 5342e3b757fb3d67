//! GGUF Q4_K weights served as stored, with integer dot products (the bulk of a Q4_K_M file).
//!
//! Q4_K (ggml): super-blocks of 256 values along a row: `d` and `dmin` as f16, 12 bytes packing
//! eight 6-bit scales and eight 6-bit mins (one pair per sub-block of 32), and 128 bytes of
//! nibbles (each 64 values: 32 bytes, low nibbles the first 32, high nibbles the next 32). A
//! value is `d·sc·q − dmin·m`, `q` in 0..15.
//!
//! At load the rows are repacked into tiles of 16 output rows × one super-block: each sub-block
//! of 32 in the Q4_1 tiles' layout (`q4_1.rs`: for each group of 8 values, 16 rows × 4 bytes,
//! byte `j` holding value `j` in its low nibble and `j + 4` in its high nibble), then the rows'
//! `d`, `dmin` (f16) and the unpacked scales and mins (a byte each): 2,368 bytes per 16 × 256
//! values, 4.6 bits a weight against the file's 4.5.
//!
//! Activations are the shared 8-bit blocks of 32 (`int8.rs`), one per sub-block, so a sub-block's
//! dot product is `d·sc·xd·Σ q·xq − dmin·m·xs`, the sum exact in integers: the only error against
//! dequantize-then-f32-matmul is the activations' rounding, as for Q4_1. Paths: AVX-512 VNNI, AVX2
//! and portable, on the same tiles; a row's result never depends on the other rows.

use half::f16;

use super::int8::{self, broadcast4, Acc, Activations, RowOrder, QK, TILE};
use super::q4_1::{nibble_dot, unpack_nibbles};

/// Values per super-block.
pub const QK_K: usize = 256;
/// Sub-blocks of 32 per super-block.
const SUBS: usize = QK_K / QK;
/// Bytes of one GGUF Q4_K super-block.
pub const BLOCK_BYTES: usize = 144;

/// One super-block of 256 values for 16 output rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    /// `[sub-block (8)][group of 8 values (4)][row (16)][4 bytes]`.
    qs: [u8; 2048],
    d: [u16; TILE],
    dmin: [u16; TILE],
    /// `[sub-block][row]`: the 6-bit scale and min of each row's sub-block.
    sc: [[u8; TILE]; SUBS],
    mn: [[u8; TILE]; SUBS],
}

impl Tile {
    /// No rows yet: every value, scale and min zero.
    pub(crate) const EMPTY: Tile = Tile {
        qs: [0; 2048],
        d: [0; TILE],
        dmin: [0; TILE],
        sc: [[0; TILE]; SUBS],
        mn: [[0; TILE]; SUBS],
    };

    /// Lane `lane` (an output row) from a super-block's `d` and `dmin` (`head`, 4 bytes), packed
    /// scales and mins (12 bytes) and nibbles (128 bytes), ggml's Q4_K and Q5_K layout.
    pub(crate) fn fill(&mut self, lane: usize, head: &[u8], scales: &[u8], qs: &[u8]) {
        self.d[lane] = u16::from_le_bytes([head[0], head[1]]);
        self.dmin[lane] = u16::from_le_bytes([head[2], head[3]]);
        for s in 0..SUBS {
            (self.sc[s][lane], self.mn[s][lane]) = scale_min(s, scales);
        }
        // Sub-blocks 2p and 2p + 1: the low and the high nibbles of bytes 32·p .. 32·p + 32.
        // A packed byte holds values j and j + 4 of a group of 8.
        for (p, bytes) in qs.chunks_exact(QK).enumerate() {
            let pair = &mut self.qs[2 * p * 256..][..512];
            for (g, v) in bytes.chunks_exact(8).enumerate() {
                for j in 0..4 {
                    let (a, c) = (v[j], v[j + 4]);
                    pair[g * 64 + lane * 4 + j] = (a & 0x0F) | (c << 4);
                    pair[256 + g * 64 + lane * 4 + j] = (a >> 4) | (c & 0xF0);
                }
            }
        }
    }
}

/// A tile in Q4_K's layout with a fifth bit per value (Q5_K, `q5_k.rs`: the value is then
/// `q + 16`) or without (Q4_K): the kernels below serve both, the fifth bits' work compiled
/// away for Q4_K.
pub(crate) trait KTile: Sync {
    /// Whether values carry a fifth bit.
    const FIFTH: bool;
    fn q4(&self) -> &Tile;
    /// Group `g` (8 values) of sub-block `s`: bit `4·lane + j` of `[0]` set where value `j` of
    /// row `lane` has its fifth bit, of `[1]` where value `j + 4` has (the byte order of
    /// `Tile::qs`: `[0]` goes with the low nibbles, `[1]` with the high).
    fn fifth(&self, s: usize, g: usize) -> [u64; 2];
}

impl KTile for Tile {
    const FIFTH: bool = false;
    fn q4(&self) -> &Tile {
        self
    }
    fn fifth(&self, _s: usize, _g: usize) -> [u64; 2] {
        [0, 0]
    }
}

/// Value `v` (0..32) of sub-block `s` of row `lane`: its fifth bit's weight (0 or 16).
fn fifth_of<T: KTile>(tile: &T, s: usize, lane: usize, v: usize) -> u8 {
    super::q4_1::fifth_weight(tile.fifth(s, v / 8), lane, v)
}

/// Rows `ids` of `[row tile][super-block]` tiles as f32, `[ids.len(), cols]`, as ggml
/// dequantizes Q4_K (and Q5_K).
pub(crate) fn dequantize_tiles<T: KTile>(tiles: &[T], cols: usize, ids: &[u32]) -> Vec<f32> {
    let kb = cols / QK_K;
    let mut out = vec![0f32; ids.len() * cols];
    for (o, &r) in ids.iter().enumerate() {
        let r = r as usize;
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..kb {
            let full = &tiles[t * kb + b];
            let tile = full.q4();
            let d = f16::from_bits(tile.d[lane]).to_f32();
            let dmin = f16::from_bits(tile.dmin[lane]).to_f32();
            for s in 0..SUBS {
                let d1 = d * tile.sc[s][lane] as f32;
                let m1 = dmin * tile.mn[s][lane] as f32;
                let row = &mut out[o * cols + b * QK_K + s * QK..][..QK];
                for (v, (y, q)) in row
                    .iter_mut()
                    .zip(unpack_nibbles(&tile.qs[s * 256..], lane))
                    .enumerate()
                {
                    *y = d1 * (q + fifth_of(full, s, lane, v)) as f32 - m1;
                }
            }
        }
    }
    out
}

/// A Q4_K weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q4KWeight {
    rows: usize,
    cols: usize,
    /// `[row tile][super-block]`.
    tiles: Vec<Tile>,
}

/// Sub-block `j`'s 6-bit scale and min from a super-block's 12 packed bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl Q4KWeight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q4_K", data, (rows, cols), QK_K, BLOCK_BYTES)?;
        let tiles = int8::build_tiles(
            data,
            rows,
            kb,
            BLOCK_BYTES,
            order,
            &Tile::EMPTY,
            |tile, lane, block| tile.fill(lane, &block[..4], &block[4..16], &block[16..]),
        );
        Ok(Self { rows, cols, tiles })
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`, as ggml dequantizes them.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        dequantize_tiles(&self.tiles, self.cols, ids)
    }
}

int8::tile_weight!(Q4KWeight, Tile, 16, amx);

pub(crate) fn portable<T: KTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    for (b, full) in tiles.iter().enumerate() {
        let tile = full.q4();
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            for s in 0..SUBS {
                let blk = b * SUBS + s;
                let xq = &act.row(i + r)[blk * QK..(blk + 1) * QK];
                let (xd, xs) = act.scale(i + r, blk);
                for lane in 0..TILE {
                    let mut isum = nibble_dot(&tile.qs[s * 256..], lane, xq);
                    if T::FIFTH {
                        isum += xq
                            .iter()
                            .enumerate()
                            .map(|(v, &x)| fifth_of(full, s, lane, v) as i32 * x as i32)
                            .sum::<i32>();
                    }
                    let d = f16::from_bits(tile.d[lane]).to_f32() * tile.sc[s][lane] as f32;
                    let m = f16::from_bits(tile.dmin[lane]).to_f32() * tile.mn[s][lane] as f32;
                    acc_r[lane] += isum as f32 * (d * xd) - m * xs;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn avx512<T: KTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    // Eight activation rows share each unpacked sub-block pair (a prefill's rows); up to four
    // go the four-row way. A row's arithmetic is the same in both.
    int8::by_eights(rows, acc, |start, k, out| match k {
        5.. => avx512_rows::<8, T>(tiles, act, i + start, k, out),
        _ => avx512_rows::<4, T>(tiles, act, i + start, k, out),
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_rows<const R: usize, T: KTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(0x0F);
    let mut facc = [_mm512_setzero_ps(); R];
    // Eight rows always run all eight (constant trip counts keep the accumulators in
    // registers; a short group repeats its last row); four run as many as there are.
    let live = if R > 4 { R } else { rows };
    let cols = tiles.len() * QK_K;
    let xrows: [&[i8]; R] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    let scales: [(&[f32], &[f32]); R] =
        std::array::from_fn(|r| act.scales_row(i + r.min(rows - 1)));
    assert!(xrows.iter().all(|x| x.len() == cols));
    // Four bytes of activation row `r` from `at` (in bounds: `at + 4 <= cols`, checked above).
    let x4 = |r: usize, at: usize| {
        _mm512_set1_epi32(std::ptr::read_unaligned(
            xrows[r].as_ptr().add(at) as *const i32
        ))
    };
    let sixteen = _mm512_set1_epi8(16);
    for (b, full) in tiles.iter().enumerate() {
        let tile = full.q4();
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(tile.dmin.as_ptr() as *const _));
        // Sub-blocks in pairs, with independent accumulators: a decode row's chain of
        // `vpdpbusd` is then two chains, not one.
        for pair in 0..SUBS / 2 {
            let (sa, sb) = (2 * pair, 2 * pair + 1);
            let mut ia = [_mm512_setzero_si512(); R];
            let mut ib = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                let wa = _mm512_loadu_si512(tile.qs.as_ptr().add(sa * 256 + g * 64) as *const _);
                let wb = _mm512_loadu_si512(tile.qs.as_ptr().add(sb * 256 + g * 64) as *const _);
                let (mut lo_a, mut hi_a) = (
                    _mm512_and_si512(wa, mask),
                    _mm512_and_si512(_mm512_srli_epi16(wa, 4), mask),
                );
                let (mut lo_b, mut hi_b) = (
                    _mm512_and_si512(wb, mask),
                    _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask),
                );
                if T::FIFTH {
                    let ([fa_lo, fa_hi], [fb_lo, fb_hi]) = (full.fifth(sa, g), full.fifth(sb, g));
                    lo_a = _mm512_mask_add_epi8(lo_a, fa_lo, lo_a, sixteen);
                    hi_a = _mm512_mask_add_epi8(hi_a, fa_hi, hi_a, sixteen);
                    lo_b = _mm512_mask_add_epi8(lo_b, fb_lo, lo_b, sixteen);
                    hi_b = _mm512_mask_add_epi8(hi_b, fb_hi, hi_b, sixteen);
                }
                let at_a = (b * SUBS + sa) * QK + 8 * g;
                let at_b = at_a + QK;
                for r in 0..live {
                    ia[r] = _mm512_dpbusd_epi32(ia[r], lo_a, x4(r, at_a));
                    ia[r] = _mm512_dpbusd_epi32(ia[r], hi_a, x4(r, at_a + 4));
                    ib[r] = _mm512_dpbusd_epi32(ib[r], lo_b, x4(r, at_b));
                    ib[r] = _mm512_dpbusd_epi32(ib[r], hi_b, x4(r, at_b + 4));
                }
            }
            for (s, isum) in [(sa, &ia), (sb, &ib)] {
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    tile.sc[s].as_ptr() as *const _,
                )));
                let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    tile.mn[s].as_ptr() as *const _,
                )));
                let (ds, ms) = (_mm512_mul_ps(d, sc), _mm512_mul_ps(dmin, mn));
                let blk = b * SUBS + s;
                for r in 0..live {
                    let (xd, xs) = (scales[r].0[blk], scales[r].1[blk]);
                    let sum = _mm512_cvtepi32_ps(isum[r]);
                    facc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(ds, _mm512_set1_ps(xd)), facc[r]);
                    facc[r] = _mm512_fnmadd_ps(ms, _mm512_set1_ps(xs), facc[r]);
                }
            }
        }
    }
    for r in 0..rows {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

/// Sixteen activation rows by AMX tiles (fewer go the AVX-512 way). Per super-block, each
/// sub-block's nibbles are split into a `tdpbsud` B tile (8 rows of 16 weight rows × 4 values:
/// the tile's layout, one group's low then high nibbles), the activations load as A tiles
/// straight from their rows, and the eight 16 × 16 integer sums are then scaled row by row,
/// exactly as `avx512_rows` scales them (same operations, same order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn amx<T: KTile>(
    tiles: &[T],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut Acc,
) {
    use super::amx::{two_products, Tiles};
    use std::arch::x86_64::*;
    const AMX_ROWS: usize = 16;
    if rows < AMX_ROWS {
        return avx512(tiles, act, i, rows, acc);
    }
    #[repr(C, align(64))]
    struct Scratch {
        /// B tiles: `[sub-block][group (4)][low, high][row (16)][4 bytes]`.
        w: [u8; SUBS * 512],
        /// C tiles: `[sub-block][activation row (16)][weight row (16)]`.
        c: [i32; SUBS * 256],
    }
    let cols = tiles.len() * QK_K;
    let (x0, scales) = super::amx::rows16(act, i, cols);
    let mask = _mm512_set1_epi8(0x0F);
    let mut facc = [_mm512_setzero_ps(); AMX_ROWS];
    let mut scratch = Scratch {
        w: [0; SUBS * 512],
        c: [0; SUBS * 256],
    };
    let _tiles = Tiles::load(&super::amx::PAIR_OF_32);
    let sixteen = _mm512_set1_epi8(16);
    for (b, full) in tiles.iter().enumerate() {
        let tile = full.q4();
        for s in 0..SUBS {
            for g in 0..4 {
                let w = _mm512_loadu_si512(tile.qs.as_ptr().add(s * 256 + g * 64) as *const _);
                let out = scratch.w.as_mut_ptr().add(s * 512 + g * 128);
                let (mut lo, mut hi) = (
                    _mm512_and_si512(w, mask),
                    _mm512_and_si512(_mm512_srli_epi16(w, 4), mask),
                );
                if T::FIFTH {
                    let [f_lo, f_hi] = full.fifth(s, g);
                    lo = _mm512_mask_add_epi8(lo, f_lo, lo, sixteen);
                    hi = _mm512_mask_add_epi8(hi, f_hi, hi, sixteen);
                }
                _mm512_store_si512(out as *mut _, lo);
                _mm512_store_si512(out.add(64) as *mut _, hi);
            }
        }
        for pair in 0..SUBS / 2 {
            let (sa, sb) = (2 * pair, 2 * pair + 1);
            let blk = b * SUBS + sa;
            let c = scratch.c.as_mut_ptr();
            two_products(
                [x0.add(blk * QK), x0.add((blk + 1) * QK)],
                cols,
                [
                    scratch.w.as_ptr().add(sa * 512),
                    scratch.w.as_ptr().add(sb * 512),
                ],
                [c.add(sa * 256), c.add(sb * 256)],
            );
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(tile.dmin.as_ptr() as *const _));
        let ds: [__m512; SUBS] = std::array::from_fn(|s| {
            _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    tile.sc[s].as_ptr() as *const _
                ))),
            )
        });
        let ms: [__m512; SUBS] = std::array::from_fn(|s| {
            _mm512_mul_ps(
                dmin,
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    tile.mn[s].as_ptr() as *const _
                ))),
            )
        });
        for (r, f) in facc.iter_mut().enumerate() {
            let xd = &scales[r].0[b * SUBS..][..SUBS];
            let xs = &scales[r].1[b * SUBS..][..SUBS];
            let mut v = *f;
            for s in 0..SUBS {
                let isum = _mm512_load_si512(scratch.c.as_ptr().add(s * 256 + r * 16) as *const _);
                let sum = _mm512_cvtepi32_ps(isum);
                v = _mm512_fmadd_ps(sum, _mm512_mul_ps(ds[s], _mm512_set1_ps(xd[s])), v);
                v = _mm512_fnmadd_ps(ms[s], _mm512_set1_ps(xs[s]), v);
            }
            *f = v;
        }
    }
    for r in 0..AMX_ROWS {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    for start in (0..rows).step_by(4) {
        let mut part = [[0f32; TILE]; int8::MAX_ROWS];
        let k = (rows - start).min(4);
        avx2_four(tiles, act, i + start, k, &mut part);
        acc[start..start + k].copy_from_slice(&part[..k]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_four(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut facc = [[_mm256_setzero_ps(); 2]; 4];
    let xrows: [&[i8]; 4] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    for (b, tile) in tiles.iter().enumerate() {
        let d = [0, 1]
            .map(|h| _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(h * 8) as *const _)));
        let dmin = [0, 1]
            .map(|h| _mm256_cvtph_ps(_mm_loadu_si128(tile.dmin.as_ptr().add(h * 8) as *const _)));
        for s in 0..SUBS {
            let blk = b * SUBS + s;
            let mut isum = [[_mm256_setzero_si256(); 2]; 4];
            for g in 0..4 {
                for h in 0..2 {
                    let v = _mm256_loadu_si256(
                        tile.qs.as_ptr().add(s * 256 + g * 64 + h * 32) as *const _
                    );
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for r in 0..rows {
                        let at = blk * QK + 8 * g;
                        let xa = _mm256_set1_epi32(broadcast4(xrows[r], at));
                        let xb = _mm256_set1_epi32(broadcast4(xrows[r], at + 4));
                        // u8 × i8 pairs to i16 (|15·127·2| fits), then pairs to i32.
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xa),
                            _mm256_maddubs_epi16(hi, xb),
                        );
                        isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            for h in 0..2 {
                let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.sc[s].as_ptr().add(h * 8) as *const _,
                )));
                let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.mn[s].as_ptr().add(h * 8) as *const _,
                )));
                let (ds, ms) = (_mm256_mul_ps(d[h], sc), _mm256_mul_ps(dmin[h], mn));
                for r in 0..rows {
                    let (xd, xs) = act.scale(i + r, blk);
                    let sum = _mm256_cvtepi32_ps(isum[r][h]);
                    facc[r][h] =
                        _mm256_fmadd_ps(sum, _mm256_mul_ps(ds, _mm256_set1_ps(xd)), facc[r][h]);
                    facc[r][h] = _mm256_fnmadd_ps(ms, _mm256_set1_ps(xs), facc[r][h]);
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
    use candle_core::quantized::GgmlDType;

    int8::kernel_tests!(Q4KWeight, GgmlDType::Q4K);
}
