//! `tally publish`: the producer tool. Reads CloudEvents JSON Lines,
//! validates each line against the contract, publishes valid ones to
//! `<prefix>.<tenant>.<type>` with `Nats-Msg-Id`, and waits for every
//! JetStream acknowledgement.
//!
//! Memory stays bounded whatever the input: a line is buffered only up to
//! the largest message the contract accepts; a longer one is reported as
//! `too_large` and skipped to its newline unread, and input with no newline
//! for [`MAX_UNENDED_LINE`] bytes is not JSON Lines and stops the run.

use std::collections::VecDeque;
use std::io::BufRead;
use std::io::{BufReader, Read};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;

use super::{CommandError, Globals};
use crate::event::{self, DlqReason, Limits, subject_for, validate_payload};
use crate::sink::nats::ack_or_republish;
use crate::source::jetstream::{SourceError, connect};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read input: {0}")]
    Read(std::io::Error),
    #[error(
        "line {line} has no end after {bytes} bytes: the input is not JSON Lines (one event per line, each at most {max_bytes} bytes); stopped reading there (the lines before it were handled as reported)"
    )]
    NoLineEnd {
        line: u64,
        bytes: u64,
        max_bytes: usize,
    },
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

pub(crate) use crate::sink::nats::MAX_WINDOW;

/// Bytes without a newline after which the input is taken for something
/// other than JSON Lines (a binary file, `/dev/zero`) and reading stops:
/// a line this long is hundreds of times the largest valid event.
pub(crate) const MAX_UNENDED_LINE: u64 = 64 << 20;

/// What a publish run did.
#[derive(Debug, Default, Clone)]
pub(crate) struct PublishReport {
    pub(crate) lines: u64,
    pub(crate) published: u64,
    /// JetStream said the message was a duplicate inside its window.
    pub(crate) duplicates: u64,
    pub(crate) invalid: u64,
    /// Invalid lines not sent even with `--allow-invalid`: those over the
    /// size limit, which are never held in memory whole.
    pub(crate) unsendable: u64,
    /// Reading stopped at this line (number, bytes read) because it had no
    /// end after [`MAX_UNENDED_LINE`] bytes.
    pub(crate) unended_line: Option<(u64, u64)>,
    /// (line number, reason, detail), at most the first 100.
    pub(crate) problems: Vec<(u64, DlqReason, String)>,
}

impl PublishReport {
    /// An invalid line: printed at once, or kept if among the first 100.
    fn problem(&mut self, opts: &PublishOptions, line: u64, reason: DlqReason, detail: String) {
        if opts.print_problems {
            eprintln!("line {line}: {reason}: {detail}");
        } else if self.problems.len() < 100 {
            self.problems.push((line, reason, detail));
        }
    }
}

/// Options of `tally publish`.
#[derive(Debug, Clone)]
pub(crate) struct PublishOptions {
    pub(crate) prefix: String,
    /// Send lines that fail validation anyway (to exercise the DLQ).
    pub(crate) allow_invalid: bool,
    /// Acks outstanding at once; capped at [`MAX_WINDOW`].
    pub(crate) window: usize,
    /// Print each invalid line's number and reason to stderr as it is
    /// read (`tally publish`), instead of keeping the first 100 in the
    /// report.
    pub(crate) print_problems: bool,
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

/// One line of input, without its `\n` (and `\r`).
enum Line {
    /// Held whole: at most the size limit (plus a `\r`).
    Whole,
    /// Over the size limit: skipped to its end, `bytes` long.
    TooLong { bytes: u64 },
}

/// Why [`Lines`] stopped.
enum LinesError {
    Read(std::io::Error),
    NoEnd { line: u64, bytes: u64 },
}

/// Splits input into lines, holding at most `limit + 1` bytes of one line.
struct Lines<R> {
    input: R,
    /// The size limit: a line is held if at most this plus a `\r`.
    limit: usize,
    give_up: u64,
    /// The current line when it is [`Line::Whole`].
    buf: Vec<u8>,
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(input: R, limit: usize, give_up: u64) -> Lines<R> {
        Lines {
            input,
            limit,
            give_up,
            buf: Vec::new(),
            number: 0,
        }
    }

