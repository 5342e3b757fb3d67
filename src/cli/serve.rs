//! `serve` (the default command): the server's flags, and building its state.

use super::*;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// TOML file of API keys (key → tenant, admin); without it the server is open.
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// Sequences decoded together in one step.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// KV positions all running sequences may reserve together (prompt + max_tokens each): the
    /// block pool is allocated for this many at start-up (its bytes are logged; the default
    /// model takes 46 KiB per position in f32, so the default is 1.4 GiB).
    #[arg(long, default_value_t = 32768)]
    pub kv_cache_tokens: usize,
    /// How the KV pool stores keys and values: f32 (exact), bf16 or f16 (half the memory),
    /// int8 (a quarter: rows rotated, one scale per row and head); auto: int8 when the model's
    /// projections run integer kernels (a GGUF served as stored, the default model), else f32.
    /// README's Long contexts gives decode speeds at context 2,048 for each, beside llama.cpp's.
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype)]
    pub kv_cache_dtype: KvDtypeChoice,
    /// Positions per KV block (the unit of allocation and of prefix reuse).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub kv_block_size: u16,
    /// Do not reuse the KV of cached prompt prefixes (reuse is per adapter and version).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Requests waiting beyond this get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Tokens one step feeds the model: running streams one each, prompts share the rest in
    /// chunks, so a long prompt does not stall the streams (0: whole prompts at once).
    /// Measured (8 streams, a 2,001-token prompt arriving): 0 → streams stall 5.0 s; 512 → 1.5 s;
    /// 256 → 0.8 s with the prompt as fast as unchunked; 128 → 0.44 s, the prompt 14 % slower.
    #[arg(long, default_value_t = 256)]
    pub max_batched_tokens: usize,
    /// Fair share step by step: a tenant this many weighted tokens (prompt 1, generated 2, over
    /// its weight) ahead of another tenant that shares a step and still wants more sits steps
    /// out until the other catches up (0: fairness only at admission). Measured (tenants of
    /// weights 1 and 2 both backlogged): per-minute share off by up to 12 % with 0.
    #[arg(long, default_value_t = 256)]
    pub fair_lag_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub max_resident_adapters: usize,
    #[arg(long, default_value_t = 2 << 30)]
    pub adapter_cache_bytes: usize,
    /// Upper bound for `max_tokens`.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_cap: usize,
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// A request body must arrive within this many seconds.
    #[arg(long, default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// On SIGTERM, running requests get this long to finish.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Directories admins may load adapters from by path, besides the adapters directory
    /// (repeatable; symlinks are resolved first).
    #[arg(long = "adapter-path-allow", value_name = "DIR")]
    pub adapter_path_allow: Vec<PathBuf>,
    /// A key that may read `/metrics` (and nothing else); with `--api-keys`, admin keys may too.
    #[arg(long, env = "LORAPLEX_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,
    /// Most choices one request may ask for (`n`).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=128))]
    pub max_n: u16,
    /// `/metrics` without a key even with `--api-keys`: for a Kubernetes endpoint picker, which
    /// scrapes the inference port and sends no key. Its series name every tenant's adapters:
    /// route only `/v1/` to the pods from outside (as `deploy/k8s` does).
    #[arg(long)]
    pub open_metrics: bool,
    /// Adapter loads (from disk or the hub) running at once.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent_loads: usize,
    /// Registered revisions kept per adapter name, for `name@REVISION` and rollbacks (their
    /// files hard-linked under `--state-dir`).
    #[arg(long, default_value_t = 3)]
    pub adapter_revisions: usize,
    /// Largest adapter weights file downloaded from the hub (checked from its header first).
    #[arg(long, default_value_t = 1 << 30)]
    pub max_hub_adapter_bytes: u64,
    /// Where uploaded files (`/v1/files`) are kept (default `$LORAPLEX_HOME/state`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Fine-tuning jobs running at once; the rest wait in order.
    #[arg(long, default_value_t = 1)]
    pub max_training_jobs: usize,
    /// Compute threads a fine-tuning job trains with (0: the cores); they run at a lower
    /// priority (nice 10) than serving's threads.
    #[arg(long, default_value_t = 0)]
    pub train_threads: usize,
    /// Prompt-lookup speculative decoding for requests that do not say (`speculative` in the
    /// request): tokens proposed per step from the request's own prompt and answer (0: off).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=16))]
    pub speculative_ngram: u16,
    /// Speculate only while a step holds at most this many answers being decoded: in a fuller
    /// step the proposed rows take compute from the others.
    #[arg(long, default_value_t = 4)]
    pub speculative_max_batch: usize,
    /// Lock the model's weights in RAM once loaded (`mlockall` of what is mapped then, before
    /// the KV cache is allocated), as llama.cpp's `--mlock`: never swapped out or compressed.
    /// Needs the memory lock limit (`ulimit -l`; in Kubernetes the IPC_LOCK capability); where
    /// it is too low the server says so and runs unlocked.
    #[arg(long)]
    pub mlock: bool,
    /// The longest stop string a request may send, in bytes (at most 4 strings).
    #[arg(long, default_value_t = 256)]
    pub max_stop_bytes: usize,
    /// Tokens one training forward/backward of a fine-tuning job holds: a job's `batch_size` is
    /// reached by gradient accumulation over micro-batches within it (the same update). Bounds a
    /// job's memory (see README); at least 512, a job example's longest.
    #[arg(long, default_value_t = 2048)]
    pub train_max_batch_tokens: usize,
    /// Activation checkpointing in fine-tuning jobs (`true`/`false`): keep each layer's input
    /// only and recompute the layer in the backward. On by default: on the default model a
    /// 2,048-token micro-batch of 512-token examples holds 9.3 GB without it, 0.8 GB with it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub train_checkpoint_activations: bool,
    /// Messages one line of a training file may hold (uploads and jobs).
    #[arg(long, default_value_t = 256)]
    pub train_max_messages: usize,
    /// Tokens one fine-tuning job may train on (`n_epochs ×` its file's tokens).
    #[arg(long, default_value_t = 20_000_000)]
    pub train_max_job_tokens: usize,
    /// Examples one fine-tuning job may train on (`n_epochs ×` its file's lines).
    #[arg(long, default_value_t = 200_000)]
    pub train_max_job_examples: usize,
    /// Wall-clock seconds one fine-tuning job may train; past it the job fails.
    #[arg(long, default_value_t = 86_400)]
    pub train_max_job_seconds: u64,
}

