//! GGUF Q6_K weights served as stored, with integer dot products (the embedding / lm_head and
//! part of `attn_v` / `ffn_down` in Q4_K_M files; the embedding of Q4_0 ones).
//!
//! Q6_K (ggml): super-blocks of 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit high
//! parts, 16 signed 8-bit scales (one per 16 values) and `d` as f16. A value is `d·sc·(q − 32)`,
//! `q` in 0..63.
//!
//! At load the rows are repacked into tiles of 16 output rows × one super-block, at the file's
//! 6.56 bits a weight (the GGUF bytes are dropped): per sub-block of 32, the low nibbles in the
//! Q4_1 tiles' layout (`q4_1.rs`), and for each pair of groups of 8 values the four 2-bit high
//! parts that go with a low-nibble byte packed in one byte (bits 0–1 and 2–3: the pair's first
//! group, values `j` and `j + 4`; bits 4–5 and 6–7: its second); then the scales and `d`.
//!
//! Activations are the shared 8-bit blocks of 32 (`int8.rs`) with their sums per 16, so a
//! 16-value part's dot product is `d·sc·xd·(Σ q·xq − 32·Σ xq)`, exact in integers: the only error
//! against dequantize-then-f32-matmul is the activations' rounding. Paths: AVX-512 VNNI and
//! portable (no AVX2 kernel yet: the AVX2 entry runs the portable one, and `gguf.rs` routes Q6_K
//! here only where the CPU has AVX-512 VNNI).

use half::f16;

use super::int8::{self, Acc, Activations, RowOrder, QK, TILE};

/// Values per super-block.
pub const QK_K: usize = 256;
/// Sub-blocks of 32 per super-block.
const SUBS: usize = QK_K / QK;
/// Bytes of one GGUF Q6_K super-block.
pub const BLOCK_BYTES: usize = 210;

/// One super-block of 256 values for 16 output rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile {
    /// `[sub-block (8)][group of 8 (4)][row (16)][4 bytes]`: low nibbles as in Q4_1 tiles.
    lo: [u8; 2048],
    /// `[sub-block (8)][pair of groups (2)][row (16)][4 bytes]`: the 2-bit high parts.
    hi: [u8; 1024],
    /// `[part of 16 (16)][row (16)]`.
    sc: [[i8; TILE]; 16],
    d: [u16; TILE],
}

/// A Q6_K weight `[rows, cols]` repacked for the kernels.
#[derive(Clone)]
pub struct Q6KWeight {
    rows: usize,
    cols: usize,
    /// `[row tile][super-block]`.
    tiles: Vec<Tile>,
}

