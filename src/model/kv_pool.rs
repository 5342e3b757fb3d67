//! The serving KV cache's memory: one pool of fixed-size blocks allocated once at start-up
//! (`--kv-cache-tokens`, `--kv-cache-dtype`). A sequence holds a block table (`KvCache::paged`);
//! each step writes its new rows into its blocks and attention reads through the table
//! (`ops::attention::KvSource`), so no step copies a sequence's history. Which block belongs to
//! whom, and which hold a cached prefix, is the engine's bookkeeping (`engine::kv_blocks`).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

use crate::ops::attention::KvSource;

/// How the pool stores keys and values (attention widens to f32 as it reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
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
            other => Err(format!(
                "KV cache dtype `{other}`: expected f32, bf16 or f16"
            )),
        }
    }
}

enum Store {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(Vec<u16>),
}

/// The shape of a pool: `blocks` blocks of `block_size` positions for `layers` layers of
/// `kv_width` (= kv_heads · head_dim) keys and as many values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub layers: usize,
    pub kv_width: usize,
    pub block_size: usize,
    pub blocks: usize,
    pub dtype: KvDtype,
}

impl PoolShape {
    /// Bytes the pool takes (`None`: does not fit in an address space).
    pub fn bytes(&self) -> Option<usize> {
        self.elements()?.checked_mul(self.dtype.bytes())
    }

    fn elements(&self) -> Option<usize> {
        self.layers
            .checked_mul(2)?
            .checked_mul(self.blocks)?
            .checked_mul(self.block_size)?
            .checked_mul(self.kv_width)
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
        if shape.block_size == 0 || shape.blocks == 0 || shape.kv_width == 0 {
            return Err(format!("KV pool: empty shape {shape:?}"));
        }
        let n = shape
            .elements()
            .filter(|_| shape.bytes().is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| format!("KV pool of {shape:?} does not fit in memory"))?;
        let store = match shape.dtype {
            KvDtype::F32 => Store::F32(vec![0f32; n]),
            KvDtype::Bf16 | KvDtype::F16 => Store::Half(vec![0u16; n]),
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

    /// Offset of row 0 of `block` (keys: `which` 0, values: 1) of `layer`.
    fn base(&self, layer: usize, which: usize, block: u32) -> usize {
        let s = &self.shape;
        ((layer * 2 + which) * s.blocks + block as usize) * s.block_size * s.kv_width
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
        let (bs, w) = (self.shape.block_size, self.shape.kv_width);
        let n = k.len() / w;
        let dtype = self.shape.dtype;
        let mut pos = start;
        while pos < start + n {
            let (b, r0) = (pos / bs, pos % bs);
            let take = (bs - r0).min(start + n - pos);
            let src = (pos - start) * w..(pos - start + take) * w;
            for (which, data) in [(0, k), (1, v)] {
                let at = self.base(layer, which, table[b]) + r0 * w;
                match &mut self.store {
                    Store::F32(d) => d[at..at + take * w].copy_from_slice(&data[src.clone()]),
                    Store::Half(d) => {
                        let dst = &mut d[at..at + take * w];
                        if dtype == KvDtype::Bf16 {
                            dst.reinterpret_cast_mut::<bf16>()
                                .convert_from_f32_slice(&data[src.clone()]);
                        } else {
                            dst.reinterpret_cast_mut::<f16>()
                                .convert_from_f32_slice(&data[src.clone()]);
                        }
                    }
                }
            }
            pos += take;
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

    fn block<'s>(
        &'s self,
        layer: usize,
        which: usize,
        block: u32,
        scratch: &'s mut Vec<f32>,
    ) -> &'s [f32] {
        let len = self.shape.block_size * self.shape.kv_width;
        let at = self.base(layer, which, block);
        match &self.store {
            Store::F32(d) => &d[at..at + len],
            Store::Half(d) => {
                scratch.resize(len, 0.0);
                let src = &d[at..at + len];
                if self.shape.dtype == KvDtype::Bf16 {
                    src.reinterpret_cast::<bf16>().convert_to_f32_slice(scratch);
                } else {
                    src.reinterpret_cast::<f16>().convert_to_f32_slice(scratch);
                }
                &scratch[..]
            }
        }
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

    fn keys<'s>(&'s self, block: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        self.pool.block(self.layer, 0, self.table[block], scratch)
    }

    fn values<'s>(&'s self, block: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        self.pool.block(self.layer, 1, self.table[block], scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_through_a_table_read_back_in_each_dtype() {
        for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::F16] {
            let shape = PoolShape {
                layers: 2,
                kv_width: 3,
                block_size: 4,
                blocks: 5,
                dtype,
            };
            let mut pool = KvPool::new(shape).unwrap();
            assert_eq!(shape.bytes(), Some(2 * 2 * 5 * 4 * 3 * dtype.bytes()));
            let table = [3u32, 0, 4];
            let k: Vec<f32> = (0..9 * 3).map(|i| i as f32 * 0.5).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            // Positions 0..2, then 2..9, crossing block boundaries.
            pool.write(1, &table, 0, &k[..6], &v[..6]);
            pool.write(1, &table, 2, &k[6..], &v[6..]);
            let view = pool.view(1, &table, 9);
            let mut scratch = Vec::new();
            for pos in 0..9 {
                let (b, r) = (pos / 4, pos % 4);
                let kb = view.keys(b, &mut scratch)[r * 3..r * 3 + 3].to_vec();
                let vb = view.values(b, &mut scratch)[r * 3..r * 3 + 3].to_vec();
                for c in 0..3 {
                    let want = k[pos * 3 + c];
                    let tol = if dtype == KvDtype::F32 {
                        0.0
                    } else {
                        want.abs() / 128.0
                    };
                    assert!((kb[c] - want).abs() <= tol, "{dtype:?} pos {pos}");
                    assert!((vb[c] + want).abs() <= tol, "{dtype:?} pos {pos}");
                }
            }
            // Layer 0 was not touched.
            assert!(pool
                .view(0, &table, 9)
                .keys(0, &mut scratch)
                .iter()
                .all(|&x| x == 0.0));
        }
        let huge = PoolShape {
            layers: 1 << 20,
            kv_width: 1 << 20,
            block_size: 1 << 20,
            blocks: 1 << 20,
            dtype: KvDtype::F32,
        };
        assert!(KvPool::new(huge).unwrap_err().contains("does not fit"));
    }
}
