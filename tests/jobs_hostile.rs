//! A hostile tenant against the files and fine-tuning plane of one `serve` process (two tenants):
//! the attacks that took the server down or kept it busy, each with what must hold now.
//! Memory and CPU are the process's own (`/proc`), so each test runs the binary.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::process::{cpu_share, json, start, status_kb, upload};
use common::*;
use serde_json::{json as j, Value};

const KEYS: &str = r#"
[keys."sk-heavy"]
tenant = "heavy"
max_jobs = 2

[keys."sk-light"]
tenant = "light"

[keys."sk-capped"]
tenant = "capped"
max_jobs = 2
max_file_bytes = 10000
max_files = 3
max_job_bytes = 1000
"#;

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve` with the two tenants' keys and its state in `dir`, plus `extra` flags.
fn serve(dir: &Path, model: Option<&Path>, extra: &[&str]) -> Server {
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, KEYS).unwrap();
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    let mut args: Vec<String> = vec![
        "--api-keys".into(),
        keys.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--adapters".into(),
        dir.join("adapters").display().to_string(),
    ];
    if let Some(m) = model {
        args.extend(["--model".into(), m.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, port) = start(&refs);
    Server { child, port }
}

fn base_model(port: u16) -> String {
    let (_, v, _) = json(port, "GET", "/v1/models", Some("sk-light"), None);
    v["data"][0]["id"].as_str().unwrap().to_string()
}

fn job_request(file: &str, model: &str, batch: usize, epochs: usize) -> Value {
    j!({"training_file": file, "model": model,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": batch}}}})
}

/// `POST /v1/fine_tuning/jobs` as `key`.
fn create_job(port: u16, key: &str, body: &Value) -> (u16, Value, String) {
    json(port, "POST", "/v1/fine_tuning/jobs", Some(key), Some(body))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel` as `key`: the status and the text.
fn cancel(port: u16, key: &str, id: &str) -> (u16, String) {
    let (status, _, text) = json(
        port,
        "POST",
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        Some(key),
        None,
    );
    (status, text)
}

