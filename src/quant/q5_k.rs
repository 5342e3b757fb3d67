//! GGUF Q5_K weights served as stored (the bulk of a Q5_K_M file), by the Q4_K kernels.
//!
//! Q5_K (ggml): super-blocks of 256 values like Q4_K's (`d`, `dmin`, the same 12 bytes of 6-bit
//! scales and mins, 128 bytes of nibbles) plus 32 bytes `qh` of fifth bits: value `l` of the
//! 64-value chunk `p` takes bit `2p` (first 32 values) or `2p + 1` (last 32) of `qh[l % 32]`. A
//! value is `d·sc·q − dmin·m`, `q` in 0..31.
//!
//! At load the rows are repacked into Q4_K's tiles (`q4_k.rs`) plus the fifth bits as one 64-bit
//! mask per group of 8 values and nibble half, in the byte order of the tile's nibbles
//! (2,880 bytes per 16 × 256 values, 5.6 bits a weight against the file's 5.5). The kernels are
//! Q4_K's: after unpacking a vector of nibbles they add 16 where the mask says
//! (`vpaddb` under the mask), so the sums stay exact in integers, and the AVX-512 and AMX paths
//! stay bit for bit the same. Served by ours where the CPU has AVX-512 VNNI (no AVX2 kernel:
//! candle's serves it there).

use super::int8::{self, Acc, Activations, RowOrder};
use super::q4_1::{put_fifth, FifthBits};
use super::q4_k::{self, KTile, QK_K};

/// Bytes of one GGUF Q5_K super-block.
pub const BLOCK_BYTES: usize = 176;
/// Sub-blocks of 32 per super-block.
const SUBS: usize = 8;

/// One super-block of 256 values for 16 output rows: Q4_K's tile and the fifth bits.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    q4: q4_k::Tile,
    /// Per sub-block, as Q5_0's blocks hold them.
    qh: [FifthBits; SUBS],
}

impl KTile for Tile {
    const FIFTH: bool = true;
    fn q4(&self) -> &q4_k::Tile {
        &self.q4
    }
    fn fifth(&self, s: usize, g: usize) -> [u64; 2] {
        self.qh[s][g]
    }
}

/// A Q5_K weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q5KWeight {
    rows: usize,
    cols: usize,
    /// `[row tile][super-block]`.
    tiles: Vec<Tile>,
}

impl Q5KWeight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q5_K", data, (rows, cols), QK_K, BLOCK_BYTES)?;
        let empty = Tile {
            q4: q4_k::Tile::EMPTY,
            qh: [[[0; 2]; 4]; SUBS],
        };
        let tiles = int8::build_tiles(
            data,
            rows,
            kb,
            BLOCK_BYTES,
            order,
            &empty,
            |tile, lane, block| {
                let (qh, qs) = (&block[16..48], &block[48..]);
                tile.q4.fill(lane, &block[..4], &block[4..16], qs);
                for (s, bits) in tile.qh.iter_mut().enumerate() {
                    for (v, byte) in qh.iter().enumerate() {
                        put_fifth(bits, lane, v, (byte >> s) & 1 == 1);
                    }
                }
            },
        );
        Ok(Self { rows, cols, tiles })
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`, as ggml dequantizes them.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        q4_k::dequantize_tiles(&self.tiles, self.cols, ids)
    }
}

int8::tile_weight!(Q5KWeight, Tile, 16, amx);

fn portable(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    q4_k::portable(tiles, act, i, rows, acc)
}

/// No AVX2 kernel of ours for Q5_K (candle's serves it on such CPUs): the portable one.
#[cfg(target_arch = "x86_64")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    portable(tiles, act, i, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    q4_k::avx512(tiles, act, i, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn amx(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    q4_k::amx(tiles, act, i, rows, acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    int8::kernel_tests!(Q5KWeight, GgmlDType::Q5K);
}