/// Everything the server needs, built from the arguments (the model loaded, keys read).
pub async fn build_state(args: &ServeArgs) -> Result<std::sync::Arc<crate::server::AppState>> {
    use crate::server::{auth::ApiKeys, validate::Limits, AppState, ServerConfig};
    use std::sync::Arc;
    let keys = match &args.api_keys {
        Some(p) => Some(ApiKeys::from_file(p)?),
        None => None,
    };
    let longest = crate::server::job_runner::MAX_SEQ_LEN;
    if args.train_max_batch_tokens < longest {
        anyhow::bail!(
            "`--train-max-batch-tokens` is {}; it must be at least {longest}, the longest example a job trains on",
            args.train_max_batch_tokens
        );
    }
    let loaded = Arc::new(args.model.load().await?);
    if args.mlock {
        match lock_memory() {
            Ok(()) => tracing::info!("--mlock: the model's weights are locked in RAM"),
            Err(e) => {
                tracing::warn!("--mlock: {e}");
                eprintln!("warning: --mlock: {e}");
            }
        }
    }
    let kv_dtype = args
        .kv_cache_dtype
        .0
        .unwrap_or_else(|| loaded.model.auto_kv_dtype());
    let template = ChatTemplate::select(
        args.model.chat_template.as_deref(),
        loaded.chat_template.as_deref(),
    )?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let context = loaded.model.config.max_position_embeddings;
    let loaded_vocab = loaded.model.config.vocab_size;
    let engine = crate::engine::Engine::start_with(
        loaded,
        crate::engine::SchedulerConfig {
            max_running: args.max_running,
            kv_cache_tokens: args.kv_cache_tokens,
            max_queue: args.max_queue,
            max_queue_per_tenant: crate::server::policy::Policy::queue_share(
                keys.as_ref(),
                args.max_queue,
            ),
            max_batched_tokens: args.max_batched_tokens,
            fair_lag_tokens: args.fair_lag_tokens,
        },
        crate::engine::KvConfig {
            block_size: args.kv_block_size as usize,
            dtype: kv_dtype,
            prefix_caching: !args.no_prefix_cache,
        },
        metrics.clone(),
    )?;
    let cache = crate::adapters::AdapterCache::new(crate::adapters::CacheConfig {
        max_resident: args.max_resident_adapters,
        max_bytes: args.adapter_cache_bytes,
    });
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        body_timeout: std::time::Duration::from_secs(args.body_timeout_secs),
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_secs),
        limits: Limits {
            vocab: loaded_vocab,
            max_n: args.max_n as usize,
            max_tokens_cap: args.max_tokens_cap,
            max_stop_bytes: args.max_stop_bytes,
            context,
            speculative: (args.speculative_ngram > 0).then_some(crate::engine::NgramSpec {
                num_tokens: args.speculative_ngram as usize,
                min_ngram: 1,
                max_ngram: 3,
                max_batch: args.speculative_max_batch,
            }),
            speculative_max_batch: args.speculative_max_batch,
        },
        bind: args.model.bind_options(),
        sources: SourceConfig::from_env(),
        policy: crate::server::policy::PolicyConfig {
            path_allow: args.adapter_path_allow.clone(),
            metrics_key: args
                .metrics_key
                .as_deref()
                .map(crate::server::auth::MetricsKey::new),
            open_metrics: args.open_metrics,
            max_hub_bytes: args.max_hub_adapter_bytes,
        },
        max_concurrent_loads: args.max_concurrent_loads,
        max_training_jobs: args.max_training_jobs.max(1),
        train_threads: args.train_threads,
        train: crate::server::job_runner::TrainLimits {
            max_batch_tokens: args.train_max_batch_tokens,
            checkpoint_activations: args.train_checkpoint_activations,
            max_messages: args.train_max_messages,
            max_job_tokens: args.train_max_job_tokens,
            max_job_seconds: args.train_max_job_seconds,
            max_job_examples: args.train_max_job_examples,
        },
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| SourceConfig::from_env().home.join("state")),
        max_concurrent_prepare: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2),
    };
    let state = Arc::new(AppState::new(crate::server::Parts {
        engine,
        registry: Registry::new(&args.model.adapters)
            .keeping_revisions(
                config.state_dir.join("adapter-revisions"),
                args.adapter_revisions,
            )
            .context("--state-dir: cannot prepare the adapter revisions directory")?,
        cache,
        metrics,
        keys,
        template,
        config,
    }));
    // Jobs a previous run left queued or running start again (from their checkpoints).
    state.jobs.recover(Arc::downgrade(&state));
    Ok(state)
}

