//! Checkpoints on a disk that fills up, with a flipped bit, and pruned by validation loss.

use super::*;
use crate::engine::rng::Rng;
use vramplan_planner::{Arch, ModelSpec};

fn model() -> Model {
    let spec = ModelSpec {
        name: "tiny".into(),
        arch: Arch::Llama,
        hidden_size: 8,
        num_layers: 1,
        num_decoder_layers: 0,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        intermediate_size: 12,
        vocab_size: 16,
        tie_embeddings: true,
        max_positions: 0,
        gated_ffn: false,
        features: Default::default(),
    };
    Model::new(
        &spec,
        DType::F32,
        DType::F32,
        &Device::Cpu,
        &mut Rng::new(1),
    )
    .unwrap()
}

fn meta(step: u64, val_loss: Option<f64>) -> Meta {
    Meta {
        step,
        data_rng: 7,
        data_position: None,
        adam_t: step,
        seed: 0,
        plan: "[model]\n".into(),
        plan_hash: plan_hash("[model]\n"),
        data: "built-in".into(),
        total_steps: 10,
        learning_rate: 1e-3,
        last_loss: 1.0,
        val_loss,
        train_on: None,
        tokenizer: false,
        checksums: BTreeMap::new(),
        hf_config: None,
        init: None,
    }
}

fn folder(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vramplan-ckpt-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const KEEP: Keep = Keep { last: 3, best: 0 };

/// Stands in for a disk with 1,000 bytes free: the write past them fails as ENOSPC does.
struct Full<'w> {
    inner: &'w mut dyn Write,
    left: usize,
}

impl Write for Full<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.left {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        self.left -= buf.len();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn full<'w>(w: &'w mut dyn Write) -> Box<dyn Write + 'w> {
    Box::new(Full {
        inner: w,
        left: 1000,
    })
}

#[test]
fn a_full_disk_names_the_file_and_leaves_no_temporary() {
    let out = folder("full");
    let (m, opt) = (model(), AdamW::new());
    save(&out, &m, &opt, &meta(2, None), KEEP).unwrap();
    let e = save_with(&out, &m, &opt, &meta(4, None), KEEP, full).unwrap_err();
    match &e {
        Error::Io { path, error } => {
            assert_eq!(error.kind(), std::io::ErrorKind::StorageFull);
            assert_eq!(
                path,
                &out.join("ckpt-00000004").join(STATE).display().to_string()
            );
        }
        other => panic!("not an I/O error: {other:?}"),
    }
    assert_eq!(names(&out), vec!["ckpt-00000002"], "{e}");
    assert_eq!(latest(&out).unwrap().meta.step, 2);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_flipped_bit_is_caught_and_the_previous_checkpoint_loads() {
    let out = folder("flip");
    let (m, opt) = (model(), AdamW::new());
    save(&out, &m, &opt, &meta(2, None), KEEP).unwrap();
    let newest = save(&out, &m, &opt, &meta(4, None), KEEP).unwrap();
    let path = newest.join(STATE);
    let mut bytes = std::fs::read(&path).unwrap();
    // A bit of the last tensor's data, past the header: the file still parses.
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    assert!(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).is_ok());
    let e = read(&newest).err().expect("the flipped bit is detected");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert_eq!(latest(&out).unwrap().meta.step, 2);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_checkpoint_reads_back_exactly() {
    let out = folder("exact");
    let (m, opt) = (model(), AdamW::new());
    let dir = save(&out, &m, &opt, &meta(3, Some(2.5)), KEEP).unwrap();
    let l = read(&dir).unwrap();
    assert_eq!(l.meta.step, 3);
    assert_eq!(l.meta.val_loss, Some(2.5));
    for (n, v) in &m.params {
        let a = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = l.tensors[n]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{n}");
        assert_eq!(v.as_tensor().dims(), l.tensors[n].dims(), "{n}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn pruning_keeps_the_newest_and_the_best() {
    let out = folder("best");
    let (m, opt) = (model(), AdamW::new());
    let keep = Keep { last: 2, best: 2 };
    for (step, val) in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 0.5), (5, 4.0), (6, 5.0)] {
        save(&out, &m, &opt, &meta(step, Some(val)), keep).unwrap();
    }
    // The newest two (5, 6) and the two lowest losses (4: 0.5, 2: 1.0).
    assert_eq!(
        names(&out),
        vec![
            "ckpt-00000002",
            "ckpt-00000004",
            "ckpt-00000005",
            "ckpt-00000006"
        ]
    );
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn resume_says_when_train_on_changes() {
    use crate::engine::rundir::{check_resume, Asked};
    let mut m = meta(3, None);
    let asked = |train_on| Asked {
        plan: "[model]\n",
        seed: 0,
        lr: 1e-3,
        steps: 10,
        train_on,
    };
    let dir = Path::new("run");
    // A checkpoint written before the choice was kept says nothing.
    assert!(check_resume(dir, &m, &asked("all")).unwrap().is_empty());
    m.train_on = Some("response".into());
    assert!(check_resume(dir, &m, &asked("response"))
        .unwrap()
        .is_empty());
    assert_eq!(
        check_resume(dir, &m, &asked("all")).unwrap(),
        ["--train-on all (was response)"]
    );
}
