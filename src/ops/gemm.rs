//! One safe wrapper around the `gemm` crate for f32 matrices given as slices with strides,
//! used by the CPU kernels (adapter deltas, NF4 tiles).

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose (the same values, strides swapped).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m, n] (= | +=) lhs[m, k] · rhs[k, n]`; `dst` is row-major with row stride `dst_rs`.
pub fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * dst_rs + n
            && lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs
            && rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs,
        "gemm_f32: matrix bounds"
    );
    // SAFETY: every element the strides reach lies inside its slice (checked above), and `dst`
    // is a unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Multiply-adds below which a split product runs on one thread.
const SPLIT_MIN_WORK: usize = 1 << 18;

/// `y[n, out] = x[n, in] · Wᵀ` for a row-major `w` `[out, in]`, computed as `W · xᵀ` into `y`
/// seen as `yᵀ` (W's rows read in place, the layout the gemm runs fastest). Threads take
/// disjoint bands of W's rows — the columns of `y` — each one single-threaded product: on two
/// cores that beats letting the gemm split one product (measured 1.1–1.3× at the default
/// model's shapes, 85–340 rows).
pub fn matmul_wt(w: &[f32], (out, inp): (usize, usize), x: &[f32], n: usize) -> Vec<f32> {
    assert!(
        w.len() >= out * inp && x.len() >= n * inp,
        "matmul_wt: matrix bounds"
    );
    // yᵀ[out, n] = W[out, in] · xᵀ[in, n]
    banded(
        (out, n, inp),
        Mat {
            data: w,
            rs: inp,
            cs: 1,
        },
        Mat {
            data: x,
            rs: 1,
            cs: inp,
        },
    )
}

/// `dx[n, in] = g[n, out] · W` for a row-major `w` `[out, in]`, computed as `Wᵀ · gᵀ` into
/// `dx` seen as `dxᵀ`. Threads take disjoint bands of W's columns — the columns of `dx` — each
/// one single-threaded product that packs only its band of W (banding the rows of `g` instead
/// had every thread pack all of W: measured 1.1–1.5× slower, most of it in packing).
pub fn matmul_w(w: &[f32], (out, inp): (usize, usize), g: &[f32], n: usize) -> Vec<f32> {
    assert!(
        w.len() >= out * inp && g.len() >= n * out,
        "matmul_w: matrix bounds"
    );
    // dxᵀ[in, n] = Wᵀ[in, out] · gᵀ[out, n]
    banded(
        (inp, n, out),
        Mat {
            data: w,
            rs: 1,
            cs: inp,
        },
        Mat {
            data: g,
            rs: 1,
            cs: out,
        },
    )
}

/// `dstᵀ[m, n] = lhs[m, k] · rhs[k, n]` into a row-major `dst` `[n, m]` (so `dst`'s element
/// `(j, i)` is the product's `(i, j)`), bands of the product's rows on the pool's threads.
fn banded((m, n, k): (usize, usize, usize), lhs: Mat<'_>, rhs: Mat<'_>) -> Vec<f32> {
    let mut dst = vec![0f32; n * m];
    if m == 0 || n == 0 || k == 0 {
        return dst;
    }
    assert!(
        lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs
            && rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs,
        "banded gemm: matrix bounds"
    );
    let threads = rayon::current_num_threads().max(1);
    let bands = if m * n * k < SPLIT_MIN_WORK {
        1
    } else {
        threads.min(m.div_ceil(16))
    };
    let per = m.div_ceil(bands).next_multiple_of(16).min(m);
    let out = SendPtr(dst.as_mut_ptr());
    let band = |b: usize| {
        let (start, end) = (b * per, ((b + 1) * per).min(m));
        if start >= end {
            return;
        }
        // SAFETY: the operands' bounds are checked above and `dst` holds `n × m` values;
        // band `b` writes only the elements `j * m + i` with `i` in `start..end`, which no
        // other band touches, and `dst` outlives the bands.
        unsafe {
            gemm::gemm(
                end - start,
                n,
                k,
                out.get().add(start),
                m as isize,
                1,
                false,
                lhs.data.as_ptr().add(start * lhs.rs),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr(),
                rhs.cs as isize,
                rhs.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if bands == 1 {
        band(0);
    } else {
        use rayon::prelude::*;
        (0..bands).into_par_iter().for_each(band);
    }
    dst
}

/// A raw pointer that bands of one product share (each writes its own elements).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: only used by `banded`, whose bands write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
