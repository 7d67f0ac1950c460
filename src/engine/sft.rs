//! Supervised fine-tuning examples: a prompt and a response become one row of tokens in
//! which only the response's tokens are targets of the loss.
//!
//! - Formatting: with a `chat_template` in the tokenizer's `tokenizer_config.json`, the
//!   example is a user turn (the prompt) and an assistant turn (the response), rendered as
//!   transformers' `apply_chat_template` renders them (Jinja with `trim_blocks` and
//!   `lstrip_blocks`); the loss covers the assistant's content and the end-of-turn token
//!   (`eos_token`) right after it, nothing else of the template. Without a template: the
//!   prompt, a newline, the response, then the tokenizer config's `eos_token` (else, and
//!   always for bytes, a blank line `\n\n`, the separator of text documents); the loss
//!   covers the response and that end.
//! - Padding, not packing: one example a row of `seq_len`, padded at its end with id 0,
//!   whose positions have no loss. So attention never crosses examples and positions start
//!   at 0 in each; the pads cost compute, not correctness (attention is causal: real
//!   tokens never see the pads after them).
//! - Too long (more than `seq_len + 1` tokens): the response keeps its first `seq_len`
//!   tokens (cut at its end), the prompt its last tokens (cut from the left) that fill
//!   the rest.
//! - T5 (encoder-decoder, [`crate::engine::t5`]): the prompt and the end (the
//!   `eos_token`, else a blank line) feed the encoder, the response and the end are the
//!   decoder's labels, each side cut to its first `seq_len` tokens (as a tokenizer's
//!   truncation cuts); no chat template. Rows: the encoder's tokens padded with 0 and
//!   masked out of attention, the decoder reading `decoder_start_token_id` then the labels
//!   shifted right, padded with 0 and no loss.
//! - The loss of an optimizer step is the sum of the response tokens' losses over all of
//!   its micro-batches divided by the number of response tokens in the step (the trainer
//!   draws the step's micro-batches and counts them before the first backward).

use crate::engine::bad;
use crate::engine::data::Tokens;
use crate::engine::model::Model;
use crate::engine::probe::Probe;
use crate::engine::step;
use crate::engine::Result;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// One tokenized example: `loss[i]` says whether token `i` is a target of the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub loss: Vec<bool>,
    /// Bytes of the text the loss covers (the response and its end).
    pub bytes: usize,
}

impl Example {
    /// Cuts the example to `window` tokens: the response (from the first trained token)
    /// to its first `window − 1`, the prompt to its last tokens that fill the rest.
    pub fn truncate(&mut self, window: usize) {
        let n = self.tokens.len();
        if n <= window {
            return;
        }
        let first = self.loss.iter().position(|&l| l).unwrap_or(n);
        let keep_resp = (n - first).min(window - 1);
        let keep_prompt = first.min(window - keep_resp);
        let r = first - keep_prompt..first + keep_resp;
        self.tokens = self.tokens[r.clone()].to_vec();
        self.loss = self.loss[r].to_vec();
    }

    /// Targets of the loss: trained tokens after the first token.
    pub fn targets(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&l| l).count()
    }
}

/// A micro-batch: inputs and targets `(b·t,)` u32, and for SFT rows the weight of each
/// target (1: a response token, 0: prompt or padding). For T5 the inputs are the
/// decoder's, and `encoder` holds the encoder's.
pub struct Micro {
    pub ids: Tensor,
    pub targets: Tensor,
    pub weights: Option<Tensor>,
    /// Targets the loss counts.
    pub count: usize,
    pub encoder: Option<Encoder>,
}

/// An encoder-decoder's encoder input: ids `(b·t,)` u32 and which are tokens (`(b·t,)`
/// f32, 1; 0 for padding).
pub struct Encoder {
    pub ids: Tensor,
    pub keep: Tensor,
}

