//! Probe: where an adapter load's time goes — the header check, reading the tensors (the file
//! read into memory and converted), binding them to the model (transposed into the kernel's
//! layout) — over a directory of PEFT adapters for the default model (e.g. the ones
//! `benches/scale.py` writes), each loaded once, files already in the page cache.
//!
//! `cargo run --release --example adapter_load_probe -- DIR [COUNT]`
use std::time::Instant;

use clap::Parser;
use loraplex::adapters::{bind, PeftAdapter};

fn main() {
    loraplex::init_threads();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let count: usize = args.get(2).map_or(100, |c| c.parse().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cli = loraplex::cli::Cli::try_parse_from(["serve"]).unwrap();
    let loaded = rt.block_on(cli.serve.model.load()).unwrap();
    let opts = bind::BindOptions::default();
    let mut dirs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("adapter_config.json").is_file())
        .collect();
    dirs.sort();
    dirs.truncate(count);
    for d in &dirs {
        // into the page cache
        let _ = std::fs::read(d.join("adapter_model.safetensors"));
    }
    let (mut header, mut read, mut bound, mut bytes) = (0.0, 0.0, 0.0, 0u64);
    for d in &dirs {
        let t = Instant::now();
        let h = PeftAdapter::inspect(d).unwrap();
        bind::check(&h, &loaded.model, &opts).unwrap();
        bytes += h.bytes;
        let t1 = Instant::now();
        let a = PeftAdapter::load_tensors(h).unwrap();
        let t2 = Instant::now();
        let w = bind::bind(&a, &loaded.model, &opts).unwrap();
        let t3 = Instant::now();
        std::hint::black_box(w);
        header += (t1 - t).as_secs_f64();
        read += (t2 - t1).as_secs_f64();
        bound += (t3 - t2).as_secs_f64();
    }
    let n = dirs.len() as f64;
    println!(
        "{} adapters, {:.2} MB each on average: header {:.3} ms, read {:.3} ms, bind {:.3} ms a load",
        dirs.len(),
        bytes as f64 / n / 1e6,
        header / n * 1e3,
        read / n * 1e3,
        bound / n * 1e3
    );
}
