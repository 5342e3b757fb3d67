//! `serve merge`: base + adapter written as one model directory.

use super::*;

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
