//! NormalFloat4 exactly as bitsandbytes stores it: blocks of 64 values, an fp32 absmax per
//! block, each value the nearest of 16 NF4 levels, two codes a byte (first element in the HIGH
//! nibble). Double quantization stores the absmax constants as `absmax - mean`, blockwise 256,
//! with the 8-bit signed dynamic map (codes looked up the way bitsandbytes' CPU kernel does) and
//! one fp32 absmax per 256 constants.

pub const BLOCK: usize = 64;
pub const NESTED_BLOCK: usize = 256;

/// The 16 NF4 levels (bitsandbytes' float32 values).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' `create_dynamic_map(signed=True)` as float32, the 8-bit map of double
/// quantization. Copied from bitsandbytes' output (torch's `linspace` rounding is not
/// reproduced by a straightforward recomputation, and these are the values that decode files).
pub const DYNAMIC_MAP: [f32; 256] = [
    -9.9296874e-01,
    -9.789063e-01,
    -9.6484375e-01,
    -9.507812e-01,
    -9.3671876e-01,
    -9.2265624e-01,
    -9.085938e-01,
    -8.9453125e-01,
    -8.804687e-01,
    -8.6640626e-01,
    -8.5234374e-01,
    -8.382813e-01,
    -8.2421875e-01,
    -8.101562e-01,
    -7.9609376e-01,
    -7.8203124e-01,
    -7.679688e-01,
    -7.5390625e-01,
    -7.398437e-01,
    -7.2578126e-01,
    -7.117188e-01,
    -6.976563e-01,
    -6.8359375e-01,
    -6.695312e-01,
    -6.5546876e-01,
    -6.414063e-01,
    -6.273438e-01,
    -6.1328125e-01,
    -5.992187e-01,
    -5.8515626e-01,
    -5.710938e-01,
    -5.570313e-01,
    -5.4296875e-01,
    -5.289062e-01,
    -5.148437e-01,
    -5.0078124e-01,
    -4.867187e-01,
    -4.7265625e-01,
    -4.5859373e-01,
    -4.4453126e-01,
    -4.3046874e-01,
    -4.1640624e-01,
    -4.0234375e-01,
    -3.8828123e-01,
    -3.7421876e-01,
    -3.6015624e-01,
    -3.4609374e-01,
    -3.3203125e-01,
    -3.1796873e-01,
    -3.0390626e-01,
    -2.8984374e-01,
    -2.7578127e-01,
    -2.6171875e-01,
    -2.4765624e-01,
    -2.3359375e-01,
    -2.1953125e-01,
    -2.0546874e-01,
    -1.9140625e-01,
    -1.7734376e-01,
    -1.6328125e-01,
    -1.4921875e-01,
    -1.3515624e-01,
    -1.2109375e-01,
    -1.07031256e-01,
    -9.859375e-02,
    -9.578126e-02,
    -9.2968754e-02,
    -9.015625e-02,
    -8.734375e-02,
    -8.453125e-02,
    -8.171876e-02,
    -7.890625e-02,
    -7.609375e-02,
    -7.328125e-02,
    -7.0468746e-02,
    -6.7656256e-02,
    -6.484375e-02,
    -6.203125e-02,
    -5.9218753e-02,
    -5.640625e-02,
    -5.359375e-02,
    -5.078125e-02,
    -4.796875e-02,
    -4.515625e-02,
    -4.2343747e-02,
    -3.953125e-02,
    -3.6718752e-02,
    -3.390625e-02,
    -3.109375e-02,
    -2.8281251e-02,
    -2.546875e-02,
    -2.265625e-02,
    -1.9843752e-02,
    -1.703125e-02,
    -1.421875e-02,
    -1.140625e-02,
    -9.71875e-03,
    -9.156249e-03,
    -8.59375e-03,
    -8.03125e-03,
    -7.46875e-03,
    -6.90625e-03,
    -6.34375e-03,
    -5.78125e-03,
    -5.2187503e-03,
    -4.6562497e-03,
    -4.09375e-03,
    -3.5312497e-03,
    -2.96875e-03,
    -2.40625e-03,
    -1.84375e-03,
    -1.2812499e-03,
    -9.437501e-04,
    -8.3125e-04,
    -7.1875006e-04,
    -6.062501e-04,
    -4.9375003e-04,
    -3.8125002e-04,
    -2.6875004e-04,
    -1.5625001e-04,
    -8.875e-05,
    -6.625e-05,
    -4.375e-05,
    -2.1249998e-05,
    -7.75e-06,
    -3.2500002e-06,
    -5.5000004e-07,
    0.0e+00,
    5.5000004e-07,
    3.2500002e-06,
    7.75e-06,
    2.1249998e-05,
    4.375e-05,
    6.625e-05,
    8.875e-05,
    1.5625001e-04,
    2.6875004e-04,
    3.8125002e-04,
    4.9375003e-04,
    6.062501e-04,
    7.1875006e-04,
    8.3125e-04,
    9.437501e-04,
    1.2812499e-03,
    1.84375e-03,
    2.40625e-03,
    2.96875e-03,
    3.5312497e-03,
    4.09375e-03,
    4.6562497e-03,
    5.2187503e-03,
    5.78125e-03,
    6.34375e-03,
    6.90625e-03,
    7.46875e-03,
    8.03125e-03,
    8.59375e-03,
    9.156249e-03,
    9.71875e-03,
    1.140625e-02,
    1.421875e-02,
    1.703125e-02,
    1.9843752e-02,
    2.265625e-02,
    2.546875e-02,
    2.8281251e-02,
    3.109375e-02,
    3.390625e-02,
    3.6718752e-02,
    3.953125e-02,
    4.2343747e-02,
    4.515625e-02,
    4.796875e-02,
    5.078125e-02,
    5.359375e-02,
    5.640625e-02,
    5.9218753e-02,
    6.203125e-02,
    6.484375e-02,
    6.7656256e-02,
    7.0468746e-02,
    7.328125e-02,
    7.609375e-02,
    7.890625e-02,
    8.171876e-02,
    8.453125e-02,
    8.734375e-02,
    9.015625e-02,
    9.2968754e-02,
    9.578126e-02,
    9.859375e-02,
    1.07031256e-01,
    1.2109375e-01,
    1.3515624e-01,
    1.4921875e-01,
    1.6328125e-01,
    1.7734376e-01,
    1.9140625e-01,
    2.0546874e-01,
    2.1953125e-01,
    2.3359375e-01,
    2.4765624e-01,
    2.6171875e-01,
    2.7578127e-01,
    2.8984374e-01,
    3.0390626e-01,
    3.1796873e-01,
    3.3203125e-01,
    3.4609374e-01,
    3.6015624e-01,
    3.7421876e-01,
    3.8828123e-01,
    4.0234375e-01,
    4.1640624e-01,
    4.3046874e-01,
    4.4453126e-01,
    4.5859373e-01,
    4.7265625e-01,
    4.867187e-01,
    5.0078124e-01,
    5.148437e-01,
    5.289062e-01,
    5.4296875e-01,
    5.570313e-01,
    5.710938e-01,
    5.8515626e-01,
    5.992187e-01,
    6.1328125e-01,
    6.273438e-01,
    6.414063e-01,
    6.5546876e-01,
    6.695312e-01,
    6.8359375e-01,
    6.976563e-01,
    7.117188e-01,
    7.2578126e-01,
    7.398437e-01,
    7.5390625e-01,
    7.679688e-01,
    7.8203124e-01,
    7.9609376e-01,
    8.101562e-01,
    8.2421875e-01,
    8.382813e-01,
    8.5234374e-01,
    8.6640626e-01,
    8.804687e-01,
    8.9453125e-01,
    9.085938e-01,
    9.2265624e-01,
    9.3671876e-01,
    9.507812e-01,
    9.6484375e-01,
    9.789063e-01,
    9.9296874e-01,
    1.0e+00,
];

pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP
}

/// Sum in f32 with the pairwise scheme numpy and torch use (8 accumulators per block of up to
/// 128, halves above), so the mean of absmax rounds as bitsandbytes' does.
fn pairwise_sum(v: &[f32]) -> f32 {
    if v.len() < 8 {
        return v.iter().fold(0.0, |a, x| a + x);
    }
    if v.len() <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&v[..8]);
        let mut i = 8;
        while i + 8 <= v.len() {
            for j in 0..8 {
                r[j] += v[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &v[i..] {
            res += x;
        }
        return res;
    }
    let mut half = v.len() / 2;
    half -= half % 8;
    pairwise_sum(&v[..half]) + pairwise_sum(&v[half..])
}

/// Index of the nearest entry of `table` (sorted ascending); ties go to the lower entry, as
/// `torch.argmin` does.
fn nearest(table: &[f32], v: f32) -> u8 {
    let mut best = 0;
    let mut best_d = f32::INFINITY;
    for (i, &t) in table.iter().enumerate() {
        let d = (v - t).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// Bins of the 8-bit quantizer's lookup table over [-1, 1].
const LUT_BINS: usize = 65536;

/// The lookup table bitsandbytes' CPU kernel quantizes 8-bit blocks with: [-1, 1] cut into
/// 65536 evenly spaced points, each mapped to the first code whose upper midpoint is not below
/// it. A value takes the entry of its nearest grid point, so codes within half a bin
/// (1.5e-5) of a midpoint can land on the farther neighbour — bitsandbytes' result, which we
/// reproduce rather than the exact nearest code.
fn dynamic_lut() -> &'static [u8] {
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let map = &DYNAMIC_MAP;
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut idx = 0;
        (0..LUT_BINS)
            .map(|i| {
                let v = -1.0f32 + (2.0 * i as f32) / (LUT_BINS - 1) as f32;
                while idx < mids.len() && mids[idx] < v {
                    idx += 1;
                }
                idx as u8
            })
            .collect()
    })
}

