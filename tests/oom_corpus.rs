//! The corpus of real out-of-memory reports (tests/data/oom/real, from public issue
//! trackers): every report is found, its figures are read as written by hand in
//! index.toml, and the cause agrees with the thread's for at least 90 % of them, the
//! figure docs/diagnose.md states per class.

use std::collections::BTreeMap;
use std::path::Path;
use toml::Value;
use vramplan_planner::{diagnose, parse_log, Cause, Diagnosis, OomReport};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oom/real");
const DOC: &str = include_str!("../docs/diagnose.md");

struct Entry {
    file: String,
    cause: Cause,
    figures: Option<toml::Table>,
}

fn index() -> Vec<Entry> {
    let text = std::fs::read_to_string(Path::new(DIR).join("index.toml")).expect("index.toml");
    let v: toml::Table = toml::from_str(&text).expect("index.toml parses");
    v["report"]
        .as_array()
        .expect("[[report]]")
        .iter()
        .map(|r| Entry {
            file: r["file"].as_str().expect("file").to_string(),
            cause: Cause::from_name(r["cause"].as_str().expect("cause")).expect("a cause name"),
            figures: r.get("figures").and_then(Value::as_table).cloned(),
        })
        .collect()
}

fn read(file: &str) -> String {
    std::fs::read_to_string(Path::new(DIR).join(file)).expect("a corpus file")
}

/// The header's `#| label:`: the file and the index agree.
fn header_label(text: &str) -> Option<&str> {
    text.lines()
        .take_while(|l| l.starts_with("#|"))
        .find_map(|l| l.strip_prefix("#| label: "))
}

fn first_diagnosis(text: &str) -> Diagnosis {
    let reports = parse_log(text);
    assert!(!reports.is_empty(), "no report found");
    diagnose(reports[0].clone(), None)
}

#[test]
fn every_report_is_indexed_labelled_and_found() {
    let idx = index();
    let mut on_disk: Vec<String> = std::fs::read_dir(DIR)
        .expect("the corpus directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".log"))
        .collect();
    on_disk.sort();
    let listed: Vec<String> = idx.iter().map(|e| e.file.clone()).collect();
    assert_eq!(on_disk, listed, "index.toml lists every report, in order");
    assert!(idx.len() >= 40, "{} reports", idx.len());
    for e in &idx {
        let text = read(&e.file);
        assert_eq!(header_label(&text), Some(e.cause.name()), "{}", e.file);
        assert!(
            text.lines().any(|l| l.starts_with("#| source: https://")),
            "{}",
            e.file
        );
        let d = first_diagnosis(&text);
        if !d.report.has_sizes() && d.report.host.is_none() {
            // Reports without sizes say so instead of printing zeros.
            assert!(d.report.request_bytes.is_none(), "{}", e.file);
        }
    }
}

/// [number, unit] as written, or a list of them summed; with the tolerance of rounding
/// to two decimals (half a hundredth of the unit per term).
fn expected(v: &Value) -> (f64, f64) {
    let arr = v.as_array().expect("[number, unit]");
    if arr.first().is_some_and(Value::is_array) {
        return arr
            .iter()
            .map(expected)
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    }
    let n = arr[0]
        .as_float()
        .or_else(|| arr[0].as_integer().map(|i| i as f64));
    let unit = match arr[1].as_str().expect("a unit") {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u}"),
    };
    (n.expect("a number") * unit, 0.005 * unit + 0.5)
}

fn figure(r: &OomReport, key: &str) -> Option<u64> {
    let host = r.host.as_ref();
    match key {
        "request" => r.request_bytes,
        "capacity" => r.capacity_bytes,
        "free" => r.free_bytes,
        "allocated" => r.allocated_bytes,
        "reserved" => r.reserved_bytes,
        "reserved_unallocated" => r.reserved_unallocated_bytes,
        "process_in_use" => r.process_in_use_bytes,
        "other_processes" => r.other_processes_bytes,
        "other_allocations" => r.other_allocations_bytes,
        "anon_rss" => host.and_then(|h| h.anon_rss_bytes),
        "killed_pid" => host.and_then(|h| h.pid),
        "self_pid" => r.self_pid,
        "rank" => r.rank.map(u64::from),
        "gpu" => r.gpu.map(u64::from),
        _ => panic!("figure {key}"),
    }
}

#[test]
fn figures_match_the_hand_written_ones() {
    let mut checked = 0;
    for e in index() {
        let Some(figs) = &e.figures else { continue };
        let r = &parse_log(&read(&e.file))[0];
        for (key, v) in figs {
            if key == "shape" {
                let got = r.shape.as_ref().map(|s| s.describe());
                assert_eq!(got.as_deref(), v.as_str(), "{} shape", e.file);
                continue;
            }
            let got = figure(r, key);
            if let Some(i) = v.as_integer() {
                assert_eq!(got, u64::try_from(i).ok(), "{} {key}", e.file);
                continue;
            }
            let (want, tol) = expected(v);
            let got = got.unwrap_or_else(|| panic!("{}: {key} not read", e.file)) as f64;
            assert!(
                (got - want).abs() <= tol,
                "{} {key}: {got} vs {want}",
                e.file
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "{checked} reports with figures");
}

/// Per class: (reports, right).
fn accuracy() -> BTreeMap<&'static str, (usize, usize)> {
    let mut per: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for e in index() {
        let d = first_diagnosis(&read(&e.file));
        let slot = per.entry(e.cause.name()).or_default();
        slot.0 += 1;
        slot.1 += usize::from(d.cause == e.cause);
    }
    per
}

/// The rows of docs/diagnose.md's accuracy table: `| class | reports | right |`.
fn documented() -> BTreeMap<String, (usize, usize)> {
    let start = DOC
        .find("<!-- accuracy -->")
        .expect("the accuracy table's marker");
    DOC[start..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let n = cells.get(2)?.parse().ok()?;
            let k = cells.get(3)?.parse().ok()?;
            Some((cells[1].trim_matches('`').to_string(), (n, k)))
        })
        .collect()
}

#[test]
fn the_cause_is_right_for_nine_in_ten_and_the_docs_say_so() {
    let per = accuracy();
    let (n, k) = per.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert!(k * 10 >= n * 9, "{k} of {n} right: {per:?}");
    let mut doc = documented();
    let total = doc.remove("all");
    let measured: BTreeMap<String, (usize, usize)> =
        per.iter().map(|(c, v)| (c.to_string(), *v)).collect();
    assert_eq!(
        doc, measured,
        "docs/diagnose.md's table is the measured one"
    );
    assert_eq!(total, Some((n, k)));
}

#[test]
fn a_corpus_log_of_a_few_megabytes_is_read_whole() {
    let idx = index();
    let one: String = idx.iter().map(|e| read(&e.file) + "\n").collect();
    let per_copy = parse_log(&one).len();
    let big = one.repeat((4 << 20) / one.len().max(1) + 1);
    let n = parse_log(&big).len();
    // Kill lines of neighbouring host logs merge into one kill; every other report counts.
    assert!(per_copy >= idx.len() - 7, "{per_copy}");
    assert_eq!(n, per_copy * (big.len() / one.len()));
}
