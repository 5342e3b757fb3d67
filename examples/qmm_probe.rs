use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
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
    for (out, inp, ty) in [(1536usize, 576usize, GgmlDType::Q4_1), (576, 1536, GgmlDType::Q4_1), (49152, 576, GgmlDType::Q8_0), (1536, 576, GgmlDType::Q8_0), (1536, 768, GgmlDType::Q4K)] {
        let w = (Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap()).contiguous().unwrap();
        let q = QTensor::quantize(&w, ty).unwrap();
        let qm = QMatMul::from_qtensor(q).unwrap();
        for m in [1usize, 8, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
            let n = if out > 10000 { 5 } else { 50 };
            let tq = time(|| { qm.forward(&x).unwrap(); }, n);
            let tf = time(|| { w.matmul(&x.t().unwrap()).unwrap().t().unwrap().contiguous().unwrap(); }, n);
            let gflop = 2.0 * (out * inp * m) as f64 / 1e9;
            println!("{out}x{inp} {ty:?} m={m}: quant {tq:.3} ms ({:.1} GFLOP/s), f32 {tf:.3} ms ({:.1} GFLOP/s)", gflop / tq * 1e3, gflop / tf * 1e3);
        }
    }
}
