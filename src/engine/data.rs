//! Training data: the built-in corpus, plain text, or JSONL (`text`, or `prompt` +
//! `response`), read whole, or Parquet, streamed (`engine::parquet`); the last tenth held
//! out for validation; as bytes (vocabulary 256) by default, or as the ids of a Hugging
//! Face `tokenizer.json`. Prompt/response data is SFT examples (`engine::sft`: one a row,
//! loss on the response) unless `--train-on all` makes its rows text documents.
//!
//! The built-in corpus is a random first-order Markov chain over a small alphabet whose
//! entropy rate is exact: `H = Σᵢ πᵢ · H(Pᵢ)` with `π` the chain's stationary
//! distribution, so the validation loss can be compared with the best achievable.

use crate::engine::bad;
use crate::engine::parquet::{Position, Stream};
use crate::engine::rng::Rng;
use crate::engine::sft::{Example, Formatter, Micro, TrainOn};
use crate::engine::Result;
use candle_core::{Device, Tensor};
use std::path::Path;

/// Letters of the built-in corpus.
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz .,\n";
/// Successors per state.
const FANOUT: usize = 4;
pub const CORPUS_BYTES: usize = 400_000;

/// Validation windows at the most.
pub const VAL_WINDOWS: usize = 256;

pub struct Corpus<'a> {
    pub name: String,
    pub train: Train<'a>,
    pub val: Vec<u32>,
    /// SFT data's held-out examples (empty for text; then `val` holds the tokens).
    pub val_examples: Vec<Example>,
    /// How prompt/response rows were formatted (`None`: text data).
    pub format: Option<String>,
    /// Bytes of text per token in the validation split (1 for bytes).
    pub bytes_per_token: f64,
    /// Entropy rate in nats per byte, known only for the built-in corpus.
    pub entropy: Option<Entropy>,
}

#[derive(Debug, Clone, Copy)]
pub struct Entropy {
    /// Per byte once the previous byte is known: the lowest expected loss, since every
    /// target follows an input byte.
    pub rate: f64,
}

/// The chain: `succ[i]` are `(next state, probability)`.
struct Chain {
    succ: Vec<Vec<(usize, f64)>>,
}

impl Chain {
    fn new(seed: u64) -> Chain {
        let n = ALPHABET.len();
        let mut rng = Rng::new(seed);
        let succ = (0..n)
            .map(|_| {
                let mut next: Vec<usize> = Vec::new();
                while next.len() < FANOUT {
                    let j = rng.below(n);
                    if !next.contains(&j) {
                        next.push(j);
                    }
                }
                let w: Vec<f64> = (0..FANOUT).map(|_| 0.2 + rng.uniform()).collect();
                let s: f64 = w.iter().sum();
                next.into_iter().zip(w.iter().map(|x| x / s)).collect()
            })
            .collect();
        Chain { succ }
    }

    fn entropy(&self) -> Entropy {
        let n = self.succ.len();
        let mut pi = vec![1.0 / n as f64; n];
        for _ in 0..10_000 {
            let mut nx = vec![0.0; n];
            for (i, s) in self.succ.iter().enumerate() {
                for &(j, p) in s {
                    nx[j] += pi[i] * p;
                }
            }
            // Averaging makes the iteration converge for periodic chains too.
            pi = pi.iter().zip(&nx).map(|(a, b)| 0.5 * (a + b)).collect();
        }
        let h = |ps: &mut dyn Iterator<Item = f64>| -> f64 {
            ps.filter(|p| *p > 0.0).map(|p| -p * p.ln()).sum()
        };
        let rate = self
            .succ
            .iter()
            .zip(&pi)
            .map(|(s, w)| w * h(&mut s.iter().map(|x| x.1)))
            .sum();
        Entropy { rate }
    }

    fn generate(&self, len: usize, rng: &mut Rng) -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        let mut s = 0;
        // Burn in so the text starts near the stationary distribution.
        for i in 0..len + 1000 {
            let u = rng.uniform();
            let mut acc = 0.0;
            let mut next = self.succ[s][FANOUT - 1].0;
            for &(j, p) in &self.succ[s] {
                acc += p;
                if u < acc {
                    next = j;
                    break;
                }
            }
            s = next;
            if i >= 1000 {
                out.push(ALPHABET[s] as u32);
            }
        }
        out
    }
}

