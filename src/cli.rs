//! Command line: clap arguments and the commands they run. The only place that uses `anyhow`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::adapters::{bind, locate, merge::merge, BindOptions, PeftAdapter, Registry};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{generate, GenerationConfig, SamplingParams};
use crate::model::source::SourceConfig;
use crate::model::AdapterWeights;
use crate::model::{load_model, LoadedModel, ModelOptions, ModelSource};

#[derive(Debug, Parser)]
#[command(
    name = "serve",
    version,
    about = "One base model, many LoRA/DoRA adapters, an OpenAI-compatible API",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand: run the server.
    #[command(flatten)]
    pub serve: ServeArgs,
}

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
    /// Adapter loads (from disk or the hub) running at once.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent_loads: usize,
    /// Largest adapter weights file downloaded from the hub (checked from its header first).
    #[arg(long, default_value_t = 1 << 30)]
    pub max_hub_adapter_bytes: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate from one prompt or one chat turn and print it.
    Generate(GenerateArgs),
    /// Write base + adapter merged as a Hugging Face model directory.
    Merge(MergeArgs),
    /// Fine-tune a new LoRA/DoRA adapter (PEFT format) from a JSONL file.
    Train(TrainArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    Lora,
    Dora,
    /// IA³ vectors on the target modules (`down_proj`'s scales its input, as PEFT does).
    Ia3,
    /// Prompt tuning: `--num-virtual-tokens` trained input embeddings before every prompt.
    PromptTuning,
    /// Prefix tuning: `--num-virtual-tokens` trained key/value rows at every layer.
    PrefixTuning,
    /// A bottleneck adapter in every layer (`--bn-config`, `--reduction-factor`), exported in
    /// AdapterHub's format (`adapters` loads it with `load_adapter`).
    Bottleneck,
    /// AdapterFusion over the `--fuse` bottleneck adapters (frozen), exported as AdapterHub's
    /// fusion setup (`adapters` loads it with `load_adapter_setup`).
    Fusion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BnConfigArg {
    /// AdapterHub's `seq_bn` (Pfeiffer).
    Seq,
    /// `double_seq_bn` (Houlsby).
    Double,
    /// `par_bn`.
    Parallel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Auto,
    Alpaca,
    Chat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulerArg {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL: `{"messages"}`, `{"prompt", "completion"}` or `{"instruction", "input"?, "output"}`.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of `--data` held out for evaluation (when no `--eval-data`).
    #[arg(long, default_value_t = 0.0)]
    pub eval_split: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: FormatArg,
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Where the adapter goes, e.g. `adapters/NAME`.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
    /// Continue from the last checkpoint in `--output`.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodArg,
    /// Virtual tokens of `--method prompt-tuning` and `prefix-tuning`.
    #[arg(long, default_value_t = 8)]
    pub num_virtual_tokens: usize,
    /// `--method prefix-tuning` through PEFT's projection MLP (an embedding per virtual token,
    /// `Linear → tanh → Linear` to every layer's key/value rows); the export holds the projected
    /// rows, as PEFT saves them.
    #[arg(long)]
    pub prefix_projection: bool,
    /// The projection's hidden size (0: the key/value width, PEFT's `token_dim`).
    #[arg(long, default_value_t = 0)]
    pub encoder_hidden_size: usize,
    /// `--method fusion`: a bottleneck adapter's folder to fuse (repeat, in order; at least two).
    #[arg(long)]
    pub fuse: Vec<PathBuf>,
    /// The preset of `--method bottleneck`.
    #[arg(long, value_enum, default_value = "seq")]
    pub bn_config: BnConfigArg,
    /// `--method bottleneck`: the adapter's width is the hidden size over this (default: the
    /// preset's, 16 for seq and double, 2 for parallel).
    #[arg(long, default_value_t = 0)]
    pub reduction_factor: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    /// Comma-separated projections (default: all seven).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    #[arg(long)]
    pub rslora: bool,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub scheduler: SchedulerArg,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 50)]
    pub save_steps: usize,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Load the new adapter into this running server when training ends.
    #[arg(long)]
    pub register: Option<String>,
    #[arg(long)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// A GGUF model's quantized tensors as stored (integer kernels); anything else in f32.
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Which model to load and how; shared by every command that loads one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face directory, `.gguf` file, or hub id (default: HuggingFaceTB/SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<String>,
    /// `auto`: a GGUF model is served in its own quantization; `f32` dequantizes it at load.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// A shipped chat template (chatml, llama3, mistral, alpaca) or a path to a `.jinja` file.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Directory of adapters, one folder each (optionally one `tenant/` level).
    #[arg(long, default_value = "adapters")]
    pub adapters: PathBuf,
    /// Adapters of a higher rank are refused.
    #[arg(long, default_value_t = 256)]
    pub max_lora_rank: usize,
    /// Quantize the base model's projections (`nf4`: 4-bit NormalFloat, double-quantized).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// Threads of the one compute pool (kernels, attention, gemm); default: the cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// How adapters' A and B are kept for serving: `auto` as the file has them (16-bit files stay
    /// 16-bit), or `f32`, `bf16`, `f16` (16 bits halve the bytes each step streams).
    #[arg(long, value_enum, default_value = "auto")]
    pub adapter_dtype: AdapterDTypeArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdapterDTypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    Nf4,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter name (in `--adapters`) or directory.
    #[arg(long)]
    pub adapter: String,
    /// Directory to write (`config.json`, `model.safetensors`, tokenizer files).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Apply this adapter (name in `--adapters`, or a directory), unmerged.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Raw text to continue (no chat template).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// One user message, rendered with the chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for `--chat`.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print the generated token ids as JSON after the text (for scripts and tests).
    #[arg(long)]
    pub print_ids: bool,
}

impl ModelArgs {
    fn options(&self) -> Result<ModelOptions> {
        // On CPU, `bf16` means bf16 weights with f32 activations (the bf16 kernels); elsewhere
        // candle runs the whole model in bf16.
        let bf16_weights = self.dtype == DTypeArg::Bf16 && self.device == DeviceArg::Cpu;
        let dtype = match self.dtype {
            DTypeArg::Auto | DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 if bf16_weights => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        };
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda if cfg!(feature = "cuda") => Device::new_cuda(0).context("`--device cuda`")?,
            DeviceArg::Cuda => bail!("`--device cuda`: this binary was built without CUDA; rebuild with `--features cuda`"),
        };
        Ok(ModelOptions {
            dtype,
            device,
            nf4: self.quantize == Some(QuantizeArg::Nf4),
            bf16_weights,
            // A GGUF read as stored, then each weight widened to bf16 in turn: no f32 model.
            native_quant: self.dtype == DTypeArg::Auto || bf16_weights,
        })
    }

    /// How adapters are bound to this model (`--max-lora-rank`, `--adapter-dtype`).
    pub fn bind_options(&self) -> BindOptions {
        use crate::adapters::AdapterDType as D;
        BindOptions {
            max_rank: self.max_lora_rank,
            adapter_dtype: match self.adapter_dtype {
                AdapterDTypeArg::Auto => D::Auto,
                AdapterDTypeArg::F32 => D::F32,
                AdapterDTypeArg::Bf16 => D::Bf16,
                AdapterDTypeArg::F16 => D::F16,
            },
        }
    }

    /// Reads the adapter `spec` (a directory, or a name in `--adapters`).
    pub fn peft_adapter(&self, spec: &str) -> Result<PeftAdapter> {
        let dir = locate(spec, &Registry::new(&self.adapters))?;
        Ok(PeftAdapter::load(&dir)?)
    }

    /// Resolves (fetching if needed) and loads the model.
    pub async fn load(&self) -> Result<LoadedModel> {
        let opts = self.options()?;
        let source = ModelSource::parse(self.model.as_deref())?;
        let resolved = source.resolve(&SourceConfig::from_env()).await?;
        let nf4 = opts.nf4;
        let loaded = tokio::task::spawn_blocking(move || load_model(&resolved, &opts)).await??;
        let (bytes, bits) = crate::model::projection_footprint(&loaded.model);
        tracing::info!(
            "CPU kernels: {}; {} threads",
            crate::ops::cpu_features::describe(),
            rayon::current_num_threads()
        );
        if nf4 {
            eprintln!(
                "base projections in NF4: {:.1} MB, {bits:.3} bits per parameter",
                bytes as f64 / 1e6
            );
        } else {
            tracing::info!(
                "base projections: {:.1} MB, {bits:.1} bits per parameter",
                bytes as f64 / 1e6
            );
        }
        Ok(loaded)
    }
}

