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

/// The instance `key` and the admin URL of the host that serves it: the
/// asked host's own when it serves it, else the one the cluster lists.
/// Operations that run on the serving host only (migrations, agent
/// actions) are sent there.
pub fn serving_host(api: &Api, key: &str) -> Result<(cradle_model::api::InstanceView, String)> {
    let inst = api.send(cradle_client::route::instance(key))?;
    let cluster = api.send(cradle_client::route::cluster())?;
    if inst.host == cluster.host {
        return Ok((inst, api.target().base().to_string()));
    }
    let h = cluster
        .hosts
        .iter()
        .find(|h| h.name == inst.host)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "instance {key} is on host {:?}, which the cluster does not know",
                inst.host
            )
        })?;
    let url = h.admin_url.clone();
    Ok((inst, url))
}
