use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    for m in [1usize, 8, 32] {
        let x = Tensor::randn(0f32, 1., (m, 576), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (1536, 576), &d).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let n = 200;
        let t = Instant::now();
        for _ in 0..n {
            let _ = x.matmul(&w.t().unwrap()).unwrap();
        }
        let a = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let _ = x.matmul(&wt).unwrap();
        }
        let b = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let _ = w.matmul(&x.t().unwrap()).unwrap();
        }
        let c = t.elapsed().as_secs_f64() / n as f64;
        let fl = 2.0 * m as f64 * 576.0 * 1536.0;
        println!(
            "m={m}: x·Wᵀ(view) {:.1} GF/s, x·Wt(contig) {:.1} GF/s, W·xᵀ {:.1} GF/s",
            fl / a / 1e9,
            fl / b / 1e9,
            fl / c / 1e9
        );
    }
}
