//! Intel AMX for the integer kernels' wide calls (prefill): `tdpbsud` multiplies a tile of 16
//! activation rows (signed bytes) by a tile of 16 weight rows (unsigned bytes, the VNNI layout
//! the Q4_1-style tiles already have once their nibbles are split), 16 × 16 × 32 products in
//! one instruction where AVX-512 VNNI's `vpdpbusd` does 16 × 4.
//!
//! Used where the CPU reports AMX-TILE and AMX-INT8 and Linux grants the process the tile data
//! state (`ops::cpu_features::amx_int8`, checked once); `LORAPLEX_NO_AMX=1` (or
//! `LORAPLEX_NO_SIMD=1`) turns it off. A kernel call loads its tile
//! configuration and releases the tiles before it returns, so no AMX state outlives a call.
//!
//! The integer sums are exact whichever instruction makes them, and the kernels scale them in
//! the same order as the AVX-512 ones: a row's result is bit for bit the same by either path.

/// Whether the AMX kernels run here (`cpu_features::amx_int8`).
pub fn available() -> bool {
    crate::ops::cpu_features::amx_int8()
}

/// Activation rows `i .. i + 16` of `act` (each `cols` bytes) as one pointer to row `i`, with
/// the rows' scales: A tiles load them with a stride of `cols`. Panics unless the rows lie one
/// after another with that width.
#[allow(clippy::type_complexity)]
pub fn rows16(
    act: &super::int8::Activations,
    i: usize,
    cols: usize,
) -> (*const i8, [(&[f32], &[f32]); 16]) {
    let xrows: [&[i8]; 16] = std::array::from_fn(|r| act.row(i + r));
    assert!(xrows.iter().all(|x| x.len() == cols));
    let x0 = xrows[0].as_ptr();
    assert_eq!(xrows[15].as_ptr(), x0.wrapping_add(15 * cols));
    (x0, std::array::from_fn(|r| act.scales_row(i + r)))
}

/// A tile configuration (`ldtilecfg`'s 64 bytes): palette 1, per tile its rows and bytes per row.
#[repr(C, align(64))]
pub struct Config([u8; 64]);

impl Config {
    /// Tiles `0..shapes.len()` as `(rows, bytes per row)`.
    pub const fn new(shapes: &[(u8, u16)]) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < shapes.len() {
            let (rows, colsb) = shapes[t];
            c[16 + 2 * t] = colsb as u8;
            c[17 + 2 * t] = (colsb >> 8) as u8;
            c[48 + t] = rows;
            t += 1;
        }
        Self(c)
    }
}

/// The tiles configured for the duration of one kernel call: loaded on creation, released on
/// drop (also when the call unwinds).
#[cfg(target_arch = "x86_64")]
pub struct Tiles(());

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// # Safety
    /// `available()` must be true.
    pub unsafe fn load(config: &Config) -> Self {
        std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        Self(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only built by `load`, so AMX is there and the tiles are configured.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `tileloadd tmmN, [ptr + stride·row]` for a constant tile number.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_load {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $tmm, ", [{p} + {s}*1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly)
        )
    };
}

/// `tilestored [ptr + stride·row], tmmN`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_store {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{p} + {s}*1], tmm", $tmm),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack)
        )
    };
}

/// `tilezero tmmN`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_zero {
    ($tmm:literal) => {
        std::arch::asm!(concat!("tilezero tmm", $tmm), options(nostack, nomem))
    };
}

/// `tdpbsud tmmC, tmmA, tmmB`: C (i32) += A (signed bytes) · B (unsigned bytes, VNNI layout).
#[cfg(target_arch = "x86_64")]
macro_rules! tile_dpbsud {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(
            concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}

/// The tiles of `two_products` over blocks of 32 values: C tiles 0–1 (16 × 16 i32), A tiles
/// 2–3 (16 rows × 32 bytes), B tiles 4–5 (8 × 64 bytes).
pub static PAIR_OF_32: Config =
    Config::new(&[(16, 64), (16, 64), (16, 32), (16, 32), (8, 64), (8, 64)]);

/// Two independent tile products, as the kernels lay their tiles out (C tiles 0–1, A tiles 2–3,
/// B tiles 4–5, shaped by the caller's `Config`): `c[k] = a[k] · b[k]`, A's rows `a_stride`
/// bytes apart, B's and C's rows 64 bytes apart.
///
/// # Safety
/// The tiles are configured (`Tiles`) with those numbers, and each pointer covers its tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn two_products(
    a: [*const i8; 2],
    a_stride: usize,
    b: [*const u8; 2],
    c: [*mut i32; 2],
) {
    tile_load!(4, b[0], 64usize);
    tile_load!(5, b[1], 64usize);
    tile_load!(2, a[0], a_stride);
    tile_load!(3, a[1], a_stride);
    tile_zero!(0);
    tile_zero!(1);
    tile_dpbsud!(0, 2, 4);
    tile_dpbsud!(1, 3, 5);
    tile_store!(0, c[0], 64usize);
    tile_store!(1, c[1], 64usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tile_product_is_exact() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        unsafe {
            // A: 16 rows × 32 signed bytes; B: 8 rows (k/4) × 16 columns × 4 unsigned bytes.
            let a: Vec<i8> = (0..16 * 32).map(|i| ((i * 37) % 255) as i8).collect();
            let b: Vec<u8> = (0..8 * 64).map(|i| ((i * 11) % 16) as u8).collect();
            let mut c = [0i32; 256];
            let cfg = Config::new(&[(16, 64), (16, 32), (8, 64)]);
            let _tiles = Tiles::load(&cfg);
            tile_zero!(0);
            tile_load!(1, a.as_ptr(), 32usize);
            tile_load!(2, b.as_ptr(), 64usize);
            tile_dpbsud!(0, 1, 2);
            tile_store!(0, c.as_mut_ptr(), 64usize);
            for m in 0..16 {
                for n in 0..16 {
                    let want: i32 = (0..32)
                        .map(|k| a[m * 32 + k] as i32 * b[(k / 4) * 64 + n * 4 + k % 4] as i32)
                        .sum();
                    assert_eq!(c[m * 16 + n], want, "[{m}][{n}]");
                }
            }
        }
    }
}
