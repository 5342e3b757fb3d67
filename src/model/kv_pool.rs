//! The serving KV cache's memory: one pool of fixed-size blocks allocated once at start-up
//! (`--kv-cache-tokens`, `--kv-cache-dtype`). A sequence holds a block table (`KvCache::paged`);
//! each step writes its new rows into its blocks and attention reads through the table
//! (`ops::attention::KvSource`), so no step copies a sequence's history. Which block belongs to
//! whom, and which hold a cached prefix, is the engine's bookkeeping (`engine::kv_blocks`).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

use crate::ops::attention::{Int8Rows, KvSource};

/// How the pool stores keys and values (attention widens to f32 as it reads). `Int8`: each
/// head's row of a key or value is scaled by its absolute maximum to ±127 and rounded (one f32
/// scale per row and head): a quarter of f32's bytes. Int8 keys are kept offset by 128 and, per
/// block and head, in groups of 16 rows × 4 columns (`k4_offset`), the layout `vpdpbusd` reads:
/// attention's scores then come from integer dot products (`ops::attention::Int8Rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    Bf16,
    F16,
    Int8,
}

impl KvDtype {
    /// Bytes per stored element (an int8 row also has a 4-byte scale per head).
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::Int8 => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "KV cache dtype `{other}`: expected f32, bf16, f16 or int8"
            )),
        }
    }
}

enum Store {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(Vec<u16>),
    /// Values, and one scale per row and head.
    Int8(Vec<i8>, Vec<f32>),
}

/// The shape of a pool: `blocks` blocks of `block_size` positions for `layers` layers of
/// `kv_heads` heads of `head_dim` keys and as many values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub blocks: usize,
    pub dtype: KvDtype,
}

impl PoolShape {
    /// Bytes the pool takes (`None`: does not fit in an address space).
    pub fn bytes(&self) -> Option<usize> {
        let values = self.elements()?.checked_mul(self.dtype.bytes())?;
        let scales = match self.dtype {
            KvDtype::Int8 => (self.elements()? / self.head_dim.max(1)).checked_mul(4)?,
            _ => 0,
        };
        values.checked_add(scales)
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Whether rows are stored rotated (`ops::hadamard`): int8 rows whose head width is a power of
    /// two. Attention over such a pool rotates its queries and un-rotates its outputs.
    pub fn rotated(&self) -> bool {
        self.dtype == KvDtype::Int8 && crate::ops::hadamard::rotates(self.head_dim)
    }

    /// Whether int8 keys use the 16-row × 4-column layout (whole groups of 16 rows and 4 columns).
    fn k4(&self) -> bool {
        self.dtype == KvDtype::Int8 && self.block_size % 16 == 0 && self.head_dim % 4 == 0
    }

    /// Where key (row `r`, column `c`) lies in its head's run of a block: groups of 16 rows,
    /// and within a group, 4 columns of each of the 16 rows in turn.
    pub fn k4_offset(&self, r: usize, c: usize) -> usize {
        ((r / 16) * (self.head_dim / 4) + c / 4) * 64 + (r % 16) * 4 + c % 4
    }

    fn elements(&self) -> Option<usize> {
        self.layers
            .checked_mul(2)?
            .checked_mul(self.blocks)?
            .checked_mul(self.block_size)?
            .checked_mul(self.kv_heads)?
            .checked_mul(self.head_dim)
    }
}

pub struct KvPool {
    shape: PoolShape,
    store: Store,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPool({:?})", self.shape)
    }
}

impl KvPool {
    /// Allocates the whole pool (zeroed; the OS commits pages as blocks are first written).
    pub fn new(shape: PoolShape) -> Result<Self, String> {
        if shape.block_size == 0 || shape.blocks == 0 || shape.kv_width() == 0 {
            return Err(format!("KV pool: empty shape {shape:?}"));
        }
        let n = shape
            .elements()
            .filter(|_| shape.bytes().is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| format!("KV pool of {shape:?} does not fit in memory"))?;
        let store = match shape.dtype {
            KvDtype::F32 => Store::F32(vec![0f32; n]),
            KvDtype::Bf16 | KvDtype::F16 => Store::Half(vec![0u16; n]),
            KvDtype::Int8 => Store::Int8(vec![0i8; n], vec![0f32; n / shape.head_dim]),
        };
        Ok(Self { shape, store })
    }

    pub fn shape(&self) -> PoolShape {
        self.shape
    }

    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    pub fn blocks(&self) -> usize {
        self.shape.blocks
    }