    /// The next line, or `None` at the end of the input;
    /// [`LinesError::NoEnd`] for a line with no end after `give_up` bytes.
    fn next_line(&mut self) -> Result<Option<Line>, LinesError> {
        self.buf.clear();
        let mut bytes: u64 = 0;
        let mut too_long = false;
        let mut started = false;
        loop {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LinesError::Read(e)),
            };
            if chunk.is_empty() {
                if !started {
                    return Ok(None);
                }
                break;
            }
            if !started {
                started = true;
                self.number += 1;
            }
            let newline = memchr::memchr(b'\n', chunk);
            let part = &chunk[..newline.unwrap_or(chunk.len())];
            bytes += part.len() as u64;
            if !too_long {
                if self.buf.len() + part.len() > self.limit + 1 {
                    too_long = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            let used = part.len() + usize::from(newline.is_some());
            self.input.consume(used);
            if newline.is_some() {
                break;
            }
            if bytes > self.give_up {
                return Err(LinesError::NoEnd {
                    line: self.number,
                    bytes,
                });
            }
        }
        if too_long {
            return Ok(Some(Line::TooLong { bytes }));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        // The buffer takes one byte past the limit for a `\r`: without
        // one, that line is over the limit too.
        if self.buf.len() > self.limit {
            let bytes = self.buf.len() as u64;
            self.buf = Vec::new();
            return Ok(Some(Line::TooLong { bytes }));
        }
        Ok(Some(Line::Whole))
    }
}

/// Publishes every line of `input`.
pub(crate) async fn publish<R: BufRead>(
    js: &jetstream::Context,
    input: R,
    opts: &PublishOptions,
) -> Result<PublishReport, PublishError> {
    let limits = Limits::default();
    let mut report = PublishReport::default();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut lines = Lines::new(input, limits.max_bytes, MAX_UNENDED_LINE);
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(LinesError::Read(e)) => return Err(PublishError::Read(e)),
            Err(LinesError::NoEnd { line, bytes }) => {
                // The lines before it were sent: wait for their acks too.
                report.lines += 1;
                report.invalid += 1;
                report.unended_line = Some((line, bytes));
                break;
            }
        };
        let line_no = lines.number;
        if let Line::TooLong { bytes } = line {
            report.lines += 1;
            report.invalid += 1;
            if opts.allow_invalid {
                report.unsendable += 1;
            }
            let mut detail = format!(
                "line is {bytes} bytes, over the {}-byte limit",
                limits.max_bytes
            );
            if opts.allow_invalid {
                detail.push_str(
                    "; not sent even with --allow-invalid: a line over the limit is skipped unread, so it cannot be sent intact",
                );
            }
            report.problem(opts, line_no, DlqReason::TooLarge, detail);
            continue;
        }
        let line = &lines.buf;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.lines += 1;
        let (subject, msg_id) = match validate_payload(line, &limits) {
            Ok(e) => (
                subject_for(&opts.prefix, &e.tenant, &e.event_type),
                Some(event::nats_msg_id(&e.tenant, &e.source, &e.id)),
            ),
            Err(reject) => {
                report.invalid += 1;
                report.problem(opts, line_no, reject.reason, reject.detail);
                if !opts.allow_invalid {
                    continue;
                }
                (fallback_subject(&opts.prefix, line), None)
            }
        };
        let mut headers = HeaderMap::new();
        if let Some(id) = &msg_id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let payload = Bytes::copy_from_slice(line);
        let ack = js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
            .map_err(|e| PublishError::Publish {
                line: line_no,
                subject: subject.clone(),
                cause: e.to_string(),
            })?;
        pending.push_back(Pending {
            line: line_no,
            subject,
            headers,
            payload,
            ack,
        });
        while pending.len() >= opts.window.clamp(1, MAX_WINDOW) {
            if let Some(p) = pending.pop_front() {
                settle(js, p, &mut report).await?;
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        settle(js, p, &mut report).await?;
    }
    Ok(report)
}

/// A published line awaiting its acknowledgement, kept whole so that it can
/// be published again (see [`ack_or_republish`]).
struct Pending {
    line: u64,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    ack: PublishAckFuture,
}

async fn settle(
    js: &jetstream::Context,
    p: Pending,
    report: &mut PublishReport,
) -> Result<(), PublishError> {
    let Pending {
        line,
        subject,
        headers,
        payload,
        ack,
    } = p;
    let ack = ack_or_republish(js, ack, &subject, &headers, &payload)
        .await
        .map_err(|e| PublishError::Ack {
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

/// The arguments of `tally publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// File to read, or `-` for stdin.
    pub(crate) file: String,
    /// Publish invalid lines too (to exercise the dead-letter path).
    #[arg(long, env = "TALLY_PUBLISH_ALLOW_INVALID")]
    pub(crate) allow_invalid: bool,
}

/// `tally publish`, from the command line.
pub(crate) async fn command(g: &Globals, a: &PublishArgs) -> Result<(), CommandError> {
    let PublishArgs {
        file,
        allow_invalid,
    } = a;
    let input: Box<dyn Read> = if file == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(file).map_err(|source| CommandError::Input {
                what: file.clone(),
                source,
            })?,
        )
    };
    let client = connect(&g.nats).await?;
    let js = async_nats::jetstream::new(client);
    // A producer's first publish on a fresh server should just work.
    // A producer whose account has no JetStream of its own (one
    // account per tenant, see deploy/nats-tenants) cannot create or
    // inspect the stream: it publishes, and the acks say whether
    // the stream took each message.
    match crate::source::jetstream::ensure_event_stream(&js, &g.source_config(None, None)).await {
        Err(
            SourceError::Stream { stream, cause } | SourceError::StreamRefused { stream, cause },
        ) => {
            tracing::debug!(%stream, %cause, "cannot set up the event stream from this account; publishing to it as it is");
        }
        Ok(es) => {
            if let Some(n) = g
                .stream_partitions
                .filter(|n| *n > 1 && es.stored_partitions != Some(*n))
            {
                tracing::warn!(
                    stream = %g.stream,
                    stored_partitions = es.stored_partitions.unwrap_or(1),
                    "--stream-partitions {n} applies when Tally creates the stream; this one exists and keeps the subjects it stores (create a new stream to store partitions)"
                );
            }
        }
        Err(e) => return Err(e.into()),
    }
    let opts = PublishOptions {
        prefix: g.subject_prefix.clone(),
        allow_invalid: *allow_invalid,
        window: crate::sink::nats::MAX_WINDOW,
        print_problems: true,
    };
    let report = publish(&js, BufReader::with_capacity(1 << 20, input), &opts).await?;
    println!(
        "lines {}  published {}  (of which JetStream duplicates {})  invalid {}",
        report.lines, report.published, report.duplicates, report.invalid
    );
    if let Some((line, bytes)) = report.unended_line {
        return Err(PublishError::NoLineEnd {
            line,
            bytes,
            max_bytes: crate::event::Limits::default().max_bytes,
        }
        .into());
    }
    if report.invalid > 0 && !allow_invalid {
        return Err(CommandError::InvalidLines {
            invalid: report.invalid,
            lines: report.lines,
        });
    }
    if report.unsendable > 0 {
        return Err(CommandError::UnsendableLines {
            unsendable: report.unsendable,
            lines: report.lines,
            max_bytes: crate::event::Limits::default().max_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], keep: usize, give_up: u64) -> Vec<Result<(u64, String), String>> {
        let mut l = Lines::new(std::io::BufReader::with_capacity(4, input), keep, give_up);
        let mut out = Vec::new();
        loop {
            match l.next_line() {
                Ok(None) => return out,
                Ok(Some(Line::Whole)) => {
                    out.push(Ok((l.number, String::from_utf8(l.buf.clone()).unwrap())))
                }
                Ok(Some(Line::TooLong { bytes })) => out.push(Err(format!("{}:{bytes}", l.number))),
                Err(LinesError::NoEnd { line, bytes }) => {
                    out.push(Err(format!("no end: {line}:{bytes}")));
                    return out;
                }
                Err(LinesError::Read(e)) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn long_lines_are_skipped_unbuffered_and_counted() {
        let got = lines(b"ab\r\n0123456789\n\nxyz", 4, 100);
        assert_eq!(
            got,
            [
                Ok((1, "ab".into())),
                Err("2:10".into()),
                Ok((3, String::new())),
                Ok((4, "xyz".into())),
            ]
        );
        // Up to the limit plus a `\r`, a line is held (and the `\r` dropped);
        // one byte past the limit without a `\r` is over it.
        assert_eq!(lines(b"1234\r\n", 4, 100), [Ok((1, "1234".into()))]);
        assert_eq!(lines(b"12345", 4, 100), [Err("1:5".into())]);
        assert_eq!(lines(b"12345\r\n", 4, 100), [Err("1:6".into())]);
        assert_eq!(lines(b"123456", 4, 100), [Err("1:6".into())]);
    }

    #[test]
    fn a_line_without_end_stops_the_input() {
        let input = [b'x'; 64];
        let got = lines(&input, 5, 20);
        // Stopped soon after 20 bytes, not at the end of the 64.
        let [Err(e)] = got.as_slice() else {
            panic!("{got:?}")
        };
        let read: u64 = e.strip_prefix("no end: 1:").unwrap().parse().unwrap();
        assert!((21..=24).contains(&read), "{read}");
    }
}
