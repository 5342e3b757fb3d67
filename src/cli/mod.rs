//! Command line: clap arguments and the commands they run, one file per command (`serve`,
//! `generate`, `merge`, `train`); the model flags they share are here. The only place that uses
//! `anyhow`.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::adapters::{bind, locate, merge::merge, BindOptions, PeftAdapter, Registry};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{GenerationConfig, SamplingParams};
use crate::model::source::SourceConfig;
use crate::model::AdapterWeights;
use crate::model::{load_model, LoadedModel, ModelOptions, ModelSource};

mod generate;
mod merge;
mod serve;
mod train;

pub use generate::{run_generate, GenerateArgs};
pub use merge::{run_merge, MergeArgs};
pub use serve::{build_state, run_server, KvDtypeChoice, ServeArgs};
pub use train::{run_train, BnConfigArg, FormatArg, MethodArg, SchedulerArg, TrainArgs};

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