/// The training split.
pub enum Train<'a> {
    /// Tokens in memory, drawn as random windows.
    Tokens(Vec<u32>),
    /// SFT examples in memory, drawn at random (each at most `seq_len + 1` tokens; T5's
    /// `seq_len` a side), made into rows by their formatter.
    Examples(Vec<Example>, &'a Formatter),
    /// A Parquet file, read in order.
    Stream(Box<Stream<'a>>),
}

impl Train<'_> {
    /// The next micro-batch of `b` rows of `t` tokens.
    pub fn batch(&mut self, b: usize, t: usize, rng: &mut Rng) -> Result<Micro> {
        let (ids, targets) = match self {
            Train::Tokens(v) => batch(v, b, t, rng)?,
            Train::Examples(v, fmt) => {
                let picked: Vec<Example> = (0..b).map(|_| v[rng.below(v.len())].clone()).collect();
                return Ok(fmt.rows(&picked, t)?);
            }
            Train::Stream(s) => return s.batch(b, t),
        };
        Ok(Micro {
            ids,
            targets,
            weights: None,
            count: b * t,
            encoder: None,
        })
    }

    /// The stream's position (the RNG is the position of data in memory).
    pub fn position(&self) -> Option<Position> {
        match self {
            Train::Tokens(_) | Train::Examples(..) => None,
            Train::Stream(s) => Some(s.position()),
        }
    }

    pub fn seek(&mut self, p: Option<Position>) -> Result<()> {
        match self {
            Train::Tokens(_) | Train::Examples(..) => Ok(()),
            Train::Stream(s) => s.seek(p.unwrap_or_default()),
        }
    }
}

/// The bytes `start..end` of a text that a token covers.
pub(crate) type Span = (usize, usize);

/// A Hugging Face tokenizer, or bytes.
#[derive(Clone, Copy)]
pub enum Tokens<'a> {
    Bytes,
    Hf(&'a tokenizers::Tokenizer),
}

impl Tokens<'_> {
    pub(crate) fn encode(&self, name: &str, bytes: Vec<u8>) -> Result<Vec<u32>> {
        match self {
            Tokens::Bytes => Ok(bytes.into_iter().map(u32::from).collect()),
            Tokens::Hf(t) => {
                let text = String::from_utf8(bytes)
                    .map_err(|e| bad(name, format!("not UTF-8 text: {e}")))?;
                let enc = t
                    .encode(text.as_str(), false)
                    .map_err(|e| bad(name, format!("tokenizer: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// The tokens of `text` and the byte span of `text` each one covers.
    pub(crate) fn encode_offsets(&self, name: &str, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        match self {
            Tokens::Bytes => Ok((
                text.bytes().map(u32::from).collect(),
                (0..text.len()).map(|i| (i, i + 1)).collect(),
            )),
            Tokens::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| bad(name, format!("tokenizer: {e}")))?;
                Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
            }
        }
    }
}

/// Splits bytes into train and validation text, then tokenizes each.
fn corpus(name: &str, mut bytes: Vec<u8>, tok: &Tokens) -> Result<(Vec<u32>, Vec<u32>, f64)> {
    let mut cut = bytes.len() - bytes.len() / 10;
    // Cut on a character boundary so both halves stay valid UTF-8.
    while cut < bytes.len() && (bytes[cut] & 0xC0) == 0x80 {
        cut += 1;
    }
    let val_bytes = bytes.split_off(cut);
    let n_val_bytes = val_bytes.len();
    let train = tok.encode(name, bytes)?;
    let val = tok.encode(name, val_bytes)?;
    let bpt = n_val_bytes as f64 / val.len().max(1) as f64;
    Ok((train, val, bpt))
}

/// The built-in corpus: deterministic, generated in memory, no download.
pub fn builtin<'a>(tok: &Tokens) -> Result<Corpus<'a>> {
    let chain = Chain::new(7);
    let all: Vec<u8> = chain
        .generate(CORPUS_BYTES, &mut Rng::new(11))
        .into_iter()
        .map(|b| b as u8)
        .collect();
    let (train, val, bytes_per_token) = corpus("built-in corpus", all, tok)?;
    Ok(Corpus {
        name: format!(
            "built-in Markov corpus ({} symbols, {} successors each, {} bytes)",
            ALPHABET.len(),
            FANOUT,
            CORPUS_BYTES
        ),
        train: Train::Tokens(train),
        val,
        val_examples: Vec::new(),
        format: None,
        bytes_per_token,
        entropy: Some(chain.entropy()),
    })
}

/// Reads a text, JSONL or Parquet file; `window` is the tokens one sequence needs
/// (`seq_len + 1`); prompt/response rows are formatted by `fmt`.
pub fn load<'a>(
    path: &Path,
    window: usize,
    tok: Tokens<'a>,
    fmt: &'a Formatter,
) -> Result<Corpus<'a>> {
    let name = path.display().to_string();
    if path.extension().and_then(|e| e.to_str()) == Some("parquet") {
        return parquet(path, window, tok, fmt);
    }
    let raw = std::fs::read(path).map_err(|e| bad(&name, format!("cannot read data: {e}")))?;
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "ndjson")
    );
    let (bytes, pairs) = if is_jsonl {
        match jsonl(&name, &raw, fmt.train_on)? {
            Rows::Docs(b, pairs) => (b, pairs),
            Rows::Pairs(p) => return examples(&name, &p, window, &tok, fmt),
        }
    } else {
        (raw, false)
    };
    if bytes.is_empty() {
        return Err(bad(&name, "the data file is empty"));
    }
    let n = bytes.len();
    let (train, val, bytes_per_token) = corpus(&name, bytes, &tok)?;
    if val.len() < window + 1 || train.len() < window + 1 {
        return Err(bad(
            &name,
            format!(
                "{n} bytes of text ({} tokens): too little for sequences of {} tokens with 10 % held out for validation (at least {} tokens)",
                train.len() + val.len(),
                window - 1,
                20 * window
            ),
        ));
    }
    Ok(Corpus {
        name,
        train: Train::Tokens(train),
        val,
        val_examples: Vec::new(),
        format: pairs.then(|| fmt.describe()),
        bytes_per_token,
        entropy: None,
    })
}

