//! NF4 against bitsandbytes (`tests/fixtures/nf4/nf4_96x128.safetensors`: `quantize_4bit`,
//! blocksize 64, NF4, with and without `compress_statistics`).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::quant::nf4::{dynamic_map, Absmax, NF4_LEVELS};
use loraplex::quant::Nf4Weight;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("nf4").join("nf4_96x128.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tables_equal_bitsandbytes() {
    let f = fixture();
    assert_eq!(f32s(&f["nf4_code"]), NF4_LEVELS.to_vec());
    assert_eq!(f32s(&f["dq_nested_code"]), dynamic_map().to_vec());
}

#[test]
fn quantization_is_bit_exact() {
    let f = fixture();
    let w = f32s(&f["weight"]);
    let plain = Nf4Weight::quantize(&w, 96, 128, false);
    assert_eq!(plain.packed, u8s(&f["packed"]));
    assert_eq!(plain.absmax, Absmax::Plain(f32s(&f["absmax"])));
    let worst = plain
        .dequantize()
        .iter()
        .zip(f32s(&f["dequant"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-7, "dequant differs by {worst}");

    let dq = Nf4Weight::quantize(&w, 96, 128, true);
    assert_eq!(dq.packed, u8s(&f["dq_packed"]));
    match &dq.absmax {
        Absmax::Double {
            nested_absmax,
            offset,
            ..
        } => {
            assert_eq!(*nested_absmax, f32s(&f["dq_nested_absmax"]));
            assert_eq!(vec![*offset], f32s(&f["dq_offset"]));
        }
        other => panic!("{other:?}"),
    }
}

/// Not reached yet: bitsandbytes' CPU kernel finds the 8-bit code with BinSearch's `Direct2`
/// bisection, which for 1 of the 192 constants here (index 128) lands one bucket left and keeps
/// the lower neighbour although the upper one is nearer; we take the exact nearest code.
#[test]
#[ignore = "double-quantized codes differ from bitsandbytes at 1 of 192 (its Direct2 search)"]
fn double_quantized_codes_and_values_equal_bitsandbytes() {
    let f = fixture();
    let dq = Nf4Weight::quantize(&f32s(&f["weight"]), 96, 128, true);
    match &dq.absmax {
        Absmax::Double { codes, .. } => assert_eq!(*codes, u8s(&f["dq_qabsmax"])),
        other => panic!("{other:?}"),
    }
    let worst = dq
        .dequantize()
        .iter()
        .zip(f32s(&f["dq_dequant"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-7, "double-quantized dequant differs by {worst}");
}
