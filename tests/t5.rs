//! T5 (ChatLM-mini-Chinese's architecture) in the engine: tiny random checkpoints written by
//! transformers (`tools/t5_reference.py write`, committed under `tests/data/hf_tiny/t5*`)
//! load with `--init` and give transformers' logits, loss and greedy generation; a T5 plan
//! trains on prompt/response Parquet from random weights and from `--init`, resumes
//! bit-exactly, samples, and exports a folder transformers loads.

#![cfg(feature = "engine")]

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use vramplan::engine::sft::{Encoder, Micro};
use vramplan::engine::{hf, model::Model, t5};

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf_tiny")
        .join(case)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// The reference's inputs as the engine's micro-batch: the encoder's ids and mask, the
/// decoder reading the labels shifted right behind 0 (-100 read as the pad 0, as
/// transformers' `_shift_right` does), the labels weighted 0 where -100.
fn micro(r: &Value) -> (Micro, usize) {
    let (enc, mask, labels) = (
        ints(&r["encoder_ids"]),
        ints(&r["encoder_mask"]),
        ints(&r["labels"]),
    );
    let b = enc.len();
    let flat_u32 = |rows: &[Vec<i64>]| -> Vec<u32> {
        rows.iter().flatten().map(|&x| x.max(0) as u32).collect()
    };
    let shifted: Vec<Vec<i64>> = labels
        .iter()
        .map(|l| {
            std::iter::once(0)
                .chain(l[..l.len() - 1].iter().copied())
                .collect()
        })
        .collect();
    let w: Vec<f32> = labels
        .iter()
        .flatten()
        .map(|&x| (x >= 0) as u8 as f32)
        .collect();
    let keep: Vec<f32> = mask.iter().flatten().map(|&x| x as f32).collect();
    let (ne, nd) = (enc.len() * enc[0].len(), labels.len() * labels[0].len());
    let cpu = Device::Cpu;
    let count = w.iter().filter(|&&x| x > 0.0).count();
    let m = Micro {
        ids: Tensor::from_vec(flat_u32(&shifted), nd, &cpu).unwrap(),
        targets: Tensor::from_vec(flat_u32(&labels), nd, &cpu).unwrap(),
        weights: Some(Tensor::from_vec(w, nd, &cpu).unwrap()),
        count,
        encoder: Some(Encoder {
            ids: Tensor::from_vec(flat_u32(&enc), ne, &cpu).unwrap(),
            keep: Tensor::from_vec(keep, ne, &cpu).unwrap(),
        }),
    };
    (m, b)
}

/// The largest |engine − reference| over every logit of every decoder position.
fn max_diff(got: &[Vec<f32>], want: &Value) -> f32 {
    let want: Vec<Vec<f32>> = want
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|ex| ex.as_array().unwrap().iter())
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn argmax(z: &[f32]) -> u32 {
    z.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// The logits, the mean loss and the greedy generation of `model` on reference `r`.
fn outputs(model: &Model, r: &Value) -> (f32, f64, Vec<u32>) {
    let (m, b) = micro(r);
    let diff = max_diff(&t5::logits(model, &m, b).unwrap(), &r["logits"]);
    let loss = t5::eval_loss_sum(model, &m, b, 7).unwrap() / m.count as f64;
    let prompt: Vec<u32> = ints(&r["encoder_ids"])[0]
        .iter()
        .map(|&x| x as u32)
        .collect();
    let n = r["generated"].as_array().unwrap().len() - 1;
    let gen = t5::generate(model, &prompt, n, argmax).unwrap();
    (diff, loss, gen)
}

fn generated(r: &Value) -> Vec<u32> {
    r["generated"].as_array().unwrap()[1..]
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logits_loss_and_generation_equal_transformers() {
    // Reference: tests/data/hf_tiny/t5*/reference.json, tools/t5_reference.py (transformers
    // 5.24.0, torch 2.15.0, eager attention, f32): 2 + 2 layers, d_model 64, 4 heads of 16,
    // ReLU (ChatLM-mini-Chinese's) and gated-GELU feed-forwards, 32 buckets up to distance
    // 20; two examples, the second's encoder padded and its labels -100 after 13.
    for case in ["t5", "t5_gated"] {
        let r = json(&data(case).join("reference.json"));
        let (_, model) = hf::load_model(&data(case)).unwrap();
        let (diff, loss, gen) = outputs(&model, &r);
        assert!(diff <= 1e-4, "{case}: max |engine − transformers| = {diff}");
        let want = r["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-5, "{case}: loss {loss} vs {want}");
        assert_eq!(gen, generated(&r), "{case}: greedy generation");
    }
}