fn wait_status(
    port: u16,
    key: &str,
    id: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (_, job, _) = json(
            port,
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}"),
            Some(key),
            None,
        );
        if done(job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(start.elapsed() < limit, "job {id} is still {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A chat from the light tenant: served (200) while the heavy one attacks.
fn light_chat(port: u16) {
    let (status, _, text) = json(
        port,
        "POST",
        "/v1/chat/completions",
        Some("sk-light"),
        Some(
            &j!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
        ),
    );
    assert_eq!(status, 200, "the light tenant was not served: {text}");
}

/// 64 examples of about 500 tokens (a user turn and an answer of plain words).
fn long_examples() -> String {
    let words = [
        "river", "stone", "bright", "quiet", "seven", "green", "over", "the", "fox", "bend",
    ];
    (0..64)
        .map(|i| {
            let text = |n: usize, k: usize| {
                (0..n)
                    .map(|w| words[(w * 7 + k * 13 + i) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            j!({"messages": [{"role": "user", "content": text(300, 1)}, {"role": "assistant", "content": text(180, 2)}]})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The attack that took the server to 21.7 GB and the OOM killer: `batch_size: 64` over 64
/// examples of ~500 tokens on the default model. The job now trains in micro-batches within
/// `--train-max-batch-tokens` with activation checkpointing: the process stays within 1.5 GB
/// above serving, the other tenant is served throughout, and a cancel stops the work within
/// seconds.
#[cfg(target_os = "linux")]
#[test]
fn a_batch_64_job_on_long_examples_stays_in_bounds_and_others_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), None, &[]);
    let pid = s.child.id();
    light_chat(s.port);
    let serving_kb = status_kb(pid, "VmRSS");
    let (status, file, text) = upload(s.port, Some("sk-heavy"), long_examples().as_bytes());
    assert_eq!(status, 200, "{text}");
    let model = base_model(s.port);
    let (status, job, text) = create_job(
        s.port,
        "sk-heavy",
        &job_request(file["id"].as_str().unwrap(), &model, 64, 1),
    );
    assert_eq!(status, 200, "{text}");
    let id = job["id"].as_str().unwrap().to_string();
    wait_status(s.port, "sk-heavy", &id, Duration::from_secs(120), |st| {
        st == "running"
    });
    // Two micro-batches' worth of training: the light tenant is served all along.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(75) {
        light_chat(s.port);
        std::thread::sleep(Duration::from_secs(3));
    }
    let peak_kb = status_kb(pid, "VmHWM");
    let above = peak_kb.saturating_sub(serving_kb);
    eprintln!("serving {serving_kb} kB; peak with the batch-64 job {peak_kb} kB (+{above} kB)");
    assert!(
        above < 1_536_000,
        "the job took the server {above} kB above serving"
    );
    let (status, text) = cancel(s.port, "sk-heavy", &id);
    assert_eq!(status, 200, "{text}");
    let cancelled = Instant::now();
    wait_status(s.port, "sk-heavy", &id, Duration::from_secs(30), |st| {
        st == "cancelled"
    });
    let stop = cancelled.elapsed();
    std::thread::sleep(Duration::from_secs(2).saturating_sub(stop));
    let busy = cpu_share(pid, Duration::from_secs(1));
    eprintln!("cancelled after {stop:?}; CPU 2 s after the cancel: {busy:.2} of a core");
    assert!(
        busy < 0.15,
        "the server still burns {busy:.2} of a core after the cancel"
    );
    light_chat(s.port);
}

/// Six rounds of "upload a file of huge conversations, create a job, cancel it": a line past
/// `--train-max-messages` is refused at upload, naming the limit; validation of what is allowed
/// stops at the cancel, so the server is idle two seconds later, and the cancelled jobs' slots
/// are free again once their work has stopped.
#[cfg(target_os = "linux")]
#[test]
fn create_and_cancel_loops_leave_no_work_running() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &["--max-body-bytes", "16777216"]);
    let pid = s.child.id();
    let model = base_model(s.port);
    let empty = j!({"role": "user", "content": ""});
    let huge = j!({"messages": std::iter::repeat_n(empty.clone(), 20_000)
        .chain([j!({"role": "assistant", "content": "ok"})])
        .collect::<Vec<_>>()});
    let allowed_line = j!({"messages": std::iter::repeat_n(empty, 250)
        .chain([j!({"role": "assistant", "content": "ok"})])
        .collect::<Vec<_>>()})
    .to_string();
    let allowed = vec![allowed_line; 1200].join("\n");
    let mut ids = Vec::new();
    for _ in 0..6 {
        let (status, _, text) = upload(s.port, Some("sk-heavy"), huge.to_string().as_bytes());
        assert_eq!(
            status, 400,
            "a line of 20,000 messages was accepted: {text}"
        );
        assert!(
            text.contains("train-max-messages") && text.contains("\"param\":\"file\""),
            "{text}"
        );
        let (status, file, text) = upload(s.port, Some("sk-heavy"), allowed.as_bytes());
        assert_eq!(status, 200, "{text}");
        let (status, job, text) = create_job(
            s.port,
            "sk-heavy",
            &job_request(file["id"].as_str().unwrap(), &model, 4, 1),
        );
        // Two slots: a third job waits for a cancelled one's work to stop.
        if status != 200 {
            assert_eq!(status, 403, "{text}");
            assert!(text.contains("max_jobs"), "{text}");
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let id = job["id"].as_str().unwrap().to_string();
        let (status, text) = cancel(s.port, "sk-heavy", &id);
        assert_eq!(status, 200, "{text}");
        ids.push(id);
    }
    assert!(ids.len() >= 3, "only {} jobs were created", ids.len());
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_share(pid, Duration::from_secs(1));
    eprintln!("CPU 2 s after the last cancel: {busy:.2} of a core");
    assert!(busy < 0.15, "cancelled jobs still burn {busy:.2} of a core");
    for id in &ids {
        let job = wait_status(s.port, "sk-heavy", id, Duration::from_secs(5), |st| {
            !st.is_empty()
        });
        assert_eq!(job["status"], "cancelled", "{job}");
    }
    // Both slots are free again.
    let (_, file, _) = upload(
        s.port,
        Some("sk-heavy"),
        b"{\"prompt\": \"a\", \"completion\": \"b\"}",
    );
    for _ in 0..2 {
        let (status, _, text) = create_job(
            s.port,
            "sk-heavy",
            &job_request(file["id"].as_str().unwrap(), &model, 1, 1),
        );
        assert_eq!(status, 200, "{text}");
    }
    light_chat(s.port);
}

/// A job whose file has nothing usable fails with an error that names the file by id and the
/// problem, never the server's state directory; nor does any other job error or event.
#[test]
fn job_errors_name_no_server_path() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &[]);
    let model = base_model(s.port);
    // Every answer starts past the 512 tokens a job example keeps: nothing to learn.
    let long_prompt = "word ".repeat(2000);
    let lines = (0..3)
        .map(|_| j!({"prompt": long_prompt, "completion": "x"}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let (_, file, _) = upload(s.port, Some("sk-heavy"), lines.as_bytes());
    let (status, job, text) = create_job(
        s.port,
        "sk-heavy",
        &job_request(file["id"].as_str().unwrap(), &model, 1, 1),
    );
    assert_eq!(status, 200, "{text}");
    let id = job["id"].as_str().unwrap();
    let job = wait_status(s.port, "sk-heavy", id, Duration::from_secs(60), |st| {
        st == "failed"
    });
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("no usable example"), "{job}");
    let state = tmp.path().join("state");
    for text in [
        job.to_string(),
        json(
            s.port,
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/events"),
            Some("sk-heavy"),
            None,
        )
        .2,
    ] {
        assert!(
            !text.contains(&state.display().to_string())
                && !text.contains("/files/")
                && !text.contains(".jsonl"),
            "a server path reached the tenant: {text}"
        );
    }
}

/// Stop strings are matched every step on the engine thread: each is capped in bytes, and a
/// larger one is a 400 naming the field; a request without `max_tokens` on a server whose KV
/// budget is below the context gets the budget's room, never a 400 about `max_tokens`.
#[test]
fn stop_strings_are_capped_and_a_default_max_tokens_fits_the_kv_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &["--kv-cache-tokens", "64"]);
    let chat = |extra: Value| {
        let mut body = j!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        json(
            s.port,
            "POST",
            "/v1/chat/completions",
            Some("sk-light"),
            Some(&body),
        )
    };
    let big = "x".repeat(64 * 1024);
    let (status, _, text) = chat(j!({"stop": ["END", big], "max_tokens": 4}));
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("\"param\":\"stop[1]\"") && text.contains("max-stop-bytes"),
        "{text}"
    );
    let (status, _, text) = chat(j!({"stop": "y".repeat(300), "max_tokens": 4}));
    assert_eq!(status, 400, "{text}");
    let (status, _, text) = chat(j!({"stop": ["END", "z".repeat(256)], "max_tokens": 4}));
    assert_eq!(status, 200, "{text}");
    let (status, v, text) = chat(j!({}));
    assert_eq!(status, 200, "a request without max_tokens: {text}");
    let used = v["usage"]["prompt_tokens"].as_u64().unwrap()
        + v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used <= 64, "{v}");
}