fn validate(args: &GenerateArgs) -> Result<()> {
    if !(0.0..=2.0).contains(&args.temperature) {
        bail!("`--temperature` must be between 0 and 2");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("`--top-p` must be in (0, 1]");
    }
    if args.max_tokens == 0 {
        bail!("`--max-tokens` must be at least 1");
    }
    Ok(())
}

pub async fn run_generate(args: GenerateArgs) -> Result<()> {
    validate(&args)?;
    let loaded = args.model.load().await?;
    let template = ChatTemplate::select(
        args.model.chat_template.as_deref(),
        loaded.chat_template.as_deref(),
    )?;
    let eos = loaded.stop_token_ids(&template);
    let text = match (&args.prompt, &args.chat) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", c));
            template.render(&messages, true, &loaded.special_tokens())?
        }
        (None, None) => bail!("give `--prompt` or `--chat`"),
    };
    let prompt = loaded.tokenizer.encode(&text)?;
    let adapter: Option<AdapterWeights> = match &args.adapter {
        Some(spec) => {
            let peft = args.model.peft_adapter(spec)?;
            let opts = args.model.bind_options();
            Some(bind(&peft, &loaded.model, &opts)?)
        }
        None => None,
    };
    let cfg = GenerationConfig {
        max_tokens: args.max_tokens,
        min_tokens: args.min_tokens,
        ignore_eos: args.ignore_eos,
        stop: args.stop.clone(),
        eos_token_ids: eos,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
    };
    let out = tokio::task::spawn_blocking(move || {
        let mut stdout = std::io::stdout();
        generate(
            &loaded.model,
            &loaded.tokenizer,
            &prompt,
            adapter.as_ref(),
            &cfg,
            |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            },
        )
    })
    .await??;
    println!();
    if args.print_ids {
        println!("{}", serde_json::to_string(&out.token_ids)?);
    }
    eprintln!(
        "[{} prompt tokens, {} generated, finish_reason={}, prefill {:.0} ms, {:.1} tokens/s]",
        out.prompt_tokens,
        out.token_ids.len(),
        out.finish_reason.as_str(),
        out.prefill_time.as_secs_f64() * 1e3,
        out.tokens_per_second()
    );
    Ok(())
}

