//! Probe: one projection's matmul by batch size at Llama-3.2-1B's shapes, Q4_K as a Q4_K_M file
//! stores most projections — candle's `QMatMul` (what served Q4_K before) against our Q4_K
//! integer kernel, on the same bytes, in the same run. Enough weights that they do not sit in
//! cache (a decode step reads every layer once, so memory bandwidth decides).
//!
//!     cargo run --release --example kquant_probe
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use loraplex::quant::q4_k::Q4KWeight;
use std::time::Instant;

fn time<F: FnMut()>(mut f: F, n: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() / n as f64 * 1e3
}

fn main() {
    loraplex::init_threads();
    let dev = Device::Cpu;
    // `KERNEL=avx2` (or `portable`) times that path of ours instead of the detected one.
    use loraplex::quant::int8::Kernel;
    let kernel = match std::env::var("KERNEL").as_deref() {
        Ok("portable") => Kernel::Portable,
        #[cfg(target_arch = "x86_64")]
        Ok("avx2") => Kernel::Avx2,
        _ => Kernel::detect(),
    };
    println!("kernel: {kernel:?}");
    // q/o, k/v, gate/up, down of Llama-3.2-1B (hidden 2048, intermediate 8192, kv 512).
    for (out, inp, copies) in [
        (2048usize, 2048usize, 24),
        (512, 2048, 48),
        (8192, 2048, 8),
        (2048, 8192, 8),
    ] {
        let qs: Vec<QTensor> = (0..copies)
            .map(|_| {
                let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
                QTensor::quantize(&w, GgmlDType::Q4K).unwrap()
            })
            .collect();
        let ours: Vec<Q4KWeight> = qs
            .iter()
            .map(|q| Q4KWeight::from_gguf(&q.data().unwrap(), out, inp).unwrap())
            .collect();
        let cand: Vec<QMatMul> = qs
            .into_iter()
            .map(|q| QMatMul::from_qtensor(q).unwrap())
            .collect();
        for m in [1usize, 4, 8, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let n = if m > 8 { 2 } else { 6 };
            let gflops = |t: f64| 2.0 * (out * inp * m) as f64 / 1e6 / t;
            let tc = time(
                || {
                    for q in &cand {
                        q.forward(&x).unwrap();
                    }
                },
                n,
            ) / copies as f64;
            let to = time(
                || {
                    for q in &ours {
                        loraplex::quant::int8::matmul_t_int(q, &xv, m, kernel);
                    }
                },
                n,
            ) / copies as f64;
            println!(
                "{out}x{inp} m={m:3}: candle Q4_K {tc:.3} ms ({:.0} GFLOP/s) | ours {to:.3} ms ({:.0} GFLOP/s) | ours/candle speed {:.2}x",
                gflops(tc),
                gflops(to),
                tc / to
            );
        }
    }
}
