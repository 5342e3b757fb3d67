//! Adapters at scale and in motion, over HTTP in process: loads that hold back no other
//! request, queued requests' adapters that are never evicted, revisions swapped and rolled back
//! under requests in flight, and ten thousand adapters listed from the directory's index.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::http::request as call;
use common::http::{chat_body, wait_until};
use common::*;
use http_body_util::BodyExt;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};

/// A server (`tiny`: the tiny model, else the default one) on the adapters directory
/// `dir/adapters` with its state in `dir/state`.
async fn serve_dir(dir: &Path, tiny: bool, extra: &[&str]) -> Arc<AppState> {
    let (root, state, model) = (
        dir.join("adapters"),
        dir.join("state"),
        tiny_dir().display().to_string(),
    );
    let mut args = vec![
        "--adapters",
        root.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    if tiny {
        args.extend(["--model", model.as_str()]);
    }
    args.extend_from_slice(extra);
    common::http::state(&args).await
}

fn smollm2_adapter(name: &str) -> PathBuf {
    fixtures().join("smollm2/adapters").join(name)
}

/// A greedy answer of the default model (`ignore_eos`, so its length is `n` tokens).
async fn ask(app: &axum::Router, model: Option<&str>, n: u32) -> (StatusCode, Value) {
    let mut body = chat_body(model, "Name three colours.", n);
    body["ignore_eos"] = json!(true);
    let (s, v, _) = call(app, "POST", "/v1/chat/completions", Some(body), None).await;
    (s, v)
}

/// A streamed base answer of `n` tokens in the background: the arrival time of each token.
fn stream_in_background(app: &axum::Router, n: u32) -> Arc<Mutex<Vec<Instant>>> {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (app, seen) = (app.clone(), arrivals.clone());
    tokio::spawn(async move {
        let mut stream = common::http::stream_chat(&app, "Tell me a long story.", n).await;
        while let Some(Ok(frame)) = stream.frame().await {
            if let Some(data) = frame.data_ref() {
                let text = String::from_utf8_lossy(data);
                let tokens = text.matches("\"content\":\"").count();
                let mut seen = seen.lock().unwrap();
                seen.extend(std::iter::repeat_n(Instant::now(), tokens));
            }
        }
    });
    arrivals
}

/// An adapter load that takes 1.5 s (a slow volume: the test hook adds the time to the real
/// load) runs off the engine's step thread: a stream already running keeps getting tokens the
/// whole time, and the slow request's answer is the adapter's usual one.
#[tokio::test]
async fn a_slow_adapter_load_holds_back_no_other_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    for name in ["fast", "slow"] {
        replace_adapter(&smollm2_adapter("lora-r4-qv"), &root.join(name));
    }
    let st = serve_dir(dir.path(), false, &[]).await;
    let app = router(st.clone());
    let (s, v) = ask(&app, Some("fast"), 8).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let usual = answer(&v);
    let arrivals = stream_in_background(&app, 200);
    wait_until(|| arrivals.lock().unwrap().len() >= 2).await;
    st.delay_loads(Duration::from_millis(1500));
    let start = Instant::now();
    let (s, v) = ask(&app, Some("slow"), 8).await;
    let took = start.elapsed();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert_eq!(answer(&v), usual);
    let (from, to) = (
        start + Duration::from_millis(100),
        start + Duration::from_millis(1400),
    );
    let during = arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|t| (from..to).contains(t))
        .count();
    assert!(
        during >= 5,
        "the running stream got {during} tokens while the adapter loaded"
    );
}