/// Concurrent requests cannot overshoot a quota: eight job creations at once against
/// `max_jobs = 2` get exactly two slots; eight 3,000-byte uploads at once against
/// `max_file_bytes = 10000` keep at most 10,000 bytes.
#[test]
fn concurrent_requests_cannot_overshoot_max_jobs_or_max_file_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &[]);
    let port = s.port;
    let model = base_model(port);
    let line = j!({"prompt": "p", "completion": "c".repeat(2950)}).to_string();
    let uploads: Vec<_> = (0..8)
        .map(|_| {
            let line = line.clone();
            std::thread::spawn(move || upload(port, Some("sk-capped"), line.as_bytes()).0)
        })
        .collect();
    let accepted = uploads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&s| s == 200)
        .count();
    let (_, files, _) = json(port, "GET", "/v1/files", Some("sk-capped"), None);
    let kept: u64 = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(files["data"].as_array().unwrap().len(), accepted);
    assert!(kept <= 10_000, "{accepted} uploads kept {kept} bytes");
    // However small, at most `max_files` of them: each costs an index entry and two inodes.
    let tiny: &[u8] = b"{\"prompt\": \"a\", \"completion\": \"b\"}";
    let statuses: Vec<u16> = (0..4)
        .map(|_| upload(port, Some("sk-capped"), tiny).0)
        .collect();
    let (_, files, _) = json(port, "GET", "/v1/files", Some("sk-capped"), None);
    assert_eq!(files["data"].as_array().unwrap().len(), 3, "{statuses:?}");
    let (status, _, text) = upload(port, Some("sk-capped"), tiny);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("max_files"), "{text}");
    // The heavy tenant's jobs (its adapters and job bytes have room).
    let (_, file, _) = upload(
        port,
        Some("sk-heavy"),
        b"{\"prompt\": \"a\", \"completion\": \"b\"}",
    );
    let body = job_request(file["id"].as_str().unwrap(), &model, 1, 50);
    let creates: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                json(
                    port,
                    "POST",
                    "/v1/fine_tuning/jobs",
                    Some("sk-heavy"),
                    Some(&body),
                )
                .0
            })
        })
        .collect();
    let statuses: Vec<u16> = creates.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 403),
        "{statuses:?}"
    );
}