/// Rows of `t` positions from `examples` (each at most `t + 1` tokens), padded with 0.
pub fn rows(examples: &[Example], t: usize) -> candle_core::Result<Micro> {
    let n = examples.len() * t;
    let (mut x, mut y, mut w) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
    let mut count = 0;
    for (r, e) in examples.iter().enumerate() {
        let len = e.tokens.len().min(t + 1);
        for j in 0..len.saturating_sub(1) {
            x[r * t + j] = e.tokens[j];
            y[r * t + j] = e.tokens[j + 1];
            if e.loss[j + 1] {
                w[r * t + j] = 1.0;
                count += 1;
            }
        }
    }
    Ok(Micro {
        ids: Tensor::from_vec(x, n, &Device::Cpu)?,
        targets: Tensor::from_vec(y, n, &Device::Cpu)?,
        weights: Some(Tensor::from_vec(w, n, &Device::Cpu)?),
        count,
        encoder: None,
    })
}

/// T5 rows of `t` positions from seq2seq `examples` (encoder tokens, then labels, each at
/// most `t`): the encoder's ids and mask, the decoder's input (`start`, then the labels
/// shifted right) and the labels, padded with 0 (no loss).
pub fn seq2seq_rows(examples: &[Example], t: usize, start: u32) -> candle_core::Result<Micro> {
    let n = examples.len() * t;
    let (mut ex, mut keep) = (vec![0u32; n], vec![0f32; n]);
    let (mut x, mut y, mut w) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
    let mut count = 0;
    for (r, e) in examples.iter().enumerate() {
        let first = e.loss.iter().position(|&l| l).unwrap_or(e.tokens.len());
        let (enc, labels) = e.tokens.split_at(first);
        for (j, &id) in enc.iter().take(t).enumerate() {
            ex[r * t + j] = id;
            keep[r * t + j] = 1.0;
        }
        for (j, &id) in labels.iter().take(t).enumerate() {
            x[r * t + j] = if j == 0 { start } else { labels[j - 1] };
            y[r * t + j] = id;
            w[r * t + j] = 1.0;
            count += 1;
        }
    }
    let cpu = |v: Vec<u32>| Tensor::from_vec(v, n, &Device::Cpu);
    Ok(Micro {
        ids: cpu(x)?,
        targets: cpu(y)?,
        weights: Some(Tensor::from_vec(w, n, &Device::Cpu)?),
        count,
        encoder: Some(Encoder {
            ids: cpu(ex)?,
            keep: Tensor::from_vec(keep, n, &Device::Cpu)?,
        }),
    })
}

/// One optimizer step's forward and backward over `micros` (each of `b` rows): the loss
/// is the sum of the counted targets' losses over all of them divided by how many they
/// are, so every target weighs the same whichever micro-batch it is in. Returns that
/// mean and the summed gradients.
pub fn step_grads(
    model: &Model,
    micros: Vec<Micro>,
    b: usize,
    opts: step::Opts,
    probe: &dyn Probe,
) -> candle_core::Result<(f64, step::Grads)> {
    let count: usize = micros.iter().map(|m| m.count).sum();
    let opts = step::Opts {
        scale: 1.0 / count.max(1) as f64,
        ..opts
    };
    let mut grads = step::Grads::new();
    let mut loss = 0.0;
    for m in micros {
        if m.encoder.is_some() {
            loss += crate::engine::t5::forward_backward(model, &m, b, opts, &mut grads, probe)?;
            continue;
        }
        loss += step::forward_backward_weighted(
            model,
            &m.ids,
            &m.targets,
            m.weights.as_ref(),
            b,
            opts,
            &mut grads,
            probe,
        )?;
    }
    Ok((loss / count.max(1) as f64, grads))
}

/// Which tokens of prompt/response data the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainOn {
    /// The response only (SFT).
    #[default]
    Response,
    /// Every token: each row is a document `prompt\nresponse`, as text data.
    All,
}

impl TrainOn {
    /// `--train-on`'s word for it, as checkpoints record it.
    pub fn name(self) -> &'static str {
        match self {
            TrainOn::Response => "response",
            TrainOn::All => "all",
        }
    }
}