    /// Offset of row 0 of `block` of kv head `head` (keys: `which` 0, values: 1) of `layer`.
    /// Each head's rows of a block are one run of `block_size · head_dim` elements, and a
    /// head's blocks follow one another, so a task reading one head streams through memory.
    fn base(&self, layer: usize, which: usize, head: usize, block: u32) -> usize {
        let s = &self.shape;
        (((layer * 2 + which) * s.kv_heads + head) * s.blocks + block as usize)
            * s.block_size
            * s.head_dim
    }

    /// Writes `k`, `v` (`[n, kv_width]`) at positions `start .. start + n` of the sequence whose
    /// block table is `table`. Panics if the table does not cover them (the engine allocates
    /// first; the model checks before calling).
    pub(crate) fn write(
        &mut self,
        layer: usize,
        table: &[u32],
        start: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let shape = self.shape;
        let (bs, w, hd) = (shape.block_size, shape.kv_width(), shape.head_dim);
        let n = k.len() / w;
        let mut turned = vec![0f32; if shape.rotated() { hd } else { 0 }];
        for i in 0..n {
            let pos = start + i;
            let (b, r) = (pos / bs, pos % bs);
            for (which, data) in [(0, k), (1, v)] {
                for head in 0..shape.kv_heads {
                    let base = self.base(layer, which, head, table[b]);
                    let mut x = &data[i * w + head * hd..][..hd];
                    if shape.rotated() {
                        turned.copy_from_slice(x);
                        crate::ops::hadamard::rotate(&mut turned);
                        x = &turned;
                    }
                    let at = base + r * hd;
                    match &mut self.store {
                        Store::F32(d) => d[at..at + hd].copy_from_slice(x),
                        Store::Half(d) => {
                            let dst = &mut d[at..at + hd];
                            if shape.dtype == KvDtype::Bf16 {
                                dst.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(x);
                            } else {
                                dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(x);
                            }
                        }
                        Store::Int8(d, scales) => {
                            let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let scale = absmax / 127.0;
                            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                            scales[base / hd + r] = scale;
                            let q = |v: &f32| (v * inv).round().clamp(-127.0, 127.0) as i8;
                            if which == 0 && shape.k4() {
                                for (c, v) in x.iter().enumerate() {
                                    d[base + shape.k4_offset(r, c)] =
                                        (q(v) as i16 + 128) as u8 as i8;
                                }
                            } else {
                                for (o, v) in d[at..at + hd].iter_mut().zip(x) {
                                    *o = q(v);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The keys and values of `layer` at positions `0 .. total` of the sequence with `table`.
    pub(crate) fn view<'a>(
        &'a self,
        layer: usize,
        table: &'a [u32],
        total: usize,
    ) -> PagedView<'a> {
        PagedView {
            pool: self,
            layer,
            table,
            total,
        }
    }

    /// Head `head` of `block`'s rows (keys: `which` 0, values: 1) as f32 with their row stride:
    /// f32 straight from the pool, other dtypes widened into `scratch` (`[block_size, head_dim]`).
    fn head<'s>(
        &'s self,
        (layer, which, block, head): (usize, usize, u32, usize),
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        let (bs, hd) = (self.shape.block_size, self.shape.head_dim);
        let base = self.base(layer, which, head, block);
        match &self.store {
            Store::F32(d) => (&d[base..base + bs * hd], hd),
            Store::Half(d) => {
                scratch.resize(bs * hd, 0.0);
                let src = &d[base..base + bs * hd];
                widen_half(src, self.shape.dtype == KvDtype::Bf16, scratch);
                (&scratch[..], hd)
            }
            Store::Int8(d, scales) => {
                scratch.resize(bs * hd, 0.0);
                let scales = &scales[base / hd..][..bs];
                if which == 0 && self.shape.k4() {
                    for (r, &scale) in scales.iter().enumerate() {
                        for (c, o) in scratch[r * hd..][..hd].iter_mut().enumerate() {
                            let u = d[base + self.shape.k4_offset(r, c)] as u8;
                            *o = (u as i32 - 128) as f32 * scale;
                        }
                    }
                } else {
                    for (r, &scale) in scales.iter().enumerate() {
                        let src = &d[base + r * hd..][..hd];
                        widen_i8(src, scale, &mut scratch[r * hd..][..hd]);
                    }
                }
                (&scratch[..], hd)
            }
        }
    }

    /// Head `head` of `block`'s int8 rows as stored, for the integer kernels (`None`: the pool is
    /// not int8, or its keys are not in the 16 × 4 layout).
    fn int8_rows(
        &self,
        (layer, which, block, head): (usize, usize, u32, usize),
    ) -> Option<Int8Rows<'_>> {
        let Store::Int8(d, scales) = &self.store else {
            return None;
        };
        let (bs, hd) = (self.shape.block_size, self.shape.head_dim);
        let base = self.base(layer, which, head, block);
        if which == 0 && !self.shape.k4() {
            return None;
        }
        Some(Int8Rows {
            data: &d[base..][..bs * hd],
            row_stride: if which == 0 { 0 } else { hd },
            scales: &scales[base / hd..][..bs],
            scale_stride: 1,
        })
    }
}

impl KvPool {
    /// Asks for the keys (into L1) and values (into L2: they are read after all the scores) of
    /// one head's block.
    fn prefetch(&self, (layer, block, head): (usize, u32, usize)) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let run = self.shape.block_size * self.shape.head_dim;
            let bytes = run * self.shape.dtype.bytes();
            let (k, v) = (
                self.base(layer, 0, head, block),
                self.base(layer, 1, head, block),
            );
            let (kp, vp): (*const i8, *const i8) = match &self.store {
                Store::F32(d) => (d[k..].as_ptr().cast(), d[v..].as_ptr().cast()),
                Store::Half(d) => (d[k..].as_ptr().cast(), d[v..].as_ptr().cast()),
                Store::Int8(d, _) => (d[k..].as_ptr(), d[v..].as_ptr()),
            };
            // SAFETY: a prefetch reads nothing architecturally; both runs lie inside the store
            // (`base` of an existing block, `run` elements each).
            unsafe {
                for at in (0..bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(kp.add(at));
                    _mm_prefetch::<_MM_HINT_T1>(vp.add(at));
                }
            }
        }
    }
}

/// bf16 (`bf16`) or f16 bit patterns to f32, 8 at a time where AVX2 (and F16C) are there.
fn widen_half(src: &[u16], bf16: bool, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let simd = crate::ops::cpu_features::avx2_fma() && src.len() % 8 == 0;
        if simd && bf16 {
            // SAFETY: AVX2 checked at run time; whole chunks of 8 in and out.
            unsafe { widen_bf16_avx2(src, dst) };
            return;
        }
        if simd && crate::ops::cpu_features::f16c() {
            // SAFETY: AVX2 and F16C checked at run time; whole chunks of 8 in and out.
            unsafe { widen_f16_f16c(src, dst) };
            return;
        }
    }
    if bf16 {
        src.reinterpret_cast::<bf16>().convert_to_f32_slice(dst);
    } else {
        src.reinterpret_cast::<f16>().convert_to_f32_slice(dst);
    }
}

/// bf16 → f32 is a shift: AVX2 alone (a CPU with AVX2 but no F16C takes this path too).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (c, o) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        let h = _mm_loadu_si128(c.as_ptr() as *const __m128i);
        let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        _mm256_storeu_ps(o.as_mut_ptr(), f);
    }
}

