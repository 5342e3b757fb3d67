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
                                tenant: Some(format!("t{}", i % 3)),
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
