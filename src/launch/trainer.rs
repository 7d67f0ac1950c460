//! The keys the Hugging Face Trainer-based formats share: `TrainingArguments` / TRL's
//! configs and axolotl (which passes them on to the Trainer and PEFT). One table, read by
//! both after their own.

use super::*;

pub(super) const TABLE: &[Row] = &[
    // PEFT's LoRA and bitsandbytes' quantized base, as TRL's ModelConfig and axolotl
    // spell them; each format decides when they are read (TRL: `use_peft`, axolotl:
    // `adapter`).
    ("lora_r", Rule::Set(|d, v, _| lora_row(d, "rank", v))),
    ("lora_alpha", Rule::Set(|d, v, _| lora_row(d, "alpha", v))),
    (
        "lora_dropout",
        Rule::Set(|d, v, _| lora_row(d, "dropout", v)),
    ),
    (
        "lora_target_modules",
        Rule::Set(|d, v, _| lora_row(d, "targets", v)),
    ),
    (
        "lora_modules_to_save",
        Rule::Set(|d, v, _| lora_row(d, "save", v)),
    ),
    (
        "load_in_4bit",
        Rule::Set(|d, v, _| kept_flag(d, "load_in_4bit", v)),
    ),
    (
        "load_in_8bit",
        Rule::Set(|d, v, _| kept_flag(d, "load_in_8bit", v)),
    ),
    (
        "torch_compile",
        Rule::Set(|d, v, _| switch(v, &mut d.compile)),
    ),
    ("gradient_checkpointing_kwargs.*", Rule::Ignore),
    ("tf32", Rule::Ignore),
    ("output_dir", Rule::Ignore),
    ("hub_model_id", Rule::Ignore),
    ("max_steps", Rule::Ignore),
    ("learning_rate", Rule::Ignore),
    ("weight_decay", Rule::Ignore),
    ("max_grad_norm", Rule::Ignore),
    ("warmup_ratio", Rule::Ignore),
    ("warmup_steps", Rule::Ignore),
    ("eval_steps", Rule::Ignore),
    ("save_steps", Rule::Ignore),
    ("logging_steps", Rule::Ignore),
    ("seed", Rule::Ignore),
    ("resume_from_checkpoint", Rule::Ignore),
    ("group_by_length", Rule::Ignore),
    ("chat_template", Rule::Ignore),
];

fn kept_flag(d: &mut Draft, key: &str, v: &Value) -> Result<(), Refusal> {
    flag(v)?;
    keep(d, key, v)
}
