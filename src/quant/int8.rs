//! What the integer kernels of GGUF weights share: activations quantized to 8 bits per block of
//! 32 (once per row and matmul), the choice of kernel (AVX-512 VNNI, AVX2, portable), and the
//! driver that runs a kernel over row tiles of 16 output rows, 4 activation rows at a time,
//! tiles split over threads.

use rayon::prelude::*;

/// Values per block (weights and activations alike).
pub const QK: usize = 32;
/// Output rows per tile.
pub const TILE: usize = 16;
/// Most activation rows one kernel call takes (`TileWeight::ROWS` ≤ this).
pub const MAX_ROWS: usize = 16;
/// A kernel call's results: activation row × the tile's 16 output rows.
pub type Acc = [[f32; TILE]; MAX_ROWS];

/// Blocks per row of GGUF `ty` data holding `rows` rows × `cols` values in blocks of `block`
/// values, `block_bytes` bytes each; or why the data does not.
pub fn stored_blocks(
    ty: &str,
    data: &[u8],
    (rows, cols): (usize, usize),
    block: usize,
    block_bytes: usize,
) -> Result<usize, String> {
    if cols % block != 0 {
        return Err(format!(
            "{ty} rows of {cols} values are not whole blocks of {block}"
        ));
    }
    let kb = cols / block;
    if data.len() != rows * kb * block_bytes {
        return Err(format!(
            "{ty} data of {} bytes does not hold {rows} × {cols} values",
            data.len()
        ));
    }
    Ok(kb)
}

/// A weight's tiles built from GGUF rows of `kb` blocks of `block_bytes` each, in the tiles'
/// order (row tile `t`, block `b` at `t · kb + b`), each whole before it is stored:
/// `fill(tile, lane, block)` writes output row `16·t + lane`'s block `b` (taken from stored row
/// `order.source(…)`) into a tile that starts as `empty`; lanes past the last row keep `empty`.
/// The tiles' memory is written once (no fill beforehand) and, where large, populated in one
/// call rather than faulted in page by page.
pub fn build_tiles<T: Clone>(
    data: &[u8],
    rows: usize,
    kb: usize,
    block_bytes: usize,
    order: RowOrder,
    empty: &T,
    fill: impl Fn(&mut T, usize, &[u8]),
) -> Vec<T> {
    let row_tiles = rows.div_ceil(TILE);
    let mut tiles: Vec<T> = Vec::with_capacity(row_tiles * kb);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = tiles.capacity() * std::mem::size_of::<T>();
        let start = (tiles.as_mut_ptr() as usize).next_multiple_of(PAGE);
        let end = (tiles.as_mut_ptr() as usize + bytes) & !(PAGE - 1);
        if bytes >= 1 << 20 && end > start {
            // SAFETY: advice on whole pages inside this vector's own allocation, not yet
            // written; it backs them with memory and never changes what they hold.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    for t in 0..row_tiles {
        let lanes = TILE.min(rows - t * TILE);
        for b in 0..kb {
            let mut tile = empty.clone();
            for lane in 0..lanes {
                let src = order.source(t * TILE + lane);
                fill(
                    &mut tile,
                    lane,
                    &data[(src * kb + b) * block_bytes..][..block_bytes],
                );
            }
            tiles.push(tile);
        }
    }
    tiles
}

/// Which stored row each output row of a repacked weight takes: the file's order, or a
/// permutation (a Llama GGUF's q and k rows, un-permuted for the RoPE as they are repacked).
#[derive(Clone, Copy, Default)]
pub struct RowOrder<'a>(pub(crate) Option<&'a [usize]>);

impl<'a> RowOrder<'a> {
    /// The stored order.
    pub const STORED: Self = Self(None);