/// With room for one resident adapter and one running request, the adapters of two queued
/// requests stay resident (their requests hold them) past the count bound, and each queued
/// request answers as its adapter does alone.
#[tokio::test]
async fn a_queued_requests_adapter_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    replace_adapter(&smollm2_adapter("lora-r4-qv"), &root.join("b"));
    replace_adapter(&smollm2_adapter("dora-r4-ko"), &root.join("c"));
    let st = serve_dir(
        dir.path(),
        false,
        &["--max-resident-adapters", "1", "--max-running", "1"],
    )
    .await;
    let app = router(st.clone());
    let running = stream_in_background(&app, 60);
    wait_until(|| !running.lock().unwrap().is_empty()).await;
    let queued: Vec<_> = ["b", "c"]
        .into_iter()
        .map(|a| {
            let app = app.clone();
            tokio::spawn(async move { ask(&app, Some(a), 8).await })
        })
        .collect();
    wait_until(|| st.metrics.waiting.get() == 2).await;
    assert_eq!(st.metrics.waiting.get(), 2, "both requests queued");
    let mut resident: Vec<String> = st.cache.resident().iter().map(|n| n.key()).collect();
    resident.sort();
    assert_eq!(
        resident,
        ["b", "c"],
        "over the count bound: both are leased"
    );
    let (_, _, metrics) = call(&app, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("running_lora_adapters=\"\",waiting_lora_adapters=\"b,c\""),
        "{metrics}"
    );
    let mut answers = Vec::new();
    for q in queued {
        let (s, v) = q.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        answers.push(answer(&v));
    }
    // Leases ended: back within the bound.
    assert_eq!(st.cache.resident().len(), 1);
    for (a, queued_answer) in ["b", "c"].into_iter().zip(answers) {
        assert_eq!(answer(&ask(&app, Some(a), 8).await.1), queued_answer, "{a}");
    }
}

