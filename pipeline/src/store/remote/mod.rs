//! A data location in object storage: `s3://bucket/prefix`.
//!
//! There is no rename in S3, so the commit point is an object of its own:
//! `<prefix>/checkpoint.json` is the checkpoint of a local directory plus
//! the list of objects that make up each view ([`Manifest`]). It is written
//! with a conditional put, `If-Match` the version this writer last wrote
//! (or `If-None-Match: *` for the first one), so two writers can never both
//! commit: the loser's put fails and it stops ([`RemoteError::Superseded`]).
//! View objects are written before the manifest that names them; an object
//! no manifest names is invisible to readers and collected later.
//!
//! Layout under the prefix (one prefix per data location, so a partitioned
//! ingest can give each partition a prefix of its own later, without moving
//! anything):
//!
//! ```text
//! checkpoint.json                       the manifest (commit point)
//! lease.json                            who runs on this location ([`lease`])
//! handoff/{request,paused,done}         a replay taking over from a live run
//! tally.toml                            settings, optional
//! views/<view>/seq-<first>-<last>-<writer>.parquet
//! ```
//!
//! A view object's name carries its writer's token, so a paused former
//! holder that wakes up cannot overwrite an object its successor committed.
//!
//! [`WorkingCopy`] is how `tally run` uses such a location: the run works on
//! a temporary local copy exactly as on a data directory, and every local
//! commit is pushed (new files up, then the manifest, then the objects it no
//! longer names away) before the batch is acknowledged.

pub mod error;
pub mod lease;
pub mod working;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;

pub use error::RemoteError;
pub use working::WorkingCopy;

/// The scheme of an object-storage data location.
pub const SCHEME: &str = "s3://";
/// The manifest: the checkpoint and the objects it commits, under the
/// name a data directory's checkpoint has.
pub const MANIFEST: &str = super::checkpoint::FILE_NAME;
/// The settings file a location may carry, as a data directory does.
pub const SETTINGS: &str = "tally.toml";

/// An `s3://bucket/prefix` location and its client.
#[derive(Debug, Clone)]
pub struct Location {
    /// As the user wrote it (without a trailing slash), for messages.
    pub url: String,
    pub bucket: String,
    /// The prefix, without slashes at either end ("" for the bucket's root).
    pub prefix: String,
    pub store: Arc<dyn ObjectStore>,
}

/// One object of a view that a manifest commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Key relative to the location's prefix (`views/<view>/...`).
    pub key: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
}

/// The commit point of an object-storage location: the checkpoint (same
/// fields as a data directory's `checkpoint.json`) and the objects of each
/// view as of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    /// The token of the run that wrote it.
    pub writer: String,
    /// View -> its objects, in stream order.
    pub files: BTreeMap<String, Vec<ManifestFile>>,
}

/// Is `path` (as given to `--data`) an object-storage location?
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// How long one request may take, and how the client retries a failed one
/// (5xx, throttling, a dropped connection) before we see the error: within
/// a few seconds, so that a commit's own backoff (which keeps everything
/// unacknowledged) takes over during a long outage.
fn client_settings() -> (ClientOptions, RetryConfig) {
    let options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(60));
    let retry = RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(15),
        ..RetryConfig::default()
    };
    (options, retry)
}

