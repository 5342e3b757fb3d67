//! The `serve` binary as a child process on a loopback port, and a minimal HTTP/1.1 client for
//! it (one request per connection): what tests that measure the process (memory, CPU) or kill
//! it need.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary under test: this build's, or `LORAPLEX_SERVE_BIN` (to show that a test fails on
/// an earlier build).
pub fn serve_bin() -> String {
    std::env::var("LORAPLEX_SERVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_serve").into())
}

/// Starts `serve` on a free port; returns the child and the port (read from its banner).
pub fn start(args: &[&str]) -> (Child, u16) {
    let mut child = Command::new(serve_bin())
        .args(["--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "serve exited before listening"
        );
        if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
            break rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
    };
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = stderr.read_to_string(&mut sink);
    });
    (child, port)
}

/// One request: the status and the body. `body` is `(content type, bytes)`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> (u16, String) {
    try_http(port, method, path, key, body).expect("the server answers")
}

/// `http` for a server that may die under the request: `None` when no answer came.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(600))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let (kind, bytes) = body.unwrap_or(("application/json", b""));
    head.push_str(&format!(
        "Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    ));
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(bytes).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    // Chunked bodies (streams) are left as they come; JSON answers carry a length.
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// A multipart form uploading `content` as a fine-tuning file: its content type and body.
pub fn upload_form(content: &[u8]) -> (String, Vec<u8>) {
    let boundary = "loraplex-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `http` with a JSON body, the answer parsed (`Null` when it is not JSON).
pub fn json(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value, String) {
    let text = body.map(|b| b.to_string());
    let (status, answer) = http(
        port,
        method,
        path,
        key,
        text.as_deref().map(|t| ("application/json", t.as_bytes())),
    );
    (
        status,
        serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null),
        answer,
    )
}

/// Uploads `content` as a fine-tuning file: the status and the answer.
pub fn upload(port: u16, key: Option<&str>, content: &[u8]) -> (u16, serde_json::Value, String) {
    let (kind, body) = upload_form(content);
    let (status, answer) = http(port, "POST", "/v1/files", key, Some((&kind, &body)));
    (
        status,
        serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null),
        answer,
    )
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time the process has used (user + system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the ')'.
    num(11) + num(12)
}

/// The share of one core the process used over `window`.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let ticks = clock_ticks();
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    (cpu_ticks(pid) - before) as f64 / ticks / window.as_secs_f64()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux everywhere in practice).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
