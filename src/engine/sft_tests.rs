//! SFT's loss (f64): normalised over the response tokens of the whole optimizer step, so
//! accumulation gives the gradients of one big micro-batch, and the prompt's and the
//! padding's targets contribute exactly nothing.

use super::model::Model;
use super::probe::NoProbe;
use super::rng::Rng;
use super::sft::{rows, step_grads, Example, Micro};
use super::step::{self, Grads, Opts};
use candle_core::{DType, Device, Tensor};
use vramplan_planner::{Arch, ModelSpec};

const T: usize = 6;
const VOCAB: u32 = 16;

fn model() -> Model {
    let spec = ModelSpec {
        name: "tiny-llama".into(),
        arch: Arch::Llama,
        hidden_size: 8,
        num_layers: 2,
        num_decoder_layers: 0,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        intermediate_size: 12,
        vocab_size: VOCAB as u64,
        tie_embeddings: true,
        max_positions: 0,
        gated_ffn: false,
        features: Default::default(),
    };
    Model::new(
        &spec,
        DType::F64,
        DType::F64,
        &Device::Cpu,
        &mut Rng::new(3),
    )
    .unwrap()
}

/// An example of `len` random tokens whose first `prompt` are the prompt.
fn example(seed: u64, len: usize, prompt: usize) -> Example {
    let mut r = Rng::new(seed);
    Example {
        tokens: (0..len).map(|_| r.below(VOCAB as usize) as u32).collect(),
        loss: (0..len).map(|i| i >= prompt).collect(),
        bytes: 0,
    }
}

/// Four examples whose responses differ in length: 5, 4, 1 and 2 targets.
fn examples() -> Vec<Example> {
    vec![
        example(1, 7, 2),
        example(4, 7, 3),
        example(2, 4, 3),
        example(3, 5, 3),
    ]
}

fn opts(chunk: usize, checkpoint: bool) -> Opts {
    Opts {
        chunk,
        checkpoint,
        scale: 0.0,
    }
}

fn max_diff(a: &Grads, b: &Grads) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(n, g)| {
            let d = (g - &b[n]).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f64>().unwrap()
        })
        .fold(0.0, f64::max)
}

#[test]
fn accumulation_gives_the_gradients_of_one_micro_batch_of_all_rows() {
    let m = model();
    let ex = examples();
    let two = vec![rows(&ex[..2], T).unwrap(), rows(&ex[2..], T).unwrap()];
    assert_eq!((two[0].count, two[1].count), (9, 3));
    let one = vec![rows(&ex, T).unwrap()];
    let (l2, g2) = step_grads(&m, two, 2, opts(5, true), &NoProbe).unwrap();
    let (l1, g1) = step_grads(&m, one, 4, opts(4 * T, false), &NoProbe).unwrap();
    assert!((l1 - l2).abs() < 1e-12, "{l1} vs {l2}");
    assert!(max_diff(&g1, &g2) < 1e-12);
    // A mean of the micro-batches' means weighs examples otherwise: the test would see it.
    let m4: Vec<Micro> = ex
        .iter()
        .map(|e| rows(std::slice::from_ref(e), T).unwrap())
        .collect();
    let counts: Vec<usize> = m4.iter().map(|m| m.count).collect();
    assert_eq!(counts, [5, 4, 1, 2]);
    let means: f64 = m4
        .into_iter()
        .map(|x| {
            step_grads(&m, vec![x], 1, opts(T, false), &NoProbe)
                .unwrap()
                .0
        })
        .sum::<f64>()
        / 4.0;
    assert!((means - l1).abs() > 1e-3, "{means} vs {l1}");
}

/// The cross-entropy of each position of one row, by hand from the logits.
fn by_hand(m: &Model, e: &Example) -> f64 {
    let n = e.tokens.len() - 1;
    let ids = Tensor::from_vec(e.tokens[..n].to_vec(), n, &Device::Cpu).unwrap();
    let z = step::all_logits(m, &ids).unwrap();
    let (mut sum, mut count) = (0.0, 0);
    for j in 0..n {
        if !e.loss[j + 1] {
            continue;
        }
        let row: Vec<f64> = z[j].iter().map(|&v| v as f64).collect();
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        sum += lse - row[e.tokens[j + 1] as usize];
        count += 1;
    }
    sum / count as f64
}

#[test]
fn prompt_and_padding_targets_contribute_nothing() {
    let m = model();
    let e = example(4, 7, 3);
    let micro = rows(std::slice::from_ref(&e), T).unwrap();
    let (loss, g) = step_grads(&m, vec![micro], 1, opts(T, true), &NoProbe).unwrap();
    assert!((loss - by_hand(&m, &e)).abs() < 1e-5, "{loss}");
    // Other labels where the weight is 0 (prompt, padding): the very same gradients.
    let mut micro = rows(std::slice::from_ref(&e), T).unwrap();
    let w = micro.weights.as_ref().unwrap().to_vec1::<f32>().unwrap();
    let y: Vec<u32> = micro.targets.to_vec1::<u32>().unwrap();
    let changed: Vec<u32> = y
        .iter()
        .zip(&w)
        .map(|(&t, &w)| if w == 0.0 { (t + 7) % VOCAB } else { t })
        .collect();
    assert_ne!(changed, y);
    micro.targets = Tensor::from_vec(changed, T, &Device::Cpu).unwrap();
    let (again, g2) = step_grads(&m, vec![micro], 1, opts(T, true), &NoProbe).unwrap();
    assert_eq!(again, loss);
    assert_eq!(max_diff(&g, &g2), 0.0);
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    use super::sft::{Formatter, TrainOn};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat");
    for (case, eos) in [("smollm2", "<|im_end|>"), ("blocks", "</s>")] {
        let dir = root.join(case);
        let f = Formatter::load(Some(&dir.join("tokenizer.json")), TrainOn::Response).unwrap();
        assert!(f.has_template(), "{case}");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        for row in expected.as_array().unwrap() {
            let s = |k: &str| row[k].as_str().unwrap();
            let (text, span) = f.render(case, s("prompt"), s("response")).unwrap();
            assert_eq!(text, s("full"), "{case}");
            // The loss covers the assistant's content and its end of turn only.
            assert_eq!(&text[..span.start], s("head"), "{case}");
            assert_eq!(&text[span], format!("{}{eos}", s("response")), "{case}");
        }
    }
}
