//! The `serve` binary on a loopback port: SIGTERM drains running requests, and a client that
//! sends half a body and stalls gets a 408 while everything else goes on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::process::start;
use common::*;

fn post(port: u16, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "serve did not exit in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits() {
    // The default model: slow enough on CPU that the request is mid-stream at SIGTERM.
    let (mut child, port) = start(&["--adapters", "adapters"]);
    let body = r#"{"messages":[{"role":"user","content":"Count to fifty."}],"max_tokens":40,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let stream = post(port, "/v1/chat/completions", body);
    let mut reader = BufReader::new(stream);
    let mut seen = String::new();
    // Read until the first content token arrives.
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 2 {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0);
        seen.push_str(&line);
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    seen.push_str(&rest);
    assert!(
        seen.contains("\"finish_reason\":\"length\""),
        "the running request was cut: {seen}"
    );
    assert!(seen.contains("data: [DONE]"));
    let content_chunks = seen.matches("\"delta\":{\"content\":").count();
    assert!(content_chunks >= 30, "only {content_chunks} tokens arrived");
    let exit = wait_exit(&mut child, Duration::from_secs(30));
    assert!(exit.success(), "serve exited with {exit}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn a_stalled_half_body_gets_408_and_others_are_served() {
    let tiny = tiny_dir();
    let (mut child, port) = start(&[
        "--model",
        tiny.to_str().unwrap(),
        "--body-timeout-secs",
        "1",
    ]);
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stalled,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"messages\": ["
    )
    .unwrap();
    // Meanwhile a complete request is answered.
    let mut ok = post(
        port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    );
    let mut answer = String::new();
    ok.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    let _ = stalled.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn serve_train_writes_an_adapter_and_registers_it_with_a_running_server() {
    let tiny = tiny_dir();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let (mut child, port) = start(&[
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
    ]);
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"instruction": format!("say {i}"), "output": format!("number {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = adapters.join("numbers");
    let train = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args([
            "train",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .args([
            "--max-steps",
            "6",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--lr",
            "1e-2",
            "--method",
            "dora",
            "--eval-split",
            "0.25",
            // PEFT's shorthand for every projection.
            "--target-modules",
            "all-linear",
        ])
        .args(["--register", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&train.stderr);
    assert!(train.status.success(), "{stderr}");
    assert!(
        stderr.contains("registered as `numbers`") && stderr.contains("eval loss"),
        "{stderr}"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7, "{cfg}");
    // The server serves it right away.
    let mut s = post(
        port,
        "/v1/chat/completions",
        r#"{"model":"numbers","messages":[{"role":"user","content":"say 3"}],"max_tokens":4}"#,
    );
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"model\":\"numbers\""),
        "{answer}"
    );
    // A second run into the same folder is refused without --overwrite.
    let again = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args([
            "train",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && e.contains("--overwrite"), "{e}");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_tenant_key_registers_its_trained_adapter_by_name() {
    // Tenants may not name paths; `--register` falls back to the adapter's name, which works
    // when `--output` is the tenant's folder in the server's adapters directory.
    let tiny = tiny_dir();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    std::fs::create_dir_all(adapters.join("acme")).unwrap();
    let keys = tmp.path().join("keys.toml");
    std::fs::write(&keys, "[keys.\"sk-acme\"]\ntenant = \"acme\"\n").unwrap();
    let (mut child, port) = start(&[
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
        "--api-keys",
        keys.to_str().unwrap(),
    ]);
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("say {i}"), "completion": format!(" {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let train = |out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_serve"))
            .args([
                "train",
                "--model",
                tiny.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ])
            .args([
                "--output",
                out.to_str().unwrap(),
                "--max-steps",
                "2",
                "--rank",
                "4",
            ])
            .args([
                "--register",
                &format!("http://127.0.0.1:{port}"),
                "--api-key",
                "sk-acme",
            ])
            .output()
            .unwrap()
    };
    let ok = train(&adapters.join("acme").join("numbers"));
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(
        ok.status.success() && stderr.contains("registered as `numbers`"),
        "{stderr}"
    );
    // Outside its namespace the registration is refused (the adapter is still written).
    let elsewhere = train(&tmp.path().join("numbers2"));
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && stderr.contains("404"),
        "{stderr}"
    );
    child.kill().unwrap();
    let _ = child.wait();
}

/// Peak resident memory (VmHWM, kB) of a `serve` process on the default model once it listens.
fn peak_rss_kb(args: &[&str]) -> u64 {
    let mut all = vec!["--adapters", "adapters"];
    all.extend_from_slice(args);
    let (mut child, _port) = start(&all);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[cfg(target_os = "linux")]
#[test]
fn quantized_serving_keeps_no_f32_copy_of_the_model() {
    let f32_kb = peak_rss_kb(&["--dtype", "f32"]);
    let native_kb = peak_rss_kb(&[]);
    let nf4_kb = peak_rss_kb(&["--quantize", "nf4"]);
    eprintln!(
        "peak RSS once listening: f32 {f32_kb} kB, native Q4_1 {native_kb} kB ({:.2}x), NF4 {nf4_kb} kB ({:.2}x)",
        native_kb as f64 / f32_kb as f64,
        nf4_kb as f64 / f32_kb as f64
    );
    assert!(
        native_kb * 100 <= f32_kb * 35,
        "native Q4_1 {native_kb} kB vs f32 {f32_kb} kB"
    );
    assert!(
        nf4_kb * 100 <= f32_kb * 45,
        "NF4 {nf4_kb} kB vs f32 {f32_kb} kB"
    );
}

#[test]
fn sigterm_past_the_timeout_cancels_long_streams_and_exits_promptly() {
    let (mut child, port) = start(&["--adapters", "adapters", "--shutdown-timeout-secs", "1"]);
    let body = r#"{"messages":[{"role":"user","content":"Write a long story."}],"max_tokens":4000,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let mut reader = BufReader::new(post(port, "/v1/chat/completions", body));
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 2 {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0);
        seen.push_str(&line);
    }
    let signaled = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    // While draining, /health tells load balancers to stop sending.
    std::thread::sleep(Duration::from_millis(200));
    let mut h = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        h,
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut health = String::new();
    h.read_to_string(&mut health).unwrap();
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("shutting down") && rest.contains("data: [DONE]"),
        "{rest}"
    );
    let exit = wait_exit(&mut child, Duration::from_secs(10));
    let took = signaled.elapsed();
    assert!(exit.success(), "serve exited with {exit}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM (timeout 1 s)"
    );
}

/// An 8,000-token prompt on the default model: the server's peak RSS stays below 1.5 GB (the
/// KV pool, not a `len²` score matrix, bounds it), and two running streams keep producing
/// tokens while it prefills in chunks.
#[cfg(target_os = "linux")]
#[test]
fn an_8000_token_prompt_keeps_memory_bounded_and_streams_going() {
    use std::sync::{Arc, Mutex};
    let (mut child, port) = start(&["--adapters", "adapters"]);
    let stamps: Vec<Arc<Mutex<Vec<Instant>>>> = (0..2).map(|_| Arc::default()).collect();
    let streams: Vec<_> = stamps
        .iter()
        .map(|s| {
            let s = s.clone();
            std::thread::spawn(move || {
                let body = r#"{"messages":[{"role":"user","content":"Tell me a story."}],"max_tokens":1500,"temperature":0,"ignore_eos":true,"stream":true}"#;
                let reader = BufReader::new(post(port, "/v1/chat/completions", body));
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if line.contains("\"content\":\"") {
                        s.lock().unwrap().push(Instant::now());
                    }
                    if line.contains("[DONE]") {
                        break;
                    }
                }
            })
        })
        .collect();
    while stamps.iter().any(|s| s.lock().unwrap().len() < 3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ids: Vec<String> = (0..8000u32)
        .map(|i| (1000 + i * 7919 % 39000).to_string())
        .collect();
    let body = format!(
        r#"{{"prompt":[{}],"max_tokens":1,"temperature":0}}"#,
        ids.join(",")
    );
    let began = Instant::now();
    let mut answer = String::new();
    post(port, "/v1/completions", &body)
        .read_to_string(&mut answer)
        .unwrap();
    let ended = Instant::now();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"prompt_tokens\":8000"), "{answer}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    for s in streams {
        let _ = s.join();
    }
    // The longest gap between tokens of each stream while the prompt prefilled.
    let gaps: Vec<Duration> = stamps
        .iter()
        .map(|s| {
            let s = s.lock().unwrap();
            let during: Vec<Instant> = s
                .iter()
                .copied()
                .filter(|&t| t >= began && t <= ended)
                .collect();
            let mut edges = vec![began];
            edges.extend(during);
            edges.push(ended);
            edges.windows(2).map(|w| w[1] - w[0]).max().unwrap()
        })
        .collect();
    eprintln!(
        "8,000-token prompt: {:?}; peak RSS {peak_kb} kB; streams' longest gaps {gaps:?}",
        ended - began
    );
    assert!(peak_kb < 1_464_843, "peak RSS {peak_kb} kB ≥ 1.5 GB");
    for g in gaps {
        assert!(
            g < Duration::from_secs(5) && g * 4 < ended - began,
            "a stream stalled {g:?} during a {:?} prefill",
            ended - began
        );
    }
}