/// f16 → f32 needs F16C's `vcvtph2ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (c, o) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        let h = _mm_loadu_si128(c.as_ptr() as *const __m128i);
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(h));
    }
}

/// `dst = scale · src`.
fn widen_i8(src: &[i8], scale: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::cpu_features::avx2_fma() && src.len() % 8 == 0 {
        // SAFETY: AVX2 checked at run time; each step reads 8 bytes of `src` and writes 8 floats
        // of `dst`, both whole chunks.
        unsafe { widen_i8_avx2(src, scale, dst) };
        return;
    }
    for (o, &q) in dst.iter_mut().zip(src) {
        *o = q as f32 * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_i8_avx2(src: &[i8], scale: f32, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let s = _mm256_set1_ps(scale);
    for (c, o) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        let b = _mm_loadl_epi64(c.as_ptr() as *const __m128i);
        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(f, s));
    }
}

/// One sequence's history in one layer, read through its block table.
pub struct PagedView<'a> {
    pool: &'a KvPool,
    layer: usize,
    table: &'a [u32],
    total: usize,
}

impl KvSource for PagedView<'_> {
    fn total(&self) -> usize {
        self.total
    }

    fn block_rows(&self) -> usize {
        self.pool.shape.block_size
    }

    fn keys<'s>(
        &'s self,
        block: usize,
        head: usize,
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        let at = (self.layer, 0, self.table[block], head);
        self.pool.head(at, scratch)
    }

    fn values<'s>(
        &'s self,
        block: usize,
        head: usize,
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        let at = (self.layer, 1, self.table[block], head);
        self.pool.head(at, scratch)
    }

    fn prefetch(&self, block: usize, head: usize) {
        self.pool.prefetch((self.layer, self.table[block], head));
    }

    fn int8_keys(&self, block: usize, head: usize) -> Option<Int8Rows<'_>> {
        self.pool
            .int8_rows((self.layer, 0, self.table[block], head))
    }

    fn int8_values(&self, block: usize, head: usize) -> Option<Int8Rows<'_>> {
        self.pool
            .int8_rows((self.layer, 1, self.table[block], head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{causal_attention_host, Heads};

    /// A pool's view with its int8 bytes hidden: attention widens every block instead.
    struct Widened<'a>(PagedView<'a>);

    impl KvSource for Widened<'_> {
        fn total(&self) -> usize {
            self.0.total()
        }
        fn block_rows(&self) -> usize {
            self.0.block_rows()
        }
        fn keys<'s>(&'s self, b: usize, h: usize, s: &'s mut Vec<f32>) -> (&'s [f32], usize) {
            self.0.keys(b, h, s)
        }
        fn values<'s>(&'s self, b: usize, h: usize, s: &'s mut Vec<f32>) -> (&'s [f32], usize) {
            self.0.values(b, h, s)
        }
    }

    /// A one-layer pool of `total` positions of `kv_heads` heads of 64 in `dtype`, its blocks in
    /// reverse order, filled with deterministic keys and values; and `rows` query rows of `heads`.
    fn filled_pool(
        kv_heads: usize,
        total: usize,
        dtype: KvDtype,
        rows: usize,
        heads: usize,
    ) -> (KvPool, Vec<u32>, Vec<f32>) {
        let shape = PoolShape {
            layers: 1,
            kv_heads,
            head_dim: 64,
            block_size: 16,
            blocks: total.div_ceil(16),
            dtype,
        };
        let mut pool = KvPool::new(shape).unwrap();
        let table: Vec<u32> = (0..shape.blocks as u32).rev().collect();
        let w = shape.kv_width();
        let k: Vec<f32> = (0..total * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0)
            .collect();
        let v: Vec<f32> = (0..total * w)
            .map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0)
            .collect();
        pool.write(0, &table, 0, &k, &v);
        let q: Vec<f32> = (0..rows * heads * 64)
            .map(|i| ((i * 31 % 113) as f32 / 56.5 - 1.0) * 3.0)
            .collect();
        (pool, table, q)
    }

    /// Decode attention over int8 keys and values: the integer kernels (where the CPU has
    /// AVX-512 VNNI) agree with widening the same bytes to f32, for long histories split
    /// between tasks and short ones, for groups of query heads up to four (one kernel call)
    /// and past it (Qwen2.5-0.5B's seven, in sub-groups of four).
    #[test]
    fn int8_kernels_agree_with_widened_int8() {
        for (heads, kv_heads) in [(9, 3), (14, 2), (10, 2)] {
            let shape = Heads {
                heads,
                kv_heads,
                head_dim: 64,
                scoring: Default::default(),
            };
            for total in [37usize, 700, 2100] {
                let (pool, table, q) = filled_pool(kv_heads, total, KvDtype::Int8, 1, heads);
                let view = pool.view(0, &table, total);
                let (mut fast, mut wide) = (vec![0f32; heads * 64], vec![0f32; heads * 64]);
                causal_attention_host(&q, &view, shape, &mut fast);
                causal_attention_host(&q, &Widened(pool.view(0, &table, total)), shape, &mut wide);
                let worst = fast
                    .iter()
                    .zip(&wide)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{heads}/{kv_heads} heads, total {total}: int8 kernels within {worst} of widened");
                assert!(
                    worst < 0.01,
                    "{heads}/{kv_heads} heads, total {total}: {worst}"
                );
            }
        }
    }

    /// With a sliding window, the blocks behind every query's window may be given back
    /// (`KvCache::drop_blocks_before`): attention then reads none of them (a read would index
    /// past the pool and panic) and gives bit for bit what the whole table gives, for decode
    /// rows and a chunk of prompt rows, in each dtype and with the integer kernels.
    #[test]
    fn attention_reads_no_block_behind_the_window() {
        use crate::model::kv_cache::DROPPED;
        use crate::ops::attention::Scoring;
        for dtype in [KvDtype::F32, KvDtype::Int8] {
            for (total, len, window) in [(1500usize, 1, 300usize), (1500, 7, 300), (90, 5, 17)] {
                let heads = Heads {
                    heads: 8,
                    kv_heads: 2,
                    head_dim: 64,
                    scoring: Scoring {
                        window: Some(window),
                        ..Default::default()
                    },
                };
                let (pool, table, q) = filled_pool(2, total, dtype, len, 8);
                // The first query (position total - len) sees keys from total - len + 1 - window.
                let first = (total - len + 1 - window) / 16;
                assert!(first > 0, "the case drops blocks");
                let mut dropped = table.clone();
                dropped[..first].fill(DROPPED);
                let (mut whole, mut part) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                causal_attention_host(&q, &pool.view(0, &table, total), heads, &mut whole);
                causal_attention_host(&q, &pool.view(0, &dropped, total), heads, &mut part);
                assert_eq!(whole, part, "{dtype:?} total {total} rows {len}");
            }
        }
    }

    #[test]
    fn rows_written_through_a_table_read_back_in_each_dtype() {
        for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::F16, KvDtype::Int8] {
            let shape = PoolShape {
                layers: 2,
                kv_heads: 2,
                head_dim: 3,
                block_size: 4,
                blocks: 5,
                dtype,
            };
            let mut pool = KvPool::new(shape).unwrap();
            let scales = if dtype == KvDtype::Int8 {
                2 * 2 * 5 * 4 * 2 * 4
            } else {
                0
            };
            assert_eq!(
                shape.bytes(),
                Some(2 * 2 * 5 * 4 * 6 * dtype.bytes() + scales)
            );
            let table = [3u32, 0, 4];
            let k: Vec<f32> = (0..9 * 6)
                .map(|i| (i as f32 * 0.37).sin() * (1 + i % 5) as f32)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            // Positions 0..2, then 2..9, crossing block boundaries.
            pool.write(1, &table, 0, &k[..12], &v[..12]);
            pool.write(1, &table, 2, &k[12..], &v[12..]);
            let view = pool.view(1, &table, 9);
            let mut scratch = Vec::new();
            for pos in 0..9 {
                let (b, r) = (pos / 4, pos % 4);
                for head in 0..2 {
                    let want = &k[pos * 6 + head * 3..][..3];
                    let row_max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let (kb, ks) = view.keys(b, head, &mut scratch);
                    let got_k = kb[r * ks..r * ks + 3].to_vec();
                    let (vb, vs) = view.values(b, head, &mut scratch);
                    let got_v = vb[r * vs..r * vs + 3].to_vec();
                    for c in 0..3 {
                        let tol = match dtype {
                            KvDtype::F32 => 0.0,
                            // Within half a step of the row's scale.
                            KvDtype::Int8 => row_max / 254.0 * 1.001,
                            _ => want[c].abs() / 128.0,
                        };
                        assert!((got_k[c] - want[c]).abs() <= tol, "{dtype:?} pos {pos}");
                        assert!((got_v[c] + want[c]).abs() <= tol, "{dtype:?} pos {pos}");
                    }
                }
            }
            // Layer 0 was not touched.
            let layer0 = pool.view(0, &table, 9);
            let (untouched, _) = layer0.keys(0, 1, &mut scratch);
            assert!(untouched.iter().all(|&x| x == 0.0));
        }
        // Int8 keys in the 16 × 4 layout read back through `head` and `int8_rows`; a power-of-two
        // head width, so the rows are stored rotated (the first part's width 3 is not).
        let shape = PoolShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 8,
            block_size: 16,
            blocks: 3,
            dtype: KvDtype::Int8,
        };
        let mut pool = KvPool::new(shape).unwrap();
        let k: Vec<f32> = (0..20 * 16)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        assert!(shape.rotated());
        pool.write(0, &[2, 0], 0, &k, &k);
        let mut turned = k.clone();
        crate::ops::hadamard::rotate_heads(&mut turned, 8);
        let view = pool.view(0, &[2, 0], 20);
        let mut scratch = Vec::new();
        for (b, head) in [(0, 0), (0, 1), (1, 1)] {
            let (rows, stride) = view.keys(b, head, &mut scratch);
            let raw = view.int8_keys(b, head).expect("k4 layout");
            for r in 0..4usize.min(20 - b * 16) {
                for c in 0..8 {
                    let want = turned[(b * 16 + r) * 16 + head * 8 + c];
                    let scale = raw.scales[r * raw.scale_stride];
                    assert!((rows[r * stride + c] - want).abs() <= scale * 0.5 + 1e-6);
                    let byte = raw.data[shape.k4_offset(r, c)] as u8;
                    assert_eq!((byte as i32 - 128) as f32 * scale, rows[r * stride + c]);
                }
            }
        }
        let huge = PoolShape {
            layers: 1 << 20,
            kv_heads: 1 << 10,
            head_dim: 1 << 10,
            block_size: 1 << 20,
            blocks: 1 << 20,
            dtype: KvDtype::F32,
        };
        assert!(KvPool::new(huge).unwrap_err().contains("does not fit"));
    }
}