/// Prompt/response pairs as SFT examples, the last tenth held out, each cut to `window`.
fn examples<'a>(
    name: &str,
    pairs: &[(String, String)],
    window: usize,
    tok: &Tokens,
    fmt: &'a Formatter,
) -> Result<Corpus<'a>> {
    if pairs.len() < 2 {
        return Err(bad(
            name,
            format!(
                "{} prompt/response examples: needs at least 2 (the last tenth is held out for validation)",
                pairs.len()
            ),
        ));
    }
    let mut all = Vec::with_capacity(pairs.len());
    for (p, r) in pairs {
        let mut e = fmt.example(tok, name, p, r)?;
        fmt.fit(&mut e, window);
        all.push(e);
    }
    let val = all.split_off(pairs.len() - (pairs.len() / 10).max(1));
    let val_bytes: usize = val.iter().map(|e| e.bytes).sum();
    let val_targets: usize = val.iter().map(Example::targets).sum();
    Ok(Corpus {
        name: name.to_string(),
        train: Train::Examples(all, fmt),
        val: Vec::new(),
        val_examples: val,
        format: Some(fmt.describe()),
        bytes_per_token: val_bytes as f64 / val_targets.max(1) as f64,
        entropy: None,
    })
}

fn parquet<'a>(
    path: &Path,
    window: usize,
    tok: Tokens<'a>,
    fmt: &'a Formatter,
) -> Result<Corpus<'a>> {
    let name = path.display().to_string();
    let t = window - 1;
    let (stream, held) = Stream::open(path, window, VAL_WINDOWS * t + 1, tok, fmt)?;
    if stream.is_sft() && held.examples.is_empty() {
        return Err(bad(
            &name,
            "the held-out rows (the last tenth) hold no example",
        ));
    }
    if stream.is_sft() {
        let val_targets: usize = held.examples.iter().map(Example::targets).sum();
        return Ok(Corpus {
            name,
            format: Some(fmt.describe()),
            train: Train::Stream(Box::new(stream)),
            bytes_per_token: held.bytes as f64 / val_targets.max(1) as f64,
            val: Vec::new(),
            val_examples: held.examples,
            entropy: None,
        });
    }
    if held.tokens.len() < window + 1 {
        return Err(bad(
            &name,
            format!(
                "the held-out rows (the last tenth) hold {} tokens: too few for one sequence of {t}",
                held.tokens.len()
            ),
        ));
    }
    Ok(Corpus {
        name,
        format: stream.pairs().then(|| fmt.describe()),
        train: Train::Stream(Box::new(stream)),
        bytes_per_token: held.bytes as f64 / held.tokens.len() as f64,
        val: held.tokens,
        val_examples: Vec::new(),
        entropy: None,
    })
}

