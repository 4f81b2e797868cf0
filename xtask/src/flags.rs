//! The benchmarks' options: `--flag value` pairs, nothing fancier, so a few
//! lines serve all of them (and xtask stays quick to build).

use anyhow::{Result, anyhow, bail};

/// Split `args` into `(flag, value)` pairs; every flag takes a value.
pub fn pairs(args: &[String]) -> Result<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if !flag.starts_with("--") {
            bail!("unexpected argument {flag:?} (see `cargo xtask --help`)");
        }
        let value = it.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
        out.push((flag.as_str(), value.as_str()));
    }
    Ok(out)
}

/// A whole number of at least `min`, or an error naming the flag.
pub fn number(flag: &str, value: &str, min: usize) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| anyhow!("{flag}: {value:?} is not a whole number of at least {min}"))
}