pub async fn run_merge(args: MergeArgs) -> Result<()> {
    let peft = args.model.peft_adapter(&args.adapter)?;
    let loaded = args.model.load().await?;
    let merged = merge(&loaded.model, &peft)?;
    crate::model::export::save_hf_dir(&merged, &loaded, &args.output)?;
    eprintln!(
        "wrote {} (base + {} merged)",
        args.output.display(),
        args.adapter
    );
    if args.model.quantize.is_some() {
        // Like PEFT on a 4-bit base: the result carries the base's quantization error.
        eprintln!(
            "note: merged into the dequantized NF4 base (the weights the adapter was served on), \
             written as full-precision tensors; drop --quantize to merge into the original weights"
        );
    }
    Ok(())
}

/// Everything the server needs, built from the arguments (the model loaded, keys read).
pub async fn build_state(args: &ServeArgs) -> Result<std::sync::Arc<crate::server::AppState>> {
    use crate::server::{auth::ApiKeys, validate::Limits, AppState, ServerConfig};
    use std::sync::Arc;
    let keys = match &args.api_keys {
        Some(p) => Some(ApiKeys::from_file(p)?),
        None => None,
    };
    let loaded = Arc::new(args.model.load().await?);
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
            max_tokens_cap: args.max_tokens_cap,
            context,
        },
        bind: args.model.bind_options(),
        sources: SourceConfig::from_env(),
        policy: crate::server::policy::PolicyConfig {
            path_allow: args.adapter_path_allow.clone(),
            metrics_key: args
                .metrics_key
                .as_deref()
                .map(crate::server::auth::MetricsKey::new),
            max_hub_bytes: args.max_hub_adapter_bytes,
        },
        max_concurrent_loads: args.max_concurrent_loads,
        max_concurrent_prepare: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2),
    };
    Ok(Arc::new(AppState::new(crate::server::Parts {
        engine,
        registry: Registry::new(&args.model.adapters),
        cache,
        metrics,
        keys,
        template,
        config,
    })))
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
        state.registry.list().len(),
        args.model.adapters.display()
    );
    crate::server::serve(state, listener).await?;
    eprintln!("stopped");
    Ok(())
}

