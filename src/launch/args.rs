//! Command lines pasted into a file: `python run_clm.py --flag value ...`, `torchrun
//! --nproc_per_node 8 -m scripts.base_train -- --depth=20`, split like a POSIX shell
//! (quotes, backslash line continuations, comments) into the launcher's options and the
//! script's flags.

use serde_json::{Map, Value};

/// A command line: the launcher's options (torchrun, accelerate launch, deepspeed) and the
/// script's flags, each as a dict of `name → value` (a bare flag is `true`).
#[derive(Debug, Default)]
pub struct CommandLine {
    pub script: String,
    pub launcher: Map<String, Value>,
    pub flags: Map<String, Value>,
}

/// Splits text into words like a shell: quotes group, a backslash before a newline joins
/// lines, `#` starts a comment at the start of a word.
pub fn words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.get_or_insert_with(String::new);
            }
            (None, '\\') => match chars.next() {
                Some('\n') | None => {}
                Some(n) => cur.get_or_insert_with(String::new).push(n),
            },
            // PowerShell's line continuation (seed 004's command).
            (None, '`') if chars.peek().is_some_and(|n| *n == '\n' || *n == '\r') => {}
            (None, '#') if cur.is_none() => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
            }
            (None, c) if c.is_whitespace() => out.extend(cur.take()),
            (None, c) => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if quote.is_some() {
        return Err("an unclosed quote".into());
    }
    out.extend(cur);
    Ok(out)
}

/// `--name value`, `--name=value` and bare `--name` (true) into a dict; dashes in names
/// become underscores (argparse accepts both spellings of nanochat's and TRL's flags).
fn options(words: &[String]) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let Some(name) = w.strip_prefix("--").or_else(|| w.strip_prefix('-')) else {
            return Err(format!("\"{w}\": expected a --flag"));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n, Value::String(v.to_string())),
            None => {
                let value = |w: &String| !w.starts_with('-') || w.parse::<f64>().is_ok();
                let n = words[i + 1..].iter().take_while(|w| value(w)).count();
                let vals = &words[i + 1..i + 1 + n];
                i += n;
                match vals {
                    [] => (name, Value::Bool(true)),
                    [one] => (name, Value::String(one.clone())),
                    // argparse's nargs="+" (TRL's --lora_target_modules q_proj v_proj).
                    many => (
                        name,
                        Value::Array(many.iter().cloned().map(Value::String).collect()),
                    ),
                }
            }
        };
        m.insert(name.replace('-', "_"), value);
        i += 1;
    }
    Ok(m)
}

/// Parses the first command of `text` that runs a script: `python [-m mod | x.py]`,
/// `torchrun ... [-m mod | x.py]`, `accelerate launch ...`, `deepspeed ...`, `trl sft`.
/// A `--` between the launcher's options and the script's flags is skipped.
pub fn command_line(text: &str) -> Result<CommandLine, String> {
    let w = words(text)?;
    let mut start = None;
    for (i, x) in w.iter().enumerate() {
        if x.ends_with(".py") || (x == "-m" && i + 1 < w.len()) {
            start = Some(i);
            break;
        }
        if x == "trl" && i + 1 < w.len() {
            start = Some(i);
            break;
        }
    }
    let Some(s) = start else {
        return Err("no script found: expected `python script.py --flag value ...`, `torchrun ... -m module -- --flag=value` or `trl sft ...`".into());
    };
    let (script, rest) = if w[s] == "-m" || w[s] == "trl" {
        (format!("{} {}", w[s], w[s + 1]), s + 2)
    } else {
        (w[s].clone(), s + 1)
    };
    // The launcher's own options: from after the program name to the script.
    let launch_opts: Vec<String> = w[..s]
        .iter()
        .skip_while(|x| !x.starts_with('-'))
        .filter(|x| !matches!(x.as_str(), "launch" | "--"))
        .cloned()
        .collect();
    let flags: Vec<String> = w[rest..]
        .iter()
        .filter(|x| x.as_str() != "--")
        .cloned()
        .collect();
    Ok(CommandLine {
        script,
        launcher: options(&launch_opts)?,
        flags: options(&flags)?,
    })
}

/// The process count a launcher's options ask for (`--nproc_per_node`, `--num_processes`,
/// `--num_gpus`) times `--nnodes`/`--num_machines`; None when they name none.
pub fn processes(launcher: &Map<String, Value>) -> Result<Option<u64>, String> {
    let get = |keys: &[&str]| -> Result<Option<u64>, String> {
        for k in keys {
            if let Some(v) = launcher.get(*k) {
                return match v.as_str().and_then(|s| s.parse::<u64>().ok()) {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(format!(
                        "--{k} = {v}: a whole number above 0 (a shell variable such as $NPROC_PER_NODE cannot be read: write the number)"
                    )),
                };
            }
        }
        Ok(None)
    };
    let per_node = get(&["nproc_per_node", "num_gpus"])?;
    let total = get(&["num_processes"])?;
    let nodes = get(&["nnodes", "num_nodes"])?.unwrap_or(1);
    Ok(total.or(per_node.map(|p| p * nodes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pasted_command_splits_like_a_shell() {
        let c = command_line(
            "torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --run=$WANDB_RUN",
        )
        .unwrap();
        assert_eq!(c.script, "-m scripts.base_train");
        assert_eq!(processes(&c.launcher).unwrap(), Some(8));
        assert_eq!(c.flags["depth"], "20");
        let c = command_line(
            "python run_clm.py \\\n  --model_name_or_path gpt2 \\\n  --do_train \\\n  --eos_token '<|im_end|>' --lr -1e-3",
        )
        .unwrap();
        assert_eq!(c.flags["model_name_or_path"], "gpt2");
        assert_eq!(c.flags["do_train"], true);
        assert_eq!(c.flags["eos_token"], "<|im_end|>");
        assert_eq!(c.flags["lr"], "-1e-3");
        let c =
            command_line("python sft.py --lora_target_modules q_proj v_proj --use_peft").unwrap();
        assert_eq!(
            c.flags["lora_target_modules"],
            serde_json::json!(["q_proj", "v_proj"])
        );
        assert_eq!(c.flags["use_peft"], true);
    }

    #[test]
    fn bad_command_lines_say_why() {
        assert!(command_line("echo hi")
            .unwrap_err()
            .starts_with("no script found"));
        assert!(words("python 'x.py")
            .unwrap_err()
            .contains("unclosed quote"));
        let c = command_line("torchrun --nproc_per_node=$N -m scripts.base_train").unwrap();
        assert!(processes(&c.launcher)
            .unwrap_err()
            .contains("$NPROC_PER_NODE"));
    }
}
