//! Load test: closed-loop clients against the server (started here on a loopback port, or
//! `--url`), streaming chat completions, adapters drawn uniformly or Zipf from synthetic PEFT
//! adapters made for the model. Reports tokens/s, TTFT and inter-token p50/p99, errors and the
//! adapter cache hit rate, as a table and JSON.
//!
//! `cargo bench --bench load -- [--model M] [--concurrency 8] [--requests 32] [--max-tokens 64]
//!   [--adapters 8] [--rank 16 | --ranks 8,16,32,64] [--dist uniform|zipf]
//!   [--modes base,one,mixed] [--url http://host:port] [--json FILE]`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use futures::StreamExt;
use loraplex::adapters::peft::ModuleWeights;
use loraplex::adapters::{AdapterConfig, PeftAdapter, TargetModules};
use loraplex::model::Proj;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Parser, Debug)]
struct Opts {
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests per mode, all clients together.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    adapters: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Ranks to cycle through instead of `--rank` (e.g. 8,16,32,64).
    #[arg(long, value_delimiter = ',')]
    ranks: Vec<usize>,
    #[arg(long, default_value = "uniform")]
    dist: String,
    #[arg(long, value_delimiter = ',', default_value = "base,one,mixed")]
    modes: Vec<String>,
    #[arg(long)]
    url: Option<String>,
    #[arg(long)]
    json: Option<String>,
    /// Serve the base in NF4.
    #[arg(long)]
    nf4: bool,
    /// Only write the synthetic adapters (PEFT format) into this directory and exit (to serve
    /// the same adapters from another server, e.g. llama.cpp after conversion).
    #[arg(long)]
    write_adapters: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn make_adapters(
    model: &loraplex::model::Llama,
    dir: &std::path::Path,
    count: usize,
    ranks: &[usize],
) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..count)
        .map(|i| {
            let r = ranks[i % ranks.len()];
            let mut modules = std::collections::BTreeMap::new();
            for l in 0..model.layers.len() {
                for p in Proj::ALL {
                    let (out, inp) = model.linear(l, p).unwrap().base().dims().unwrap();
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> = (0..r * inp)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect();
                    let b: Vec<f32> = (0..out * r)
                        .map(|_| rng.random_range(-0.01..0.01f32))
                        .collect();
                    modules.insert(
                        format!("model.layers.{l}.{}", p.module()),
                        ModuleWeights {
                            lora_a: Some(Tensor::from_vec(a, (r, inp), &Device::Cpu).unwrap()),
                            lora_b: Some(Tensor::from_vec(b, (out, r), &Device::Cpu).unwrap()),
                            magnitude: None,
                            ..Default::default()
                        },
                    );
                }
            }
            let name = format!("synthetic-{i}-r{r}");
            let config = AdapterConfig {
                method: loraplex::adapters::config::Method::Lora,
                r,
                lora_alpha: 2.0 * r as f64,
                target_modules: TargetModules::AllLinear,
                use_rslora: false,
                use_dora: false,
                rank_pattern: vec![],
                alpha_pattern: vec![],
                lora_dropout: 0.0,
                layers_to_transform: None,
                base_model_name_or_path: None,
                prefix_encoder_hidden: None,
            };
            let names: Vec<&str> = Proj::ALL.iter().map(|p| p.short()).collect();
            PeftAdapter {
                dir: dir.join(&name),
                config,
                modules,
                prompt_embeddings: None,
                fusion: None,
            }
            .save(&dir.join(&name), &names)
            .unwrap();
            name
        })
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct Sample {
    tokens: usize,
    ttft: Option<f64>,
    itl: Vec<f64>,
    error: bool,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    adapter: Option<&str>,
    max_tokens: usize,
    prompt: &str,
) -> Sample {
    let mut body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    if let Some(a) = adapter {
        body["adapter"] = json!(a);
    }
    let start = Instant::now();
    let mut s = Sample::default();
    let resp = match client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        _ => {
            s.error = true;
            return s;
        }
    };
    let mut last = start;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            s.error = true;
            return s;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(u) = v.get("usage") {
                s.tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                let now = Instant::now();
                match s.ttft {
                    None => s.ttft = Some((now - start).as_secs_f64()),
                    Some(_) => s.itl.push((now - last).as_secs_f64()),
                }
                last = now;
            }
        }
    }
    s
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn run_mode(opts: &Opts, url: &str, mode: &str, adapters: &[String]) -> serde_json::Value {
    let client = reqwest::Client::new();
    let before = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap_or_default();
    let zipf_weights: Vec<f64> = (1..=adapters.len()).map(|k| 1.0 / k as f64).collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..opts.concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        let adapters = adapters.to_vec();
        let (mode, dist, weights) = (mode.to_string(), opts.dist.clone(), zipf_weights.clone());
        let (total, max_tokens) = (opts.requests, opts.max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let adapter = match mode.as_str() {
                    "base" => None,
                    "one" => adapters.first().cloned(),
                    _ if dist == "zipf" => {
                        let sum: f64 = weights.iter().sum();
                        let mut x = rng.random::<f64>() * sum;
                        let mut pick = 0;
                        for (k, w) in weights.iter().enumerate() {
                            if x < *w {
                                pick = k;
                                break;
                            }
                            x -= w;
                        }
                        Some(adapters[pick].clone())
                    }
                    // Uniform: every client cycles through the adapters, offset by its index,
                    // so each decode step mixes distinct adapters.
                    _ => Some(adapters[(i + c) % adapters.len()].clone()),
                };
                let prompt = format!(
                    "Request {i}: tell me a story about the number {}.",
                    i * 7 + c
                );
                samples.push(
                    one_request(&client, &url, adapter.as_deref(), max_tokens, &prompt).await,
                );
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap_or_default();
    let hits = metric(&after, "loraplex_adapter_cache_hits_total")
        - metric(&before, "loraplex_adapter_cache_hits_total");
    let misses = metric(&after, "loraplex_adapter_cache_misses_total")
        - metric(&before, "loraplex_adapter_cache_misses_total");
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let errors = samples.iter().filter(|s| s.error).count();
    let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
    json!({
        "mode": mode, "requests": samples.len(), "errors": errors, "tokens": tokens,
        "seconds": elapsed, "tokens_per_second": tokens as f64 / elapsed,
        "ttft_p50_ms": percentile(&mut ttft, 0.5) * 1e3, "ttft_p99_ms": percentile(&mut ttft, 0.99) * 1e3,
        "itl_p50_ms": percentile(&mut itl, 0.5) * 1e3, "itl_p99_ms": percentile(&mut itl, 0.99) * 1e3,
        "cache_hit_rate": if hits + misses > 0.0 { hits / (hits + misses) } else { f64::NAN },
    })
}

fn main() {
    loraplex::init_threads();
    let opts = Opts::parse();
    let rt = tokio::runtime::Runtime::new().unwrap();
    if let Some(dir) = &opts.write_adapters {
        let cli = loraplex::cli::Cli::try_parse_from(["serve"]).unwrap();
        let loaded = rt.block_on(cli.serve.model.load()).unwrap();
        let ranks = if opts.ranks.is_empty() {
            vec![opts.rank]
        } else {
            opts.ranks.clone()
        };
        std::fs::create_dir_all(dir).unwrap();
        for name in make_adapters(&loaded.model, dir, opts.adapters, &ranks) {
            println!("{}", dir.join(name).display());
        }
        return;
    }
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let (url, adapters) = match &opts.url {
            Some(u) => (u.clone(), (0..opts.adapters).map(|i| format!("synthetic-{i}-r{}", opts.rank)).collect::<Vec<_>>()),
            None => {
                let mut args = vec!["serve".to_string(), "--port".into(), "0".into(), "--adapters".into(), tmp.path().display().to_string()];
                if opts.nf4 {
                    args.extend(["--quantize".to_string(), "nf4".into()]);
                }
                if let Some(m) = &opts.model {
                    args.extend(["--model".to_string(), m.clone()]);
                }
                let cli = loraplex::cli::Cli::try_parse_from(&args).unwrap();
                let state = loraplex::cli::build_state(&cli.serve).await.unwrap();
                let ranks = if opts.ranks.is_empty() { vec![opts.rank] } else { opts.ranks.clone() };
                eprintln!("making {} synthetic adapters (ranks {ranks:?}) ...", opts.adapters);
                let adapters = make_adapters(&state.engine.model().model, tmp.path(), opts.adapters, &ranks);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                tokio::spawn(loraplex::server::serve(state, listener));
                (url, adapters)
            }
        };
        // Warm up: one request per adapter (loads them) and one base request.
        let client = reqwest::Client::new();
        for a in adapters.iter().map(Some).chain([None]) {
            one_request(&client, &url, a.map(|s| s.as_str()), 2, "warm up").await;
        }
        let mut results = Vec::new();
        for mode in &opts.modes {
            eprintln!("mode {mode}: {} requests, concurrency {}, {} tokens each", opts.requests, opts.concurrency, opts.max_tokens);
            results.push(run_mode(&opts, &url, mode, &adapters).await);
        }
        let by_mode: HashMap<String, f64> = results
            .iter()
            .map(|r| (r["mode"].as_str().unwrap().to_string(), r["tokens_per_second"].as_f64().unwrap()))
            .collect();
        println!("\n| mode | requests | errors | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | cache hits |");
        println!("|---|---|---|---|---|---|---|");
        for r in &results {
            println!(
                "| {} | {} | {} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} |",
                r["mode"].as_str().unwrap(), r["requests"], r["errors"], r["tokens_per_second"].as_f64().unwrap(),
                r["ttft_p50_ms"].as_f64().unwrap(), r["ttft_p99_ms"].as_f64().unwrap(),
                r["itl_p50_ms"].as_f64().unwrap(), r["itl_p99_ms"].as_f64().unwrap(),
                r["cache_hit_rate"].as_f64().unwrap_or(f64::NAN),
            );
        }
        if let (Some(base), Some(mixed)) = (by_mode.get("base"), by_mode.get("mixed")) {
            println!("\nmixed / base throughput: {:.2}", mixed / base);
        }
        let report = json!({"concurrency": opts.concurrency, "max_tokens": opts.max_tokens, "adapters": opts.adapters,
            "dist": opts.dist, "results": results});
        println!("{report}");
        if let Some(path) = &opts.json {
            std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        }
    });
}