    /// Output row `i` takes stored row `order[i]`; `order` must pick among `rows` rows, once each.
    pub fn new(order: &'a [usize], rows: usize) -> Result<Self, String> {
        let mut seen = vec![false; rows];
        for &r in order {
            if r >= rows || std::mem::replace(&mut seen[r], true) {
                return Err(format!("the row order is not a permutation of {rows} rows"));
            }
        }
        if order.len() != rows {
            return Err(format!(
                "a row order of {} rows for {rows} rows",
                order.len()
            ));
        }
        Ok(Self(Some(order)))
    }

    /// The stored row that output row `r` takes.
    #[inline]
    pub fn source(&self, r: usize) -> usize {
        self.0.map_or(r, |o| o[r])
    }
}

/// Activations quantized to 8 bits per block of 32: `xd = max|x| / 127`, `xq = round(x / xd)`.
pub struct Activations {
    cols: usize,
    q: Vec<i8>,
    /// Per row and block: the scale `xd`, `xd · Σ xq`, and `Σ xq`.
    d: Vec<f32>,
    s: Vec<f32>,
    sum: Vec<i32>,
    /// Per row and half block (16 values): `Σ xq` (Q6_K's 16-value parts).
    sum16: Vec<i32>,
}

impl Activations {
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> Self {
        assert_eq!(x.len(), n * cols, "activations do not match the weight");
        let kb = cols / QK;
        let mut q = vec![0i8; n * cols];
        let mut d = vec![0f32; n * kb];
        let mut s = vec![0f32; n * kb];
        let mut sums = vec![0i32; n * kb];
        let mut sum16 = vec![0i32; 2 * n * kb];
        // Blocks are independent: spread over threads in runs of whole blocks (a prefill's
        // activations are quantized once per matmul, on both cores).
        const BLOCKS_PER_TASK: usize = 512;
        x.par_chunks(QK * BLOCKS_PER_TASK)
            .zip(q.par_chunks_mut(QK * BLOCKS_PER_TASK))
            .zip(d.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(s.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(sums.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(sum16.par_chunks_mut(2 * BLOCKS_PER_TASK))
            .for_each(|(((((x, q), d), s), sums), sum16)| {
                for (blk, (xs, qs)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    let mut sum = 0i32;
                    for (v, o) in xs.iter().zip(qs.iter_mut()) {
                        // Round to nearest (ties to even) by the float-add trick: |v·inv| <=
                        // 127, far below 2^22, and it vectorizes where `round` is a libm call.
                        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
                        let r = ((v * inv + MAGIC) - MAGIC) as i8;
                        *o = r;
                        sum += r as i32;
                    }
                    d[blk] = scale;
                    s[blk] = scale * sum as f32;
                    sums[blk] = sum;
                    sum16[2 * blk] = qs[..QK / 2].iter().map(|&v| v as i32).sum();
                    sum16[2 * blk + 1] = sum - sum16[2 * blk];
                }
            });
        Self {
            cols,
            q,
            d,
            s,
            sum: sums,
            sum16,
        }
    }

    pub fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.cols..(i + 1) * self.cols]
    }

    /// `(xd, xd · Σ xq)` of row `i`, block `b`.
    pub fn scale(&self, i: usize, b: usize) -> (f32, f32) {
        let kb = self.cols / QK;
        (self.d[i * kb + b], self.s[i * kb + b])
    }

    /// Row `i`'s `xd` and `xd · Σ xq`, one per block.
    pub fn scales_row(&self, i: usize) -> (&[f32], &[f32]) {
        let kb = self.cols / QK;
        (&self.d[i * kb..(i + 1) * kb], &self.s[i * kb..(i + 1) * kb])
    }

    /// Row `i`'s `Σ xq` per 16 values (two per block).
    pub fn sums16_row(&self, i: usize) -> &[i32] {
        let parts = 2 * (self.cols / QK);
        &self.sum16[i * parts..(i + 1) * parts]
    }

    /// `Σ xq` of row `i`, block `b`.
    pub fn sum(&self, i: usize, b: usize) -> i32 {
        self.sum[i * (self.cols / QK) + b]
    }
}

/// Which instruction set a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX-512 VNNI, with Intel AMX tiles for the wide calls of the kernels that have them.
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Kernel {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if super::amx::available() {
                return Self::Amx;
            }
            if crate::ops::cpu_features::avx512_vnni() {
                return Self::Avx512Vnni;
            }
            if crate::ops::cpu_features::f16c() {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Whether this is the AVX-512 VNNI kernel.
    pub fn is_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Self::Avx512Vnni || self == Self::Amx {
            return true;
        }
        false
    }

    /// Every kernel this CPU runs (for tests comparing them).
    pub fn available() -> Vec<Self> {
        let mut k = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::ops::cpu_features::f16c() {
                k.push(Self::Avx2);
            }
            if crate::ops::cpu_features::avx512_vnni() {
                k.push(Self::Avx512Vnni);
            }
            if super::amx::available() {
                k.push(Self::Amx);
            }
        }
        k
    }
}

