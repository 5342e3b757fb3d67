//! GGUF Q5_0 weights served as stored, by the Q4_1 kernels (most projections of a Q4_K_M or
//! Q5_K_M file whose rows are not whole 256-value super-blocks: llama-quantize's fallback, e.g.
//! Qwen2.5-0.5B's 896-wide rows).
//!
//! Q5_0 (ggml): blocks of 32 values, `d` as f16, 4 bytes `qh` of fifth bits (bit `v` for value
//! `v`) and 16 bytes of nibbles (low nibbles values 0..16, high 16..32); a value is `d·(q − 16)`,
//! `q` in 0..31. That is Q4_1's `d·q + m` with `m = −16·d` (exact in f16, as Q4_0's `−8·d`).
//!
//! At load the rows are repacked into Q4_1's tiles (`q4_1.rs`) plus the fifth bits as one 64-bit
//! mask per group of 8 values and nibble half, in the byte order of the tile's nibbles (384
//! bytes per 16 × 32 values, 6 bits a weight against the file's 5.5). The kernels are Q4_1's:
//! after unpacking a vector of nibbles they add 16 where the mask says (`vpaddb` under the
//! mask), so the sums stay exact in integers. Served by ours where the CPU has AVX-512 VNNI
//! (no AVX2 kernel: candle's serves it there).

use half::f16;

use super::int8::{self, Acc, Activations, RowOrder, QK};
use super::q4_1::{self, put_fifth, FifthBits, NibbleTile};

/// Bytes of one GGUF Q5_0 block.
pub const BLOCK_BYTES: usize = 22;

/// One block of 32 values for 16 output rows: Q4_1's tile and the fifth bits.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    q4: q4_1::Tile,
    qh: FifthBits,
}

impl NibbleTile for Tile {
    const FIFTH: bool = true;
    fn nibbles(&self) -> &q4_1::Tile {
        &self.q4
    }
    fn fifth(&self, g: usize) -> [u64; 2] {
        self.qh[g]
    }
}

/// A Q5_0 weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q50Weight {
    rows: usize,
    cols: usize,
    /// `[row tile][block]`.
    tiles: Vec<Tile>,
}

impl Q50Weight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q5_0", data, (rows, cols), QK, BLOCK_BYTES)?;
        // `m = −16·d` overflows f16 only for `|d|` above 4,095.
        for block in data.chunks_exact(BLOCK_BYTES) {
            let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
            if d.is_finite() && f16::from_f32(-16.0 * d.to_f32()).is_infinite() {
                return Err("a Q5_0 block scale times 16 overflows f16".into());
            }
        }
        let empty = Tile {
            q4: q4_1::Tile::EMPTY,
            qh: [[0; 2]; 4],
        };
        let tiles = int8::build_tiles(
            data,
            rows,
            kb,
            BLOCK_BYTES,
            order,
            &empty,
            |tile, lane, block| {
                let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
                let m = f16::from_f32(-16.0 * d.to_f32());
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let mut q = [0u8; QK];
                for j in 0..16 {
                    q[j] = block[6 + j] & 0x0F;
                    q[j + 16] = block[6 + j] >> 4;
                }
                tile.q4.fill(lane, d.to_bits(), m.to_bits(), &q);
                for v in 0..QK {
                    put_fifth(&mut tile.qh, lane, v, (qh >> v) & 1 == 1);
                }
            },
        );
        Ok(Self { rows, cols, tiles })
    }

    /// Rows `ids` as f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        q4_1::dequantize_tiles(&self.tiles, self.cols, ids)
    }
}

// Groups of 16 activation rows go through AMX where the CPU has it (prefill); the AVX-512
// kernel takes them four at a time otherwise.
int8::tile_weight!(Q50Weight, Tile, 16, amx);

fn portable(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    q4_1::portable(tiles, act, i, rows, acc)
}

/// No AVX2 kernel of ours for Q5_0 (candle's serves it on such CPUs): the portable one.
#[cfg(target_arch = "x86_64")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    portable(tiles, act, i, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    // Up to 16 rows a call (`ROWS`, for AMX): four at a time here.
    for start in (0..rows).step_by(4) {
        let k = (rows - start).min(4);
        q4_1::avx512_rows::<Tile, 4>(tiles, act, i + start, k, &mut acc[start..start + k]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn amx(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    q4_1::amx(tiles, act, i, rows, acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    int8::kernel_tests!(Q50Weight, GgmlDType::Q5_0);

    /// An odd number of blocks a row (the AMX kernel pairs them): every kernel against the
    /// portable one, AMX against AVX-512 bit for bit.
    #[test]
    fn odd_block_counts_agree() {
        for cols in [32, 96, 160] {
            let w = Q50Weight::from_gguf(&stored(20, cols, 9), 20, cols).unwrap();
            int8::checks::simd_matches_portable(&w);
        }
    }
}
