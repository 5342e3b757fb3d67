//! Usage accounting per tenant and adapter: prompt, completion and cached tokens and requests,
//! in minute buckets (older than a day: hour buckets), for `GET /v1/usage` and the admin-only
//! metrics. Persisted under `--state-dir` as `usage.jsonl`: what changed is appended (fsynced)
//! every `FLUSH_SECONDS` and at shutdown, so a crash loses at most the last minute; at start
//! the log is read back and rewritten compacted (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How often the ledger is written.
pub const FLUSH_SECONDS: u64 = 60;
const DAY: u64 = 86_400;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub requests: u64,
}

impl Usage {
    fn add(&mut self, o: &Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cached_tokens += o.cached_tokens;
        self.requests += o.requests;
    }
}

/// (bucket start, unix seconds; tenant; adapter, "" for the base model)
type Key = (u64, String, String);

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    start: u64,
    tenant: String,
    adapter: String,
    #[serde(flatten)]
    usage: Usage,
}

#[derive(Debug, Default)]
struct Books {
    totals: BTreeMap<Key, Usage>,
    /// Not yet written.
    unsaved: BTreeMap<Key, Usage>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("usage ledger `{path}`: {message}")]
    Io { path: String, message: String },
}

pub struct UsageLedger {
    path: Option<PathBuf>,
    books: Mutex<Books>,
}

/// One row of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub tenant: String,
    pub adapter: String,
    #[serde(flatten)]
    pub usage: Usage,
}

fn bucket(now: u64) -> u64 {
    now - now % 60
}

/// Buckets older than a day merge into their hour.
fn compacted(start: u64, now: u64) -> u64 {
    if start + DAY < now {
        start - start % 3600
    } else {
        start
    }
}

impl UsageLedger {
    /// Kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            books: Mutex::default(),
        }
    }

    /// Opens `state_dir/usage.jsonl` (a line cut by a crash is skipped) and compacts it.
    pub fn open(state_dir: &Path, now: u64) -> Result<Self, UsageError> {
        let path = state_dir.join("usage.jsonl");
        let io = |e: std::io::Error| UsageError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut books = Books::default();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    let Ok(l) = serde_json::from_str::<Line>(line) else {
                        continue;
                    };
                    books
                        .totals
                        .entry((compacted(l.start, now), l.tenant, l.adapter))
                        .or_default()
                        .add(&l.usage);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut text = String::new();
        for ((start, tenant, adapter), usage) in &books.totals {
            text.push_str(&line_of(*start, tenant, adapter, usage));
            text.push('\n');
        }
        std::fs::create_dir_all(state_dir).map_err(io)?;
        crate::durable::write(&path, text.as_bytes()).map_err(io)?;
        Ok(Self {
            path: Some(path),
            books: Mutex::new(books),
        })
    }

    /// Adds one request's usage at `now` (unix seconds).
    pub fn record(&self, tenant: &str, adapter: &str, usage: Usage, now: u64) {
        let key = (bucket(now), tenant.to_string(), adapter.to_string());
        let mut b = self.books.lock().expect("usage lock");
        b.totals.entry(key.clone()).or_default().add(&usage);
        b.unsaved.entry(key).or_default().add(&usage);
    }

    /// Appends what changed since the last flush (fsynced) and compacts old buckets in memory.
    pub fn flush(&self, now: u64) -> Result<(), UsageError> {
        let unsaved = {
            let mut b = self.books.lock().expect("usage lock");
            let old: Vec<Key> = b
                .totals
                .range(..(now.saturating_sub(DAY + 3600), String::new(), String::new()))
                .filter(|(k, _)| compacted(k.0, now) != k.0)
                .map(|(k, _)| k.clone())
                .collect();
            for k in old {
                let u = b.totals.remove(&k).expect("key");
                b.totals
                    .entry((compacted(k.0, now), k.1, k.2))
                    .or_default()
                    .add(&u);
            }
            std::mem::take(&mut b.unsaved)
        };
        let Some(path) = &self.path else {
            return Ok(());
        };
        if unsaved.is_empty() {
            return Ok(());
        }
        let text: Vec<String> = unsaved
            .iter()
            .map(|((s, t, a), u)| line_of(*s, t, a, u))
            .collect();
        crate::durable::append_line(path, &text.join("\n")).map_err(|e| {
            // Not lost: back into the unsaved books for the next flush.
            let mut b = self.books.lock().expect("usage lock");
            for (k, u) in &unsaved {
                b.unsaved.entry(k.clone()).or_default().add(u);
            }
            UsageError::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })
    }

    /// Totals per tenant and adapter over buckets starting in `[start, end)`; `tenant` `None`:
    /// every tenant.
    pub fn report(&self, tenant: Option<&str>, start: u64, end: u64) -> Vec<Row> {
        let b = self.books.lock().expect("usage lock");
        let mut sums: BTreeMap<(String, String), Usage> = BTreeMap::new();
        for ((s, t, a), u) in b.totals.range((start, String::new(), String::new())..) {
            if *s >= end {
                break;
            }
            if tenant.is_some_and(|want| want != t) {
                continue;
            }
            sums.entry((t.clone(), a.clone())).or_default().add(u);
        }
        sums.into_iter()
            .map(|((tenant, adapter), usage)| Row {
                tenant,
                adapter,
                usage,
            })
            .collect()
    }
}

fn line_of(start: u64, tenant: &str, adapter: &str, usage: &Usage) -> String {
    serde_json::to_string(&Line {
        start,
        tenant: tenant.to_string(),
        adapter: adapter.to_string(),
        usage: *usage,
    })
    .expect("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(p: u64, c: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_tokens: 0,
            requests: 1,
        }
    }

    #[test]
    fn totals_survive_a_restart_and_a_cut_line_and_filter_by_time_and_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_800_000_000;
        let l = UsageLedger::open(dir.path(), t0).unwrap();
        l.record("a", "a/x", u(10, 5), t0);
        l.record("a", "a/x", u(1, 1), t0 + 30);
        l.record("b", "", u(7, 3), t0 + 120);
        l.flush(t0 + 130).unwrap();
        l.record("a", "a/x", u(100, 100), t0 + 140); // not flushed: the crash loses it
                                                     // A crash mid-append leaves a cut line.
        let path = dir.path().join("usage.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"start\": 1800000");
        std::fs::write(&path, text).unwrap();
        drop(l);
        let l = UsageLedger::open(dir.path(), t0 + 200).unwrap();
        let all = l.report(None, 0, u64::MAX);
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].usage,
            Usage {
                prompt_tokens: 11,
                completion_tokens: 6,
                cached_tokens: 0,
                requests: 2
            }
        );
        assert_eq!(l.report(Some("b"), 0, u64::MAX)[0].usage, u(7, 3));
        assert!(l.report(Some("a"), t0 + 60, u64::MAX).is_empty());
        assert_eq!(l.report(None, t0 + 60, t0 + 180).len(), 1);
        // Appends after the restart go on the compacted file.
        l.record("b", "", u(1, 1), t0 + 300);
        l.flush(t0 + 300).unwrap();
        let l = UsageLedger::open(dir.path(), t0 + 400).unwrap();
        assert_eq!(l.report(Some("b"), 0, u64::MAX)[0].usage.requests, 2);
        // A day later the minute buckets merge into hours; totals are unchanged.
        l.flush(t0 + 3 * DAY).unwrap();
        let total: u64 = l
            .report(None, 0, u64::MAX)
            .iter()
            .map(|r| r.usage.requests)
            .sum();
        assert_eq!(total, 4);
    }
}