/// How prompt/response examples become tokens.
pub struct Formatter {
    template: Option<Template>,
    /// The end-of-sequence token's text, from `tokenizer_config.json`.
    eos: Option<String>,
    pub train_on: TrainOn,
    /// Where the template came from.
    source: Option<PathBuf>,
    /// T5: examples are an encoder's input and a decoder's labels; the decoder's start id.
    seq2seq: Option<u32>,
}

/// A chat template and the special tokens it is rendered with.
struct Template {
    env: minijinja::Environment<'static>,
    specials: serde_json::Map<String, serde_json::Value>,
}

/// The file beside a tokenizer.json that holds its chat template and special tokens.
pub const CONFIG: &str = "tokenizer_config.json";

/// A special token's text: a string, or an `AddedToken` object's `content`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
        .map(str::to_string)
}

impl Formatter {
    /// Prompt, newline, response, blank line: bytes, or a tokenizer without a config.
    pub fn plain(train_on: TrainOn) -> Formatter {
        Formatter {
            template: None,
            eos: None,
            train_on,
            source: None,
            seq2seq: None,
        }
    }

    /// The formatting `spec`'s model reads: T5's encoder input and decoder labels (its
    /// decoder starting from the `decoder_start_token_id` of `hf_config`, the run's
    /// config.json), else as loaded.
    pub fn for_model(self, spec: &vramplan_planner::RunSpec, hf_config: Option<&str>) -> Formatter {
        let start = crate::engine::hf::numerics_of(hf_config).decoder_start;
        Formatter {
            seq2seq: (spec.model.arch == vramplan_planner::Arch::T5).then_some(start),
            ..self
        }
    }

    /// The text that ends a response (and a T5 prompt): the `eos_token`, else a blank line.
    pub fn end(&self) -> &str {
        self.eos.as_deref().unwrap_or("\n\n")
    }

    /// Whether examples are T5's (encoder input, decoder labels).
    pub fn is_seq2seq(&self) -> bool {
        self.seq2seq.is_some()
    }

    /// Cuts `e` to `window` tokens (`seq_len + 1`): [`Example::truncate`], or for T5 each
    /// side to its first `window − 1`.
    pub fn fit(&self, e: &mut Example, window: usize) {
        if self.seq2seq.is_none() {
            return e.truncate(window);
        }
        let first = e.loss.iter().position(|&l| l).unwrap_or(e.tokens.len());
        let t = window.saturating_sub(1);
        let (enc, dec) = (first.min(t), (e.tokens.len() - first).min(t));
        let keep: Vec<usize> = (0..enc).chain(first..first + dec).collect();
        e.tokens = keep.iter().map(|&i| e.tokens[i]).collect();
        e.loss = keep.iter().map(|&i| e.loss[i]).collect();
    }

    /// Rows of `t` positions from `examples`: [`rows`], or T5's [`seq2seq_rows`].
    pub fn rows(&self, examples: &[Example], t: usize) -> candle_core::Result<Micro> {
        match self.seq2seq {
            Some(start) => seq2seq_rows(examples, t, start),
            None => rows(examples, t),
        }
    }

