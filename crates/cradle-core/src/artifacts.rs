//! What an operator can take away for an instance: its config drive, built
//! now from the renderer the metadata service uses, and its
//! personalization package, fetched now with its secret credentials.

use cradle_drive::{DriveError, Format};
use cradle_personalize::{Credentials, Limits, fetch};
use tracing::{error, info, warn};

use crate::caller::authorize_package;
use crate::{Caller, Core, Error, Kind};

/// A config drive image, whole in memory.
#[derive(Debug)]
pub struct ConfigDrive {
    pub instance: uuid::Uuid,
    pub format: Format,
    pub image: Vec<u8>,
}

/// A personalization package fetched for the caller: an anonymous file (no
/// name on disk, gone with the last handle) of `bytes` bytes, rewound.
#[derive(Debug)]
pub struct PackageDownload {
    pub file: std::fs::File,
    pub bytes: u64,
    pub sha256: String,
}

impl Core {
    /// Build the instance's config drive. `format` is `iso9660` (the
    /// default) or `vfat`.
    pub async fn config_drive(
        &self,
        caller: &Caller,
        key: &str,
        format: Option<&str>,
    ) -> Result<ConfigDrive, Error> {
        let format: Format = format
            .unwrap_or("iso9660")
            .parse()
            .map_err(|e| Error::refused(Kind::BadRequest, "bad_request", e))?;
        let instance = self.visible(caller, key)?;
        let dynamic = self
            .vendordata
            .fetch(&instance)
            .await
            .map_err(|fatal| Error::unavailable("vendordata_failed", fatal.to_string()))?;
        let (vendor_data, limits) = (self.vendor_data.clone(), self.drive_limits);
        let _permit = self
            .drive_builds
            .acquire()
            .await
            .map_err(|_| Error::Internal("the drive builders' semaphore is closed".into()))?;
        let id = instance.id;
        crate::blocking(move || {
            let today = cradle_render::date(time::OffsetDateTime::now_utc());
            let ctx =
                cradle_render::Context::new(&today, &vendor_data).with_dynamic(&dynamic.entries);
            let mut image = Vec::new();
            match cradle_drive::build(&instance, &ctx, format, limits, &mut image) {
                Ok(_) => Ok(ConfigDrive {
                    instance: id,
                    format,
                    image,
                }),
                Err(e @ (DriveError::TooLarge { .. } | DriveError::VfatFull { .. })) => Err(
                    Error::refused(Kind::Invalid, "drive_too_large", e.to_string()),
                ),
                Err(other) => {
                    error!(instance = %id, error = %other, "building a config drive failed");
                    Err(Error::Internal(format!("building a config drive: {other}")))
                }
            }
        })
        .await
    }

    /// Fetch the instance's personalization package from its URL, with its
    /// secret download credentials, for this one download. Each call
    /// fetches afresh: a package changed upstream is never served stale.
    /// A `file://` URL is read with the server's rights: operators only.
    pub async fn personalization_package(
        &self,
        caller: &Caller,
        key: &str,
    ) -> Result<PackageDownload, Error> {
        let instance = self.visible(caller, key)?;
        let Some(url) = instance.personalization_url.clone() else {
            return Err(Error::not_found(
                "no_personalization",
                format!("instance {} has no personalization_url", instance.name),
            ));
        };
        authorize_package(caller, Some(&url), "serving")?;
        let credentials = Credentials::of(&instance.os_params);
        let pin = instance.personalization_sha256.clone();
        let _permit = self
            .package_fetches
            .acquire()
            .await
            .map_err(|_| Error::Internal("the package fetchers' semaphore is closed".into()))?;
        let id = instance.id;
        crate::blocking(move || {
            let fetched = fetch(
                &url,
                &credentials,
                Limits::default().max_compressed,
                pin.as_deref(),
            )
            .map_err(|e| match e {
                cradle_personalize::Error::Fetch { .. } | cradle_personalize::Error::Limit(_) => {
                    warn!(instance = %id, error = %e, "personalization package fetch failed");
                    Error::refused(
                        Kind::Upstream,
                        "personalization_fetch_failed",
                        e.to_string(),
                    )
                }
                other => Error::Internal(format!("fetching a personalization package: {other}")),
            })?;
            let (bytes, sha256) = (fetched.bytes, fetched.sha256.clone());
            let file = fetched
                .into_file()
                .map_err(|e| Error::Internal(format!("cannot rewind the fetched package: {e}")))?;
            info!(instance = %id, bytes, sha256 = %sha256, "personalization package served");
            Ok(PackageDownload {
                file,
                bytes,
                sha256,
            })
        })
        .await
    }
}
