//! Parquet training data, streamed: a string column `text`, or `prompt` and `response`.
//!
//! The last tenth of the rows is held out for validation, of which only as many tokens as
//! the validation windows use are read. The training rows are read in order, row group by
//! row group, each document tokenized on its own (followed by a blank line) into a buffer
//! that holds little more than one sequence; consecutive windows of `seq_len + 1` tokens
//! (overlapping by one) make the micro-batches, and the file starts over at its end. So
//! memory holds one row group's pages and the buffer, never the file; and the position
//! (a row and the tokens of it already used) is all a checkpoint needs to resume exactly.

use crate::engine::data::{doc_text, Tokens};
use crate::exit::bad;
use anyhow::Result;
use candle_core::{Device, Tensor};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the training stream stands: the row whose tokens come next, and how many of
/// that row's tokens were already used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub row: u64,
    pub offset: u64,
}

/// The held-out text: its tokens and its length in bytes.
pub struct Held {
    pub tokens: Vec<u32>,
    pub bytes: usize,
}

pub struct Stream<'a> {
    path: PathBuf,
    name: String,
    projection: Type,
    /// Rows per row group, in file order.
    groups: Vec<u64>,
    /// Rows `0..train_rows` are trained on; the rest are held out.
    train_rows: u64,
    rows: RowIter<'static>,
    /// The index of the row `rows` yields next.
    next_row: u64,
    buf: VecDeque<u32>,
    /// The rows whose tokens are in `buf`, oldest first, with how many of each remain.
    docs: VecDeque<(u64, usize)>,
    /// Tokens of the oldest row in `buf` already used.
    front_used: u64,
    tok: Tokens<'a>,
}

fn reader(path: &Path, name: &str, from_group: usize) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).map_err(|e| bad(name, format!("cannot read data: {e}")))?;
    let opts = ReadOptionsBuilder::new()
        .with_predicate(Box::new(move |_, i| i >= from_group))
        .build();
    SerializedFileReader::new_with_options(file, opts)
        .map_err(|e| bad(name, format!("not a readable Parquet file: {e}")))
}

/// The columns documents are read from: `text`, else `prompt` and `response`.
fn projection(root: &Type, name: &str) -> Result<Type> {
    let strings: Vec<&Arc<Type>> = root
        .get_fields()
        .iter()
        .filter(|f| f.is_primitive() && f.get_physical_type() == parquet::basic::Type::BYTE_ARRAY)
        .collect();
    let pick = |n: &str| {
        strings
            .iter()
            .find(|f| f.name() == n)
            .map(|f| Arc::clone(f))
    };
    let fields = match (pick("text"), pick("prompt"), pick("response")) {
        (Some(t), _, _) => vec![t],
        (None, Some(p), Some(r)) => vec![p, r],
        _ => {
            let found: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
            return Err(bad(
                name,
                format!(
                    "expected a string column \"text\", or \"prompt\" and \"response\"; found columns: {}",
                    if found.is_empty() { "none".to_string() } else { found.join(", ") }
                ),
            ));
        }
    };
    Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
        .map_err(|e| bad(name, format!("{e}")))
}

/// A row's document text, or `None` when its columns are null.
fn row_text(row: &Row) -> Option<String> {
    let mut cols = row.get_column_iter().map(|(_, f)| match f {
        Field::Str(s) => Some(s.clone()),
        Field::Bytes(b) => Some(String::from_utf8_lossy(b.data()).into_owned()),
        _ => None,
    });
    let first = cols.next().flatten();
    match cols.next() {
        None => doc_text(first.as_deref(), None, None),
        Some(second) => doc_text(None, first.as_deref(), second.as_deref()),
    }
}

