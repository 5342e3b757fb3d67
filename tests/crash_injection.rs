//! Crash injection: the `serve` binary with a state directory is driven by a seeded stream of
//! uploads, job creations (which train, with checkpoints, in the background), cancels and
//! deletions, and `kill -9`ed at a seeded random instant; 24 times over one state directory
//! (more, up to 60, until three resumes from a checkpoint have been checked).
//! After every restart: each upload that got a 200 is listed and its bytes are on disk as sent;
//! no file on disk that is not listed; every job in a valid state, a resumed one continuing
//! from its last complete checkpoint (never from step 0 when one existed); every epoch
//! checkpoint complete; a deleted model stays deleted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{start, try_http, upload_form};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const SEED: u64 = 0x5EED_CAFE;
/// Kills at least this many times...
const KILLS: usize = 24;
/// ...and goes on (up to this many) until a job's resume from a checkpoint has been checked
/// `RESUMES` times: whether a kill lands after a checkpoint and the job then finishes within its
/// deadline depends on the machine's speed, so a slow machine takes more rounds to see as many.
const MAX_KILLS: usize = 60;
const RESUMES: usize = 3;

/// What the server acknowledged.
#[derive(Default)]
struct Acked {
    /// Uploads that got a 200, and their contents.
    files: BTreeMap<String, Vec<u8>>,
    /// Files whose deletion got a 200.
    deleted_files: BTreeSet<String>,
    /// Files whose deletion was sent without an answer (the kill came first): either way.
    maybe_deleted: BTreeSet<String>,
    jobs: BTreeSet<String>,
    /// Fine-tuned models whose deletion got a 200.
    deleted_models: BTreeSet<String>,
}

impl Acked {
    /// A random acknowledged file not known to be deleted.
    fn live_file(&self, rng: &mut impl Rng) -> Option<String> {
        let live: Vec<&String> = self
            .files
            .keys()
            .filter(|f| !self.deleted_files.contains(*f))
            .collect();
        (!live.is_empty()).then(|| live[rng.random_range(0..live.len())].clone())
    }
}

/// One request that tolerates the server dying under it: `None` when no answer came.
fn try_json(port: u16, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    let text = body.map(|b| b.to_string());
    let (status, answer) = try_http(
        port,
        method,
        path,
        None,
        text.as_deref().map(|t| ("application/json", t.as_bytes())),
    )?;
    Some((status, serde_json::from_str(&answer).unwrap_or(Value::Null)))
}

fn try_upload(port: u16, content: &[u8]) -> Option<(u16, Value)> {
    let (kind, body) = upload_form(content);
    let (status, answer) = try_http(port, "POST", "/v1/files", None, Some((&kind, &body)))?;
    Some((status, serde_json::from_str(&answer).unwrap_or(Value::Null)))
}

