//! Numeric building blocks of the Llama: RMSNorm, RoPE, causal attention. Depends on candle only.
//!
//! Every op has two paths: candle's fused kernels, which have no backward, and a path built from
//! differentiable primitives. The differentiable path is taken whenever the input tracks a
//! gradient (`Tensor::track_op`), so training through the same model code never silently loses
//! its gradient, and serving keeps the fast kernels.

pub mod attention;
pub mod attention_train;
pub mod cpu_features;
pub mod frozen_matmul;
pub mod fused;
pub mod gemm;
pub mod hadamard;
pub mod lora_avx2;
pub mod lora_cpu;
pub mod lora_train;
pub mod profile;
pub mod rms_norm;
pub mod rope;
pub mod transpose;
pub mod vexp;

pub use attention::causal_attention;
pub use rms_norm::rms_norm;
pub use rope::Rope;