pub async fn run_server(args: ServeArgs) -> Result<()> {
    let state = build_state(&args).await?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`--host`, `--port`)"))?;
    if state.keys.is_none() {
        eprintln!("no --api-keys: the server is open to anyone who can reach {addr}");
    }
    // Stated once: which kernels this CPU runs (a CPU without AVX2 takes the portable ones).
    eprintln!(
        "CPU kernels: {}; {} threads",
        crate::ops::cpu_features::describe(),
        rayon::current_num_threads()
    );
    eprintln!(
        "serving {} on http://{} ({} adapters in {})",
        state.base_id(),
        listener.local_addr()?,
        state.registry.names().len(),
        args.model.adapters.display()
    );
    crate::server::serve(state, listener).await?;
    eprintln!("stopped");
    Ok(())
}

/// `--kv-cache-dtype`: a dtype, or `auto` (`None`), chosen for the model once it is loaded
/// (`Llama::auto_kv_dtype`).
#[derive(Debug, Clone, Copy)]
pub struct KvDtypeChoice(pub Option<crate::model::KvDtype>);

fn parse_kv_dtype(s: &str) -> std::result::Result<KvDtypeChoice, String> {
    if s == "auto" {
        return Ok(KvDtypeChoice(None));
    }
    s.parse()
        .map(|d| KvDtypeChoice(Some(d)))
        .map_err(|e: String| e.replace("expected", "expected auto,"))
}

/// `--mlock`: locks every page mapped now (the model's weights, the code) in RAM.
fn lock_memory() -> std::result::Result<(), String> {
    // SAFETY: `mlockall` takes flags only and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT) };
    if rc == 0 {
        return Ok(());
    }
    Err(format!(
        "the weights could not be locked in RAM ({}); raise the memory lock limit (`ulimit -l`, \
         RLIMIT_MEMLOCK; in Kubernetes the IPC_LOCK capability)",
        std::io::Error::last_os_error()
    ))
}