/// A document from its fields: `text`, else `prompt` and `response` on two lines.
pub(crate) fn doc_text(
    text: Option<&str>,
    prompt: Option<&str>,
    response: Option<&str>,
) -> Option<String> {
    match (text, prompt, response) {
        (Some(t), _, _) => Some(t.to_string()),
        (None, Some(p), Some(r)) => Some(format!("{p}\n{r}")),
        _ => None,
    }
}

/// What a JSONL file holds: documents joined with a blank line, or SFT pairs.
enum Rows {
    /// The bytes, and whether they are prompt/response rows (`--train-on all`).
    Docs(Vec<u8>, bool),
    Pairs(Vec<(String, String)>),
}

/// JSONL: one object per line with `text`, or `prompt` and `response`; documents are
/// joined with a blank line. A file whose first object has `prompt` and `response` (and
/// no `text`) is SFT pairs, each line then needing both, unless `train_on` is `All`.
fn jsonl(name: &str, raw: &[u8], train_on: TrainOn) -> Result<Rows> {
    let text = std::str::from_utf8(raw).map_err(|e| bad(name, format!("not UTF-8: {e}")))?;
    let mut out = Vec::new();
    let mut pairs: Option<Vec<(String, String)>> = None;
    let mut first_pairs = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(name, format!("line {}: not a JSON object: {e}", i + 1)))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str());
        if first_pairs.is_none() {
            let p = s("text").is_none() && s("prompt").is_some() && s("response").is_some();
            first_pairs = Some(p);
            if p && train_on == TrainOn::Response {
                pairs = Some(Vec::new());
            }
        }
        if let Some(ps) = &mut pairs {
            let (Some(p), Some(r)) = (s("prompt"), s("response")) else {
                return Err(bad(
                    name,
                    format!(
                        "line {}: expected string fields \"prompt\" and \"response\", as on the file's first line (SFT examples)",
                        i + 1
                    ),
                ));
            };
            ps.push((p.to_string(), r.to_string()));
            continue;
        }
        let Some(doc) = doc_text(s("text"), s("prompt"), s("response")) else {
            return Err(bad(
                name,
                format!(
                    "line {}: expected a string field \"text\", or \"prompt\" and \"response\"",
                    i + 1
                ),
            ));
        };
        out.extend_from_slice(doc.as_bytes());
        out.extend_from_slice(b"\n\n");
    }
    Ok(match pairs {
        Some(p) => Rows::Pairs(p),
        None => Rows::Docs(out, first_pairs == Some(true)),
    })
}

/// `b` random windows of `t + 1` tokens from `tokens`: inputs and next-token targets, `(b·t,)` u32.
pub fn batch(
    tokens: &[u32],
    b: usize,
    t: usize,
    rng: &mut Rng,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(b * t);
    let mut y = Vec::with_capacity(b * t);
    let span = tokens.len() - t - 1;
    for _ in 0..b {
        let o = rng.below(span + 1);
        x.extend_from_slice(&tokens[o..o + t]);
        y.extend_from_slice(&tokens[o + 1..o + t + 1]);
    }
    Ok((
        Tensor::from_vec(x, b * t, &Device::Cpu)?,
        Tensor::from_vec(y, b * t, &Device::Cpu)?,
    ))
}

/// Fixed validation windows: consecutive, non-overlapping, up to `max` of them.
pub fn val_windows(tokens: &[u32], t: usize, max: usize) -> Vec<usize> {
    (0..)
        .map(|i| i * t)
        .take_while(|o| o + t < tokens.len())
        .take(max)
        .collect()
}

pub fn windows_batch(
    tokens: &[u32],
    offsets: &[usize],
    t: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(offsets.len() * t);
    let mut y = Vec::with_capacity(offsets.len() * t);
    for &o in offsets {
        x.extend_from_slice(&tokens[o..o + t]);
        y.extend_from_slice(&tokens[o + 1..o + t + 1]);
    }
    let n = offsets.len() * t;
    Ok((
        Tensor::from_vec(x, n, &Device::Cpu)?,
        Tensor::from_vec(y, n, &Device::Cpu)?,
    ))
}
