//! `vramplan train --data FILE.parquet`: streamed training, exact resume, bounded memory,
//! and bad files.

#![cfg(feature = "engine")]

use crate::train::{losses, run, small_plan, summary, text, tmp};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;

/// Writes string columns `names` (required, UTF-8), `rows_per_group` rows a row group.
fn write(path: &Path, names: &[&str], rows: &[Vec<String>], rows_per_group: usize, c: Compression) {
    let fields: String = names
        .iter()
        .map(|n| format!("REQUIRED BYTE_ARRAY {n} (UTF8);"))
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message doc {{ {fields} }}")).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(c).build());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    for group in rows.chunks(rows_per_group.max(1)) {
        let mut g = w.next_row_group().unwrap();
        let mut i = 0;
        while let Some(mut col) = g.next_column().unwrap() {
            let vals: Vec<ByteArray> = group.iter().map(|r| r[i].as_str().into()).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&vals, None, None)
                .unwrap();
            col.close().unwrap();
            i += 1;
        }
        g.close().unwrap();
    }
    w.close().unwrap();
}

fn train(plan: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = [
        &[
            "train",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ][..],
        extra,
    ]
    .concat();
    run(&args)
}

#[test]
fn parquet_streams_wraps_around_and_resumes_exactly() {
    let dir = tmp("parquet");
    let plan = small_plan(&dir);
    // 24 rows in 3 row groups, an unused column first: 22 training rows of about 31 bytes
    // (about 680 tokens), so 8 steps of 4 × 32 tokens go round the file, and the resumed
    // run (from 640 tokens in) crosses the wrap.
    let rows: Vec<Vec<String>> = (0..24)
        .map(|i| {
            vec![
                format!("{i}"),
                format!("row {i:02}: the cat sat on mat {}.", i % 7),
            ]
        })
        .collect();
    let data = dir.join("docs.parquet");
    write(&data, &["id", "text"], &rows, 8, Compression::SNAPPY);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let o = train(&plan, &data, &a, &["--steps", "8"]);
    assert!(o.status.success(), "{}", text(&o));
    let la = losses(&a);
    assert_eq!(la.len(), 8);
    assert!(la[7].1 < la[0].1, "the loss falls: {la:?}");
    assert!(summary(&a)["val_loss"].as_f64().unwrap().is_finite());
    let o = train(&plan, &data, &b, &["--steps", "8", "--stop-at", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = train(&plan, &data, &b, &["--steps", "8", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(la, losses(&b), "8 steps straight vs 5 steps + resume for 3");
}

#[test]
fn prompt_and_response_columns_train() {
    let dir = tmp("parquet-chat");
    let plan = small_plan(&dir);
    let rows: Vec<Vec<String>> = (0..200)
        .map(|i| vec![format!("what is {i} plus one?"), format!("{}", i + 1)])
        .collect();
    let data = dir.join("chat.parquet");
    write(
        &data,
        &["prompt", "response"],
        &rows,
        64,
        Compression::UNCOMPRESSED,
    );
    let out = dir.join("out");
    let o = train(&plan, &data, &out, &["--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(losses(&out).len(), 2);
}

/// `n` rows of 20,000 bytes of words, the same for every `n`.
fn word_rows(n: usize) -> Vec<Vec<String>> {
    let row = |i: usize| -> String {
        let mut s = String::with_capacity(20_000);
        let mut k = i as u64;
        while s.len() < 20_000 {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push_str(["alpha ", "beta ", "gamma ", "delta "][(k >> 62) as usize]);
        }
        s
    };
    (0..n).map(|i| vec![row(i)]).collect()
}

#[test]
fn a_large_parquet_file_is_never_loaded_whole() {
    let dir = tmp("parquet-large");
    let plan = small_plan(&dir);
    // The process peak holds the model, the step and the threads' buffers (about 4 MB
    // each), so it is compared with the same run on a file an eighth the size: 48 MB of
    // text in 24 row groups of 100 rows against 6 MB in 3.
    let peak = |n: usize| -> (usize, u64) {
        let data = dir.join(format!("{n}.parquet"));
        let rows = word_rows(n);
        let text_bytes = rows.iter().map(|r| r[0].len()).sum();
        write(
            &data,
            &["text"],
            &rows,
            100,
            Compression::ZSTD(Default::default()),
        );
        drop(rows);
        let out = dir.join(format!("out-{n}"));
        let o = train(&plan, &data, &out, &["--steps", "2"]);
        assert!(o.status.success(), "{}", text(&o));
        (
            text_bytes,
            summary(&out)["process_peak_bytes"].as_u64().unwrap(),
        )
    };
    let (big, small) = (peak(2_400), peak(300));
    // Loading the file whole would add the 42 MB of extra text.
    assert!(
        big.1.abs_diff(small.1) < (big.0 - small.0) as u64 / 4,
        "process peak {} B with {} B of text, {} B with {} B",
        big.1,
        big.0,
        small.1,
        small.0
    );
}

#[test]
fn bad_parquet_files_are_clear_errors() {
    let dir = tmp("parquet-bad");
    let plan = small_plan(&dir);
    let corrupt = dir.join("corrupt.parquet");
    std::fs::write(&corrupt, b"PAR1 this is not a parquet file at all PAR1").unwrap();
    let wrong = dir.join("wrong.parquet");
    let rows: Vec<Vec<String>> = (0..20).map(|i| vec![format!("body {i}")]).collect();
    write(&wrong, &["body"], &rows, 10, Compression::SNAPPY);
    let empty = dir.join("empty.parquet");
    write(&empty, &["text"], &[], 10, Compression::SNAPPY);
    let short = dir.join("short.parquet");
    let rows: Vec<Vec<String>> = (0..4).map(|i| vec![format!("{i}")]).collect();
    write(&short, &["text"], &rows, 10, Compression::SNAPPY);
    let missing = dir.join("missing.parquet");
    for (file, expect) in [
        (&missing, "cannot read data"),
        (&corrupt, "not a readable Parquet file"),
        (&wrong, "found columns: body"),
        (&empty, "0 rows"),
        (&short, "too little"),
    ] {
        let o = train(&plan, file, &dir.join("out"), &["--steps", "1"]);
        assert_eq!(o.status.code(), Some(2), "{}: {}", file.display(), text(&o));
        let t = text(&o);
        assert!(t.contains(expect), "{}: {t}", file.display());
        assert_eq!(t.trim().lines().count(), 1, "one line: {t}");
    }
}
