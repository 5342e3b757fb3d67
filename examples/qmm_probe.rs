//! Probe: one projection's matmul by batch size — f32 (as served with `--dtype f32`), candle's
//! QMatMul Q4_1, and our Q4_1 integer kernel — on the default
//! model's shapes, 30 weights so they do not sit in cache (a step reads every layer once).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use loraplex::quant::q4_1::Q41Weight;
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
    for (out, inp) in [(1536usize, 576usize), (576, 1536)] {
        let ws: Vec<Tensor> = (0..30)
            .map(|_| Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap())
            .collect();
        let qs: Vec<QTensor> = ws
            .iter()
            .map(|w| QTensor::quantize(w, GgmlDType::Q4_1).unwrap())
            .collect();
        let ours: Vec<Q41Weight> = qs
            .iter()
            .map(|q| Q41Weight::from_gguf(&q.data().unwrap(), out, inp).unwrap())
            .collect();
        let cand: Vec<QMatMul> = qs
            .into_iter()
            .map(|q| QMatMul::from_qtensor(q).unwrap())
            .collect();
        for m in [1usize, 8, 32, 64, 128, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let n = if m > 64 { 2 } else { 5 };
            let g = |t: f64| 2.0 * (out * inp * m) as f64 / 1e6 / t;
            let tf = time(
                || {
                    for w in &ws {
                        w.matmul(&x.t().unwrap())
                            .unwrap()
                            .t()
                            .unwrap()
                            .contiguous()
                            .unwrap();
                    }
                },
                n,
            ) / 30.0;
            let tc = if m <= 32 {
                time(
                    || {
                        for q in &cand {
                            q.forward(&x).unwrap();
                        }
                    },
                    n,
                ) / 30.0
            } else {
                f64::NAN
            };
            let ti = time(
                || {
                    for q in &ours {
                        loraplex::quant::int8::matmul_t_int(
                            q,
                            &xv,
                            m,
                            loraplex::quant::int8::Kernel::detect(),
                        );
                    }
                },
                n,
            ) / 30.0;
            println!("{out}x{inp} m={m:3}: f32 {tf:.3} ms ({:.0} GFLOP/s) | candle Q4_1 {tc:.3} ({:.0}) | ours int8 {ti:.3} ({:.0})", g(tf), g(tc), g(ti));
        }
    }
}
