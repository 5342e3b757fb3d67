//! `exp` for softmax in a form the compiler vectorizes (the C library's `expf` is a scalar call
//! per element, and attention at long contexts takes one per query head and key): Cephes'
//! range reduction and degree-6 polynomial, within 2 ulp of `f32::exp` on the range softmax
//! uses (x ≤ 0); below -87.3 the result is 0.

#[inline(always)]
fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting it rounds to an integer
    let xc = x.max(-87.0).min(88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // SAFETY: `n` is an integer in [-126, 127] (from the clamped `xc`), so it converts exactly.
    let scale = f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// `x ← exp(x - max)` for every element; returns their sum. Inlined into its callers, so it is
/// vectorized for the target features they are compiled with.
#[inline(always)]
pub fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp1(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp1(*x - max);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `exp_sub_sum` with AVX2 and FMA, 8 lanes at a time (the same approximation; fused
/// multiply-adds round once, so results differ from the portable form in the last bit).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn exp_sub_sum_avx2(xs: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    let m = c(max);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = xs.chunks_exact_mut(8);
    for ch in &mut chunks {
        let x = _mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), m);
        let xc = _mm256_min_ps(_mm256_max_ps(x, c(-87.0)), c(88.0));
        let n = _mm256_sub_ps(
            _mm256_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(12_582_912.0)),
            c(12_582_912.0),
        );
        let r = _mm256_fnmadd_ps(n, c(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, c(-2.121_944_4e-4), r);
        let mut p = c(1.987_569_1e-4);
        for k in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, c(k));
        }
        let e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, c(1.0)));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
        // x ≥ -87 (false for -inf and NaN): below, 0.
        let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_GE_OQ>(x, c(-87.0)));
        _mm256_storeu_ps(ch.as_mut_ptr(), y);
        acc = _mm256_add_ps(acc, y);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp1(*x - max);
        tail += *x;
    }
    lanes.iter().sum::<f32>() + tail
}

/// `exp(x)` of one value (the same approximation).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp1(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_the_library_exp_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        let mut v = vec![
            0.0,
            -1.0,
            f32::NEG_INFINITY,
            -2.5,
            0.5,
            -0.25,
            -7.0,
            -3.0,
            -1.5,
            0.0,
        ];
        let want: f32 = v.iter().map(|x| (x - 0.5f32).exp()).sum();
        let sum = exp_sub_sum(&mut v, 0.5);
        assert!((sum - want).abs() < 1e-6 * want, "{sum} vs {want}");
        assert_eq!(v[2], 0.0);
        #[cfg(target_arch = "x86_64")]
        if crate::ops::cpu_features::avx2_fma() {
            let mut xs: Vec<f32> = (0..1000).map(|i| -80.0 + i as f32 * 0.0817).collect();
            xs[3] = f32::NEG_INFINITY;
            xs[500] = -200.0;
            let want: Vec<f32> = xs.iter().map(|x| (x - 1.5f32).exp()).collect();
            // SAFETY: checked above.
            let sum = unsafe { exp_sub_sum_avx2(&mut xs, 1.5) };
            for (g, w) in xs.iter().zip(&want) {
                assert!((g - w).abs() <= 3e-7 * w, "{g} vs {w}");
            }
            let total: f32 = want.iter().sum();
            assert!((sum - total).abs() < 1e-5 * total);
        }
    }
}