/// A weight format repacked into row tiles, with one kernel per instruction set.
pub trait TileWeight: Sync {
    type Tile: Sync;
    fn dims(&self) -> (usize, usize);
    fn tiles(&self) -> &[Self::Tile];
    /// Rows `ids` as f32, `[ids.len(), cols]`.
    fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32>;
    /// Activation rows per kernel call (register blocking; ≤ `MAX_ROWS`).
    const ROWS: usize = 4;
    /// Accumulates activation rows `i..i + rows` (≤ `ROWS`) against one row tile with `kernel`.
    fn run(
        kernel: Kernel,
        tiles: &[Self::Tile],
        act: &Activations,
        i: usize,
        rows: usize,
        acc: &mut Acc,
    );
}

/// Implements `TileWeight` for a weight type with `rows`, `cols` and `tiles` fields and an
/// inherent `dequantize_rows`, whose module has the kernels `portable`, `avx2` and `avx512`
/// (`fn(&[Tile], &Activations, i, rows, &mut acc)`, the last two `unsafe`, compiled for their
/// instruction sets); `rows` sets `TileWeight::ROWS` (default 4); `amx` names the module's
/// AMX kernel (same signature), otherwise `Kernel::Amx` runs the AVX-512 one.
macro_rules! tile_weight {
    ($weight:ty, $tile:ty) => {
        $crate::quant::int8::tile_weight!($weight, $tile, 4, avx512);
    };
    ($weight:ty, $tile:ty, $rows:expr) => {
        $crate::quant::int8::tile_weight!($weight, $tile, $rows, avx512);
    };
    ($weight:ty, $tile:ty, $rows:expr, $amx:ident) => {
        impl std::fmt::Debug for $weight {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}[{}, {}]", stringify!($weight), self.rows, self.cols)
            }
        }

        impl $weight {
            /// Repacks GGUF data of `rows` rows × `cols` values, in the file's row order.
            pub fn from_gguf(data: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
                Self::from_gguf_ordered(data, rows, cols, $crate::quant::int8::RowOrder::STORED)
            }

            pub fn dims(&self) -> (usize, usize) {
                (self.rows, self.cols)
            }

            /// Bytes held: the tiles, padding rows up to a multiple of 16 included.
            pub fn bytes(&self) -> usize {
                self.tiles.len() * std::mem::size_of::<$tile>()
            }

            /// The weight as f32, row-major.
            pub fn dequantize(&self) -> Vec<f32> {
                self.dequantize_rows(&(0..self.rows as u32).collect::<Vec<_>>())
            }

            /// `x · Wᵀ` for `x` of `[n, cols]` (row-major) → `[n, rows]`.
            pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
                $crate::quant::int8::matmul_t(self, x, n)
            }
        }

        impl $crate::quant::int8::TileWeight for $weight {
            type Tile = $tile;
            const ROWS: usize = $rows;

            fn dims(&self) -> (usize, usize) {
                (self.rows, self.cols)
            }

            fn tiles(&self) -> &[$tile] {
                &self.tiles
            }

            fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
                <$weight>::dequantize_rows(self, ids)
            }

            fn run(
                kernel: $crate::quant::int8::Kernel,
                tiles: &[$tile],
                act: &$crate::quant::int8::Activations,
                i: usize,
                rows: usize,
                acc: &mut $crate::quant::int8::Acc,
            ) {
                use $crate::quant::int8::Kernel;
                match kernel {
                    Kernel::Portable => portable(tiles, act, i, rows, acc),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: chosen only where the CPU reports the features.
                    Kernel::Avx2 => unsafe { avx2(tiles, act, i, rows, acc) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => unsafe { avx512(tiles, act, i, rows, acc) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Amx => unsafe { $amx(tiles, act, i, rows, acc) },
                }
            }
        }
    };
}
pub(crate) use tile_weight;

