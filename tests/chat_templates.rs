//! The real chat templates of each family's instruct model (Llama 3.1/3.2/3.3, Mistral Nemo,
//! Qwen2.5, Qwen3, Gemma 2, Phi-3.5), copied into `tests/fixtures/chat_templates/` as data,
//! render exactly as transformers' `apply_chat_template` renders them (made by
//! `make_chat_templates.py`), token for token through the families' fixture tokenizer, and
//! refuse what the template itself refuses, with its message.

use std::collections::BTreeMap;
use std::path::PathBuf;

use loraplex::chat::{strftime, ChatMessage, ChatTemplate, SpecialTokens};
use loraplex::tokenizer::Tokenizer;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn template(name: &str) -> ChatTemplate {
    let src = std::fs::read_to_string(dir().join(format!("{name}.jinja"))).unwrap();
    ChatTemplate::new(name, &src)
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn special(case: &Value) -> SpecialTokens {
    SpecialTokens {
        bos_token: case["bos_token"].as_str().map(str::to_string),
        eos_token: case["eos_token"].as_str().map(str::to_string),
    }
}

fn render(case: &Value, date: bool) -> Result<String, String> {
    let mut vars = BTreeMap::new();
    if date {
        vars.insert(
            "date_string".to_string(),
            minijinja::Value::from(case["date_string"].as_str().unwrap()),
        );
    }
    template(case["template"].as_str().unwrap())
        .render_with(
            &messages(case),
            case["add_generation_prompt"].as_bool().unwrap(),
            &special(case),
            &vars,
        )
        .map_err(|e| e.to_string())
}

#[test]
fn every_family_template_renders_as_transformers_token_for_token() {
    let tokenizer = Tokenizer::from_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/families/qwen2/tokenizer.json"),
    )
    .unwrap();
    let mut checked = BTreeMap::<String, usize>::new();
    for case in cases() {
        let what = format!("{} / {}", case["template"], case["conversation"]);
        let got = render(&case, true);
        if let Some(error) = case["error"].as_str() {
            let e = got.expect_err(&what);
            assert!(e.contains(error), "{what}: {e} does not carry {error:?}");
            assert!(
                e.contains(case["template"].as_str().unwrap()),
                "{what}: {e}"
            );
            continue;
        }
        let text = got.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(&text).unwrap(), ids, "{what}");
        *checked
            .entry(case["template"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(checked.len(), 8, "{checked:?}");
    assert!(checked.values().all(|&n| n >= 3), "{checked:?}");
}

#[test]
fn llama_templates_date_their_header_today_with_strftime_now() {
    // Without `date_string` the Llama 3.2/3.3 templates call transformers' `strftime_now`: the
    // text is the reference's with today's date in its place.
    let mut seen = 0;
    for case in cases() {
        let name = case["template"].as_str().unwrap();
        if !name.starts_with("llama-3.") || case["error"].is_string() {
            continue;
        }
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let got = render(&case, false).unwrap();
        let want = case["text"].as_str().unwrap();
        let fixed = case["date_string"].as_str().unwrap();
        if !want.contains(fixed) {
            continue;
        }
        let src = std::fs::read_to_string(dir().join(format!("{name}.jinja"))).unwrap();
        if src.contains("strftime_now") {
            let today = strftime("%d %b %Y", before);
            assert_eq!(got, want.replace(fixed, &today), "{name}");
            seen += 1;
        } else {
            assert_eq!(got, want, "{name}: no strftime_now, its own default date");
        }
    }
    assert!(seen > 0, "no template used strftime_now");
}
