//! Parquet training data, streamed: a string column `text`, or `prompt` and `response`.
//!
//! The last tenth of the rows is held out for validation, of which only as many tokens as
//! the validation windows use are read. The training rows are read in order with the
//! column readers of one row group at a time, each document tokenized on its own
//! (followed by a blank line) into a buffer that holds little more than one sequence;
//! consecutive windows of `seq_len + 1` tokens (overlapping by one) make the
//! micro-batches, and the file starts over at its end. So memory holds a page of each
//! document column and the buffer, never the file; and the position (a row and the
//! tokens of it already used) is all a checkpoint needs to resume exactly.
//!
//! Prompt/response rows are SFT examples (`engine::sft`), unless trained on as text
//! (`--train-on all`): each micro-batch row is the next row's example, the held-out
//! rows' examples (up to `VAL_WINDOWS`) validate, and the position is the next row.

use crate::engine::bad;
use crate::engine::data::{doc_text, Tokens, VAL_WINDOWS};
use crate::engine::sft::{Example, Formatter, Micro, TrainOn};
use crate::engine::Result;
use candle_core::{Device, Tensor};
use parquet::basic::{Repetition, Type as PhysicalType};
use parquet::column::reader::ColumnReaderImpl;
use parquet::data_type::{ByteArray, ByteArrayType, DataType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::{SchemaDescriptor, Type};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;

/// Where the training stream stands: the row whose tokens come next, and how many of
/// that row's tokens were already used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub row: u64,
    pub offset: u64,
}

/// The held-out text: its tokens and its length in bytes (SFT: its examples, and the
/// bytes of the text their loss covers).
pub struct Held {
    pub tokens: Vec<u32>,
    pub bytes: usize,
    pub examples: Vec<Example>,
}

pub struct Stream<'a> {
    name: String,
    file: SerializedFileReader<File>,
    /// The leaf columns documents are read from: `text`, or `prompt` and `response`.
    cols: Vec<usize>,
    /// Rows per row group, in file order.
    groups: Vec<u64>,
    /// Rows `0..train_rows` are trained on; the rest are held out.
    train_rows: u64,
    /// The row group being read (`groups.len()` past the end), its rows not yet read,
    /// and readers of its document columns.
    group: usize,
    left: u64,
    readers: Vec<ColumnReaderImpl<ByteArrayType>>,
    /// The index of the row read next.
    next_row: u64,
    buf: VecDeque<u32>,
    /// The rows whose tokens are in `buf`, oldest first, with how many of each remain.
    docs: VecDeque<(u64, usize)>,
    /// Tokens of the oldest row in `buf` already used.
    front_used: u64,
    tok: Tokens<'a>,
    fmt: &'a Formatter,
    /// Rows are SFT examples of at most `window` tokens.
    sft: bool,
    window: usize,
}

/// Whether a top-level column holds one string (a byte array) a row.
fn is_string(f: &Type) -> bool {
    f.is_primitive()
        && f.get_physical_type() == PhysicalType::BYTE_ARRAY
        && f.get_basic_info().repetition() != Repetition::REPEATED
}

/// The leaf columns documents are read from: `text`, else `prompt` and `response`.
fn columns(schema: &SchemaDescriptor, name: &str) -> Result<Vec<usize>> {
    let pick = |n: &str| {
        schema
            .columns()
            .iter()
            .position(|c| c.path().parts() == [n] && is_string(c.self_type()))
    };
    match (pick("text"), pick("prompt"), pick("response")) {
        (Some(t), _, _) => Ok(vec![t]),
        (None, Some(p), Some(r)) => Ok(vec![p, r]),
        _ => {
            let found: Vec<String> = schema
                .root_schema()
                .get_fields()
                .iter()
                .map(|f| {
                    if is_string(f) {
                        f.name().to_string()
                    } else {
                        format!("{} (not a string)", f.name())
                    }
                })
                .collect();
            Err(bad(
                name,
                format!(
                    "expected a string column \"text\", or \"prompt\" and \"response\"; found columns: {}",
                    if found.is_empty() { "none".to_string() } else { found.join(", ") }
                ),
            ))
        }
    }
}

