//! `cargo xtask openapi`: write docs/openapi.json, the admin API's OpenAPI
//! document, from the code that generates it (`cradle_admin::document_json`).
//! A unit test of cradle-admin fails while the committed file differs, so
//! CI catches a route or a body changed without it.

use anyhow::{Context, Result};

use crate::repo_root;

pub fn write() -> Result<()> {
    let path = repo_root().join("docs/openapi.json");
    let text = cradle_admin::document_json();
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
        println!("==> {} is up to date", path.display());
        return Ok(());
    }
    // Whole or not at all: a temporary file beside it, then a rename.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    println!("==> wrote {} ({} bytes)", path.display(), text.len());
    Ok(())
}
