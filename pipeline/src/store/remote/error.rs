//! How a step against the object store fails. Kept apart from the rest of
//! [`super`] so that the checkpoint, which the location's manifest holds,
//! can name these errors without a cycle.

use std::path::PathBuf;

/// One failing step against the object store. Each says whether it is
/// worth retrying ([`RemoteError::is_fatal`]).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Reject: the URL is not one we can use.
    #[error("{url} is not a data location Tally can use: {why}; write s3://BUCKET/PREFIX")]
    Url { url: String, why: String },
    /// Fatal: the client cannot be configured from the environment.
    #[error(
        "cannot set up the S3 client for {url}: {cause}; check AWS_REGION, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ALLOW_HTTP=true for an http:// endpoint)"
    )]
    Client {
        url: String,
        cause: Box<object_store::Error>,
    },
    /// Fatal: the bucket is not there.
    #[error(
        "bucket {bucket} does not exist (data location {url}): create it, or correct the bucket in --data / TALLY_DATA_DIR"
    )]
    NoBucket { bucket: String, url: String },
    /// Fatal: the credentials are refused, or lack a permission.
    #[error(
        "the object store refused to {action} {key} in bucket {bucket} (prefix {prefix}): {cause}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that they may read, write, list and delete under s3://{bucket}/{prefix}"
    )]
    Denied {
        action: &'static str,
        bucket: String,
        prefix: String,
        key: String,
        cause: Box<object_store::Error>,
    },
    /// Retry: the store is unreachable, throttles or fails (after the
    /// client's own retries).
    #[error(
        "cannot {action} {key} in bucket {bucket} yet: {cause}; retrying with backoff, nothing unfinished is acknowledged"
    )]
    Unavailable {
        action: &'static str,
        bucket: String,
        key: String,
        cause: Box<object_store::Error>,
    },
    /// Fatal: another run committed to this location since this one last did.
    #[error(
        "another tally run took over {url} (its checkpoint was rewritten by someone else); this run stops without committing, and what it had not committed stays unacknowledged for the new holder"
    )]
    Superseded { url: String },
    /// Fatal: the manifest cannot be read as one.
    #[error(
        "the checkpoint (manifest) of {url} is corrupt ({source}); run `tally replay` into a new location to rebuild it"
    )]
    Corrupt {
        url: String,
        source: serde_json::Error,
    },
    /// Fatal: the lease is held by a live run and this one is not a standby.
    #[error(
        "another tally run holds {url} ({holder}); stop it first, or start this one with --standby to take over when it stops"
    )]
    Held { url: String, holder: String },
    /// Fatal: local scratch space for the working copy.
    #[error(
        "cannot {action} the local working copy at {path}: {source}; check TMPDIR's free space"
    )]
    Local {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RemoteError {
    /// Whether retrying cannot help (the run stops and says what to do).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, RemoteError::Unavailable { .. })
    }
}
