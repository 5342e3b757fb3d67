//! Chat templates: Hugging Face Jinja templates rendered with minijinja (with the same
//! `trim_blocks`/`lstrip_blocks` settings transformers uses), plus the templates shipped in
//! `chat_templates/`. A leaf: imports nothing of the crate.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "chat template `{name}` is not a shipped template ({known}) nor a readable file: {message}"
    )]
    Unknown {
        name: String,
        known: String,
        message: String,
    },
    #[error("chat template `{name}` failed to render: {message}")]
    Render { name: String, message: String },
}

/// One chat message; `content` is plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Templates shipped with the binary: `chat_templates/NAME.jinja`.
pub const BUILTIN: [(&str, &str); 4] = [
    ("chatml", include_str!("../chat_templates/chatml.jinja")),
    ("llama3", include_str!("../chat_templates/llama3.jinja")),
    ("mistral", include_str!("../chat_templates/mistral.jinja")),
    ("alpaca", include_str!("../chat_templates/alpaca.jinja")),
];

/// Tokens that end an assistant turn in common templates; the ones a template writes count as
/// end-of-sequence during generation.
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// Special tokens a template may refer to.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Where it came from: a shipped name, a path, or `model`.
    pub name: String,
    pub source: String,
}

impl ChatTemplate {
    pub fn new(name: &str, source: &str) -> Self {
        Self {
            name: name.to_string(),
            source: source.to_string(),
        }
    }

    /// `--chat-template NAME|PATH` if given, else the model's own, else ChatML.
    pub fn select(spec: Option<&str>, model_template: Option<&str>) -> Result<Self, ChatError> {
        match (spec, model_template) {
            (Some(spec), _) => Self::named_or_file(spec),
            (None, Some(own)) => Ok(Self::new("model", own)),
            (None, None) => Self::named_or_file("chatml"),
        }
    }

    fn named_or_file(spec: &str) -> Result<Self, ChatError> {
        if let Some((name, src)) = BUILTIN.iter().find(|(n, _)| *n == spec) {
            return Ok(Self::new(name, src));
        }
        match std::fs::read_to_string(Path::new(spec)) {
            Ok(src) => Ok(Self::new(spec, &src)),
            Err(e) => Err(ChatError::Unknown {
                name: spec.to_string(),
                known: BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                message: e.to_string(),
            }),
        }
    }

    /// End-of-turn tokens written by this template (generation stops at them).
    pub fn end_tokens(&self) -> Vec<&'static str> {
        END_OF_TURN
            .iter()
            .copied()
            .filter(|t| self.source.contains(t))
            .collect()
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String, ChatError> {
        self.render_with(
            messages,
            add_generation_prompt,
            special,
            &std::collections::BTreeMap::new(),
        )
    }

    /// `render` with more variables in the template's context (as `apply_chat_template`'s
    /// keyword arguments: `date_string`, `enable_thinking`, …).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokens,
        vars: &std::collections::BTreeMap<String, minijinja::Value>,
    ) -> Result<String, ChatError> {
        let err = |e: Error| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            ChatError::Render {
                name: self.name.clone(),
                message,
            }
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // transformers' `strftime_now` (Llama 3.x templates date their system header with it).
        env.add_function("strftime_now", |format: String| -> String {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            strftime(&format, now)
        });
        env.add_template("chat", &self.source).map_err(err)?;
        let tmpl = env.get_template("chat").map_err(err)?;
        let extra = minijinja::Value::from_serialize(vars);
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => special.bos_token.clone().unwrap_or_default(),
            eos_token => special.eos_token.clone().unwrap_or_default(),
            ..extra
        })
        .map_err(err)
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// Python's `strftime` for the UTC time `secs` after the epoch: `%d %m %Y %y %b %B %a %A %H %M
/// %S %j %%`; other directives are written as they are.
pub fn strftime(format: &str, secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][month as usize - 1];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        }
    }

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::select(Some("chatml"), None).unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "Hi")], true, &special())
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.end_tokens(), vec!["<|im_end|>"]);
    }

    #[test]
    fn mistral_folds_system_and_enforces_alternation() {
        let t = ChatTemplate::select(Some("mistral"), None).unwrap();
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
            ChatMessage::new("user", "Bye"),
        ];
        let out = t.render(&msgs, true, &special()).unwrap();
        assert_eq!(
            out,
            "<s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]"
        );
        let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let err = t.render(&bad, true, &special()).unwrap_err().to_string();
        assert!(
            err.contains("mistral") && err.contains("alternate"),
            "{err}"
        );
    }

    #[test]
    fn llama3_and_alpaca_render() {
        let t = ChatTemplate::select(Some("llama3"), None).unwrap();
        let sp = SpecialTokens {
            bos_token: Some("<|begin_of_text|>".into()),
            eos_token: None,
        };
        let out = t
            .render(&[ChatMessage::new("user", " Hi ")], true, &sp)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let a = ChatTemplate::select(Some("alpaca"), None).unwrap();
        let out = a
            .render(
                &[
                    ChatMessage::new("user", "Sum"),
                    ChatMessage::new("input", "1 2"),
                ],
                true,
                &special(),
            )
            .unwrap();
        assert_eq!(
            out,
            "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n"
        );
    }

    #[test]
    fn python_string_methods_and_loop_helpers_work() {
        let src = "{% for m in messages %}{% if loop.first %}[{% endif %}{{ m['content'].strip().upper() }}{% if loop.last %}]{% endif %}{% endfor %}";
        let t = ChatTemplate::new("inline", src);
        let out = t
            .render(
                &[
                    ChatMessage::new("user", " a "),
                    ChatMessage::new("user", "b "),
                ],
                false,
                &special(),
            )
            .unwrap();
        assert_eq!(out, "[AB]");
    }

    #[test]
    fn strftime_writes_pythons_dates() {
        // date -u -d @... +"%d %b %Y %A %j %H:%M:%S"
        assert_eq!(
            strftime("%d %b %Y %A %j %H:%M:%S", 1_721_952_000),
            "26 Jul 2024 Friday 208 00:00:00"
        );
        assert_eq!(
            strftime("%Y-%m-%d %a %B", 951_782_400),
            "2000-02-29 Tue February"
        );
        assert_eq!(strftime("%d/%m/%y %% %H:%M", 0), "01/01/70 % 00:00");
        assert_eq!(strftime("%j %F", 1_735_689_599), "366 %F");
    }

    #[test]
    fn errors_name_the_template() {
        let err = ChatTemplate::select(Some("/nonexistent/x.jinja"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x.jinja") && err.contains("chatml"),
            "{err}"
        );
        let broken = ChatTemplate::new("broken.jinja", "{% for %}");
        let err = broken
            .render(&[], false, &special())
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.jinja"), "{err}");
    }
}