    /// The formatting of the tokenizer at `tokenizer` (a tokenizer.json): its folder's
    /// `tokenizer_config.json`, when there is one.
    pub fn load(tokenizer: Option<&Path>, train_on: TrainOn) -> Result<Formatter> {
        let Some(path) = tokenizer
            .map(|t| t.with_file_name(CONFIG))
            .filter(|p| p.is_file())
        else {
            return Ok(Formatter::plain(train_on));
        };
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(&path).map_err(|e| bad(&name, format!("cannot read: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&name, format!("not JSON: {e}")))?;
        Formatter::from_config(&v, &name, train_on, Some(path.clone()))
    }

    /// The formatting a parsed `tokenizer_config.json` (named `name`) asks for.
    pub fn from_config(
        v: &serde_json::Value,
        name: &str,
        train_on: TrainOn,
        source: Option<PathBuf>,
    ) -> Result<Formatter> {
        let eos = v.get("eos_token").and_then(token_text);
        let template = match v.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Template::new(s, v, name)?),
            Some(_) => {
                return Err(bad(
                    name,
                    "chat_template: expected one template string (a list of named templates is not supported)",
                ))
            }
        };
        Ok(Formatter {
            template,
            eos,
            train_on,
            source,
            seq2seq: None,
        })
    }

    /// Whether a chat template formats the examples.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// What `train` says about the formatting in its first lines.
    pub fn describe(&self) -> String {
        if self.train_on == TrainOn::All {
            return "prompt, newline, response as text documents, packed; loss on every token (--train-on all)".to_string();
        }
        if self.seq2seq.is_some() {
            let end = self.eos.as_deref().unwrap_or("blank line");
            return format!("encoder: prompt, {end}; decoder labels: response, {end}; each cut to seq_len, padded; loss on the labels");
        }
        let what = match (&self.template, &self.source) {
            (Some(_), Some(p)) => format!("the chat template of {}", p.display()),
            (Some(_), None) => "the tokenizer's chat template".to_string(),
            (None, _) => format!(
                "prompt, newline, response, {}",
                self.eos.as_deref().unwrap_or("blank line")
            ),
        };
        format!("{what}; one example a row, padded; loss on the response tokens only")
    }

    /// The text an example renders to and the byte span of it the loss covers.
    pub fn render(
        &self,
        name: &str,
        prompt: &str,
        response: &str,
    ) -> Result<(String, std::ops::Range<usize>)> {
        match &self.template {
            Some(t) => t.render(name, prompt, response),
            None => {
                let end = self.eos.as_deref().unwrap_or("\n\n");
                let text = format!("{prompt}\n{response}{end}");
                let at = prompt.len() + 1;
                Ok((text, at..at + response.len() + end.len()))
            }
        }
    }

    /// The example of `prompt` and `response` (from the data file `name`), tokenized: a
    /// token is trained on when it holds a byte of the span [`Formatter::render`] gives.
    pub fn example(
        &self,
        tok: &Tokens,
        name: &str,
        prompt: &str,
        response: &str,
    ) -> Result<Example> {
        if self.seq2seq.is_some() {
            return self.seq2seq_example(tok, name, prompt, response);
        }
        let (text, span) = self.render(name, prompt, response)?;
        let (tokens, offsets) = tok.encode_offsets(name, &text)?;
        let loss = offsets
            .iter()
            .map(|&(a, b)| a < span.end && b > span.start)
            .collect();
        Ok(Example {
            tokens,
            loss,
            bytes: span.len(),
        })
    }
}

impl Formatter {
    /// T5's example: the encoder's tokens (the prompt and the end), then the labels (the
    /// response and the end), marked for the loss.
    fn seq2seq_example(
        &self,
        tok: &Tokens,
        name: &str,
        prompt: &str,
        response: &str,
    ) -> Result<Example> {
        let end = self.end();
        let labels_text = format!("{response}{end}");
        let (enc, _) = tok.encode_offsets(name, &format!("{prompt}{end}"))?;
        let (labels, _) = tok.encode_offsets(name, &labels_text)?;
        let loss = std::iter::repeat_n(false, enc.len())
            .chain(std::iter::repeat_n(true, labels.len()))
            .collect();
        Ok(Example {
            tokens: [enc, labels].concat(),
            loss,
            bytes: labels_text.len(),
        })
    }
}

impl Template {
    fn new(source: &str, config: &serde_json::Value, name: &str) -> Result<Template> {
        let mut env = minijinja::Environment::new();
        // As transformers renders (with loopcontrols, a feature of this build).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| bad(name, format!("chat_template: {e}")))?;
        env.set_syntax(syntax);
        // Python's `str.strip()`, `.startswith()`, `dict.items()`… as Jinja2 has them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| bad(name, format!("chat_template: {e}")))?;
        let mut specials = serde_json::Map::new();
        for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = config.get(k).and_then(token_text) {
                specials.insert(k.to_string(), t.into());
            }
        }
        Ok(Template { env, specials })
    }

