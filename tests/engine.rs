//! The engine under many concurrent submissions: every request finishes (a request admitted by
//! the worker before its message arrived used to be dropped from the scheduler and wait forever,
//! with the worker spinning).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use loraplex::engine::{
    Engine, Event, GenerationConfig, SamplingParams, SchedulerConfig, ValidRequest,
};

#[test]
fn every_one_of_many_concurrent_submissions_finishes() {
    let model = Arc::new(load_tiny());
    let engine = Arc::new(Engine::start(
        model,
        SchedulerConfig {
            max_running: 2,
            kv_cache_tokens: 1 << 16,
            max_queue: 4096,
            max_queue_per_tenant: 4096,
            max_batched_tokens: 0,
            fair_lag_tokens: 256,
        },
        Arc::new(loraplex::metrics::Metrics::new()),
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let start = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|i| {
                        engine
                            .submit(ValidRequest {
                                prompt: vec![5 + (t * 7 + i) as u32 % 200, 9, 11],
                                config: GenerationConfig {
                                    max_tokens: 2,
                                    ignore_eos: true,
                                    sampling: SamplingParams::greedy(),
                                    ..Default::default()
                                },
                                logprobs: None,
                                adapter: None,
                                adapter_label: None,
                                adapter_name: None,
                                tenant: Some(format!("t{}", i % 3)),
                                class: Default::default(),
                            })
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let receivers: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    rt.block_on(async {
        for mut rx in receivers {
            let done = tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(e) = rx.recv().await {
                    if matches!(e, Event::Done { .. } | Event::Error(_)) {
                        return true;
                    }
                }
                false
            })
            .await;
            assert_eq!(done, Ok(true), "a request never finished");
        }
    });
    // The worker clears its scheduler entry right after the last event.
    let idle_by = Instant::now() + Duration::from_secs(5);
    while !engine.is_idle() && Instant::now() < idle_by {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(engine.is_idle());
    eprintln!("800 requests in {:?}", start.elapsed());
}

/// A step that panics (here: an adapter whose B does not fit its A, which `bind` would refuse,
/// trips a kernel's bounds check) fails that step's requests; the worker goes on serving.
#[test]
fn a_panicking_step_fails_its_requests_and_the_next_request_succeeds() {
    use candle_core::{Device, Tensor};
    use loraplex::adapters::{AdapterCache, AdapterKey, AdapterName, CacheConfig};
    use loraplex::model::{AdapterWeights, LoraSite};
    let model = Arc::new(load_tiny());
    let metrics = Arc::new(loraplex::metrics::Metrics::new());
    let engine = Engine::start(
        model.clone(),
        SchedulerConfig {
            max_running: 4,
            kv_cache_tokens: 1 << 16,
            max_queue: 16,
            max_queue_per_tenant: 16,
            max_batched_tokens: 0,
            fair_lag_tokens: 256,
        },
        metrics.clone(),
    );
    let hidden = model.model.config.hidden_size;
    let mut layers: Vec<[Option<LoraSite>; 7]> = (0..model.model.layers.len())
        .map(|_| Default::default())
        .collect();
    layers[0][0] = Some(LoraSite {
        a_t: Tensor::ones((hidden, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
        b_t: Tensor::ones((8, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        dora_scale: None,
        dropout: None,
    });
    let cache = AdapterCache::new(CacheConfig::default());
    let bad = cache
        .acquire(
            &AdapterKey {
                name: AdapterName::parse("broken").unwrap(),
                version: 1,
            },
            false,
            || Ok(AdapterWeights::from_lora(layers)),
        )
        .unwrap();
    let request = |adapter| ValidRequest {
        prompt: vec![5, 9, 11],
        config: GenerationConfig {
            max_tokens: 3,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
        logprobs: None,
        adapter,
        adapter_label: None,
        adapter_name: None,
        tenant: None,
        class: Default::default(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let last = |mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>| {
        rt.block_on(async move {
            let mut last = None;
            while let Some(e) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap()
            {
                last = Some(e);
            }
            last
        })
    };
    let failed = last(engine.submit(request(Some(bad))).unwrap());
    assert!(
        matches!(failed, Some(Event::Error(ref m)) if m.contains("internal")),
        "{failed:?}"
    );
    assert_eq!(metrics.engine_restarts.get(), 1);
    let ok = last(engine.submit(request(None)).unwrap());
    assert!(
        matches!(
            ok,
            Some(Event::Done {
                completion_tokens: 3,
                ..
            })
        ),
        "{ok:?}"
    );
}
