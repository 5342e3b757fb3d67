//! NF4 codes decoded thirty-two at a time with AVX2: sixteen packed bytes are split into one code
//! per byte, each code looks up the four bytes of its level's f32 bits with `pshufb` (one table
//! per byte), and byte/word interleaves assemble the floats (a table of 16 levels fits one
//! register, so no gather and only one cross-lane permute per 32 weights). Used for the fused
//! decode dot products and for dequantizing tiles. Every entry point has a portable scalar twin
//! that gives bit-identical results for the tile decode (the dot products differ only in
//! summation order); the SIMD path is taken when the CPU reports AVX2 and FMA.

use super::nf4::{BLOCK, NF4_LEVELS};
use crate::ops::cpu_features::avx2_fma as simd_available;

/// Rows the fused dot-product kernel takes at once (its accumulators stay in registers).
pub const FUSED_ROWS: usize = 8;

/// Decodes one block (32 bytes, 64 codes, high nibble first) times `scale` into `out`.
pub fn decode_block(bytes: &[u8], scale: f32, out: &mut [f32]) {
    // Checked in release builds too: the SIMD path reads and writes a whole block through raw
    // pointers, so its safety must not rest on the callers.
    assert!(
        bytes.len() >= BLOCK / 2 && out.len() >= BLOCK,
        "decode_block: a block needs {} bytes and {BLOCK} outputs",
        BLOCK / 2
    );
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were detected; the slices hold a whole block (asserted above).
        unsafe { avx2::decode_block(bytes, scale, out) };
        return;
    }
    decode_block_portable(bytes, scale, out);
}

fn decode_block_portable(bytes: &[u8], scale: f32, out: &mut [f32]) {
    for (pair, &byte) in out[..BLOCK].chunks_exact_mut(2).zip(&bytes[..BLOCK / 2]) {
        pair[0] = NF4_LEVELS[(byte >> 4) as usize] * scale;
        pair[1] = NF4_LEVELS[(byte & 0x0F) as usize] * scale;
    }
}

/// `y[r] = Σ_k W[row, k] · x[r, k]` for one weight row and `n ≤ FUSED_ROWS` input rows, straight
/// from the codes. `packed` is the row's bytes (`cols / 2`, whole blocks), `scales` its block
/// scales, `x` is `n × cols` row-major.
pub fn dot_row(packed: &[u8], scales: &[f32], x: &[f32], n: usize, cols: usize, y: &mut [f32]) {
    assert!(n <= FUSED_ROWS && cols.is_multiple_of(BLOCK));
    assert!(
        packed.len() >= cols / 2
            && scales.len() >= cols / BLOCK
            && x.len() >= n * cols
            && y.len() >= n,
        "dot_row: the slices do not hold {n} rows of {cols} columns"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features detected; bounds asserted above.
        unsafe { avx2::dot_row(packed, scales, x, n, cols, y) };
        return;
    }
    dot_row_portable(packed, scales, x, n, cols, y);
}

