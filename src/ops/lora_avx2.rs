//! The adapter delta `Δ = (x · A_t) · B_t` for up to four rows at once with AVX2, for ranks
//! that are multiples of 8 up to 64: the shrink keeps each row's `r` sums in registers while
//! `A_t` streams by once, the expand keeps eight output columns per row in registers while
//! `B_t` streams by once. At decode sizes (a few rows, r ≤ 64) a general gemm spends more on
//! packing and dispatch than on the arithmetic. A and B may be f32, bf16 or f16 (16 bits halve
//! the bytes streamed per step; each 8 values widen to f32 in one or two instructions), and
//! accumulation is f32 either way.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether `rows_delta` takes rank `r`.
pub fn supports(r: usize) -> bool {
    cfg!(target_arch = "x86_64") && matches!(r, 8 | 16 | 32 | 64) && super::cpu_features::f16c()
}

/// An element type of A and B the kernel reads.
pub trait Elem: Copy + Send + Sync + 'static {
    /// 0: f32, 1: bf16, 2: f16.
    const KIND: u8;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const KIND: u8 = 0;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    const KIND: u8 = 1;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Elem for half::f16 {
    const KIND: u8 = 2;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// Eight values from `p` widened to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
    match T::KIND {
        0 => _mm256_loadu_ps(p as *const f32),
        // bf16 is the high half of an f32.
        1 => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        )),
        _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

/// Rows handled together (their accumulators share each loaded row of `A_t` and `B_t`).
const GROUP: usize = 4;

/// `delta[i] = (x[rows[i]] · A_t) · B_t` for every row, `delta` `[rows.len(), out]`.
/// `xv` is `[n, inp]`, `a` is `A_t` `[inp, r]`, `b` is `B_t` `[r, out]`, all row-major.
/// Panics unless `supports(r)`.
pub fn rows_delta<T: Elem>(
    xv: &[f32],
    inp: usize,
    rows: &[usize],
    a: &[T],
    b: &[T],
    r: usize,
    out: usize,
) -> Vec<f32> {
    assert!(supports(r), "lora_avx2: rank {r}");
    assert!(a.len() >= inp * r && b.len() >= r * out);
    assert!(rows.iter().all(|&row| (row + 1) * inp <= xv.len()));
    let mut delta = vec![0f32; rows.len() * out];
    for (g, d) in rows.chunks(GROUP).zip(delta.chunks_mut(GROUP * out)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA detected (`supports`); every index below is within the slices
        // whose lengths were asserted above.
        unsafe {
            match (r / 8, g.len()) {
                (1, 1) => group::<1, 1, T>(xv, inp, g, a, b, out, d),
                (1, 2) => group::<1, 2, T>(xv, inp, g, a, b, out, d),
                (1, 3) => group::<1, 3, T>(xv, inp, g, a, b, out, d),
                (1, _) => group::<1, 4, T>(xv, inp, g, a, b, out, d),
                (2, 1) => group::<2, 1, T>(xv, inp, g, a, b, out, d),
                (2, 2) => group::<2, 2, T>(xv, inp, g, a, b, out, d),
                (2, 3) => group::<2, 3, T>(xv, inp, g, a, b, out, d),
                (2, _) => group::<2, 4, T>(xv, inp, g, a, b, out, d),
                (4, 1) => group::<4, 1, T>(xv, inp, g, a, b, out, d),
                (4, 2) => group::<4, 2, T>(xv, inp, g, a, b, out, d),
                (4, 3) => group::<4, 3, T>(xv, inp, g, a, b, out, d),
                (4, _) => group::<4, 4, T>(xv, inp, g, a, b, out, d),
                (_, 1) => group::<8, 1, T>(xv, inp, g, a, b, out, d),
                (_, 2) => group::<8, 2, T>(xv, inp, g, a, b, out, d),
                (_, 3) => group::<8, 3, T>(xv, inp, g, a, b, out, d),
                (_, _) => group::<8, 4, T>(xv, inp, g, a, b, out, d),
            }
        }
    }
    delta
}