/// `x · Wᵀ` for `x` of `[n, cols]` → `[n, rows]` by the integer kernels, at every batch size: a
/// row's result depends on that row alone (a prefill step of 256 rows computes each row exactly
/// as a decode step of one does), so prefix-cache hits and batching never change an answer.
pub fn matmul_t<W: TileWeight>(w: &W, x: &[f32], n: usize) -> Vec<f32> {
    matmul_t_int(w, x, n, Kernel::detect())
}

/// The integer path with a given kernel (tests and benchmarks compare them).
pub fn matmul_t_int<W: TileWeight>(w: &W, x: &[f32], n: usize, kernel: Kernel) -> Vec<f32> {
    let (rows, cols) = w.dims();
    let act = Activations::quantize(x, n, cols);
    matmul_tiles(
        w.tiles(),
        rows,
        cols,
        n,
        W::ROWS,
        &act,
        |tiles, act, i, k, acc| W::run(kernel, tiles, act, i, k, acc),
    )
}

/// A kernel call's `rows` activation rows in groups of eight (the AVX-512 kernels' register
/// blocking): `run(start, k, acc[start .. start + k])` for each group of `k` rows.
pub fn by_eights(
    rows: usize,
    acc: &mut Acc,
    mut run: impl FnMut(usize, usize, &mut [[f32; TILE]]),
) {
    for start in (0..rows).step_by(8) {
        let k = (rows - start).min(8);
        run(start, k, &mut acc[start..start + k]);
    }
}

/// Four bytes of `x` from `at` as one little-endian `i32` (to broadcast to every lane).
#[inline]
pub fn broadcast4(x: &[i8], at: usize) -> i32 {
    let four: [i8; 4] = x[at..at + 4].try_into().expect("four bytes");
    i32::from_le_bytes(four.map(|b| b as u8))
}

/// `x · Wᵀ` over `tiles` (`[row tile][block of columns]`: 32 columns each, or a K-quant's
/// super-block of 256) of a `[rows, cols]` weight, for `n` activation rows held in `act` (in
/// whatever form the kernel reads): `run(tiles of one row tile, act, i, k, acc)` accumulates
/// activation rows `i..i + k` (k ≤ `group` ≤ `MAX_ROWS`) into `acc`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tiles<T: Sync, A: Sync>(
    tiles: &[T],
    rows: usize,
    cols: usize,
    n: usize,
    group: usize,
    act: &A,
    run: impl Fn(&[T], &A, usize, usize, &mut Acc) + Sync,
) -> Vec<f32> {
    let row_tiles = rows.div_ceil(TILE);
    let kb = tiles.len() / row_tiles.max(1);
    // Enough tiles per task that a task outweighs its hand-off.
    let per_task = ((1 << 18) / (cols.max(1) * TILE * n.max(1))).clamp(1, row_tiles.max(1));
    let mut y = vec![0f32; n * rows];
    let out = OutColumns(y.as_mut_ptr());
    (0..row_tiles)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(|t0| {
            let t1 = (t0 + per_task).min(row_tiles);
            for t in t0..t1 {
                let tile_row = &tiles[t * kb..(t + 1) * kb];
                let valid = TILE.min(rows - t * TILE);
                let mut i = 0;
                while i < n {
                    let k = (n - i).min(group);
                    let mut acc = [[0f32; TILE]; MAX_ROWS];
                    run(tile_row, act, i, k, &mut acc);
                    for (r, a) in acc.iter().enumerate().take(k) {
                        // SAFETY: row i + r < n, columns t·16 .. t·16 + valid ≤ rows: inside
                        // `y`, and only this task writes tile t's columns.
                        unsafe { out.write((i + r) * rows + t * TILE, &a[..valid]) };
                    }
                    i += k;
                }
            }
        });
    y
}