/// Each job bound is a setting, and passing it is named: `n_epochs ×` examples past
/// `--train-max-job-examples` is a 400 at creation; tokens past `--train-max-job-tokens` fail the
/// job at validation; a job past `--train-max-job-seconds` fails when the time is up; job
/// outputs past the key's `max_job_bytes` are refused up front.
#[test]
fn job_bounds_are_settings_and_passing_one_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(
        tmp.path(),
        Some(&tiny),
        &[
            "--train-max-job-examples",
            "1000",
            "--train-max-job-tokens",
            "20000",
            "--train-max-job-seconds",
            "1",
        ],
    );
    let model = base_model(s.port);
    let lines: Vec<String> = (0..24)
        .map(|i| j!({"prompt": format!("q{i}: "), "completion": "the red one"}).to_string())
        .collect();
    let (_, file, _) = upload(s.port, Some("sk-heavy"), lines.join("\n").as_bytes());
    let file = file["id"].as_str().unwrap().to_string();
    let create = |file: &str, epochs: usize| {
        json(
            s.port,
            "POST",
            "/v1/fine_tuning/jobs",
            Some("sk-heavy"),
            Some(&job_request(file, &model, 1, epochs)),
        )
    };
    let (status, _, text) = create(&file, 50);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("method.supervised.hyperparameters.n_epochs")
            && text.contains("train-max-job-examples"),
        "{text}"
    );
    // 20 examples of a few hundred tokens, 20 epochs: over 20,000 tokens.
    let long: Vec<String> = (0..20)
        .map(|i| {
            j!({"prompt": format!("q{i}: {}", "word ".repeat(60)), "completion": "the red one"})
                .to_string()
        })
        .collect();
    let (_, long_file, _) = upload(s.port, Some("sk-heavy"), long.join("\n").as_bytes());
    let (status, job, text) = create(long_file["id"].as_str().unwrap(), 20);
    assert_eq!(status, 200, "{text}");
    let job = wait_status(
        s.port,
        "sk-heavy",
        job["id"].as_str().unwrap(),
        Duration::from_secs(30),
        |st| st == "failed",
    );
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("train-max-job-tokens"),
        "{job}"
    );
    // Within both, past the second: 960 steps of batch 1 train longer than one second.
    let (status, job, text) = create(&file, 40);
    assert_eq!(status, 200, "{text}");
    let job = wait_status(
        s.port,
        "sk-heavy",
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
        |st| matches!(st, "failed" | "succeeded"),
    );
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "training_time_limit", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("train-max-job-seconds"),
        "{job}"
    );
    // A key whose job bytes cannot hold a job's outputs.
    let (_, small, _) = upload(s.port, Some("sk-capped"), lines[..2].join("\n").as_bytes());
    let (status, _, text) = create_job(
        s.port,
        "sk-capped",
        &job_request(small["id"].as_str().unwrap(), &model, 1, 1),
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("max_job_bytes"), "{text}");
}