pub async fn run_train(args: TrainArgs) -> Result<()> {
    use crate::train::{
        dataset::Tokenization, optim::Schedule, trainable::TrainSpec, Dataset, Format, Method,
    };
    if !matches!(args.model.dtype, DTypeArg::F32 | DTypeArg::Auto) {
        bail!("`--dtype`: training runs in f32");
    }
    // The base's matmuls must backpropagate to their input: dense f32 (or NF4), never the
    // GGUF integer kernels.
    let mut args = args;
    args.model.dtype = DTypeArg::F32;
    let targets = args
        .target_modules
        .iter()
        .map(|t| crate::model::Proj::from_short(t).with_context(|| format!("`--target-modules`: unknown projection `{t}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")))
        .collect::<Result<Vec<_>>>()?;
    if !(0.0..1.0).contains(&args.eval_split) {
        bail!("`--eval-split` must be in [0, 1)");
    }
    let loaded = args.model.load().await?;
    let template = ChatTemplate::select(
        args.model.chat_template.as_deref(),
        loaded.chat_template.as_deref(),
    )?;
    let special = loaded.special_tokens();
    let eos = *loaded
        .stop_token_ids(&template)
        .first()
        .context("the model has no EOS token")?;
    let tok = Tokenization {
        tokenizer: &loaded.tokenizer,
        template: &template,
        special: &special,
        eos,
        max_seq_len: args.max_seq_len,
        format: match args.format {
            FormatArg::Auto => Format::Auto,
            FormatArg::Alpaca => Format::Alpaca,
            FormatArg::Chat => Format::Chat,
        },
    };
    let data = Dataset::load(&args.data, &tok, args.skip_bad_lines)?;
    let (data, eval) = match &args.eval_data {
        Some(p) => (data, Some(Dataset::load(p, &tok, args.skip_bad_lines)?)),
        None if args.eval_split > 0.0 => {
            let (t, e) = data.split(args.eval_split, args.seed);
            (t, Some(e))
        }
        None => (data, None),
    };
    eprintln!(
        "{} training examples ({} skipped){}",
        data.examples.len(),
        data.skipped,
        eval.as_ref()
            .map(|e| format!(", {} for evaluation", e.examples.len()))
            .unwrap_or_default()
    );
    let cfg = crate::train::TrainConfig {
        output: args.output.clone(),
        overwrite: args.overwrite,
        resume: args.resume,
        spec: TrainSpec {
            method: match args.method {
                MethodArg::Lora => Method::Lora,
                MethodArg::Dora => Method::Dora,
                MethodArg::Ia3 => Method::Ia3,
                MethodArg::PromptTuning => Method::PromptTuning,
                MethodArg::PrefixTuning => Method::PrefixTuning,
                MethodArg::Bottleneck => {
                    use crate::adapters::config::BnKind;
                    Method::Bottleneck(match args.bn_config {
                        BnConfigArg::Seq => BnKind::Seq,
                        BnConfigArg::Double => BnKind::Double,
                        BnConfigArg::Parallel => BnKind::Parallel,
                    })
                }
                MethodArg::Fusion => Method::Fusion,
            },
            virtual_tokens: args.num_virtual_tokens,
            reduction_factor: args.reduction_factor,
            prefix_projection: args.prefix_projection.then_some(args.encoder_hidden_size),
            fuse: args.fuse.clone(),
            rank: args.rank,
            alpha: args.alpha,
            dropout: args.dropout,
            targets,
            rslora: args.rslora,
            seed: args.seed,
            base_model: loaded.id.clone(),
        },
        lr: args.lr,
        weight_decay: args.weight_decay,
        betas: (args.beta1, args.beta2),
        schedule: match args.scheduler {
            SchedulerArg::Cosine => Schedule::Cosine,
            SchedulerArg::Linear => Schedule::Linear,
            SchedulerArg::Constant => Schedule::Constant,
        },
        warmup_ratio: args.warmup_ratio,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        epochs: args.epochs,
        max_steps: args.max_steps,
        save_steps: args.save_steps,
        progress: true,
        args: serde_json::json!({
            "data": args.data, "eval_data": args.eval_data, "eval_split": args.eval_split, "method": format!("{:?}", args.method).to_lowercase(),
            "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "target_modules": args.target_modules, "rslora": args.rslora,
            "lr": args.lr, "weight_decay": args.weight_decay, "betas": [args.beta1, args.beta2], "scheduler": format!("{:?}", args.scheduler).to_lowercase(),
            "warmup_ratio": args.warmup_ratio, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_grad_norm": args.max_grad_norm,
            "epochs": args.epochs, "max_steps": args.max_steps, "save_steps": args.save_steps, "max_seq_len": args.max_seq_len, "seed": args.seed,
            "base_model": loaded.id,
        }),
        interrupt_after: None,
    };
    let report = tokio::task::spawn_blocking(move || {
        crate::train::train(&loaded.model, &data, eval.as_ref(), &cfg)
    })
    .await??;
    eprintln!(
        "trained {} steps in {:.0} s ({:.0} tokens/s): loss {:.4} -> {:.4}{}; wrote {}",
        report.steps,
        report.seconds,
        report.tokens_per_second,
        report.first_loss,
        report.final_loss,
        report
            .eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        args.output.display()
    );
    if let Some(url) = &args.register {
        let name = args
            .output
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .context("`--output` has no folder name")?;
        let path = std::fs::canonicalize(&args.output)?;
        // By path (admins; the server's allow-list applies); a tenant's key may not name paths,
        // so it registers by name the adapter its namespace holds (an `--output` inside the
        // server's adapters directory).
        let client = reqwest::Client::new();
        let post = |body: serde_json::Value| {
            let mut req = client
                .post(format!("{}/v1/adapters", url.trim_end_matches('/')))
                .json(&body);
            if let Some(k) = &args.api_key {
                req = req.bearer_auth(k);
            }
            async move {
                let resp = req
                    .send()
                    .await
                    .with_context(|| format!("`--register`: cannot reach {url}"))?;
                let status = resp.status();
                Ok::<_, anyhow::Error>((status, resp.text().await.unwrap_or_default()))
            }
        };
        let (mut status, mut body) = post(serde_json::json!({"name": name, "path": path})).await?;
        if status == reqwest::StatusCode::FORBIDDEN && body.contains("\"param\":\"path\"") {
            (status, body) = post(serde_json::json!({"name": name})).await?;
        }
        if !status.is_success() {
            bail!("`--register`: {url} answered {status}: {body}");
        }
        eprintln!("registered as `{name}` at {url}");
    }
    Ok(())
}

impl Cli {
    /// `--threads` of whichever command runs.
    pub fn threads(&self) -> Option<usize> {
        match &self.command {
            Some(Command::Train(a)) => a.model.threads,
            Some(Command::Generate(a)) => a.model.threads,
            Some(Command::Merge(a)) => a.model.threads,
            None => self.serve.model.threads,
        }
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Train(args)) => run_train(args).await,
        Some(Command::Generate(args)) => run_generate(args).await,
        Some(Command::Merge(args)) => run_merge(args).await,
        None => run_server(cli.serve).await,
    }
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