/// The output of `matmul_tiles`, written by its tasks in place: each task owns its row tiles'
/// columns of every row, so no two write the same element.
struct OutColumns(*mut f32);

// SAFETY: the tasks write disjoint elements (see `matmul_tiles`) and `y` outlives them.
unsafe impl Sync for OutColumns {}

impl OutColumns {
    /// # Safety
    /// `at .. at + values.len()` lies inside the output and no other task writes it.
    unsafe fn write(&self, at: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len());
    }
}

/// Checks shared by the kernels' tests: against the exact product of the dequantized weight
/// within the activations' rounding bound, and every SIMD kernel against the portable one.
/// The tests every GGUF weight type of ours passes (`q4_k.rs`, `q5_k.rs`, `q6_k.rs`, `q5_0.rs`): its
/// dequantization against ggml's, its kernels against dequantize-then-matmul within the
/// activations' rounding, SIMD (and AMX) against portable, rows independent of the batch, and
/// bad data refused.
#[cfg(test)]
macro_rules! kernel_tests {
    ($weight:ty, $dtype:expr) => {
        use $crate::quant::int8::checks;

        fn stored(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
            checks::ggml_quantized(rows, cols, seed, $dtype)
        }

        #[test]
        fn dequantize_follows_ggml() {
            for (rows, cols) in [(3, 256), (17, 512), (40, 768)] {
                let data = stored(rows, cols, 5);
                let w = <$weight>::from_gguf(&data, rows, cols).unwrap();
                let theirs = checks::ggml_dequantized(&data, rows, cols, $dtype);
                assert_eq!(w.dequantize(), theirs, "{rows}x{cols}");
            }
            assert!(<$weight>::from_gguf(&stored(2, 256, 1), 2, 128).is_err());
            assert!(<$weight>::from_gguf(&stored(2, 256, 1)[1..], 2, 256).is_err());
        }

        #[test]
        fn matches_dequantized_matmul_within_the_activation_rounding_bound() {
            for (rows, cols) in [(16, 256), (37, 512), (100, 768), (48, 2048)] {
                let w = <$weight>::from_gguf(&stored(rows, cols, rows as u64), rows, cols).unwrap();
                checks::within_rounding_bound(&w);
            }
        }

        #[test]
        fn simd_and_portable_paths_agree() {
            let (rows, cols) = (45, 512);
            checks::simd_matches_portable(
                &<$weight>::from_gguf(&stored(rows, cols, 3), rows, cols).unwrap(),
            );
        }

        #[test]
        fn rows_are_independent_of_the_batch() {
            let (rows, cols) = (45, 512);
            checks::rows_are_independent(
                &<$weight>::from_gguf(&stored(rows, cols, 3), rows, cols).unwrap(),
            );
        }
    };
}
#[cfg(test)]
pub(crate) use kernel_tests;

#[cfg(test)]
pub(crate) mod checks {
    use super::*;

