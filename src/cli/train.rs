//! `serve train`: fine-tune an adapter from a JSONL file, and register it with a server.

use super::*;

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
    /// Train on a GGUF's quantized weights as stored (the serving kernels forward, the
    /// dequantized weight for the input gradient), as the server's fine-tuning jobs do, instead
    /// of on an f32 copy. Other numerics than the default; less memory.
    #[arg(long)]
    pub stored_weights: bool,
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
    /// Comma-separated projections, or `all-linear` (PEFT's shorthand for all seven; the default).
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
    /// Tokens one forward/backward holds: a batch is split into micro-batches within it and
    /// their gradients summed (the same update), bounding memory (default: one micro-batch per
    /// `--batch-size` examples, whatever their length). At least `--max-seq-len`.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Keep only each layer's input in the forward and recompute the layer in the backward:
    /// less memory per token for about a third more compute.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Where stderr is not a terminal, a progress line at least this many seconds apart.
    #[arg(long, default_value_t = 10)]
    pub progress_interval: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Load the new adapter into this running server when training ends.
    #[arg(long)]
    pub register: Option<String>,
    #[arg(long)]
    pub api_key: Option<String>,
}

pub async fn run_train(args: TrainArgs) -> Result<()> {
    use crate::train::{
        dataset::Tokenization, optim::Schedule, trainable::TrainSpec, Dataset, Format, Method,
    };
    if args.max_batch_tokens.is_some_and(|b| b < args.max_seq_len) {
        bail!(
            "`--max-batch-tokens` must be at least `--max-seq-len` ({})",
            args.max_seq_len
        );
    }
    if !matches!(args.model.dtype, DTypeArg::F32 | DTypeArg::Auto) {
        bail!("`--dtype`: training runs in f32");
    }
    if args.stored_weights && (args.model.dtype == DTypeArg::F32 || args.model.quantize.is_some()) {
        bail!("`--stored-weights` trains on a GGUF's weights as stored; it excludes `--dtype f32` and `--quantize`");
    }
    // f32 (or NF4 from it) unless asked to train on the stored GGUF weights.
    let mut args = args;
    if !args.stored_weights {
        args.model.dtype = DTypeArg::F32;
    }
    // `all-linear` is PEFT's shorthand for every linear layer but the head: the seven projections.
    let targets = if args.target_modules.iter().any(|t| t == "all-linear") {
        if args.target_modules.len() > 1 {
            bail!(
                "`--target-modules`: `all-linear` stands alone (it already names every projection)"
            );
        }
        crate::model::Proj::ALL.to_vec()
    } else {
        use crate::model::Proj;
        let mut targets: Vec<Proj> = Vec::new();
        for t in &args.target_modules {
            // The fused modules' names (Phi-3's) name their parts.
            let parts = match t.as_str() {
                "qkv_proj" => vec![Proj::Q, Proj::K, Proj::V],
                "gate_up_proj" => vec![Proj::Gate, Proj::Up],
                _ => vec![Proj::from_short(t).with_context(|| format!("`--target-modules`: unknown projection `{t}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, qkv_proj, gate_up_proj, or all-linear)"))?],
            };
            for p in parts {
                if !targets.contains(&p) {
                    targets.push(p);
                }
            }
        }
        targets
    };
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
        cancel: None,
        on_step: None,
        epoch_checkpoints: None,
        max_batch_tokens: args.max_batch_tokens,
        checkpoint_activations: args.checkpoint_activations,
        keep_checkpoint: false,
        keep_epoch_checkpoints: None,
        progress_every: std::time::Duration::from_secs(args.progress_interval),
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