impl Location {
    /// The location `name` under this one (a partition's), sharing its
    /// client and so its connections: opening every partition of a
    /// location costs no new client.
    pub fn within(&self, name: &str) -> Location {
        let prefix = if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        };
        Location {
            url: format!("{}/{name}", self.url),
            bucket: self.bucket.clone(),
            prefix,
            store: Arc::clone(&self.store),
        }
    }

    /// The location `path` names, if it is an `s3://` URL; its client is
    /// configured from the standard `AWS_*` variables.
    pub fn parse(path: &Path) -> Result<Option<Location>, RemoteError> {
        let Some(text) = path.to_str().filter(|s| s.starts_with(SCHEME)) else {
            return Ok(None);
        };
        let rest = &text[SCHEME.len()..];
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_owned();
        if bucket.is_empty() {
            return Err(RemoteError::Url {
                url: text.to_owned(),
                why: "no bucket".into(),
            });
        }
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(RemoteError::Url {
                url: text.to_owned(),
                why: "the prefix may not contain . or .. parts".into(),
            });
        }
        let url = if prefix.is_empty() {
            format!("{SCHEME}{bucket}")
        } else {
            format!("{SCHEME}{bucket}/{prefix}")
        };
        let (options, retry) = client_settings();
        // The standard AWS_* variables, as `AmazonS3Builder::from_env` reads
        // them, on top of our client options (which it would replace).
        let mut builder = AmazonS3Builder::new()
            .with_client_options(options)
            .with_retry(retry);
        for (key, value) in std::env::vars() {
            if key.starts_with("AWS_")
                && let Ok(key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                builder = builder.with_config(key, value);
            }
        }
        let store = builder
            .with_bucket_name(bucket)
            .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
            .build()
            .map_err(|cause| RemoteError::Client {
                url: url.clone(),
                cause: Box::new(cause),
            })?;
        Ok(Some(Location {
            url,
            bucket: bucket.to_owned(),
            prefix,
            store: Arc::new(store),
        }))
    }

    /// The object `key` (relative to the prefix).
    pub fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// `s3://bucket/<prefix>/<key>`, as DataFusion names the object.
    pub fn object_url(&self, key: &str) -> String {
        format!("{SCHEME}{}/{}", self.bucket, self.path(key))
    }

    /// Sorts a failed request: fatal (refused, no bucket) or retry.
    fn fail(&self, action: &'static str, key: &str, source: object_store::Error) -> RemoteError {
        // Some requests (listing) reach us as `Generic` whatever the HTTP
        // status; the S3 error code in the answer still says what it was.
        if let object_store::Error::Generic { .. } = &source {
            match s3_error_code(&source).as_deref() {
                Some("NoSuchBucket") => {
                    return RemoteError::NoBucket {
                        bucket: self.bucket.clone(),
                        url: self.url.clone(),
                    };
                }
                Some(
                    "AccessDenied"
                    | "SignatureDoesNotMatch"
                    | "InvalidAccessKeyId"
                    | "InvalidToken"
                    | "ExpiredToken"
                    | "AllAccessDisabled",
                ) => {
                    return RemoteError::Denied {
                        action,
                        bucket: self.bucket.clone(),
                        prefix: self.prefix.clone(),
                        key: key.to_owned(),
                        cause: Box::new(source),
                    };
                }
                _ => {}
            }
        }
        match source {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => RemoteError::Denied {
                action,
                bucket: self.bucket.clone(),
                prefix: self.prefix.clone(),
                key: key.to_owned(),
                cause: Box::new(source),
            },
            object_store::Error::NotFound { .. } => RemoteError::NoBucket {
                bucket: self.bucket.clone(),
                url: self.url.clone(),
            },
            object_store::Error::Precondition { .. }
            | object_store::Error::AlreadyExists { .. } => RemoteError::Superseded {
                url: self.url.clone(),
            },
            source => RemoteError::Unavailable {
                action,
                bucket: self.bucket.clone(),
                key: key.to_owned(),
                cause: Box::new(source),
            },
        }
    }

    /// Lists the prefix once: a missing bucket or refused credentials show
    /// here, before anything else is tried.
    pub async fn probe(&self) -> Result<(), RemoteError> {
        let at = (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()));
        self.store
            .list_with_delimiter(at.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| self.fail("list", &format!("{}/", self.prefix), e))
    }

    /// The object `key`, `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, UpdateVersion)>, RemoteError> {
        let got = match self.store.get(&self.path(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail("read", key, e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| self.fail("read", key, e))?;
        Ok(Some((bytes, version)))
    }

    /// The version of `key` now, `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<String>, RemoteError> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(m.e_tag.unwrap_or_default())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail("read", key, e)),
        }
    }

    /// Puts `bytes` at `key` with `mode`; a failed precondition is
    /// [`RemoteError::Superseded`].
    pub async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<UpdateVersion, RemoteError> {
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&self.path(key), PutPayload::from_bytes(bytes), opts)
            .await
            .map(UpdateVersion::from)
            .map_err(|e| self.fail("write", key, e))
    }

    /// Deletes `key`; one that is already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("delete", key, e)),
        }
    }

    /// Every key under `dir` (relative to the prefix).
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, RemoteError> {
        let base = self.path(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.fail("list", dir, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                m.location
                    .as_ref()
                    .strip_prefix(strip.as_str())
                    .map(str::to_owned)
            })
            .collect())
    }

    /// The manifest and its version; `None` for a location nothing has
    /// committed to yet.
    pub async fn manifest(&self) -> Result<Option<(Manifest, UpdateVersion)>, RemoteError> {
        let Some((bytes, version)) = self.get(MANIFEST).await? else {
            return Ok(None);
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| RemoteError::Corrupt {
                url: self.url.clone(),
                source,
            })?;
        Ok(Some((manifest, version)))
    }

    /// Writes `manifest`, conditional on `after` (the version this writer
    /// last saw; `None`: there must be none yet).
    pub async fn put_manifest(
        &self,
        manifest: &Manifest,
        after: Option<&UpdateVersion>,
    ) -> Result<UpdateVersion, RemoteError> {
        let bytes = serde_json::to_vec_pretty(manifest).map_err(|e| RemoteError::Unavailable {
            action: "encode",
            bucket: self.bucket.clone(),
            key: MANIFEST.to_owned(),
            cause: Box::new(object_store::Error::Generic {
                store: "tally",
                source: Box::new(e),
            }),
        })?;
        let mode = match after {
            Some(v) => PutMode::Update(v.clone()),
            None => PutMode::Create,
        };
        self.put(MANIFEST, Bytes::from(bytes), mode).await
    }

    /// Uploads the local file `from` as `key`.
    pub async fn upload(&self, from: &Path, key: &str) -> Result<u64, RemoteError> {
        let bytes = tokio::fs::read(from)
            .await
            .map_err(|source| RemoteError::Local {
                action: "read",
                path: from.to_path_buf(),
                source,
            })?;
        let len = bytes.len() as u64;
        self.put(key, Bytes::from(bytes), PutMode::Overwrite)
            .await?;
        Ok(len)
    }

    /// Downloads `key` into the local file `to`.
    pub async fn download(&self, key: &str, to: &Path) -> Result<(), RemoteError> {
        let Some((bytes, _)) = self.get(key).await? else {
            return Err(RemoteError::Unavailable {
                action: "read",
                bucket: self.bucket.clone(),
                key: key.to_owned(),
                cause: Box::new(object_store::Error::NotFound {
                    path: key.to_owned(),
                    source: "named by the checkpoint but missing".into(),
                }),
            });
        };
        tokio::fs::write(to, &bytes)
            .await
            .map_err(|source| RemoteError::Local {
                action: "write",
                path: to.to_path_buf(),
                source,
            })
    }
}

