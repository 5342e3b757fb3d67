//! Bad adapters get a clear error that names the file, module or field; nothing panics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::adapters::{bind, locate, AdapterName, BindOptions, PeftAdapter, Registry};

fn copy_adapter(name: &str, dst: &Path) -> PathBuf {
    let src = tiny_dir().join("adapters").join(name);
    let dir = dst.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_and_bind(dir: &Path, max_rank: usize) -> String {
    let loaded = load_tiny();
    match PeftAdapter::load(dir) {
        Err(e) => e.to_string(),
        Ok(p) => bind(
            &p,
            &loaded.model,
            &BindOptions {
                max_rank,
                ..Default::default()
            },
        )
        .map(|_| String::from("ok"))
        .unwrap_or_else(|e| e.to_string()),
    }
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_or_malformed_config_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    std::fs::write(dir.join("adapter_config.json"), "{\"r\": 4,").unwrap();
    let e = load_and_bind(&dir, 256);
    assert!(
        e.contains("adapter_config.json") && e.contains("JSON"),
        "{e}"
    );
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    let e = load_and_bind(&dir, 256);
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn pickle_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    std::fs::rename(
        dir.join("adapter_model.safetensors"),
        dir.join("adapter_model.bin"),
    )
    .unwrap();
    let e = load_and_bind(&dir, 256);
    assert!(
        e.contains("adapter_model.bin") && e.contains("pickle") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_and_bind(&dir, 256);
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn shapes_that_do_not_fit_name_the_module_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    let path = dir.join("adapter_model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    tensors.insert(
        key.into(),
        Tensor::zeros((4, 48), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_and_bind(&dir, 256);
    assert!(
        e.contains("model.layers.1.self_attn.v_proj")
            && e.contains("[4, 48]")
            && e.contains("[32, 64]"),
        "{e}"
    );
}

#[test]
fn a_target_module_the_model_lacks_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    edit_config(&dir, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "c_attn"])
    });
    let e = load_and_bind(&dir, 256);
    assert!(
        e.contains("`target_modules`") && e.contains("c_attn"),
        "{e}"
    );
}

#[test]
fn rank_above_the_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r8-all", tmp.path());
    let e = load_and_bind(&dir, 4);
    assert!(e.contains("`r`") && e.contains("--max-lora-rank 4"), "{e}");
}

#[test]
fn unsupported_options_say_so() {
    for (field, value) in [
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("fan_in_fan_out", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_adapter("lora-r4-qv", tmp.path());
        edit_config(&dir, |v| v[field] = value.clone());
        let e = load_and_bind(&dir, 256);
        assert!(
            e.contains(&format!("`{field}`")) && e.contains("supported"),
            "{e}"
        );
    }
}

#[test]
fn dora_without_magnitudes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_adapter("lora-r4-qv", tmp.path());
    edit_config(&dir, |v| v["use_dora"] = serde_json::json!(true));
    let e = load_and_bind(&dir, 256);
    assert!(e.contains("lora_magnitude_vector is missing"), "{e}");
}

#[test]
fn path_tricks_in_names_are_refused_and_unknown_names_are_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter("lora-r4-qv", tmp.path());
    let reg = Registry::new(tmp.path());
    assert!(locate("lora-r4-qv", &reg).is_ok());
    // Names (as clients send them) are checked before any file is touched.
    for bad in ["../adapters", "a/b/c", "..", "x/../../etc", "/etc/passwd"] {
        let e = AdapterName::parse(bad)
            .and_then(|n| reg.get(&n))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid adapter name"), "{bad}: {e}");
    }
    // On the command line a directory is taken as given; one without a config is named.
    let e = locate(tmp.path().to_str().unwrap(), &reg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    let e = locate("nope", &reg).unwrap_err().to_string();
    assert_eq!(e, "adapter `nope` not found");
}

#[test]
fn hub_adapters_come_from_the_cache_or_fail_naming_the_hub() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--acme--qv");
    let snap = repo.join("snapshots").join("feedbeef");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    copy_adapter("lora-r4-qv", snap.parent().unwrap());
    std::fs::rename(snap.parent().unwrap().join("lora-r4-qv"), &snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "feedbeef").unwrap();
    let cfg = loraplex::model::source::SourceConfig {
        home: home.path().to_path_buf(),
        hub_endpoint: "http://127.0.0.1:9".into(),
        pypi_index: String::new(),
    };
    // The operator's hf-hub cache serves admins (token holders) only.
    let opts = loraplex::adapters::hub::HubOptions {
        use_token: true,
        max_bytes: 1 << 30,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = rt
        .block_on(loraplex::adapters::hub::fetch(
            "acme/qv",
            &cfg,
            &opts,
            |_| Ok(()),
        ))
        .unwrap();
    assert_eq!(load_and_bind(&dir, 256), "ok");
    let e = rt
        .block_on(loraplex::adapters::hub::fetch(
            "acme/missing",
            &cfg,
            &opts,
            |_| Ok(()),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("acme/missing") && e.contains("http://127.0.0.1:9"),
        "{e}"
    );
    let e = rt
        .block_on(loraplex::adapters::hub::fetch("../x", &cfg, &opts, |_| {
            Ok(())
        }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid adapter name"), "{e}");
}