/// A row's document from its column values (`None` for a null): invalid UTF-8 is
/// replaced rather than failing a run that may be hours in.
fn row_text(values: &[Option<ByteArray>]) -> String {
    let mut cols = values
        .iter()
        .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b.data())));
    let first = cols.next().flatten();
    let doc = match cols.next() {
        None => doc_text(first.as_deref(), None, None),
        Some(second) => doc_text(None, first.as_deref(), second.as_deref()),
    };
    doc.unwrap_or_default()
}

impl<'a> Stream<'a> {
    /// Opens `path`, checks its columns, reads the held-out text (enough for
    /// `val_tokens` tokens) and the first training window of `window` tokens.
    pub fn open(
        path: &Path,
        window: usize,
        val_tokens: usize,
        tok: Tokens<'a>,
        fmt: &'a Formatter,
    ) -> Result<(Stream<'a>, Held)> {
        let name = path.display().to_string();
        let f = File::open(path).map_err(|e| bad(&name, format!("cannot read data: {e}")))?;
        let file = SerializedFileReader::new(f)
            .map_err(|e| bad(&name, format!("not a readable Parquet file: {e}")))?;
        let meta = file.metadata();
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
        let cols = columns(meta.file_metadata().schema_descr(), &name)?;
        let sft = cols.len() == 2 && fmt.train_on == TrainOn::Response;
        let mut s = Stream {
            name,
            file,
            cols,
            train_rows: total - (total / 10).max(1),
            group: groups.len(),
            groups,
            left: 0,
            readers: Vec::new(),
            next_row: total,
            buf: VecDeque::new(),
            docs: VecDeque::new(),
            front_used: 0,
            tok,
            fmt,
            sft,
            window,
        };
        let held = s.held_out(val_tokens)?;
        s.seek(Position::default())?;
        if !sft && !s.fill(window, false)? {
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

    /// Starts reading row group `g` (nothing when `g` is past the last).
    fn open_group(&mut self, g: usize) -> Result<()> {
        self.group = g;
        self.left = self.groups.get(g).copied().unwrap_or(0);
        self.readers.clear();
        if g == self.groups.len() {
            return Ok(());
        }
        let cannot = |e: &dyn std::fmt::Display| bad(&self.name, format!("row group {g}: {e}"));
        let rg = self.file.get_row_group(g).map_err(|e| cannot(&e))?;
        for &c in &self.cols {
            let r = rg.get_column_reader(c).map_err(|e| cannot(&e))?;
            self.readers.push(
                ByteArrayType::get_column_reader(r)
                    .ok_or_else(|| cannot(&"not a string column"))?,
            );
        }
        Ok(())
    }

    /// Moves to `row`, skipping whole row groups before it and the rows of its own.
    fn restart(&mut self, row: u64) -> Result<()> {
        let (mut g, mut first) = (0, 0);
        while g < self.groups.len() && first + self.groups[g] <= row {
            first += self.groups[g];
            g += 1;
        }
        self.open_group(g)?;
        let skip = (row - first) as usize;
        for r in &mut self.readers {
            if r.skip_records(skip)
                .map_err(|e| bad(&self.name, format!("row {row}: cannot be read: {e}")))?
                < skip
            {
                return Err(bad(
                    &self.name,
                    format!("row group {g} ends before row {row}"),
                ));
            }
        }
        self.left -= skip as u64;
        self.next_row = row;
        Ok(())
    }

    /// Whether rows are SFT examples.
    pub fn is_sft(&self) -> bool {
        self.sft
    }

    /// Whether rows are prompt/response pairs.
    pub fn pairs(&self) -> bool {
        self.cols.len() == 2
    }

    /// The next row's text, or `None` at the end of the file.
    fn next_doc(&mut self) -> Result<Option<String>> {
        Ok(self.next_values()?.map(|v| row_text(&v)))
    }

    /// The next row's prompt and response as an example (a null is empty).
    fn next_example(&mut self) -> Result<Option<Example>> {
        let Some(v) = self.next_values()? else {
            return Ok(None);
        };
        let s = |i: usize| {
            v[i].as_ref()
                .map(|b| String::from_utf8_lossy(b.data()).into_owned())
                .unwrap_or_default()
        };
        let mut e = self.fmt.example(&self.tok, &self.name, &s(0), &s(1))?;
        self.fmt.fit(&mut e, self.window);
        Ok(Some(e))
    }

    /// The next row's column values, or `None` at the end of the file.
    fn next_values(&mut self) -> Result<Option<Vec<Option<ByteArray>>>> {
        while self.left == 0 {
            if self.group + 1 >= self.groups.len() {
                return Ok(None);
            }
            self.open_group(self.group + 1)?;
        }
        let row = self.next_row;
        let mut values = Vec::with_capacity(self.readers.len());
        for r in &mut self.readers {
            let (mut defs, mut vals) = (Vec::new(), Vec::new());
            let (records, _, _) = r
                .read_records(1, Some(&mut defs), None, &mut vals)
                .map_err(|e| bad(&self.name, format!("row {row}: cannot be read: {e}")))?;
            if records == 0 {
                return Err(bad(
                    &self.name,
                    format!("row {row}: missing, though the metadata counts it"),
                ));
            }
            values.push(vals.pop());
        }
        self.left -= 1;
        self.next_row += 1;
        Ok(Some(values))
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
            examples: Vec::new(),
        };
        if self.sft {
            while held.examples.len() < VAL_WINDOWS {
                let Some(e) = self.next_example()? else {
                    break;
                };
                held.bytes += e.bytes;
                held.examples.push(e);
            }
            return Ok(held);
        }
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
        if self.sft {
            return Position {
                row: self.next_row % self.train_rows.max(1),
                offset: 0,
            };
        }
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
        if self.sft {
            return Ok(());
        }
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

    /// The next `b` windows of `t + 1` tokens (SFT: the next `b` rows' examples).
    pub fn batch(&mut self, b: usize, t: usize) -> Result<Micro> {
        if self.sft {
            let mut rows = Vec::with_capacity(b);
            while rows.len() < b {
                if self.next_row >= self.train_rows {
                    self.restart(0)?;
                }
                match self.next_example()? {
                    Some(e) => rows.push(e),
                    None => return Err(bad(&self.name, "the training rows hold no example")),
                }
            }
            return Ok(self.fmt.rows(&rows, t)?);
        }
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
        Ok(Micro {
            ids: Tensor::from_vec(x, b * t, &Device::Cpu)?,
            targets: Tensor::from_vec(y, b * t, &Device::Cpu)?,
            weights: None,
            count: b * t,
            encoder: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    /// Prompt/response rows as text documents, as before SFT.
    static ALL: std::sync::LazyLock<Formatter> =
        std::sync::LazyLock::new(|| Formatter::plain(TrainOn::All));

    /// Writes nullable string columns `names`, `per_group` rows a row group, gzip.
    fn write(path: &Path, names: &[&str], rows: &[Vec<Option<Vec<u8>>>], per_group: usize) {
        let fields: String = names
            .iter()
            .map(|n| format!("OPTIONAL BYTE_ARRAY {n} (UTF8);"))
            .collect();
        let schema = Arc::new(parse_message_type(&format!("message m {{ {fields} }}")).unwrap());
        let props = WriterProperties::builder()
            .set_compression(Compression::GZIP(Default::default()))
            .build();
        let mut w =
            SerializedFileWriter::new(File::create(path).unwrap(), schema, props.into()).unwrap();
        for group in rows.chunks(per_group) {
            let mut g = w.next_row_group().unwrap();
            for i in 0..names.len() {
                let mut col = g.next_column().unwrap().unwrap();
                let vals: Vec<ByteArray> = group
                    .iter()
                    .filter_map(|r| r[i].clone())
                    .map(Into::into)
                    .collect();
                let defs: Vec<i16> = group.iter().map(|r| r[i].is_some() as i16).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&defs), None)
                    .unwrap();
                col.close().unwrap();
            }
            g.close().unwrap();
        }
        w.close().unwrap();
    }

    /// The next `b` windows' inputs, which are the stream's tokens in order.
    fn inputs(s: &mut Stream, b: usize, t: usize) -> Vec<u32> {
        s.batch(b, t).unwrap().ids.to_vec1().unwrap()
    }

    #[test]
    fn the_stream_is_the_training_rows_in_order_round_and_round() {
        let path =
            std::env::temp_dir().join(format!("vramplan-stream-{}.parquet", std::process::id()));
        // `response` before `prompt` in the file; row 4's prompt is null (an empty
        // document); row 7's response ends in a byte that is not UTF-8; 20 rows in 3 row
        // groups, the last 2 held out.
        let rows: Vec<Vec<Option<Vec<u8>>>> = (0..20)
            .map(|i| {
                let mut r = format!("r{i}").into_bytes();
                if i == 7 {
                    r.push(0xFF);
                }
                vec![Some(r), (i != 4).then(|| format!("p{i}").into_bytes())]
            })
            .collect();
        write(&path, &["response", "prompt"], &rows, 8);
        let doc = |i: usize| -> String {
            match i {
                4 => "\n\n".into(),
                7 => "p7\nr7\u{FFFD}\n\n".into(),
                _ => format!("p{i}\nr{i}\n\n"),
            }
        };
        let train: Vec<u32> = (0..18)
            .flat_map(|i| doc(i).into_bytes())
            .map(u32::from)
            .collect();
        let (b, t) = (3, 7);
        let (mut s, held) = Stream::open(&path, t + 1, 1000, Tokens::Bytes, &ALL).unwrap();
        let expect_held: String = (18..20).map(doc).collect();
        assert_eq!(held.bytes, expect_held.len());
        assert_eq!(
            held.tokens,
            expect_held.bytes().map(u32::from).collect::<Vec<_>>()
        );
        // Three passes and a bit: every position reached resumes to the same tokens.
        let mut seen = Vec::new();
        while seen.len() < 3 * train.len() + b * t {
            let p = s.position();
            let next = inputs(&mut s, b, t);
            let (mut r, _) = Stream::open(&path, t + 1, 0, Tokens::Bytes, &ALL).unwrap();
            r.seek(p).unwrap();
            assert_eq!(inputs(&mut r, b, t), next, "resumed at {p:?}");
            seen.extend(next);
        }
        let cycle: Vec<u32> = train.iter().cycle().take(seen.len()).copied().collect();
        assert_eq!(seen, cycle);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn sft_rows_are_the_training_rows_in_order_and_resume_at_a_row() {
        let path =
            std::env::temp_dir().join(format!("vramplan-sft-{}.parquet", std::process::id()));
        // 10 rows in 3 row groups: 9 train, 1 held out; row 2's response is null.
        let rows: Vec<Vec<Option<Vec<u8>>>> = (0..10)
            .map(|i| {
                vec![
                    Some(format!("q{i}").into_bytes()),
                    (i != 2).then(|| format!("a{i}").into_bytes()),
                ]
            })
            .collect();
        write(&path, &["prompt", "response"], &rows, 4);
        let fmt = Formatter::plain(TrainOn::Response);
        let (mut s, held) = Stream::open(&path, 9, 0, Tokens::Bytes, &fmt).unwrap();
        assert!(s.is_sft());
        let doc = |i: usize| -> Vec<u32> {
            let r = if i == 2 {
                String::new()
            } else {
                format!("a{i}")
            };
            format!("q{i}\n{r}\n\n").bytes().map(u32::from).collect()
        };
        assert_eq!(held.examples.len(), 1);
        assert_eq!(held.examples[0].tokens, doc(9));
        // Rows of 8 positions: row i's example, then the next; round and round.
        let t = 8;
        let mut seen = Vec::new();
        for _ in 0..7 {
            let p = s.position();
            let m = s.batch(2, t).unwrap();
            let (mut r, _) = Stream::open(&path, 9, 0, Tokens::Bytes, &fmt).unwrap();
            r.seek(p).unwrap();
            let again = r.batch(2, t).unwrap();
            assert_eq!(
                m.ids.to_vec1::<u32>().unwrap(),
                again.ids.to_vec1::<u32>().unwrap(),
                "resumed at {p:?}"
            );
            let ids = m.ids.to_vec1::<u32>().unwrap();
            seen.extend(ids.chunks(t).map(|c| c.to_vec()));
        }
        for (k, row) in seen.iter().enumerate() {
            let d = doc(k % 9);
            let mut want = d[..d.len() - 1].to_vec();
            want.resize(t, 0);
            assert_eq!(row, &want, "row {k}");
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn columns_that_are_not_one_string_a_row_are_named_and_refused() {
        let schema = parse_message_type(
            "message m { REQUIRED INT64 text; REPEATED BYTE_ARRAY prompt (UTF8); \
             OPTIONAL BYTE_ARRAY response (UTF8); }",
        )
        .unwrap();
        let e = columns(&SchemaDescriptor::new(schema.into()), "f.parquet")
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("found columns: text (not a string), prompt (not a string), response"),
            "{e}"
        );
    }
}