    /// GGUF bytes of a `rows × cols` pseudo-random weight (with a few larger values, so scales
    /// vary) quantized to `dtype` by ggml's rules (candle's port).
    pub fn ggml_quantized(
        rows: usize,
        cols: usize,
        seed: u64,
        dtype: candle_core::quantized::GgmlDType,
    ) -> Vec<u8> {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let h = (i as u64 + seed * 7919).wrapping_mul(2654435761) % 10007;
                (h as f32 / 10007.0 - 0.5) * 0.2 + if i % 97 == 0 { 0.3 } else { 0.0 }
            })
            .collect();
        let t = candle_core::Tensor::from_vec(w, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let q = candle_core::quantized::QTensor::quantize(&t, dtype).unwrap();
        q.data().unwrap().to_vec()
    }

    /// ggml's dequantization (candle's port) of GGUF `dtype` bytes of a `rows × cols` weight.
    pub fn ggml_dequantized(
        data: &[u8],
        rows: usize,
        cols: usize,
        dtype: candle_core::quantized::GgmlDType,
    ) -> Vec<f32> {
        use candle_core::quantized::{QStorage, QTensor};
        let dev = candle_core::Device::Cpu;
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(data), &dev, dtype).unwrap();
        QTensor::new(storage, (rows, cols))
            .unwrap()
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn activations(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0)
            .collect()
    }

    /// `|y - x·Wᵀ| <= Σ_blocks xd/2 · Σ|w|` (plus float rounding) at 1, 3, 8, 9 and 32 rows.
    pub fn within_rounding_bound<W: TileWeight>(w: &W) {
        let (rows, cols) = w.dims();
        let dense = w.dequantize_rows(&(0..rows as u32).collect::<Vec<_>>());
        for n in [1, 3, 8, 9, 32] {
            let x = activations(n, cols);
            let act = Activations::quantize(&x, n, cols);
            let y = matmul_t(w, &x, n);
            for i in 0..n {
                for r in 0..rows {
                    let wr = &dense[r * cols..(r + 1) * cols];
                    let xr = &x[i * cols..(i + 1) * cols];
                    let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let bound: f64 = (0..cols / QK)
                        .map(|b| {
                            act.scale(i, b).0 as f64 / 2.0
                                * wr[b * QK..(b + 1) * QK]
                                    .iter()
                                    .map(|v| v.abs() as f64)
                                    .sum::<f64>()
                        })
                        .sum();
                    let err = (y[i * rows + r] as f64 - exact).abs();
                    assert!(
                        err <= bound + 1e-4 * (1.0 + exact.abs()),
                        "{rows}x{cols} n={n} [{i},{r}]: {} vs {exact} (bound {bound})",
                        y[i * rows + r]
                    );
                }
            }
        }
    }

    /// A row's result is bit for bit the same alone and among others, at every batch size
    /// (prefill steps and decode steps compute a position alike).
    pub fn rows_are_independent<W: TileWeight>(w: &W) {
        let (rows, cols) = w.dims();
        let n = 300;
        let x = activations(n, cols);
        let all = matmul_t(w, &x, n);
        for i in [0, 1, 2, 3, 4, 5, 127, 128, 129, 299] {
            let one = matmul_t(w, &x[i * cols..(i + 1) * cols], 1);
            assert_eq!(&all[i * rows..(i + 1) * rows], &one[..], "row {i} of {n}");
            let few = matmul_t(w, &x[(i.min(297)) * cols..(i.min(297) + 3) * cols], 3);
            let at = i - i.min(297);
            assert_eq!(
                &all[i * rows..(i + 1) * rows],
                &few[at * rows..(at + 1) * rows]
            );
        }
    }

    /// Every kernel this CPU runs gives the portable kernel's results; AMX gives AVX-512's bit
    /// for bit (16-row groups by AMX, the rest by AVX-512, at 16, 33 and 40 rows).
    pub fn simd_matches_portable<W: TileWeight>(w: &W) {
        let cols = w.dims().1;
        for n in [1, 3, 8, 9, 16, 33, 40] {
            let x = activations(n, cols);
            let reference = matmul_t_int(w, &x, n, Kernel::Portable);
            for k in Kernel::available() {
                let y = matmul_t_int(w, &x, n, k);
                for (a, b) in y.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{k:?} n={n}: {a} vs {b}"
                    );
                }
                #[cfg(target_arch = "x86_64")]
                if k == Kernel::Amx {
                    assert_eq!(y, matmul_t_int(w, &x, n, Kernel::Avx512Vnni), "AMX n={n}");
                }
            }
        }
    }
}
