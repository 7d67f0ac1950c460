//! The extension point of the torch inventory: what one implementation's code keeps.
//!
//! The step's phases (`torch::play`) are the same for every PyTorch training script:
//! model state, forward, loss, backward, optimizer. What differs between implementations
//! of the same architecture (Hugging Face transformers, nanochat, torchtitan, torchtune)
//! is which tensors their forward saves and how large their temporaries are. That
//! difference is a [`Recipe`], a data table; an implementation is one file with a type
//! implementing [`Implementation`], chosen in `torch::implementation`. [`check`] says which
//! architectures each implementation models, eager and compiled.

use super::block::Block;
use crate::error::{quote, PlanError, Result};
use crate::spec::{Arch, Checkpointing, Choice, Implementation as Code, ModelSpec, TrainSpec};
use crate::timeline::Layout;

/// What an implementation keeps, as the phases play it.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Rotary tables made before the embedding and freed with the inputs.
    pub rope: Option<Layout>,
    /// The tensors the embedding makes, in order. The last one is the first block's
    /// input; the others stay saved until the embedding's backward.
    pub stem: Vec<(&'static str, Layout)>,
    /// Every block (T5: the encoder's).
    pub encoder: Block,
    /// T5's decoder blocks, which follow the `num_layers` encoder blocks.
    pub decoder: Option<Block>,
    /// What the final norm keeps for the head's backward, where it is not eager's
    /// (normalized input, and the head's input or its autocast copy).
    pub head: Option<Vec<(&'static str, Layout)>>,
}

impl Recipe {
    /// The block at index `l` of all blocks.
    pub fn block(&self, l: u64, encoder_layers: u64) -> &Block {
        match &self.decoder {
            Some(d) if l >= encoder_layers => d,
            _ => &self.encoder,
        }
    }
}

/// One implementation of the supported architectures.
pub trait Implementation {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe;
}

/// The architectures each implementation's code is modelled for.
fn modelled(code: Code) -> &'static [Arch] {
    match code {
        Code::Hf => &[
            Arch::Llama,
            Arch::Qwen2,
            Arch::Gpt2,
            Arch::T5,
            Arch::Qwen3,
            Arch::Gemma2,
            Arch::Gemma3,
            Arch::Phi3,
            Arch::Olmo2,
            Arch::Mixtral,
            Arch::Qwen3Moe,
        ],
        Code::Nanochat => &[Arch::Nanochat],
        Code::Torchtitan | Code::Torchtune => &[Arch::Llama],
    }
}

/// Refuses an implementation, or `compile`, the inventory does not model for the run.
pub fn check(m: &ModelSpec, t: &TrainSpec) -> Result<()> {
    if !modelled(t.implementation).contains(&m.arch) {
        let fits: Vec<&str> = Code::ALL
            .iter()
            .filter(|(_, c)| modelled(*c).contains(&m.arch))
            .map(|(n, _)| *n)
            .collect();
        return Err(PlanError::invalid(
            "train.implementation",
            quote(t.implementation.name()),
            format!("{} for arch {}", fits.join(" | "), m.arch),
        ));
    }
    if !t.compile {
        return Ok(());
    }
    if !matches!(m.arch, Arch::Llama | Arch::Qwen2 | Arch::Nanochat) {
        return Err(PlanError::invalid(
            "train.compile",
            true,
            format!(
                "false for arch {}: compile is modelled for llama, qwen2 and nanochat",
                m.arch
            ),
        ));
    }
    // torchtitan compiles each block over its checkpoint wrapper (`apply_compile` after
    // `FullAC` or `SelectiveAC`): measured.
    let wrapped = t.implementation == Code::Torchtitan
        && matches!(
            t.checkpointing,
            Checkpointing::Full | Checkpointing::SelectiveOp
        );
    if t.checkpointing != Checkpointing::None && !wrapped {
        return Err(PlanError::invalid(
            "train.compile",
            true,
            format!(
                "false with checkpointing = \"{}\": compile is modelled without checkpointing (torchtitan: or full, or selective-op)",
                t.checkpointing
            ),
        ));
    }
    if t.attention != crate::spec::Attention::Sdpa {
        return Err(PlanError::invalid(
            "train.compile",
            true,
            "false with attention = \"eager\": compile is modelled with sdpa",
        ));
    }
    Ok(())
}
