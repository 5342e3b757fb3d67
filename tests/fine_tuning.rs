//! Fine-tuning jobs through the OpenAI API on the tiny model (served in f32): upload, job,
//! events, epoch checkpoints with the validation loss, the served `ft:` adapter equal to the
//! exported one, cancel, bad input; and a job on the default model as served (Q4_1 weights).

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use common::http::send;
use common::*;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};

async fn state(state_dir: &std::path::Path) -> Arc<AppState> {
    let tiny = tiny_dir();
    common::http::state(&[
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        state_dir.join("adapters").to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ])
    .await
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    common::http::request(app, method, uri, body, None).await
}

/// `model` on `prompt` (greedy, `max_tokens`) through the server, and the PEFT adapter the job
/// exported into `job_dir` applied by the library to the same base: the same text, and at every
/// generated position the served log-probability equals the library forward's log-softmax
/// within `tol`. The served text.
async fn served_as_exported(
    app: &axum::Router,
    st: &AppState,
    job_dir: &std::path::Path,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    tol: f64,
) -> String {
    let (status, out, text) = call(
        app,
        "POST",
        "/v1/completions",
        Some(json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let served = out["choices"][0]["text"].as_str().unwrap().to_string();
    let loaded = st.engine.model();
    let peft = loraplex::adapters::PeftAdapter::load(&job_dir.join("adapter")).unwrap();
    let w = loraplex::adapters::bind(&peft, &loaded.model, &Default::default()).unwrap();
    let ids = loaded.tokenizer.encode(prompt).unwrap();
    let cfg = loraplex::engine::GenerationConfig {
        max_tokens,
        sampling: loraplex::engine::SamplingParams::greedy(),
        eos_token_ids: loaded.stop_token_ids(&st.template),
        ..Default::default()
    };
    let direct = loraplex::engine::generate(
        &loaded.model,
        &loaded.tokenizer,
        &ids,
        Some(&w),
        &cfg,
        |_| {},
    )
    .unwrap();
    assert_eq!(served, direct.text, "served vs library");
    let served_lp: Vec<f64> = out["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let all: Vec<u32> = ids.iter().chain(&direct.token_ids).copied().collect();
    let mut cache = loaded.model.new_cache();
    let mut batch = loraplex::model::BatchInput {
        seqs: vec![loraplex::model::llama::SeqInput::new(&all, &mut cache).with_adapter(Some(&w))],
        logits: loraplex::model::LogitsRows::All,
    };
    let logits = loaded.model.forward(&mut batch).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(served_lp.len(), direct.token_ids.len());
    for (k, (&tok, &lp)) in direct.token_ids.iter().zip(&served_lp).enumerate() {
        let want = logp[ids.len() - 1 + k][tok as usize] as f64;
        assert!(
            (lp - want).abs() < tol,
            "position {k}: served {lp} vs library {want}"
        );
    }
    served
}

async fn upload(app: &axum::Router, content: &str) -> String {
    let b = "xBOUNDARYx";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    let req = Request::builder()
        .method("POST")
        .uri("/v1/files")
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(Body::from(body))
        .unwrap();
    let (status, v, text) = send(app, req).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    v["id"].as_str().unwrap().to_string()
}

/// Upload → job (with a validation file) → events → checkpoints → the `ft:` adapter served at
/// once, its answers equal to the exported PEFT adapter's applied by the library; the last
/// three epochs' checkpoints served too; cancel of a finished job is a 409; bad requests are
/// named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_registers_and_serves_its_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("adapters")).unwrap();
    let st = state(tmp.path()).await;
    let base = st.engine.model().id.clone();
    let app = router(st.clone());
    let lines: Vec<String> = (0..24)
        .map(|i| {
            json!({"prompt": format!("question {i}: "), "completion": "the red one"}).to_string()
        })
        .collect();
    let file = upload(&app, &lines.join("\n")).await;
    let held_out: Vec<String> = (100..108)
        .map(|i| {
            json!({"prompt": format!("question {i}: "), "completion": "the red one"}).to_string()
        })
        .collect();
    let validation = upload(&app, &held_out.join("\n")).await;
    // Bad requests first: each names its field; an unknown file is a 404.
    let bad = |patch: Value| {
        let mut body = json!({"training_file": file, "model": base});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (patch, param) in [
        (json!({"model": "other-model"}), "model"),
        (
            json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}),
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}}),
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        (json!({"suffix": "no spaces please"}), "suffix"),
        (json!({"adapter": {"method": "oft"}}), "adapter.method"),
        (json!({"validation_file": 7}), "validation_file"),
    ] {
        let (status, v, text) = call(&app, "POST", "/v1/fine_tuning/jobs", Some(bad(patch))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"], param, "{text}");
    }
    let (status, _, text) = call(
        &app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"training_file": "file-0123456789abcdef01234567", "model": base})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    let (status, _, text) = call(
        &app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"training_file": file, "model": base,
                    "validation_file": "file-0123456789abcdef01234567"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    // A file whose lines are well formed but hold nothing to learn within 512 tokens: the job
    // fails while validating its files, the error naming the file.
    let long = json!({"prompt": "word ".repeat(700), "completion": "x"}).to_string();
    let useless = upload(&app, &long).await;
    let (_, job, _) = call(
        &app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"training_file": useless, "model": base})),
    )
    .await;
    let bad_id = job["id"].as_str().unwrap().to_string();
    let failed = wait_for(&app, &bad_id, |b| b["job"]["status"] != "validating_files").await;
    assert_eq!(failed["job"]["status"], "failed", "{failed}");
    assert_eq!(failed["job"]["error"]["code"], "invalid_training_file");
    assert_eq!(failed["job"]["error"]["param"], "training_file");
    assert!(
        failed["job"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&useless),
        "{failed}"
    );
    // The job.
    let (status, job, text) = call(
        &app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"training_file": file, "validation_file": validation, "model": base,
                    "suffix": "red", "seed": 3,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 50}}},
                    "adapter": {"method": "lora", "rank": 8}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    let id = job["id"].as_str().unwrap().to_string();
    let mut done = Value::Null;
    for _ in 0..600 {
        let (_, j, _) = call(&app, "GET", &format!("/v1/fine_tuning/jobs/{id}"), None).await;
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            done = j;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["validation_file"], validation.as_str());
    let ft = done["fine_tuned_model"].as_str().unwrap().to_string();
    let base_name = base.rsplit('/').next().unwrap();
    assert_eq!(ft, format!("ft:{base_name}:red:{}", &id[id.len() - 8..]));
    assert!(done["trained_tokens"].as_u64().unwrap() > 0);
    // Events: one per step, newest first, with the loss falling.
    let (_, ev, _) = call(
        &app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"),
        None,
    )
    .await;
    let all = ev["data"].as_array().unwrap().clone();
    // A validation-loss event at each epoch's end, a training-loss event per step.
    let (ev, valid): (Vec<Value>, Vec<Value>) = all
        .iter()
        .cloned()
        .partition(|e| e["data"]["train_loss"].is_number());
    assert_eq!(ev.len(), 24); // 4 epochs × 6 batches
    assert_eq!(valid.len(), 4, "{valid:?}");
    assert!(valid
        .iter()
        .all(|e| e["data"]["full_valid_loss"].is_number()));
    // Pages of events, as the client's `list_events(limit, after)` reads them.
    let (_, page, _) = call(
        &app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=5"),
        None,
    )
    .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 5);
    assert_eq!(page["has_more"], true);
    let after = page["data"][4]["id"].as_str().unwrap().to_string();
    let (_, next, _) = call(
        &app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=5&after={after}"),
        None,
    )
    .await;
    assert_eq!(next["data"][0]["id"], all[5]["id"]);
    let (last, first) = (
        &ev[0]["data"]["train_loss"],
        &ev[ev.len() - 1]["data"]["train_loss"],
    );
    assert!(
        last.as_f64().unwrap() < 0.5 * first.as_f64().unwrap(),
        "{first} -> {last}"
    );
    let (_, listed, _) = call(&app, "GET", "/v1/fine_tuning/jobs?limit=5", None).await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
    // Checkpoints: one per epoch, newest first, with both losses; the held-out loss falls; the
    // last three are served under `ft:…:ckpt-step-N`, the first is not.
    let (status, ck, text) = call(
        &app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let ck = ck["data"].as_array().unwrap().clone();
    let steps: Vec<u64> = ck
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [24, 18, 12, 6]);
    assert!(ck
        .iter()
        .all(|c| c["object"] == "fine_tuning.job.checkpoint"
            && c["fine_tuning_job_id"] == id.as_str()
            && c["metrics"]["train_loss"].is_number()));
    let held = |c: &Value| c["metrics"]["full_valid_loss"].as_f64().unwrap();
    assert!(
        held(&ck[0]) < held(&ck[3]),
        "{} -> {}",
        held(&ck[3]),
        held(&ck[0])
    );
    assert!(ck[3]["fine_tuned_model_checkpoint"].is_null());
    for c in &ck[..3] {
        let name = c["fine_tuned_model_checkpoint"].as_str().unwrap();
        assert_eq!(name, format!("{ft}:ckpt-step-{}", c["step_number"]));
        let (status, _, text) = call(
            &app,
            "POST",
            "/v1/completions",
            Some(json!({"model": name, "prompt": "question 1: ", "max_tokens": 2})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {text}");
    }
    // Served at once, answering as the exported adapter does through the library.
    let served = served_as_exported(
        &app,
        &st,
        &tmp.path().join("jobs").join(&id),
        &ft,
        "question 99: ",
        6,
        1e-4,
    )
    .await;
    assert!(served.contains("red"), "{served:?}");
    // Cancel of a finished job: 409.
    let (status, _, text) = call(
        &app,
        "POST",
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
}

async fn wait_for(app: &axum::Router, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1200 {
        let (_, j, _) = call(app, "GET", &format!("/v1/fine_tuning/jobs/{id}"), None).await;
        let (_, ev, _) = call(
            app,
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"),
            None,
        )
        .await;
        let both = json!({"job": j, "events": ev["data"]});
        if done(&both) {
            return both;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("job {id} did not get there");
}

/// A running job cancelled stops after its step (status `cancelled`, fewer events than steps);
/// a job a process left running (`running` on disk, a checkpoint) is queued again when a server
/// starts on the same state and resumes from its checkpoint, then succeeds and is served.
/// (The process here is left as a kill leaves it: a checkpoint some steps back, events logged
/// past it; the steps after the checkpoint run again and their events are logged once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancels_and_an_interrupted_one_resumes_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("adapters")).unwrap();
    let st = state(tmp.path()).await;
    let base = st.engine.model().id.clone();
    let app = router(st);
    let lines: Vec<String> = (0..24)
        .map(|i| json!({"prompt": format!("q{i}: "), "completion": "the red one"}).to_string())
        .collect();
    let file = upload(&app, &lines.join("\n")).await;
    let long = json!({"training_file": file, "model": base,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 1}}}});
    // Cancel while running.
    let (_, job, _) = call(&app, "POST", "/v1/fine_tuning/jobs", Some(long.clone())).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&app, &id, |b| {
        b["events"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    let (status, _, text) = call(
        &app,
        "POST",
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let end = wait_for(&app, &id, |b| {
        b["job"]["status"] != "running" && b["job"]["status"] != "queued"
    })
    .await;
    assert_eq!(end["job"]["status"], "cancelled", "{end}");
    let steps = end["events"].as_array().unwrap().len();
    assert!(steps < 960, "{steps} events");
    assert!(end["job"]["fine_tuned_model"].is_null());
    // A cancelled job keeps no optimizer state. The worker records how the job ended first
    // (so a crash in between resumes nothing that ended) and then removes it: allow it a moment.
    let checkpoint = tmp.path().join("jobs").join(&id).join("adapter/checkpoint");
    for _ in 0..100 {
        if !checkpoint.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !checkpoint.exists(),
        "a cancelled job's resume checkpoint was left on disk 5 s after it ended"
    );
    // An interrupted job: train past a checkpoint, then leave it as a killed process would
    // (its resume checkpoint as it was at some instant, its events running on past it).
    let (_, job, _) = call(&app, "POST", "/v1/fine_tuning/jobs", Some(long)).await;
    let id = job["id"].as_str().unwrap().to_string();
    let dir = tmp.path().join("jobs").join(&id);
    wait_for(&app, &id, |b| {
        b["events"].as_array().is_some_and(|e| e.len() >= 12)
    })
    .await;
    let aside = tmp.path().join("checkpoint-aside");
    let copied = (0..200).any(|_| {
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::create_dir_all(&aside).unwrap();
        let ok = ["adapter.safetensors", "optimizer.safetensors", "state.json"]
            .iter()
            .all(|f| std::fs::copy(dir.join("adapter/checkpoint").join(f), aside.join(f)).is_ok());
        // A copy taken across a checkpoint swap mixes two steps: only one whose files
        // read back whole counts.
        ok && candle_core::safetensors::load(
            aside.join("optimizer.safetensors"),
            &candle_core::Device::Cpu,
        )
        .is_ok()
            && candle_core::safetensors::load(
                aside.join("adapter.safetensors"),
                &candle_core::Device::Cpu,
            )
            .is_ok()
    });
    assert!(copied, "no resume checkpoint to copy");
    wait_for(&app, &id, |b| {
        b["events"].as_array().is_some_and(|e| e.len() >= 25)
    })
    .await;
    call(
        &app,
        "POST",
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        None,
    )
    .await;
    wait_for(&app, &id, |b| b["job"]["status"] == "cancelled").await;
    let _ = std::fs::remove_dir_all(dir.join("adapter/checkpoint"));
    std::fs::rename(&aside, dir.join("adapter/checkpoint")).unwrap();
    let checkpoint: Value = read_json(dir.join("adapter/checkpoint/state.json"));
    let saved = checkpoint["step"].as_u64().unwrap();
    assert!(saved >= 10, "{checkpoint}");
    let mut record: Value = read_json(dir.join("job.json"));
    record["status"] = json!("running");
    record["finished_at"] = Value::Null;
    std::fs::write(dir.join("job.json"), record.to_string()).unwrap();
    // A new server on the same state: the job resumes from its checkpoint and succeeds.
    let st2 = state(tmp.path()).await;
    let app2 = router(st2);
    let end = wait_for(&app2, &id, |b| {
        b["job"]["status"] == "succeeded" || b["job"]["status"] == "failed"
    })
    .await;
    assert_eq!(end["job"]["status"], "succeeded", "{end}");
    let events = end["events"].as_array().unwrap();
    let count = |step: u64| events.iter().filter(|e| e["data"]["step"] == step).count();
    assert_eq!(events[0]["data"]["step"], 960);
    // The second process went on from the step after the checkpoint (the events past it that
    // the first process logged are dropped): every step appears exactly once, none ran from
    // scratch again.
    assert_eq!(events.len(), 960);
    assert!((1..=960).all(|step| count(step) == 1), "checkpoint {saved}");
    let ft = end["job"]["fine_tuned_model"].as_str().unwrap();
    let (status, _, text) = call(
        &app2,
        "POST",
        "/v1/completions",
        Some(json!({"model": ft, "prompt": "q1: ", "max_tokens": 3, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // A third server on the same state serves the adapter the finished job registered.
    let app3 = router(state(tmp.path()).await);
    let (status, _, text) = call(
        &app3,
        "POST",
        "/v1/completions",
        Some(json!({"model": ft, "prompt": "q1: ", "max_tokens": 3, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

/// An upload over `--max-body-bytes` is refused with 413 before anything is kept.
#[tokio::test]
async fn an_upload_over_the_body_limit_is_413_and_kept_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("adapters")).unwrap();
    let tiny = tiny_dir();
    let cli = loraplex::cli::Cli::try_parse_from([
        "serve",
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        tmp.path().join("adapters").to_str().unwrap(),
        "--state-dir",
        tmp.path().to_str().unwrap(),
        "--max-body-bytes",
        "2048",
    ])
    .unwrap();
    let app = router(loraplex::cli::build_state(&cli.serve).await.unwrap());
    let line = json!({"prompt": "p", "completion": "c"}).to_string() + "\n";
    let b = "xBOUNDARYx";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n\r\n{}\r\n--{b}--\r\n",
        line.repeat(200)
    );
    let req = Request::builder()
        .method("POST")
        .uri("/v1/files")
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(Body::from(body))
        .unwrap();
    let (status, _, text) = send(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    let (_, listed, _) = call(&app, "GET", "/v1/files", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0);
}

/// A job on the default model as `serve` loads it (the GGUF's Q4_1 and Q8_0 served as stored,
/// no f32 copy): it trains through the quantized weights' input gradient, the loss falls, and
/// the `ft:` adapter it registers answers exactly as the exported PEFT adapter applied by the
/// library to the same served model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_on_the_served_quantized_default_model() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("adapters")).unwrap();
    let cli = loraplex::cli::Cli::try_parse_from([
        "serve",
        "--adapters",
        tmp.path().join("adapters").to_str().unwrap(),
        "--state-dir",
        tmp.path().to_str().unwrap(),
        "--kv-cache-tokens",
        "2048",
        // f32 KV, as the library forward keeps it (int8 KV would move the logprobs).
        "--kv-cache-dtype",
        "f32",
    ])
    .unwrap();
    let st = loraplex::cli::build_state(&cli.serve).await.unwrap();
    let quantized = st
        .engine
        .model()
        .model
        .linear(0, loraplex::model::Proj::Q)
        .is_some_and(|l| matches!(l.base(), loraplex::model::BaseWeight::Quant(_)));
    assert!(quantized, "the default model is served as stored");
    let base = st.engine.model().id.clone();
    let app = router(st.clone());
    let lines: Vec<String> = (0..8)
        .map(|i| json!({"prompt": format!("Code {i}?"), "completion": " zebra"}).to_string())
        .collect();
    let file = upload(&app, &lines.join("\n")).await;
    let (status, job, text) = call(
        &app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"training_file": file, "model": base, "suffix": "zebra", "seed": 1,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10}}}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let id = job["id"].as_str().unwrap().to_string();
    let end = wait_for(&app, &id, |b| {
        matches!(
            b["job"]["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    })
    .await;
    assert_eq!(end["job"]["status"], "succeeded", "{end}");
    let events = end["events"].as_array().unwrap();
    let loss = |e: &Value| e["data"]["train_loss"].as_f64().unwrap();
    let (last, first) = (loss(&events[0]), loss(&events[events.len() - 1]));
    assert_eq!(events.len(), 6);
    assert!(last < 0.5 * first, "{first} -> {last}");
    let ft = end["job"]["fine_tuned_model"].as_str().unwrap().to_string();
    let served = served_as_exported(
        &app,
        &st,
        &tmp.path().join("jobs").join(&id),
        &ft,
        "Code 42?",
        4,
        // The library reads its contiguous cache in blocks of 64 rows, the server its pool in
        // blocks of 16: the same sums in another order (1.2e-4 seen).
        1e-3,
    )
    .await;
    assert!(served.contains("zebra"), "{served:?}");
}