fn dot_row_portable(
    packed: &[u8],
    scales: &[f32],
    x: &[f32],
    n: usize,
    cols: usize,
    y: &mut [f32],
) {
    let mut w = [0f32; BLOCK];
    y[..n].fill(0.0);
    for b in 0..cols / BLOCK {
        decode_block_portable(&packed[b * BLOCK / 2..], 1.0, &mut w);
        for (r, acc) in y[..n].iter_mut().enumerate() {
            let xb = &x[r * cols + b * BLOCK..r * cols + (b + 1) * BLOCK];
            // Eight independent lanes so the compiler vectorizes the dot product.
            let mut lanes = [0f32; 8];
            for (wc, xc) in w.chunks_exact(8).zip(xb.chunks_exact(8)) {
                for l in 0..8 {
                    lanes[l] += wc[l] * xc[l];
                }
            }
            let part = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
            *acc += part * scales[b];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, FUSED_ROWS, NF4_LEVELS};

    /// The NF4 levels as four byte planes (byte k of each level's f32 bits), in both lanes,
    /// for `pshufb` lookups.
    struct Tables {
        planes: [__m256i; 4],
        nibble: __m256i,
        order: __m256i,
    }

    /// Byte `k` of each level's f32 bits, computed at compile time.
    const PLANES: [[u8; 16]; 4] = {
        let mut planes = [[0u8; 16]; 4];
        let mut k = 0;
        while k < 4 {
            let mut c = 0;
            while c < 16 {
                planes[k][c] = (NF4_LEVELS[c].to_bits() >> (8 * k)) as u8;
                c += 1;
            }
            k += 1;
        }
        planes
    };

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tables() -> Tables {
        let plane = |k: usize| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(PLANES[k].as_ptr() as *const __m128i))
        };
        Tables {
            planes: [plane(0), plane(1), plane(2), plane(3)],
            nibble: _mm256_set1_epi8(0x0F),
            order: _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7),
        }
    }

    /// Thirty-two levels, in order, from sixteen packed bytes at `p` (high nibble first).
    ///
    /// The codes are spread to one byte each and ordered so that the byte-wise table lookups
    /// (`pshufb`, within 128-bit lanes) and the byte/word interleaves that assemble the floats
    /// come out as elements 0-7, 8-15, 16-23, 24-31: lane 0 holds codes 0-3, 8-11, 16-19,
    /// 24-27, lane 1 codes 4-7, 12-15, 20-23, 28-31. One cross-lane permute per 32 weights.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode32(t: &Tables, p: *const u8) -> [__m256; 4] {
        let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
        let lo = _mm256_and_si256(raw, t.nibble);
        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), t.nibble);
        // Lane 0: codes 0-15 (bytes 0-7), lane 1: codes 16-31 (bytes 8-15).
        let natural = _mm256_blend_epi32(
            _mm256_unpacklo_epi8(hi, lo),
            _mm256_unpackhi_epi8(hi, lo),
            0xF0,
        );
        let q = _mm256_permutevar8x32_epi32(natural, t.order);
        let [b0, b1, b2, b3] = t.planes.map(|plane| _mm256_shuffle_epi8(plane, q));
        let (w01l, w23l) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpacklo_epi8(b2, b3));
        let (w01h, w23h) = (_mm256_unpackhi_epi8(b0, b1), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h)),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode_block(bytes: &[u8], scale: f32, out: &mut [f32]) {
        let t = tables();
        let s = _mm256_set1_ps(scale);
        for half in 0..2 {
            let w = decode32(&t, bytes.as_ptr().add(16 * half));
            for (j, wj) in w.iter().enumerate() {
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(32 * half + 8 * j),
                    _mm256_mul_ps(*wj, s),
                );
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(
        packed: &[u8],
        scales: &[f32],
        x: &[f32],
        n: usize,
        cols: usize,
        y: &mut [f32],
    ) {
        match n {
            1 => dot_rows::<1, 4>(packed, scales, x, cols, y),
            2 => dot_rows::<2, 2>(packed, scales, x, cols, y),
            3 => dot_rows::<3, 2>(packed, scales, x, cols, y),
            4 => dot_rows::<4, 1>(packed, scales, x, cols, y),
            5 => dot_rows::<5, 1>(packed, scales, x, cols, y),
            6 => dot_rows::<6, 1>(packed, scales, x, cols, y),
            7 => dot_rows::<7, 1>(packed, scales, x, cols, y),
            _ => dot_rows::<FUSED_ROWS, 1>(packed, scales, x, cols, y),
        }
    }

    /// `N` input rows, `K` accumulators per row (so a single row still keeps several FMA chains
    /// in flight). Each eight weights are decoded once, scaled, and used by every row at once:
    /// few live registers, no spills.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows<const N: usize, const K: usize>(
        packed: &[u8],
        scales: &[f32],
        x: &[f32],
        cols: usize,
        y: &mut [f32],
    ) {
        let t = tables();
        let mut acc = [[_mm256_setzero_ps(); K]; N];
        for b in 0..cols / BLOCK {
            let p = packed.as_ptr().add(b * BLOCK / 2);
            let s = _mm256_set1_ps(*scales.get_unchecked(b));
            for half in 0..2 {
                let w = decode32(&t, p.add(16 * half));
                for (jj, wj) in w.iter().enumerate() {
                    let j = 4 * half + jj;
                    let w = _mm256_mul_ps(*wj, s);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.as_ptr().add(r * cols + b * BLOCK + 8 * j));
                        a[j % K] = _mm256_fmadd_ps(w, xv, a[j % K]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let mut sum = a[0];
            for v in &a[1..] {
                sum = _mm256_add_ps(sum, *v);
            }
            y[r] = hsum(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounds hold in release builds: a short slice is a panic, not a write past its end.
    #[test]
    #[should_panic(expected = "decode_block")]
    fn decode_block_refuses_a_short_output() {
        let mut out = vec![0f32; BLOCK - 1];
        decode_block(&[0u8; BLOCK / 2], 1.0, &mut out);
    }

    #[test]
    #[should_panic(expected = "dot_row")]
    fn dot_row_refuses_a_short_output() {
        let x = vec![0f32; 2 * BLOCK];
        let mut y = vec![0f32; 1];
        dot_row(&[0u8; BLOCK / 2], &[1.0], &x, 2, BLOCK, &mut y);
    }

    fn codes_block(seed: usize) -> Vec<u8> {
        (0..BLOCK / 2)
            .map(|i| ((i * 37 + seed * 11) % 256) as u8)
            .collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn this_machine_runs_the_simd_path() {
        // CI and the benches run on x86-64 with AVX2; the figures in README assume it.
        if is_x86_feature_detected!("avx2") && std::env::var("LORAPLEX_NO_SIMD").is_err() {
            assert!(simd_available());
        }
    }

    #[test]
    fn block_decode_equals_the_table_lookup() {
        for seed in 0..8 {
            let bytes = codes_block(seed);
            let mut got = [0f32; BLOCK];
            let mut portable = [0f32; BLOCK];
            decode_block(&bytes, 0.37, &mut got);
            decode_block_portable(&bytes, 0.37, &mut portable);
            for (i, g) in got.iter().enumerate() {
                let byte = bytes[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
                assert_eq!(*g, NF4_LEVELS[code as usize] * 0.37, "element {i}");
                assert_eq!(portable[i], *g, "portable element {i}");
            }
        }
    }

    #[test]
    fn dot_row_equals_decode_then_dot() {
        let cols = 4 * BLOCK;
        let packed: Vec<u8> = (0..4).flat_map(codes_block).collect();
        let scales = [0.5f32, 1.5, 0.25, 2.0];
        for n in 1..=FUSED_ROWS {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let mut y = [0f32; FUSED_ROWS];
            let mut portable = [0f32; FUSED_ROWS];
            dot_row(&packed, &scales, &x, n, cols, &mut y);
            dot_row_portable(&packed, &scales, &x, n, cols, &mut portable);
            let mut w = vec![0f32; cols];
            for b in 0..4 {
                decode_block(&packed[b * 32..], scales[b], &mut w[b * BLOCK..]);
            }
            for r in 0..n {
                let want: f32 = (0..cols).map(|k| w[k] * x[r * cols + k]).sum();
                assert!(
                    (y[r] - want).abs() < 1e-4,
                    "n={n} r={r}: {} vs {want}",
                    y[r]
                );
            }
        }
    }
}