/// Ten thousand adapters (configs only: a list reads no weights) list in pages from the
/// directory's index; each page checks its own adapters, so one removed shows at once.
#[tokio::test]
async fn ten_thousand_adapters_list_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    let config = tiny_dir().join("adapters/lora-r4-qv/adapter_config.json");
    for i in 0..10_000 {
        let d = root.join(format!("a{i:05}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::hard_link(&config, d.join("adapter_config.json"))
            .or_else(|_| std::fs::copy(&config, d.join("adapter_config.json")).map(|_| ()))
            .unwrap();
    }
    let st = serve_dir(dir.path(), true, &[]).await;
    let app = router(st.clone());
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let mut all = Vec::new();
    let mut uri = "/v1/models?limit=1000".to_string();
    loop {
        let (s, page, _) = call(&app, "GET", &uri, None, None).await;
        assert_eq!(s, StatusCode::OK);
        all.extend(ids(&page));
        if page["has_more"] != json!(true) {
            break;
        }
        uri = format!(
            "/v1/models?limit=1000&after={}",
            page["last_id"].as_str().unwrap()
        );
    }
    assert_eq!(all.len(), 10_001);
    assert_eq!(all[1], "a00000");
    assert_eq!(all[10_000], "a09999");
    // No longer an adapter after the index was built (its config removed: the root directory
    // does not change, so the index still names it): the page holding it drops it, the others
    // are as they were.
    std::fs::remove_file(root.join("a02500/adapter_config.json")).unwrap();
    let (_, page, _) = call(&app, "GET", "/v1/models?after=a02499&limit=2", None, None).await;
    assert_eq!(ids(&page), ["a02501"], "{page}");
    let (_, page, _) = call(&app, "GET", "/v1/models?after=a00009&limit=2", None, None).await;
    assert_eq!(ids(&page), ["a00010", "a00011"]);
}

fn answer(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

/// Replaces the adapter in `dst` with `src`'s files as a writer of large files does: each
/// written beside and renamed over.
fn replace_adapter(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let tmp = dst.join(format!("{f}.new"));
        std::fs::copy(src.join(f), &tmp).unwrap();
        std::fs::rename(tmp, dst.join(f)).unwrap();
    }
}

/// Re-registering a name is a new revision: requests in flight finish on the revision they
/// started with, new ones get the new one, `name@REV` serves a kept revision from its snapshot
/// (whatever the source directory holds now), and a rollback registers the previous revision
/// again (another tenant's `name@REV` and rollback: `tests/server.rs`, tenants).
#[tokio::test]
async fn revisions_swap_atomically_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    let st = serve_dir(dir.path(), true, &[]).await;
    let app = router(st.clone());
    let (a, b) = (
        tiny_dir().join("adapters/lora-r8-all"),
        tiny_dir().join("adapters/lora-r4-qv"),
    );
    let hot = root.join("hot");
    replace_adapter(&a, &hot);
    let ask = |model: &str, n: u32| {
        let (app, model) = (app.clone(), model.to_string());
        async move {
            let (s, v, _) = call(
                &app,
                "POST",
                "/v1/chat/completions",
                Some(chat_body(Some(&model), "tell me about the sea", n)),
                None,
            )
            .await;
            (s, v)
        }
    };
    let register = |body: Value| {
        let app = app.clone();
        async move { call(&app, "POST", "/v1/adapters", Some(body), None).await }
    };
    let (s, v) = ask("hot", 12).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let with_a = answer(&v);
    // Nothing registered yet: nothing to roll back to.
    let (s, v, _) = register(json!({"name": "hot", "rollback": true})).await;
    assert_eq!(
        (s, &v["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("rollback")),
        "{v}"
    );

    replace_adapter(&b, &hot);
    let (s, v, _) = register(json!({"name": "hot"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["version"].as_u64(), &v["revisions"]),
        (Some(1), &json!([1]))
    );
    let with_b = answer(&ask("hot", 12).await.1);
    assert_ne!(with_a, with_b, "the two adapters must answer differently");

    replace_adapter(&a, &hot);
    let (s, v, _) = register(json!({"name": "hot"})).await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::CREATED, Some(2)));
    assert_eq!(answer(&ask("hot", 12).await.1), with_a);
    // Revision 1 from its snapshot: the directory holds adapter A again.
    assert_eq!(answer(&ask("hot@1", 12).await.1), with_b);
    assert_eq!(answer(&ask("hot@2", 12).await.1), with_a);
    for missing in ["hot@0", "hot@9", "hot@x", "hot@"] {
        let (s, v) = ask(missing, 2).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{missing}: {v}");
    }

    // Rollback: revision 1's files as revision 3.
    let (s, v, _) = register(json!({"name": "hot", "rollback": true})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["version"].as_u64(), v["restored_revision"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(answer(&ask("hot", 12).await.1), with_b);
    let (_, list, _) = call(&app, "GET", "/v1/adapters", None, None).await;
    let entry = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "hot")
        .unwrap()
        .clone();
    assert_eq!(
        (&entry["version"], &entry["revisions"]),
        (&json!(3), &json!([1, 2, 3]))
    );
    let (s, v, _) = register(json!({"name": "hot", "revision": 7})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v, _) = register(json!({"name": "hot", "revision": 2, "path": "/tmp"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "revision", "{v}");
}

/// A request in flight when its adapter's name is registered again finishes on the revision it
/// started with (default model: a 48-token answer outlasts a registration many times over).
#[tokio::test]
async fn a_request_in_flight_keeps_its_revision_through_a_swap() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    let fixtures = fixtures().join("smollm2/adapters");
    replace_adapter(&fixtures.join("lora-r4-qv"), &root.join("hot"));
    let st = serve_dir(dir.path(), false, &[]).await;
    let app = router(st.clone());
    let ask = |n: u32| {
        let app = app.clone();
        async move {
            let mut body = chat_body(Some("hot"), "Name three colours.", n);
            body["ignore_eos"] = json!(true);
            let (s, v, _) = call(&app, "POST", "/v1/chat/completions", Some(body), None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            answer(&v)
        }
    };
    let (short_before, long_before) = (ask(8).await, ask(48).await);
    let running = tokio::spawn(ask(48));
    wait_until(|| st.engine.running() > 0).await;
    replace_adapter(&fixtures.join("dora-r4-ko"), &root.join("hot"));
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "hot"})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(
        st.engine.running() > 0,
        "the swap came after the long request ended"
    );
    assert_ne!(
        ask(8).await,
        short_before,
        "new requests get the new revision"
    );
    assert_eq!(
        running.await.unwrap(),
        long_before,
        "the request in flight kept its revision"
    );
}

/// A registration snapshots the adapter's whole directory: an AdapterFusion keeps its fused
/// adapters one level down, and registered again by name it answers as it did from the
/// directory (revision 0), also as `name@1`.
#[tokio::test]
async fn a_registered_fusion_keeps_its_fused_adapters() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(
        &smollm2_adapter("fuse-bn-ab"),
        &dir.path().join("adapters/fused"),
    );
    let st = serve_dir(dir.path(), false, &[]).await;
    let app = router(st.clone());
    let (s, v) = ask(&app, Some("fused"), 8).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let from_dir = answer(&v);
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "fused"})),
        None,
    )
    .await;
    assert_eq!(
        (s, v["version"].as_u64()),
        (StatusCode::CREATED, Some(1)),
        "{v}"
    );
    for model in ["fused", "fused@1"] {
        let (s, v) = ask(&app, Some(model), 8).await;
        assert_eq!(s, StatusCode::OK, "{model}: {v}");
        assert_eq!(answer(&v), from_dir, "{model}");
    }
}
