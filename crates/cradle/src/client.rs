//! The CLI's admin API client: the typed client, pointed and authenticated
//! as the global flags say.

use anyhow::{Context, Result};
use cradle_client::Target;
pub use cradle_client::blocking::Client as Api;

use crate::ApiArgs;

/// The client for `args`: the token from --token, CRADLE_ADMIN_TOKEN,
/// --token-file, or the data directory's admin.token, in that order.
pub fn connect(args: &ApiArgs) -> Result<Api> {
    let target = match (&args.token, &args.token_file) {
        (Some(t), _) => Target::new(&args.url, t.clone()),
        (None, Some(f)) => Target::with_token_file(&args.url, f)?,
        (None, None) => Target::with_token_file(&args.url, &args.data_dir.join("admin.token"))
            .context(
                "no admin token: pass --token-file, set CRADLE_ADMIN_TOKEN, or run from the directory holding cradle-data/",
            )?,
    };
    Ok(Api::new(target)?)
}