/// The S3 error code (`<Code>NoSuchBucket</Code>`) of a failed request's
/// answer, if the error carries one: the protocol's own classification.
fn s3_error_code(e: &object_store::Error) -> Option<String> {
    let text = e.to_string();
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(text[start..start + len].to_owned())
}

/// The key of a view object written by `writer`.
pub fn view_key(view: &str, first: u64, last: u64, writer: &str) -> String {
    format!("views/{view}/seq-{first:020}-{last:020}-{writer}.parquet")
}

/// A fresh writer token: 16 hex digits.
pub fn new_token() -> String {
    let mut raw = [0u8; 8];
    // No randomness at all is next to impossible on Linux; the process id
    // still tells the writers of one host apart then.
    if getrandom::fill(&mut raw).is_err() {
        raw = u64::from(std::process::id()).to_le_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let l = Location::parse(Path::new("s3://bills/prod/tally/"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("bills", "prod/tally")
        );
        assert_eq!(l.url, "s3://bills/prod/tally");
        assert_eq!(l.path(MANIFEST).as_ref(), "prod/tally/checkpoint.json");
        assert_eq!(
            l.object_url("views/usage/x.parquet"),
            "s3://bills/prod/tally/views/usage/x.parquet"
        );
        let root = Location::parse(Path::new("s3://bills")).unwrap().unwrap();
        assert_eq!(root.path(MANIFEST).as_ref(), "checkpoint.json");
        assert!(
            Location::parse(Path::new("./tally-data"))
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            Location::parse(Path::new("s3:///x")),
            Err(RemoteError::Url { .. })
        ));
        assert!(matches!(
            Location::parse(Path::new("s3://b/a/../c")),
            Err(RemoteError::Url { .. })
        ));
    }

    #[test]
    fn reads_the_s3_error_code_of_an_answer() {
        let e = object_store::Error::Generic {
            store: "S3",
            source: "403 Forbidden: <?xml?><Error><Code>SignatureDoesNotMatch</Code></Error>"
                .into(),
        };
        assert_eq!(s3_error_code(&e).as_deref(), Some("SignatureDoesNotMatch"));
        let plain = object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        };
        assert_eq!(s3_error_code(&plain), None);
    }

    #[test]
    fn manifest_reads_as_a_checkpoint_too() {
        let cp = Checkpoint::new(
            "S",
            "2026-01-01T00:00:00Z",
            &crate::config::Settings::default(),
        );
        let m = Manifest {
            checkpoint: cp.clone(),
            writer: "ab".into(),
            files: BTreeMap::from([(
                "usage".to_owned(),
                vec![ManifestFile {
                    key: view_key("usage", 1, 9, "ab"),
                    first_seq: 1,
                    last_seq: 9,
                    bytes: 10,
                }],
            )]),
        };
        let text = serde_json::to_vec(&m).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&text).unwrap(), m);
        assert_eq!(serde_json::from_slice::<Checkpoint>(&text).unwrap(), cp);
    }
}
