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