fn step_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Disk is bounded: a finished job keeps its model and the three served epoch checkpoints, no
/// optimizer state; `DELETE /v1/models/{ft:…}` (the owner only) removes its files and names for
/// good, a restart included; a checkpoint's name is not deletable on its own.
#[test]
fn a_finished_job_keeps_what_is_served_and_a_deleted_model_stays_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let mut s = serve(tmp.path(), Some(&tiny), &[]);
    let model = base_model(s.port);
    let lines: Vec<String> = (0..4)
        .map(|i| j!({"prompt": format!("q{i}: "), "completion": "the red one"}).to_string())
        .collect();
    let (_, file, _) = upload(s.port, Some("sk-heavy"), lines.join("\n").as_bytes());
    let (_, job, _) = create_job(
        s.port,
        "sk-heavy",
        &job_request(file["id"].as_str().unwrap(), &model, 2, 5),
    );
    let id = job["id"].as_str().unwrap().to_string();
    let job = wait_status(s.port, "sk-heavy", &id, Duration::from_secs(120), |st| {
        matches!(st, "failed" | "succeeded")
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    let ft = job["fine_tuned_model"].as_str().unwrap().to_string();
    let dir = tmp.path().join("state/jobs").join(&id);
    assert_eq!(
        step_dirs(&dir.join("checkpoints")),
        ["checkpoints.jsonl", "step-10", "step-6", "step-8"]
    );
    // The record says how the job ended first, then its resume state goes (crash safety):
    // the status can be read in between, so the removal is waited for, briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dir.join("adapter/checkpoint").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !dir.join("adapter/checkpoint").exists(),
        "the optimizer state of a finished job was kept"
    );
    let (_, ckpts, _) = json(
        s.port,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
        Some("sk-heavy"),
        None,
    );
    assert_eq!(ckpts["data"].as_array().unwrap().len(), 5, "{ckpts}");
    let chat = |port: u16, name: &str| {
        json(
            port,
            "POST",
            "/v1/completions",
            Some("sk-heavy"),
            Some(&j!({"model": name, "prompt": "q1: ", "max_tokens": 2, "temperature": 0})),
        )
        .0
    };
    assert_eq!(chat(s.port, &ft), 200);
    let path = format!("/v1/models/{ft}");
    assert_eq!(json(s.port, "DELETE", &path, Some("sk-light"), None).0, 404);
    let (status, _, text) = json(
        s.port,
        "DELETE",
        &format!("{path}:ckpt-step-10"),
        Some("sk-heavy"),
        None,
    );
    assert_eq!(status, 400, "{text}");
    let (status, v, text) = json(s.port, "DELETE", &path, Some("sk-heavy"), None);
    assert_eq!(status, 200, "{text}");
    assert_eq!(v["deleted"], true);
    assert_eq!(chat(s.port, &ft), 404);
    assert_eq!(chat(s.port, &format!("{ft}:ckpt-step-10")), 404);
    assert!(!dir.join("adapter").exists() && !dir.join("checkpoints").exists());
    assert_eq!(json(s.port, "DELETE", &path, Some("sk-heavy"), None).0, 404);
    // A restart on the same state does not bring it back.
    drop(s);
    s = serve(tmp.path(), Some(&tiny), &[]);
    assert_eq!(chat(s.port, &ft), 404);
    let (_, models, _) = json(s.port, "GET", "/v1/models", Some("sk-heavy"), None);
    assert!(!models.to_string().contains(&ft), "{models}");
    let (_, job, _) = json(
        s.port,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}"),
        Some("sk-heavy"),
        None,
    );
    assert_eq!(job["status"], "succeeded");
}