/// Blockwise 8-bit quantization with the dynamic map, as bitsandbytes' CPU
/// `quantize_blockwise` computes it (fp32 arithmetic step by step, no fused multiply-add).
/// Returns the codes and one absmax per block.
pub fn quantize_blockwise_dynamic(values: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let m = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        absmax.push(m);
        if m == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, chunk.len()));
            continue;
        }
        let inv = 1.0 / m;
        codes.extend(chunk.iter().map(|&v| {
            let x = (v * inv).clamp(-1.0, 1.0);
            let t = (x + 1.0) * 0.5;
            let t = t * (LUT_BINS - 1) as f32;
            let t = t + 0.5;
            lut[t as usize]
        }));
    }
    (codes, absmax)
}

/// Per-block scale constants, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double {
        /// 8-bit codes of `absmax - offset` in the dynamic map.
        codes: Vec<u8>,
        /// One per 256 constants.
        nested_absmax: Vec<f32>,
        /// The mean of absmax.
        offset: f32,
    },
}

impl Absmax {
    /// The per-block scales as the dequantizer uses them.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * nested_absmax[i / NESTED_BLOCK] + offset)
                    .collect()
            }
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double {
                codes,
                nested_absmax,
                ..
            } => codes.len() + 4 * nested_absmax.len() + 4,
        }
    }
}

/// A weight matrix `[rows, cols]` (row-major) in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    pub rows: usize,
    pub cols: usize,
    /// Two codes a byte, first element in the high nibble; `ceil(rows*cols/2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Weight {
    pub fn quantize(values: &[f32], rows: usize, cols: usize, double: bool) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "NF4: shape does not match the data"
        );
        let n = values.len();
        let mut absmax = Vec::with_capacity(n.div_ceil(BLOCK));
        let mut codes = vec![0u8; n];
        for (b, block) in values.chunks(BLOCK).enumerate() {
            let m = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            absmax.push(m);
            // bitsandbytes scales by the reciprocal and clamps before taking the nearest level.
            let inv = 1.0 / m;
            for (j, &v) in block.iter().enumerate() {
                // An all-zero block: bitsandbytes' 0 * (1/0) is NaN and it stores code 0.
                codes[b * BLOCK + j] = if m > 0.0 {
                    nearest(&NF4_LEVELS, (v * inv).clamp(-1.0, 1.0))
                } else {
                    0
                };
            }
        }
        let packed = codes
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
            .collect();
        let absmax = if double {
            let offset = pairwise_sum(&absmax) / absmax.len() as f32;
            let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (qcodes, nested) = quantize_blockwise_dynamic(&centered, NESTED_BLOCK);
            Absmax::Double {
                codes: qcodes,
                nested_absmax: nested,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Self {
            rows,
            cols,
            packed,
            absmax,
        }
    }

    /// Code of element `i`.
    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    /// Dequantizes rows `start..start + count` into `out` (`count * cols` values).
    pub fn dequantize_rows(&self, scales: &[f32], start: usize, count: usize, out: &mut [f32]) {
        let base = start * self.cols;
        let n = count * self.cols;
        if base.is_multiple_of(BLOCK) {
            // Whole blocks: one scale per 64 values, two values per byte.
            for (b, chunk) in out[..n].chunks_mut(BLOCK).enumerate() {
                let scale = scales[base / BLOCK + b];
                let bytes = &self.packed[(base + b * BLOCK) / 2..];
                if chunk.len() == BLOCK {
                    super::nf4_simd::decode_block(bytes, scale, chunk);
                    continue;
                }
                for (pair, &byte) in chunk.chunks_mut(2).zip(bytes) {
                    pair[0] = NF4_LEVELS[(byte >> 4) as usize] * scale;
                    if let Some(second) = pair.get_mut(1) {
                        *second = NF4_LEVELS[(byte & 0x0F) as usize] * scale;
                    }
                }
            }
            return;
        }
        for (k, o) in out[..n].iter_mut().enumerate() {
            let i = base + k;
            *o = NF4_LEVELS[self.code(i) as usize] * scales[i / BLOCK];
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(&self.absmax.values(), 0, self.rows, &mut out);
        out
    }

    /// Bytes held: codes plus scales.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }

    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.bytes() as f64 / (self.rows * self.cols) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_high_nibble_first_and_round_trips_levels() {
        let vals: Vec<f32> = (0..64).map(|i| NF4_LEVELS[i % 16] * 2.0).collect();
        let q = Nf4Weight::quantize(&vals, 1, 64, false);
        assert_eq!(q.packed[0], 0x01);
        assert_eq!(q.dequantize(), vals);
        assert!((q.bits_per_param() - 4.5).abs() < 1e-9);
    }

    #[test]
    fn double_quantization_is_close_and_small() {
        let vals: Vec<f32> = (0..64 * 512)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let q = Nf4Weight::quantize(&vals, 512, 64, true);
        assert!(q.bits_per_param() < 4.2, "{}", q.bits_per_param());
        let plain = Nf4Weight::quantize(&vals, 512, 64, false).dequantize();
        let dq = q.dequantize();
        let worst = plain
            .iter()
            .zip(&dq)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.02, "{worst}");
    }
}
