//! What the Gateway API Inference Extension's endpoint picker reads from a replica (see
//! `deploy/k8s/inference-gateway/epp-config.yaml`): on the inference port, with `--open-metrics`
//! and no key, the waiting, running and KV-usage series as typed gauges, one series each; the
//! LoRA info gauge with `max_lora`, `running_lora_adapters` and `waiting_lora_adapters` naming
//! adapters as the requests' `model` field did, its value the update's Unix time; the KV
//! layout for `cacheInfoSpec`. And the adapter syncer's `POST /v1/load_lora_adapter` checks
//! `base_model_name`.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use loraplex::adapters::{AdapterCache, CacheConfig};
use loraplex::engine::{
    Engine, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
};
use loraplex::metrics::Metrics;
use serde_json::{json, Value};

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, String) {
    let (status, _, text) = common::http::request(app, method, uri, body, key).await;
    (status, text)
}

/// The sample lines of series `name` (exactly that name, any labels).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .collect()
}

/// `label="value"` of a sample line.
fn label<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(&format!("{key}=\"")).expect("label present") + key.len() + 2;
    &line[at..at + line[at..].find('"').expect("closing quote")]
}

fn value(line: &str) -> f64 {
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

#[tokio::test]
async fn the_picker_reads_typed_gauges_without_a_key_and_load_checks_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys.toml");
    std::fs::write(
        &keys,
        "[keys.\"sk-admin\"]\ntenant = \"ops\"\nadmin = true\n\n[keys.\"sk-acme\"]\ntenant = \"acme\"\n",
    )
    .unwrap();
    let tiny = tiny_dir();
    let adapters = tiny.join("adapters");
    let args = [
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
        "--api-keys",
        keys.to_str().unwrap(),
    ];
    // Without --open-metrics a keyless scrape is refused; with it, it is served (and nothing
    // else opens: the API still wants a key).
    let closed = router(common::http::state(&args).await);
    assert_eq!(
        call(&closed, "GET", "/metrics", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let st = common::http::state(&[&args[..], &["--open-metrics"]].concat()).await;
    let base = st.engine.model().id.clone();
    let app = router(st);
    assert_eq!(
        call(&app, "GET", "/v1/models", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "lora-r4-qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})),
        Some("sk-acme"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    for name in [
        "loraplex_num_requests_waiting",
        "loraplex_num_requests_running",
        "loraplex_kv_cache_usage_perc",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} gauge\n")),
            "{name} is not a typed gauge:\n{text}"
        );
        let lines = samples(&text, name);
        assert_eq!(lines.len(), 1, "{name}: {lines:?}");
        assert!(!lines[0].contains('{'), "{name} has labels: {}", lines[0]);
    }
    assert!(text.contains("# TYPE loraplex_lora_requests_info gauge\n"));
    let info = samples(&text, "loraplex_lora_requests_info");
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(
        label(info[0], "max_lora").parse::<u32>().is_ok(),
        "{}",
        info[0]
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - value(info[0])).abs() < 60.0, "{}", info[0]);
    let layout = samples(&text, "loraplex_cache_config_info");
    assert_eq!(layout.len(), 1, "{layout:?}");
    assert_eq!(label(layout[0], "block_size"), "16");
    // The adapter syncer's load names the base it is for: another base is a 400 naming the field.
    let dir = adapters.join("lora-r4-qv");
    let (status, text) = call(
        &app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "synced", "lora_path": dir, "base_model_name": "another-base"})),
        Some("sk-admin"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["param"], "base_model_name", "{text}");
    let (status, text) = call(
        &app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "synced", "lora_path": dir, "base_model_name": base})),
        Some("sk-admin"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
}

/// The LoRA info names running and waiting adapters as the requests named them (`model`), one
/// step driven by hand: one request runs (`--max-running 1`), two wait.
#[test]
fn lora_info_names_running_and_waiting_adapters_as_requested() {
    let model = Arc::new(load_tiny());
    let cache = AdapterCache::new(CacheConfig::default());
    let lease = |name: &str| lease(&cache, &model, name, &format!("acme/{name}"), 1);
    let metrics = Arc::new(Metrics::new());
    let (engine, mut worker) = Engine::manual(
        model.clone(),
        SchedulerConfig {
            max_running: 1,
            kv_cache_tokens: 1024,
            max_queue: 8,
            max_queue_per_tenant: 8,
            max_batched_tokens: 256,
            fair_lag_tokens: 256,
        },
        KvConfig::default(),
        metrics.clone(),
    )
    .unwrap();
    let request = |name: &str| ValidRequest {
        prompt: vec![5, 6, 7],
        config: GenerationConfig {
            max_tokens: 4,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
        logprobs: None,
        adapter: Some(lease(name)),
        adapter_label: None,
        // A tenant's request says `lora-r4-qv` for `acme/lora-r4-qv`: the picker sees `model`.
        adapter_name: Some(name.to_string()),
        tenant: Some("acme".into()),
        class: Default::default(),
    };
    let _rx = [
        engine.submit(request("lora-r4-qv")).unwrap(),
        engine.submit(request("dora-r8-all")).unwrap(),
        engine.submit(request("lora-r8-all")).unwrap(),
    ];
    worker.step();
    let text = metrics.render();
    let info = samples(&text, "loraplex_lora_requests_info");
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(label(info[0], "max_lora"), "1");
    assert_eq!(label(info[0], "running_lora_adapters"), "lora-r4-qv");
    assert_eq!(
        label(info[0], "waiting_lora_adapters"),
        "dora-r8-all,lora-r8-all"
    );
    run_to_idle(&mut worker);
    let text = metrics.render();
    let info = samples(&text, "loraplex_lora_requests_info");
    assert_eq!(label(info[0], "running_lora_adapters"), "");
    assert_eq!(label(info[0], "waiting_lora_adapters"), "");
}

use loraplex::server::router;
