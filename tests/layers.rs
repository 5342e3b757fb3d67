//! Dependencies point down only (../shared/DESIGN.md): checked by scanning `crate::` paths.

use std::path::Path;

/// Modules each layer may use (besides itself).
const ALLOWED: [(&str, &[&str]); 13] = [
    ("ops", &[]),
    ("durable", &[]),
    ("quant", &["ops"]),
    ("chat", &[]),
    ("tokenizer", &[]),
    ("metrics", &[]),
    ("guided", &["tokenizer"]),
    ("model", &["ops", "quant", "tokenizer", "chat"]),
    ("adapters", &["model", "ops"]),
    (
        "train",
        &["model", "adapters", "chat", "tokenizer", "ops", "durable"],
    ),
    (
        "engine",
        &[
            "model",
            "adapters",
            "tokenizer",
            "metrics",
            "chat",
            "guided",
        ],
    ),
    (
        "server",
        &[
            "engine",
            "train",
            "adapters",
            "model",
            "chat",
            "tokenizer",
            "metrics",
            "guided",
            "durable",
        ],
    ),
    (
        "cli",
        &[
            "train",
            "server",
            "engine",
            "adapters",
            "model",
            "chat",
            "tokenizer",
            "metrics",
            "ops",
        ],
    ),
];

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn layers_depend_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut violations = Vec::new();
    for f in all {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        let layer = rel.split(['/', '.']).next().unwrap().to_string();
        let Some((_, allowed)) = ALLOWED.iter().find(|(l, _)| *l == layer) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            for part in line.split("crate::").skip(1) {
                let used: String = part
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if used != layer && !allowed.contains(&used.as_str()) && !used.is_empty() {
                    violations.push(format!("src/{rel}:{}: {layer} uses crate::{used}", i + 1));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward dependencies:\n{}",
        violations.join("\n")
    );
}
