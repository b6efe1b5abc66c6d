//! `tally publish`: the producer tool. Reads CloudEvents JSON Lines,
//! validates each line against the contract, publishes valid ones to
//! `<prefix>.<tenant>.<type>` with `Nats-Msg-Id`, and waits for every
//! JetStream acknowledgement.

use std::collections::VecDeque;
use std::io::BufRead;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;

use crate::event::{self, DlqReason, Limits, subject_for, validate_payload};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read input: {0}")]
    Read(std::io::Error),
    #[error("cannot publish line {line} to {subject}: {cause}")]
    Publish {
        line: u64,
        subject: String,
        cause: String,
    },
    #[error(
        "JetStream did not acknowledge line {line} ({subject}): {cause} — is there a stream capturing {subject}? `tally run` creates it"
    )]
    Ack {
        line: u64,
        subject: String,
        cause: String,
    },
}

pub use crate::sink::nats::MAX_WINDOW;

/// What a publish run did.
#[derive(Debug, Default, Clone)]
pub struct PublishReport {
    pub lines: u64,
    pub published: u64,
    /// JetStream said the message was a duplicate inside its window.
    pub duplicates: u64,
    pub invalid: u64,
    /// (line number, reason, detail), at most the first 100.
    pub problems: Vec<(u64, DlqReason, String)>,
}

/// Options of `tally publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub prefix: String,
    /// Send lines that fail validation anyway (to exercise the DLQ).
    pub allow_invalid: bool,
    /// Acks outstanding at once; capped at [`MAX_WINDOW`].
    pub window: usize,
}

/// Where an invalid line goes with `--allow-invalid`: its subject when the
/// envelope names a tenant and type, else a catch-all subject.
fn fallback_subject(prefix: &str, line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        tenant: Option<String>,
        #[serde(rename = "type")]
        event_type: Option<String>,
    }
    let probe: Option<Probe> = serde_json::from_slice(line).ok();
    let token_ok = |s: &str| !s.is_empty() && !s.contains([' ', '*', '>', '\t', '\r', '\n']);
    match probe {
        Some(Probe {
            tenant: Some(t),
            event_type: Some(ty),
        }) if token_ok(&t) && token_ok(&ty) && !ty.starts_with('.') && !ty.ends_with('.') => {
            subject_for(prefix, &t, &ty)
        }
        _ => format!("{prefix}.invalid.unknown"),
    }
}

/// Publishes every line of `input`.
pub async fn publish<R: BufRead>(
    js: &jetstream::Context,
    input: R,
    opts: &PublishOptions,
) -> Result<PublishReport, PublishError> {
    let limits = Limits::default();
    let mut report = PublishReport::default();
    let mut pending: VecDeque<(u64, String, PublishAckFuture)> = VecDeque::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let mut line = line.map_err(PublishError::Read)?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.lines += 1;
        let (subject, msg_id) = match validate_payload(&line, &limits) {
            Ok(e) => (
                subject_for(&opts.prefix, &e.tenant, &e.event_type),
                Some(event::nats_msg_id(&e.tenant, &e.source, &e.id)),
            ),
            Err(reject) => {
                report.invalid += 1;
                if report.problems.len() < 100 {
                    report
                        .problems
                        .push((line_no, reject.reason, reject.detail));
                }
                if !opts.allow_invalid {
                    continue;
                }
                (fallback_subject(&opts.prefix, &line), None)
            }
        };
        let mut headers = HeaderMap::new();
        if let Some(id) = &msg_id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let ack = js
            .publish_with_headers(subject.clone(), headers, Bytes::from(line))
            .await
            .map_err(|e| PublishError::Publish {
                line: line_no,
                subject: subject.clone(),
                cause: e.to_string(),
            })?;
        pending.push_back((line_no, subject, ack));
        while pending.len() >= opts.window.clamp(1, MAX_WINDOW) {
            if let Some(p) = pending.pop_front() {
                settle(p, &mut report).await?;
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        settle(p, &mut report).await?;
    }
    Ok(report)
}

async fn settle(
    (line, subject, ack): (u64, String, PublishAckFuture),
    report: &mut PublishReport,
) -> Result<(), PublishError> {
    let ack = ack.await.map_err(|e| PublishError::Ack {
        line,
        subject,
        cause: e.to_string(),
    })?;
    report.published += 1;
    if ack.duplicate {
        report.duplicates += 1;
    }
    Ok(())
}
