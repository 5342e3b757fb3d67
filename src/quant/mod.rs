//! Quantized base weights: NF4 (bitsandbytes layout) with double quantization, and the matmul
//! over it. Depends on candle only.

pub mod nf4;
pub mod nf4_matmul;
pub mod nf4_simd;

pub use nf4::Nf4Weight;