/// `G` rows, rank `8·R8`. Index loops over the fixed-size register arrays on purpose.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn group<const R8: usize, const G: usize, T: Elem>(
    xv: &[f32],
    inp: usize,
    rows: &[usize],
    a: &[T],
    b: &[T],
    out: usize,
    delta: &mut [f32],
) {
    let r = 8 * R8;
    let x: [*const f32; G] = std::array::from_fn(|g| xv.as_ptr().add(rows[g] * inp));
    // Shrink: t[g] = x[g] · A_t, r sums per row kept in registers.
    let mut acc = [[_mm256_setzero_ps(); R8]; G];
    for k in 0..inp {
        let ak = a.as_ptr().add(k * r);
        let av: [__m256; R8] = std::array::from_fn(|j| load8(ak.add(8 * j)));
        for g in 0..G {
            let xb = _mm256_set1_ps(*x[g].add(k));
            for j in 0..R8 {
                acc[g][j] = _mm256_fmadd_ps(xb, av[j], acc[g][j]);
            }
        }
    }
    let mut t = [[0f32; 64]; G];
    for g in 0..G {
        for j in 0..R8 {
            _mm256_storeu_ps(t[g].as_mut_ptr().add(8 * j), acc[g][j]);
        }
    }
    // Expand: eight output columns per row at a time, B_t read once for the group.
    let full = out - out % 8;
    for c in (0..full).step_by(8) {
        let mut y = [_mm256_setzero_ps(); G];
        for k in 0..r {
            let bv = load8(b.as_ptr().add(k * out + c));
            for g in 0..G {
                y[g] = _mm256_fmadd_ps(_mm256_set1_ps(t[g][k]), bv, y[g]);
            }
        }
        for g in 0..G {
            _mm256_storeu_ps(delta.as_mut_ptr().add(g * out + c), y[g]);
        }
    }
    for c in full..out {
        for g in 0..G {
            delta[g * out + c] = (0..r).map(|k| t[g][k] * b[k * out + c].to_f32()).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_plain_product() {
        if !supports(16) {
            return;
        }
        let val = |i: usize, m: usize| ((i * 7919 + m) % 97) as f32 / 48.0 - 1.0;
        for (inp, out, r) in [
            (70usize, 45usize, 8usize),
            (64, 128, 16),
            (33, 20, 32),
            (40, 9, 64),
        ] {
            let n = 7;
            let xv: Vec<f32> = (0..n * inp).map(|i| val(i, 1)).collect();
            let a: Vec<f32> = (0..inp * r).map(|i| val(i, 2) * 0.1).collect();
            let b: Vec<f32> = (0..r * out).map(|i| val(i, 3) * 0.1).collect();
            for rows in [
                vec![3usize],
                vec![0, 1],
                vec![6, 2, 4],
                vec![0, 1, 2, 3, 4, 5, 6],
            ] {
                let d = rows_delta(&xv, inp, &rows, &a, &b, r, out);
                // The same in 16 bits: equal to the f32 kernel on the rounded values.
                let a16: Vec<half::bf16> = a.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let b16: Vec<half::bf16> = b.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let ar: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
                let br: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
                let d16 = rows_delta(&xv, inp, &rows, &a16, &b16, r, out);
                let dr = rows_delta(&xv, inp, &rows, &ar, &br, r, out);
                assert!(
                    d16.iter().zip(&dr).all(|(x, y)| (x - y).abs() < 1e-5),
                    "bf16 {inp}x{out} r{r}"
                );
                let h16: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
                let hb16: Vec<half::f16> = b.iter().map(|&v| half::f16::from_f32(v)).collect();
                let hr: Vec<f32> = h16.iter().map(|v| v.to_f32()).collect();
                let hbr: Vec<f32> = hb16.iter().map(|v| v.to_f32()).collect();
                let dh = rows_delta(&xv, inp, &rows, &h16, &hb16, r, out);
                let dhr = rows_delta(&xv, inp, &rows, &hr, &hbr, r, out);
                assert!(
                    dh.iter().zip(&dhr).all(|(x, y)| (x - y).abs() < 1e-5),
                    "f16 {inp}x{out} r{r}"
                );
                for (i, &row) in rows.iter().enumerate() {
                    let t: Vec<f32> = (0..r)
                        .map(|j| (0..inp).map(|k| xv[row * inp + k] * a[k * r + j]).sum())
                        .collect();
                    for c in 0..out {
                        let want: f32 = (0..r).map(|j| t[j] * b[j * out + c]).sum();
                        let got = d[i * out + c];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{inp}x{out} r{r} row {row} col {c}"
                        );
                    }
                }
            }
        }
    }
}