impl<'a> Stream<'a> {
    /// Opens `path`, checks its columns, reads the held-out text (enough for
    /// `val_tokens` tokens) and the first training window of `window` tokens.
    pub fn open(
        path: &Path,
        window: usize,
        val_tokens: usize,
        tok: Tokens<'a>,
    ) -> Result<(Stream<'a>, Held)> {
        let name = path.display().to_string();
        let r = reader(path, &name, 0)?;
        let meta = r.metadata();
        let groups: Vec<u64> = meta
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as u64)
            .collect();
        let total: u64 = groups.iter().sum();
        if total < 2 {
            return Err(bad(
                &name,
                format!(
                    "{total} rows: needs at least 2 (the last tenth is held out for validation)"
                ),
            ));
        }
        let projection = projection(meta.file_metadata().schema_descr().root_schema(), &name)?;
        let train_rows = total - (total / 10).max(1);
        let mut s = Stream {
            rows: RowIter::from_file_into(Box::new(r))
                .project(Some(projection.clone()))
                .map_err(|e| bad(&name, format!("{e}")))?,
            path: path.to_path_buf(),
            name,
            projection,
            groups,
            train_rows,
            next_row: 0,
            buf: VecDeque::new(),
            docs: VecDeque::new(),
            front_used: 0,
            tok,
        };
        let held = s.held_out(val_tokens)?;
        s.seek(Position::default())?;
        if !s.fill(window, false)? {
            return Err(bad(
                &s.name,
                format!(
                    "the {} training rows hold fewer than {window} tokens: too little for one sequence",
                    s.train_rows
                ),
            ));
        }
        Ok((s, held))
    }

    /// Restarts the row iterator at `row`, skipping whole row groups before it.
    fn restart(&mut self, row: u64) -> Result<()> {
        let (mut group, mut first) = (0, 0);
        while group < self.groups.len() && first + self.groups[group] <= row {
            first += self.groups[group];
            group += 1;
        }
        let r = reader(&self.path, &self.name, group)?;
        self.rows = RowIter::from_file_into(Box::new(r))
            .project(Some(self.projection.clone()))
            .map_err(|e| bad(&self.name, format!("{e}")))?;
        self.next_row = first;
        while self.next_row < row {
            if self.next_doc()?.is_none() {
                return Err(bad(
                    &self.name,
                    format!(
                        "ends at row {}, before the {row} its metadata promise",
                        self.next_row
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The next row's text, or `None` at the end of the file.
    fn next_doc(&mut self) -> Result<Option<String>> {
        match self.rows.next() {
            None => Ok(None),
            Some(Err(e)) => Err(bad(
                &self.name,
                format!("row {}: cannot be read: {e}", self.next_row),
            )),
            Some(Ok(row)) => {
                self.next_row += 1;
                Ok(Some(row_text(&row).unwrap_or_default()))
            }
        }
    }

    fn encode(&self, text: String) -> Result<Vec<u32>> {
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"\n\n");
        self.tok.encode(&self.name, bytes)
    }

    /// Reads the held-out rows until `want` tokens (or their end).
    fn held_out(&mut self, want: usize) -> Result<Held> {
        self.restart(self.train_rows)?;
        let mut held = Held {
            tokens: Vec::new(),
            bytes: 0,
        };
        while held.tokens.len() < want {
            let Some(text) = self.next_doc()? else {
                break;
            };
            held.bytes += text.len() + 2;
            held.tokens.extend(self.encode(text)?);
        }
        Ok(held)
    }

    /// Tops the buffer up to `n` tokens, starting over at the end of the training rows
    /// when `wrap`; false when the rows ran out first (or a whole pass added nothing).
    fn fill(&mut self, n: usize, wrap: bool) -> Result<bool> {
        // Whether tokens came in since this call last started over (None: it has not).
        let mut since_restart: Option<bool> = None;
        while self.buf.len() < n {
            let doc = if self.next_row < self.train_rows {
                self.next_doc()?
            } else {
                None
            };
            match doc {
                Some(text) => {
                    let ids = self.encode(text)?;
                    if !ids.is_empty() {
                        since_restart = since_restart.map(|_| true);
                        self.docs.push_back((self.next_row - 1, ids.len()));
                        self.buf.extend(ids);
                    }
                }
                None if wrap && since_restart != Some(false) => {
                    since_restart = Some(false);
                    self.restart(0)?;
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Drops `n` tokens from the front of the buffer.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some((_, left)) = self.docs.front_mut() else {
                return;
            };
            let k = n.min(*left);
            *left -= k;
            n -= k;
            self.front_used += k as u64;
            self.buf.drain(..k);
            if *left == 0 {
                self.docs.pop_front();
                self.front_used = 0;
            }
        }
    }

    pub fn position(&self) -> Position {
        match self.docs.front() {
            Some(&(row, _)) => Position {
                row,
                offset: self.front_used,
            },
            None => Position {
                row: self.next_row % self.train_rows.max(1),
                offset: 0,
            },
        }
    }

    /// Continues from `p` (a position this stream reported).
    pub fn seek(&mut self, p: Position) -> Result<()> {
        if p.row >= self.train_rows {
            return Err(bad(
                &self.name,
                format!(
                    "the checkpoint's data position (row {}) is past the {} training rows: not the file it was trained on",
                    p.row, self.train_rows
                ),
            ));
        }
        self.buf.clear();
        self.docs.clear();
        self.front_used = 0;
        self.restart(p.row)?;
        let first = self.next_doc()?.unwrap_or_default();
        let ids = self.encode(first)?;
        if (p.offset as usize) > ids.len() {
            return Err(bad(
                &self.name,
                format!(
                    "the checkpoint's data position (row {}, token {}) is not in the file: not the file it was trained on",
                    p.row, p.offset
                ),
            ));
        }
        self.docs.push_back((p.row, ids.len()));
        self.buf.extend(ids);
        self.consume(p.offset as usize);
        Ok(())
    }

    /// The next `b` windows of `t + 1` tokens: inputs and targets, `(b·t,)` u32.
    pub fn batch(&mut self, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let mut x: Vec<u32> = Vec::with_capacity(b * t);
        let mut y: Vec<u32> = Vec::with_capacity(b * t);
        for _ in 0..b {
            if !self.fill(t + 1, true)? {
                return Err(bad(&self.name, "the training rows hold no text"));
            }
            x.extend(self.buf.range(..t));
            y.extend(self.buf.range(1..=t));
            self.consume(t);
        }
        Ok((
            Tensor::from_vec(x, b * t, &Device::Cpu)?,
            Tensor::from_vec(y, b * t, &Device::Cpu)?,
        ))
    }
}