/// A write that fails (here: where the epoch checkpoints go is a file) fails the job with an
/// error saying what could not be written, without a server path; it is not left `running`.
#[test]
fn a_failed_write_fails_the_job_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &["--max-training-jobs", "1"]);
    let model = base_model(s.port);
    let lines: Vec<String> = (0..24)
        .map(|i| j!({"prompt": format!("q{i}: "), "completion": "the red one"}).to_string())
        .collect();
    let (_, file, _) = upload(s.port, Some("sk-light"), lines.join("\n").as_bytes());
    let file = file["id"].as_str().unwrap();
    // The worker is busy with the light tenant's long job while the obstacle is put in place.
    let (_, busy, _) = json(
        s.port,
        "POST",
        "/v1/fine_tuning/jobs",
        Some("sk-light"),
        Some(&job_request(file, &model, 1, 40)),
    );
    let busy = busy["id"].as_str().unwrap().to_string();
    wait_status(s.port, "sk-light", &busy, Duration::from_secs(30), |st| {
        st == "running"
    });
    let (_, heavy_file, _) = upload(s.port, Some("sk-heavy"), lines[..4].join("\n").as_bytes());
    let (_, job, _) = create_job(
        s.port,
        "sk-heavy",
        &job_request(heavy_file["id"].as_str().unwrap(), &model, 2, 2),
    );
    let id = job["id"].as_str().unwrap().to_string();
    wait_status(s.port, "sk-heavy", &id, Duration::from_secs(30), |st| {
        st == "queued"
    });
    std::fs::write(
        tmp.path().join("state/jobs").join(&id).join("checkpoints"),
        "not a folder",
    )
    .unwrap();
    json(
        s.port,
        "POST",
        &format!("/v1/fine_tuning/jobs/{busy}/cancel"),
        Some("sk-light"),
        None,
    );
    let job = wait_status(s.port, "sk-heavy", &id, Duration::from_secs(60), |st| {
        matches!(st, "failed" | "succeeded")
    });
    assert_eq!(job["status"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert_eq!(job["error"]["code"], "training_failed");
    assert!(
        !message.contains(&tmp.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("checkpoints"), "{message}");
}

/// Parsing and decoding a huge `/detokenize` body is CPU work: it runs on the blocking pool,
/// within the caller's share of the preparation threads, so one tenant's flood of them leaves
/// the async threads and a preparation thread to the others.
#[test]
fn a_flood_of_huge_detokenize_bodies_leaves_room_for_the_other_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tiny_dir();
    let s = serve(tmp.path(), Some(&tiny), &["--max-body-bytes", "67108864"]);
    let port = s.port;
    let ids = vec!["17"; 3_000_000].join(",");
    let body = format!("{{\"tokens\": [{ids}]}}");
    let begun = Instant::now();
    let heavy: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let (status, _) = common::process::http(
                    port,
                    "POST",
                    "/detokenize",
                    Some("sk-heavy"),
                    Some(("application/json", body.as_bytes())),
                );
                (status, begun.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, text) = json(
        port,
        "POST",
        "/detokenize",
        Some("sk-light"),
        Some(&j!({"tokens": [17, 18]})),
    );
    let light = begun.elapsed();
    assert_eq!(status, 200, "{text}");
    let ends: Vec<Duration> = heavy
        .into_iter()
        .map(|t| {
            let (status, at) = t.join().unwrap();
            assert_eq!(status, 200);
            at
        })
        .collect();
    let first = ends.iter().min().unwrap();
    eprintln!("light answered at {light:?}; the heavy tenant's four at {ends:?}");
    // Its request came in after the flood's: it is answered before the first of those is done.
    assert!(
        light < *first,
        "the light tenant waited behind the flood ({light:?} vs {first:?})"
    );
}