    /// The template rendered for `messages`.
    fn messages(
        &self,
        name: &str,
        messages: serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx = self.specials.clone();
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| bad(name, format!("chat_template: {e}")))?;
        t.render(minijinja::value::Serde(&ctx))
            .map_err(|e| bad(name, format!("chat_template: {e}")))
    }

    /// The conversation (a user turn, an assistant turn) and the byte span the loss
    /// covers: the assistant's content and the end-of-turn token right after it (where
    /// the content is not found verbatim, all that follows the generation prompt).
    fn render(
        &self,
        name: &str,
        prompt: &str,
        response: &str,
    ) -> Result<(String, std::ops::Range<usize>)> {
        let user = serde_json::json!({"role": "user", "content": prompt});
        let assistant = serde_json::json!({"role": "assistant", "content": response});
        let head = self.messages(name, serde_json::json!([user.clone()]), true)?;
        let full = self.messages(name, serde_json::json!([user, assistant]), false)?;
        let from = if full.starts_with(&head) {
            head.len()
        } else {
            0
        };
        let Some(at) = full[from..].find(response).map(|i| from + i) else {
            let end = full.len();
            return Ok((full, from..end));
        };
        let mut end = at + response.len();
        if let Some(eos) = self.specials.get("eos_token").and_then(|v| v.as_str()) {
            if full[end..].starts_with(eos) {
                end += eos.len();
            }
        }
        Ok((full, at..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(tokens: &[u32], first: usize) -> Example {
        Example {
            tokens: tokens.to_vec(),
            loss: (0..tokens.len()).map(|i| i >= first).collect(),
            bytes: 0,
        }
    }

    #[test]
    fn a_long_example_keeps_the_prompts_end_and_the_responses_start() {
        // Prompt 1..=6, response 7..=10; window 6: the whole response, the prompt's 5, 6.
        let mut e = ex(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 6);
        e.truncate(6);
        assert_eq!(e.tokens, [5, 6, 7, 8, 9, 10]);
        assert_eq!(e.targets(), 4);
        // Window 4: the response keeps its first 3, the prompt its last token.
        let mut e = ex(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 6);
        e.truncate(4);
        assert_eq!(e.tokens, [6, 7, 8, 9]);
        assert_eq!(e.loss, [false, true, true, true]);
    }

    #[test]
    fn rows_pad_and_weigh_only_response_targets() {
        let m = rows(&[ex(&[1, 2, 3, 4], 2), ex(&[5, 6], 1)], 4).unwrap();
        assert_eq!(m.ids.to_vec1::<u32>().unwrap(), [1, 2, 3, 0, 5, 0, 0, 0]);
        assert_eq!(
            m.targets.to_vec1::<u32>().unwrap(),
            [2, 3, 4, 0, 6, 0, 0, 0]
        );
        let w = m.weights.unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w, [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(m.count, 3);
    }

    #[test]
    fn plain_formatting_trains_on_the_response_and_its_end() {
        let f = Formatter::plain(TrainOn::Response);
        let e = f.example(&Tokens::Bytes, "d", "ab", "cd").unwrap();
        assert_eq!(e.tokens, b"ab\ncd\n\n".map(u32::from));
        assert_eq!(e.loss, [false, false, false, true, true, true, true]);
    }

    #[test]
    fn a_template_masks_all_but_the_assistants_content_and_end_of_turn() {
        let config = serde_json::json!({
            "eos_token": "<e>",
            "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<e>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        });
        let f = Formatter::from_config(&config, "c", TrainOn::Response, None).unwrap();
        let (text, span) = f.render("c", "hi", "yo").unwrap();
        assert_eq!(text, "<user>hi<e>\n<assistant>yo<e>\n");
        assert_eq!(&text[span], "yo<e>");
    }
}