/// `serve train` where stderr is no terminal (a container's log, CI, `| tee`) draws no bar:
/// it prints a progress line (step, loss, tokens/s, ETA) at `--progress-interval`.
#[test]
fn serve_train_off_a_terminal_prints_progress_lines() {
    let tiny = tiny_dir();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("say {i}: "), "completion": format!("number {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args([
            "train",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--output", tmp.path().join("out").to_str().unwrap()])
        .args([
            "--max-steps",
            "5",
            "--batch-size",
            "2",
            "--progress-interval",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(progress.len(), 5, "{stderr}");
    assert!(
        progress[0].starts_with("step 1/5: loss ") && progress[0].contains("tokens/s, ETA "),
        "{stderr}"
    );
    assert!(progress[4].starts_with("step 5/5: "), "{stderr}");
}

/// `--mlock`: where the memory lock limit allows it (root, or a limit above the model), the
/// model's pages are locked once the server listens (VmLck at least the default model's
/// ~100 MB of Q4_1/Q8_0 weights); where it does not, nothing is locked and the server runs.
#[cfg(target_os = "linux")]
#[test]
fn mlock_locks_the_model_where_the_limit_allows() {
    let (mut child, port) = start(&["--adapters", "adapters", "--mlock"]);
    let locked_kb = common::process::status_kb(child.id(), "VmLck");
    let mut health = String::new();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.read_to_string(&mut health).unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fills `lim`.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) },
        0
    );
    // SAFETY: no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    eprintln!(
        "VmLck {locked_kb} kB; RLIMIT_MEMLOCK {}; root {root}",
        lim.rlim_cur
    );
    if root || lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= 2 << 30 {
        assert!(locked_kb >= 60_000, "only {locked_kb} kB locked");
    } else {
        assert_eq!(locked_kb, 0);
    }
}
