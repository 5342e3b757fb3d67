//! `serve generate`: one prompt or chat turn, printed as it is generated.

use super::*;
use crate::engine::generate;

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
            ..SamplingParams::default()
        },
        ..GenerationConfig::default()
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
