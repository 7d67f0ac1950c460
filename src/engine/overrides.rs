//! `--set KEY=VALUE`: replaces one value of a plan, named by its dotted key
//! (`train.micro_batch=4`, `model.hidden_size=512`, `hardware.gpu="h100-80gb"`). The value
//! is read as TOML (a number, a boolean, a quoted string), and a bare word that is not
//! TOML as a string (`train.precision=bf16`). A key the plan does not have, or a value of
//! the wrong type, is one line of bad input naming the `--set`.

use crate::Error;
use vramplan_planner::RawConfig;

/// `raw` with each of `sets` applied in order.
pub fn apply(raw: &RawConfig, sets: &[String]) -> Result<RawConfig, Error> {
    let mut raw = raw.clone();
    for set in sets {
        raw = apply_one(&raw, set)?;
    }
    Ok(raw)
}

fn apply_one(raw: &RawConfig, set: &str) -> Result<RawConfig, Error> {
    let flag = format!("--set {set}");
    let bad = |what: String| Error::bad(&flag, what);
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, e.g. train.micro_batch=4".into()))?;
    let (section, field) = match key.trim().split('.').collect::<Vec<_>>()[..] {
        [s @ ("model" | "train" | "hardware"), f] if !f.is_empty() => (s, f),
        _ => {
            return Err(bad(format!(
                "{:?}: a key is model.NAME, train.NAME or hardware.NAME",
                key.trim()
            )))
        }
    };
    let mut value_all = toml::Value::try_from(raw).map_err(|e| bad(e.to_string()))?;
    let Some(table) = value_all.as_table_mut() else {
        return Err(bad("the plan is not a table".into()));
    };
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section_table) = entry.as_table_mut() else {
        return Err(bad(format!("[{section}] is not a table")));
    };
    section_table.insert(field.to_string(), value_of(value.trim()));
    value_all
        .try_into::<RawConfig>()
        .map_err(|e| bad(one_line(&e.to_string())))
}

/// A TOML value, or the text as a string when it is not one.
fn value_of(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RawConfig {
        RawConfig::from_toml("[model]\npreset = \"llama-3.2-1b\"\n[train]\nmicro_batch = 8\n")
            .unwrap()
    }

    #[test]
    fn values_replace_and_add_keys() {
        let sets = [
            "train.micro_batch=4".to_string(),
            "train.precision=bf16".to_string(),
            "train.learning_rate = 3e-4".to_string(),
            "hardware.gpu=\"cpu\"".to_string(),
        ];
        let r = apply(&plan(), &sets).unwrap();
        assert_eq!(r.train.micro_batch, Some(4));
        assert_eq!(r.train.precision.as_deref(), Some("bf16"));
        assert_eq!(r.train.learning_rate, Some(3e-4));
        assert_eq!(r.hardware.gpu.as_deref(), Some("cpu"));
    }

    #[test]
    fn bad_keys_and_values_are_one_line_naming_the_flag() {
        for (set, expect) in [
            ("train.micro_batch", "expected KEY=VALUE"),
            ("micro_batch=4", "a key is model.NAME"),
            ("train.micro.batch=4", "a key is model.NAME"),
            ("train.micro_bat=4", "unknown field"),
            ("train.micro_batch=four", "invalid type"),
            ("optimizer.lr=1", "a key is model.NAME"),
        ] {
            let e = apply(&plan(), &[set.to_string()]).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, Error::BadInput { .. }), "{set}: {e:?}");
            assert!(text.starts_with(&format!("--set {set}: ")), "{text}");
            assert!(text.contains(expect), "{set}: {text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
