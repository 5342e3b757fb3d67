//! NF4 codes decoded eight at a time with AVX2: four packed bytes are spread over eight lanes by
//! a variable shift, each 4-bit code picks its level from two 8-entry registers
//! (`permutevar8x32`, one for codes 0–7 and one for 8–15, blended on bit 3). Used for the fused
//! decode dot products and for dequantizing tiles. Every entry point has a portable scalar twin
//! that gives bit-identical results for the tile decode (the dot products differ only in
//! summation order); the SIMD path is taken when the CPU reports AVX2 and FMA.

use super::nf4::{BLOCK, NF4_LEVELS};

/// Rows the fused dot-product kernel takes at once (its accumulators stay in registers).
pub const FUSED_ROWS: usize = 8;

/// Whether this CPU runs the AVX2 kernels (see `ops::cpu_features`).
pub fn simd_available() -> bool {
    crate::ops::cpu_features::avx2_fma()
}

/// Decodes one block (32 bytes, 64 codes, high nibble first) times `scale` into `out`.
pub fn decode_block(bytes: &[u8], scale: f32, out: &mut [f32]) {
    debug_assert!(bytes.len() >= BLOCK / 2 && out.len() >= BLOCK);
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were detected; the slices hold a whole block (asserted above,
        // and by the callers' block-aligned ranges).
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
    assert!(packed.len() >= cols / 2 && scales.len() >= cols / BLOCK && x.len() >= n * cols);
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

    struct Tables {
        lo: __m256,
        hi: __m256,
        shifts: __m256i,
        nibble: __m256i,
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tables() -> Tables {
        Tables {
            lo: _mm256_loadu_ps(NF4_LEVELS.as_ptr()),
            hi: _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8)),
            // Little-endian word: byte 0 holds elements 0 (bits 4-7) and 1 (bits 0-3), ...
            shifts: _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24),
            nibble: _mm256_set1_epi32(0x0F),
        }
    }

    /// Eight levels from four packed bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode8(t: &Tables, p: *const u8) -> __m256 {
        let word = (p as *const u32).read_unaligned() as i32;
        let codes = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(word), t.shifts),
            t.nibble,
        );
        let low = _mm256_permutevar8x32_ps(t.lo, codes);
        let high = _mm256_permutevar8x32_ps(t.hi, codes);
        // Bit 3 of the code into the sign bit selects the upper table.
        _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode_block(bytes: &[u8], scale: f32, out: &mut [f32]) {
        let t = tables();
        let s = _mm256_set1_ps(scale);
        for j in 0..BLOCK / 8 {
            let w = decode8(&t, bytes.as_ptr().add(4 * j));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), _mm256_mul_ps(w, s));
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
            for j in 0..BLOCK / 8 {
                let w = _mm256_mul_ps(decode8(&t, p.add(4 * j)), s);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(r * cols + b * BLOCK + 8 * j));
                    a[j % K] = _mm256_fmadd_ps(w, xv, a[j % K]);
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
