//! Adapter downloads from a hub, against a real HTTP server on loopback that serves files the
//! way the hub does (`/{org}/{name}/resolve/main/{file}`, `Range` honoured). The safetensors
//! header is fetched and checked before the body; a tenant's download carries no token.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use loraplex::adapters::hub::{fetch, HubOptions};
use loraplex::adapters::{bind, BindOptions, PeftAdapter};
use loraplex::model::source::SourceConfig;

#[derive(Clone, Default)]
struct Hub {
    files: Arc<HashMap<String, Vec<u8>>>,
    /// (path, range, authorization) of every request.
    seen: Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>,
}

async fn serve_file(
    State(hub): State<Hub>,
    UrlPath((org, name, file)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let key = format!("{org}/{name}/{file}");
    let header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let range = header("range");
    hub.seen
        .lock()
        .unwrap()
        .push((key.clone(), range.clone(), header("authorization")));
    let Some(bytes) = hub.files.get(&key) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // A private repo: only the operator's token reads it.
    if key.starts_with("ops/private/")
        && header("authorization").as_deref() != Some("Bearer hf_operator_secret")
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            let end = (b + 1).min(bytes.len());
            (StatusCode::PARTIAL_CONTENT, bytes[a.min(end)..end].to_vec()).into_response()
        }
        None => bytes.clone().into_response(),
    }
}

async fn start_hub(files: HashMap<String, Vec<u8>>) -> (String, Hub) {
    let hub = Hub {
        files: Arc::new(files),
        ..Default::default()
    };
    let app = axum::Router::new()
        .route(
            "/{org}/{name}/resolve/main/{file}",
            axum::routing::get(serve_file),
        )
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hub)
}

fn adapter_files(repo: &str, src: &str) -> Vec<(String, Vec<u8>)> {
    let dir = tiny_dir().join("adapters").join(src);
    ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| (format!("{repo}/{f}"), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

fn huge_header_file() -> Vec<u8> {
    let header = serde_json::json!({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4_000_000_000_000u64]},
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    bytes
}

fn check_against_tiny(
    h: &loraplex::adapters::peft::AdapterHeader,
) -> Result<(), loraplex::adapters::AdapterError> {
    let loaded = load_tiny();
    loraplex::adapters::bind::check(h, &loaded.model, &BindOptions::default())
}

#[tokio::test]
async fn downloads_are_bounded_checked_header_first_and_tokenless_for_tenants() {
    std::env::set_var("HF_TOKEN", "hf_operator_secret");
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    files.extend(adapter_files("acme/good", "lora-r4-qv"));
    files.extend(adapter_files("ops/private", "lora-r4-qv"));
    files.extend(adapter_files("acme/huge", "lora-r4-qv"));
    files.insert(
        "acme/huge/adapter_model.safetensors".into(),
        huge_header_file(),
    );
    files.extend(adapter_files("acme/wrong-shape", "lora-r4-qv"));
    // Weights made for another model: the shapes in the header do not fit the tiny model.
    let mut big = std::collections::HashMap::new();
    big.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
        candle_core::Tensor::zeros((4, 999), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    big.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
        candle_core::Tensor::zeros((999, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&big, tmp.path().join("w.safetensors")).unwrap();
    files.insert(
        "acme/wrong-shape/adapter_model.safetensors".into(),
        std::fs::read(tmp.path().join("w.safetensors")).unwrap(),
    );
    let (endpoint, hub) = start_hub(files).await;
    let home = tempfile::tempdir().unwrap();
    let cfg = SourceConfig {
        home: home.path().to_path_buf(),
        hub_endpoint: endpoint,
        pypi_index: String::new(),
    };
    let tenant = HubOptions {
        use_token: false,
        max_bytes: 1 << 20,
    };

    // A good adapter: downloaded, loads and binds; the tenant's requests carried no token.
    let dir = fetch("acme/good", &cfg, &tenant, check_against_tiny)
        .await
        .unwrap();
    let loaded = load_tiny();
    bind(
        &PeftAdapter::load(&dir).unwrap(),
        &loaded.model,
        &BindOptions::default(),
    )
    .unwrap();
    assert!(hub
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|(_, _, auth)| auth.is_none()));
    // A second fetch is served from disk.
    let n = hub.seen.lock().unwrap().len();
    fetch("acme/good", &cfg, &tenant, check_against_tiny)
        .await
        .unwrap();
    assert_eq!(hub.seen.lock().unwrap().len(), n);

    // A header declaring 4 TB is refused from the header: the body is never requested.
    let e = fetch("acme/huge", &cfg, &tenant, check_against_tiny)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("1000000") && e.contains("data offsets"), "{e}");
    let e = fetch("acme/wrong-shape", &cfg, &tenant, check_against_tiny)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj") && e.contains("999"), "{e}");
    for repo in ["acme/huge/", "acme/wrong-shape/"] {
        let whole_body = hub.seen.lock().unwrap().iter().any(|(p, range, _)| {
            p.starts_with(repo) && p.ends_with(".safetensors") && range.is_none()
        });
        assert!(
            !whole_body,
            "{repo}: the body was downloaded before the header was checked"
        );
        assert!(!home
            .path()
            .join("hub-adapters")
            .join(repo.trim_end_matches('/').replace('/', "--"))
            .exists());
    }
    // Leftover download folders are cleaned up.
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("hub-adapters/public"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".download-"))
        .collect();
    assert!(leftovers.is_empty());

    // A size cap below the adapter's size refuses it, before the body.
    let small = HubOptions {
        use_token: false,
        max_bytes: 1000,
    };
    std::fs::remove_dir_all(home.path().join("hub-adapters/public/acme--good")).unwrap();
    let e = fetch("acme/good", &cfg, &small, check_against_tiny)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("acme/good"), "{e}");

    // The admin's download carries the operator's token.
    std::fs::remove_dir_all(home.path().join("hub-adapters")).unwrap();
    let admin = HubOptions {
        use_token: true,
        max_bytes: 1 << 20,
    };
    hub.seen.lock().unwrap().clear();
    fetch("acme/good", &cfg, &admin, check_against_tiny)
        .await
        .unwrap();
    assert!(hub
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|(_, _, auth)| auth.as_deref() == Some("Bearer hf_operator_secret")));

    // A private repo the admin fetched is not served to a tenant from the admin's download.
    fetch("ops/private", &cfg, &admin, check_against_tiny)
        .await
        .unwrap();
    let e = fetch("ops/private", &cfg, &tenant, check_against_tiny)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");
}
