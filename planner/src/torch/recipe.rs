//! The extension point of the torch inventory: what one implementation's code keeps.
//!
//! The step's phases (`torch::play`) are the same for every PyTorch training script:
//! model state, forward, loss, backward, optimizer. What differs between implementations
//! of the same architecture (Hugging Face transformers, torchtitan, torchtune) is which
//! tensors their forward saves and how large their temporaries are. That difference is a
//! [`Recipe`], a data table; an implementation is one file with a type implementing
//! [`Implementation`], chosen in `torch::implementation`.

use super::block::Block;
use crate::spec::{ModelSpec, TrainSpec};
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