/// The seeded stream of operations, until the server stops answering.
fn drive(port: u16, model: String, acked: Arc<Mutex<Acked>>, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..10_000 {
        let roll: u32 = rng.random_range(0..100);
        let answered = if roll < 35 {
            let lines = rng.random_range(1..12);
            let content: String = (0..lines)
                .map(|i| json!({"prompt": format!("q{i} {}: ", rng.random::<u16>()), "completion": "the red one"}).to_string() + "\n")
                .collect();
            try_upload(port, content.as_bytes()).map(|(status, v)| {
                if status == 200 {
                    let id = v["id"].as_str().unwrap().to_string();
                    acked.lock().unwrap().files.insert(id, content.into_bytes());
                }
            })
        } else if roll < 55 {
            let file = acked.lock().unwrap().live_file(&mut rng);
            let Some(file) = file else { continue };
            let body = json!({"training_file": file, "model": model,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": rng.random_range(2..5), "batch_size": rng.random_range(1..3)}}}});
            try_json(port, "POST", "/v1/fine_tuning/jobs", Some(&body)).map(|(status, v)| {
                if status == 200 {
                    acked
                        .lock()
                        .unwrap()
                        .jobs
                        .insert(v["id"].as_str().unwrap().to_string());
                }
            })
        } else if roll < 63 {
            let file = acked.lock().unwrap().live_file(&mut rng);
            let Some(file) = file else { continue };
            acked.lock().unwrap().maybe_deleted.insert(file.clone());
            try_json(port, "DELETE", &format!("/v1/files/{file}"), None).map(|(status, _)| {
                let mut a = acked.lock().unwrap();
                a.maybe_deleted.remove(&file);
                if status == 200 {
                    a.deleted_files.insert(file);
                }
            })
        } else if roll < 72 {
            let job = {
                let a = acked.lock().unwrap();
                let jobs: Vec<&String> = a.jobs.iter().collect();
                (!jobs.is_empty()).then(|| jobs[rng.random_range(0..jobs.len())].clone())
            };
            let Some(job) = job else { continue };
            try_json(
                port,
                "POST",
                &format!("/v1/fine_tuning/jobs/{job}/cancel"),
                None,
            )
            .map(|_| ())
        } else if roll < 82 {
            try_json(port, "GET", "/v1/fine_tuning/jobs?limit=100", None).and_then(|(_, v)| {
                let models: Vec<String> = v["data"]
                    .as_array()?
                    .iter()
                    .filter_map(|j| j["fine_tuned_model"].as_str().map(str::to_string))
                    .collect();
                if models.is_empty() {
                    return Some(());
                }
                let m = models[rng.random_range(0..models.len())].clone();
                let (status, _) = try_json(port, "DELETE", &format!("/v1/models/{m}"), None)?;
                if status == 200 {
                    acked.lock().unwrap().deleted_models.insert(m);
                }
                Some(())
            })
        } else {
            try_json(port, "GET", "/v1/files", None).map(|_| ())
        };
        if answered.is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
    }
}

fn files_on_disk(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Each unfinished job's resume checkpoint step and the metrics lines up to it, as a kill left
/// them (a resumed run keeps those lines; a run started over would rewrite them).
fn checkpoints_before(state: &Path) -> BTreeMap<String, (u64, Vec<String>)> {
    let mut out = BTreeMap::new();
    for id in files_on_disk(&state.join("jobs")) {
        let adapter = state.join("jobs").join(&id).join("adapter");
        let step = ["checkpoint", "checkpoint.old"].iter().find_map(|d| {
            let text = std::fs::read_to_string(adapter.join(d).join("state.json")).ok()?;
            serde_json::from_str::<Value>(&text).ok()?["step"].as_u64()
        });
        let Some(step) = step else { continue };
        let lines: Vec<String> = std::fs::read_to_string(adapter.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step && !l.contains("eval_loss"))
            })
            .map(str::to_string)
            .collect();
        out.insert(id, (step, lines));
    }
    out
}

/// Every job, page by page.
fn all_jobs(port: u16) -> Vec<Value> {
    let mut jobs: Vec<Value> = Vec::new();
    loop {
        let after = jobs
            .last()
            .map(|j| format!("&after={}", j["id"].as_str().unwrap()))
            .unwrap_or_default();
        let (_, page) = try_json(
            port,
            "GET",
            &format!("/v1/fine_tuning/jobs?limit=100{after}"),
            None,
        )
        .unwrap();
        jobs.extend(page["data"].as_array().unwrap().iter().cloned());
        if page["has_more"] != true {
            return jobs;
        }
    }
}

/// Checks the invariants; returns how many jobs were seen to resume from a checkpoint.
fn check_after_restart(
    port: u16,
    state: &Path,
    acked: &Acked,
    resumed: &BTreeMap<String, (u64, Vec<String>)>,
    round: usize,
) -> usize {
    let mut seen_resuming = 0;
    let (status, files) =
        try_json(port, "GET", "/v1/files", None).expect("the server answers after a restart");
    assert_eq!(status, 200);
    let listed: BTreeSet<String> = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    for (id, content) in &acked.files {
        if acked.deleted_files.contains(id) {
            assert!(
                !listed.contains(id),
                "round {round}: deleted file {id} is listed"
            );
            continue;
        }
        if acked.maybe_deleted.contains(id) && !listed.contains(id) {
            continue;
        }
        assert!(
            listed.contains(id),
            "round {round}: acknowledged upload {id} is not listed"
        );
        let on_disk = std::fs::read(state.join("files").join(format!("{id}.jsonl"))).unwrap();
        assert_eq!(
            &on_disk, content,
            "round {round}: {id} differs from what was sent"
        );
    }
    // No orphans: every file on disk belongs to a listed record.
    for name in files_on_disk(&state.join("files")) {
        let id = name
            .strip_suffix(".jsonl")
            .or_else(|| name.strip_suffix(".json"));
        assert!(
            id.is_some_and(|id| listed.contains(id)),
            "round {round}: {name} is on disk but not listed"
        );
    }
    let jobs = all_jobs(port);
    let ids: BTreeSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    for id in &acked.jobs {
        assert!(
            ids.contains(id),
            "round {round}: acknowledged job {id} is not listed"
        );
    }
    for dir in files_on_disk(&state.join("jobs")) {
        assert!(
            ids.contains(&dir),
            "round {round}: job folder {dir} is not a listed job"
        );
    }
    for job in &jobs {
        let status = job["status"].as_str().unwrap();
        assert!(
            [
                "validating_files",
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled"
            ]
            .contains(&status),
            "round {round}: {job}"
        );
        // A finished job's checkpoints are complete (a running one's are being written).
        if matches!(status, "validating_files" | "queued" | "running") {
            continue;
        }
        let dir = state.join("jobs").join(job["id"].as_str().unwrap());
        for step in files_on_disk(&dir.join("checkpoints")) {
            if step == "checkpoints.jsonl" {
                continue;
            }
            let at = dir.join("checkpoints").join(&step);
            assert!(
                at.join("adapter_config.json").is_file(),
                "round {round}: {} is incomplete",
                at.display()
            );
            candle_core::safetensors::load(
                at.join("adapter_model.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap_or_else(|e| panic!("round {round}: {}: {e}", at.display()));
        }
    }
    for m in &acked.deleted_models {
        let (status, _) = try_json(
            port,
            "POST",
            "/v1/completions",
            Some(&json!({"model": m, "prompt": "q", "max_tokens": 1})),
        )
        .unwrap();
        assert_eq!(
            status, 404,
            "round {round}: deleted model {m} is served again"
        );
    }
    // A job that had a checkpoint resumes from it: once it has moved on, the metrics lines up to
    // its checkpoint are the ones the killed run wrote.
    for (id, (step, lines)) in resumed {
        let deadline = Instant::now() + Duration::from_secs(20);
        let done = loop {
            let (_, job) =
                try_json(port, "GET", &format!("/v1/fine_tuning/jobs/{id}"), None).unwrap();
            let status = job["status"].as_str().unwrap_or("").to_string();
            if !matches!(status.as_str(), "queued" | "running") || Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if done != "succeeded" {
            continue;
        }
        let metrics =
            std::fs::read_to_string(state.join("jobs").join(id).join("adapter/metrics.jsonl"))
                .unwrap_or_default();
        for line in lines {
            assert!(
                metrics.lines().any(|l| l == line),
                "round {round}: job {id} had a checkpoint at step {step} but started over"
            );
        }
        seen_resuming += 1;
    }
    seen_resuming
}

#[test]
fn kill_9_at_random_instants_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let state: PathBuf = tmp.path().join("state");
    std::fs::create_dir_all(tmp.path().join("adapters")).unwrap();
    let tiny = common::tiny_dir();
    let args = [
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        tmp.path()
            .join("adapters")
            .to_str()
            .unwrap()
            .to_owned()
            .leak(),
        "--state-dir",
        state.to_str().unwrap().to_owned().leak(),
    ];
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut resumed = BTreeMap::new();
    let started = Instant::now();
    let mut resumes = 0;
    let mut kills = 0;
    for round in 0..=MAX_KILLS {
        let (mut child, port) = start(&args);
        if round > 0 {
            resumes += check_after_restart(port, &state, &acked.lock().unwrap(), &resumed, round);
        }
        if round == MAX_KILLS || (round >= KILLS && resumes >= RESUMES) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        let (_, models) = try_json(port, "GET", "/v1/models", None).unwrap();
        let model = models["data"][0]["id"].as_str().unwrap().to_string();
        let driver = {
            let acked = acked.clone();
            let seed = rng.random();
            std::thread::spawn(move || drive(port, model, acked, seed))
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
        child.kill().unwrap();
        kills += 1;
        let _ = child.wait();
        driver.join().unwrap();
        resumed = checkpoints_before(&state);
    }
    let a = acked.lock().unwrap();
    eprintln!(
        "{kills} kills in {:?}: {} uploads, {} jobs, {} file and {} model deletions acknowledged; {resumes} jobs resumed from a checkpoint",
        started.elapsed(),
        a.files.len(),
        a.jobs.len(),
        a.deleted_files.len(),
        a.deleted_models.len()
    );
    assert!(
        a.files.len() >= 20 && a.jobs.len() >= 5,
        "too little was exercised"
    );
    assert!(
        resumes >= RESUMES,
        "only {resumes} resumes were checked in {kills} kills"
    );
}
