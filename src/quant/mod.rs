//! Quantized base weights: NF4 (bitsandbytes layout) with double quantization, GGUF Q4_1 served
//! as stored, and the matmuls over them. Depends on candle only.

pub mod amx;
pub mod bf16;
pub mod gguf;
pub mod int8;
pub mod nf4;
pub mod nf4_matmul;
pub mod nf4_simd;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;

pub use nf4::Nf4Weight;