/// The 256 values (0..63) of one GGUF Q6_K super-block, in order (ggml's `dequantize_row_q6_K`).
fn block_values(block: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&block[..128], &block[128..192]);
    let mut q = [0u8; QK_K];
    for half in 0..2 {
        let (ql, qh, out) = (&ql[64 * half..], &qh[32 * half..], &mut q[128 * half..]);
        for l in 0..32 {
            out[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            out[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

impl Q6KWeight {
    /// `from_gguf` with output row `r` taken from stored row `order.source(r)`.
    pub fn from_gguf_ordered(
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Self, String> {
        let kb = int8::stored_blocks("Q6_K", data, (rows, cols), QK_K, BLOCK_BYTES)?;
        let empty = Tile {
            lo: [0; 2048],
            hi: [0; 1024],
            sc: [[0; TILE]; 16],
            d: [0; TILE],
        };
        let tiles = int8::build_tiles(
            data,
            rows,
            kb,
            BLOCK_BYTES,
            order,
            &empty,
            |tile, lane, block| {
                let q = block_values(block);
                for (u, s) in block[192..208].iter().enumerate() {
                    tile.sc[u][lane] = *s as i8;
                }
                tile.d[lane] = u16::from_le_bytes([block[208], block[209]]);
                for (s, v) in q.chunks_exact(QK).enumerate() {
                    let lo = &mut tile.lo[s * 256..][..256];
                    let hi = &mut tile.hi[s * 128..][..128];
                    for (g, v) in v.chunks_exact(8).enumerate() {
                        let shift = 4 * (g % 2);
                        for j in 0..4 {
                            let (a, c) = (v[j], v[j + 4]);
                            lo[g * 64 + lane * 4 + j] = (a & 0xF) | (c << 4);
                            hi[(g / 2) * 64 + lane * 4 + j] |=
                                ((a >> 4) | ((c >> 4) << 2)) << shift;
                        }
                    }
                }
            },
        );
        Ok(Self { rows, cols, tiles })
    }

    /// The value (0..63) of row lane `lane`, value `v` of sub-block `s` in `tile`.
    fn value(tile: &Tile, lane: usize, s: usize, v: usize) -> u8 {
        let (g, j, high) = (v / 8, v % 4, (v % 8) >= 4);
        let lo = tile.lo[s * 256 + g * 64 + lane * 4 + j];
        let hi = tile.hi[s * 128 + (g / 2) * 64 + lane * 4 + j] >> (4 * (g % 2));
        if high {
            (lo >> 4) | (((hi >> 2) & 3) << 4)
        } else {
            (lo & 0xF) | ((hi & 3) << 4)
        }
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`, as ggml dequantizes them.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let kb = self.cols / QK_K;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &r) in ids.iter().enumerate() {
            let r = r as usize;
            let (t, lane) = (r / TILE, r % TILE);
            for b in 0..kb {
                let tile = &self.tiles[t * kb + b];
                let d = f16::from_bits(tile.d[lane]).to_f32();
                for s in 0..SUBS {
                    for v in 0..QK {
                        let sc = tile.sc[2 * s + v / 16][lane] as f32;
                        let q = Self::value(tile, lane, s, v) as i32 - 32;
                        out[o * self.cols + b * QK_K + s * QK + v] = d * sc * q as f32;
                    }
                }
            }
        }
        out
    }
}

int8::tile_weight!(Q6KWeight, Tile, 16, amx);

fn portable(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    for (b, tile) in tiles.iter().enumerate() {
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            for s in 0..SUBS {
                let blk = b * SUBS + s;
                let xq = &act.row(i + r)[blk * QK..(blk + 1) * QK];
                let (xd, _) = act.scale(i + r, blk);
                let sums: [i32; 2] = [0, 1].map(|h| act.sums16_row(i + r)[2 * blk + h]);
                for (lane, a) in acc_r.iter_mut().enumerate() {
                    let d = f16::from_bits(tile.d[lane]).to_f32();
                    for h in 0..2 {
                        let mut isum = 0i32;
                        for v in 16 * h..16 * h + 16 {
                            isum += Q6KWeight::value(tile, lane, s, v) as i32 * xq[v] as i32;
                        }
                        let sc = tile.sc[2 * s + h][lane] as f32;
                        *a += (isum - 32 * sums[h]) as f32 * (d * sc * xd);
                    }
                }
            }
        }
    }
}

/// No AVX2 kernel yet: the portable one (`gguf.rs` routes Q6_K here only with AVX-512 VNNI).
#[cfg(target_arch = "x86_64")]
unsafe fn avx2(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    portable(tiles, act, i, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    // As Q4_K's: eight rows share each unpacked sub-block, up to four go the four-row way.
    int8::by_eights(rows, acc, |start, k, out| match k {
        5.. => avx512_rows::<8>(tiles, act, i + start, k, out),
        _ => avx512_rows::<4>(tiles, act, i + start, k, out),
    })
}

/// Sixteen activation rows by AMX tiles, as Q4_K's (`q4_k::amx`), one `tdpbsud` per 16-value
/// part: its 6-bit values (low nibble and high bits joined) as a B tile of 4 rows × 16 weight
/// rows × 4 values, the activations' 16 bytes per row as the A tile; the sums are then fixed
/// (`− 32·Σ xq`) and scaled exactly as `avx512_rows` does (same operations, same order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn amx(tiles: &[Tile], act: &Activations, i: usize, rows: usize, acc: &mut Acc) {
    use super::amx::{two_products, Config, Tiles};
    use std::arch::x86_64::*;
    const AMX_ROWS: usize = 16;
    const PARTS: usize = 2 * SUBS;
    if rows < AMX_ROWS {
        return avx512(tiles, act, i, rows, acc);
    }
    #[repr(C, align(64))]
    struct Scratch {
        /// B tiles: `[part (16)][group of the part (2)][values j, j + 4][row (16)][4 bytes]`.
        w: [u8; PARTS * 256],
        /// C tiles: `[part][activation row (16)][weight row (16)]`.
        c: [i32; PARTS * 256],
    }
    // C tiles 0–1 (16 × 16 i32), A tiles 2–3 (16 rows × 16 bytes), B tiles 4–5 (4 × 64 bytes).
    static CONFIG: Config =
        Config::new(&[(16, 64), (16, 64), (16, 16), (16, 16), (4, 64), (4, 64)]);
    let cols = tiles.len() * QK_K;
    let (x0, scales) = super::amx::rows16(act, i, cols);
    let scales: [&[f32]; AMX_ROWS] = scales.map(|s| s.0);
    let sums: [&[i32]; AMX_ROWS] = std::array::from_fn(|r| act.sums16_row(i + r));
    let mut facc = [_mm512_setzero_ps(); AMX_ROWS];
    let mut scratch = Scratch {
        w: [0; PARTS * 256],
        c: [0; PARTS * 256],
    };
    let _tiles = Tiles::load(&CONFIG);
    for (b, tile) in tiles.iter().enumerate() {
        for s in 0..SUBS {
            for gp in 0..2 {
                let h = _mm512_loadu_si512(tile.hi.as_ptr().add(s * 128 + gp * 64) as *const _);
                for k in 0..2 {
                    let (qa, qb) = values6(tile, s, 2 * gp + k, h);
                    let out = scratch.w.as_mut_ptr().add((2 * s + gp) * 256 + k * 128);
                    _mm512_store_si512(out as *mut _, qa);
                    _mm512_store_si512(out.add(64) as *mut _, qb);
                }
            }
        }
        for pair in 0..PARTS / 2 {
            let (pa, pb) = (2 * pair, 2 * pair + 1);
            let at = b * QK_K + pa * 16;
            let c = scratch.c.as_mut_ptr();
            two_products(
                [x0.add(at), x0.add(at + 16)],
                cols,
                [
                    scratch.w.as_ptr().add(pa * 256),
                    scratch.w.as_ptr().add(pb * 256),
                ],
                [c.add(pa * 256), c.add(pb * 256)],
            );
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        let ds: [__m512; PARTS] = std::array::from_fn(|part| {
            _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    tile.sc[part].as_ptr() as *const _,
                ))),
            )
        });
        for (r, f) in facc.iter_mut().enumerate() {
            let xd = &scales[r][b * SUBS..][..SUBS];
            let sum = &sums[r][b * PARTS..][..PARTS];
            let mut v = *f;
            for part in 0..PARTS {
                let isum =
                    _mm512_load_si512(scratch.c.as_ptr().add(part * 256 + r * 16) as *const _);
                let fixed = _mm512_sub_epi32(isum, _mm512_set1_epi32(32 * sum[part]));
                v = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(fixed),
                    _mm512_mul_ps(ds[part], _mm512_set1_ps(xd[part / 2])),
                    v,
                );
            }
            *f = v;
        }
    }
    for r in 0..AMX_ROWS {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

/// Group `g` of sub-block `s` as 6-bit values (bytes), for 16 rows × 4: values `j` and
/// `j + 4` of the group. `h` is the 64 bytes of high parts of the group's pair (`g / 2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn values6(
    tile: &Tile,
    s: usize,
    g: usize,
    h: std::arch::x86_64::__m512i,
) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let v = _mm512_loadu_si512(tile.lo.as_ptr().add(s * 256 + g * 64) as *const _);
    // High parts into bits 4–5: the group's bits 0–1 (value j) and 2–3 (j + 4), or 4–5 and
    // 6–7 for the pair's second group.
    let (ha, hb) = if g % 2 == 0 {
        (
            _mm512_and_si512(_mm512_slli_epi16(h, 4), m30),
            _mm512_and_si512(_mm512_slli_epi16(h, 2), m30),
        )
    } else {
        (
            _mm512_and_si512(h, m30),
            _mm512_and_si512(_mm512_srli_epi16(h, 2), m30),
        )
    };
    (
        _mm512_or_si512(_mm512_and_si512(v, m4), ha),
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), hb),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_rows<const R: usize>(
    tiles: &[Tile],
    act: &Activations,
    i: usize,
    rows: usize,
    acc: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let mut facc = [_mm512_setzero_ps(); R];
    // Constant trip counts for eight rows (a short group repeats its last row).
    let live = if R > 4 { R } else { rows };
    let cols = tiles.len() * QK_K;
    let xrows: [&[i8]; R] = std::array::from_fn(|r| act.row(i + r.min(rows - 1)));
    let scales: [(&[f32], &[f32]); R] =
        std::array::from_fn(|r| act.scales_row(i + r.min(rows - 1)));
    let sums: [&[i32]; R] = std::array::from_fn(|r| act.sums16_row(i + r.min(rows - 1)));
    assert!(xrows.iter().all(|x| x.len() == cols));
    for (b, tile) in tiles.iter().enumerate() {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const _));
        for s in 0..SUBS {
            let blk = b * SUBS + s;
            // Two 16-value parts (groups 0–1 and 2–3), each with its own accumulator.
            let mut ia = [_mm512_setzero_si512(); R];
            let mut ib = [_mm512_setzero_si512(); R];
            for gp in 0..2 {
                let h = _mm512_loadu_si512(tile.hi.as_ptr().add(s * 128 + gp * 64) as *const _);
                for k in 0..2 {
                    let g = 2 * gp + k;
                    let (qa, qb) = values6(tile, s, g, h);
                    let at = blk * QK + 8 * g;
                    for r in 0..live {
                        let xa = _mm512_set1_epi32(std::ptr::read_unaligned(
                            xrows[r].as_ptr().add(at) as *const i32,
                        ));
                        let xb = _mm512_set1_epi32(std::ptr::read_unaligned(
                            xrows[r].as_ptr().add(at + 4) as *const i32,
                        ));
                        if gp == 0 {
                            ia[r] = _mm512_dpbusd_epi32(ia[r], qa, xa);
                            ia[r] = _mm512_dpbusd_epi32(ia[r], qb, xb);
                        } else {
                            ib[r] = _mm512_dpbusd_epi32(ib[r], qa, xa);
                            ib[r] = _mm512_dpbusd_epi32(ib[r], qb, xb);
                        }
                    }
                }
            }
            for (part, isum) in [(2 * s, &ia), (2 * s + 1, &ib)] {
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    tile.sc[part].as_ptr() as *const _,
                )));
                let ds = _mm512_mul_ps(d, sc);
                for r in 0..live {
                    let sum = sums[r][2 * blk + part % 2];
                    let fixed = _mm512_sub_epi32(isum[r], _mm512_set1_epi32(32 * sum));
                    let xd = scales[r].0[blk];
                    facc[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(fixed),
                        _mm512_mul_ps(ds, _mm512_set1_ps(xd)),
                        facc[r],
                    );
                }
            }
        }
    }
    for r in 0..rows {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), facc[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    int8::kernel_tests!(Q6KWeight, GgmlDType::Q6K);
}
