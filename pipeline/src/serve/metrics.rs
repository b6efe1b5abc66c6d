//! What `tally serve` counts, and the Prometheus text it is shown in.
//!
//! Query counters and the duration histogram are atomics, bumped once per
//! query. The pipeline's numbers (checkpoint, counts, stream position) are
//! read when `/metrics` is scraped, not kept here.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::store::checkpoint::Checkpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pg,
    Flight,
    Http,
}

const PROTOCOLS: [(Protocol, &str); 3] = [
    (Protocol::Pg, "pgwire"),
    (Protocol::Flight, "flight_sql"),
    (Protocol::Http, "http"),
];

/// Upper bounds of the query duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0,
];

#[derive(Default)]
struct PerProtocol {
    served: AtomicU64,
    failed: AtomicU64,
    /// Non-cumulative counts per bucket; the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
    open: AtomicI64,
}

#[derive(Default)]
pub struct Metrics {
    per: [PerProtocol; 3],
    in_flight: AtomicI64,
}

fn index(p: Protocol) -> usize {
    match p {
        Protocol::Pg => 0,
        Protocol::Flight => 1,
        Protocol::Http => 2,
    }
}

/// Counts an open connection until dropped.
pub struct Open<'a> {
    gauge: &'a AtomicI64,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a running query until dropped.
pub struct Running<'a> {
    gauge: &'a AtomicI64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn served(&self, p: Protocol) {
        self.per[index(p)].served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self, p: Protocol) {
        self.per[index(p)].failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe(&self, p: Protocol, took: Duration) {
        let per = &self.per[index(p)];
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        per.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        per.sum_us.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Counts one more open connection unless `max` are open already.
    pub fn try_open(&self, p: Protocol, max: usize) -> Option<Open<'_>> {
        let gauge = &self.per[index(p)].open;
        gauge
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max as i64).then_some(n + 1)
            })
            .ok()?;
        Some(Open { gauge })
    }

    pub fn running(&self) -> Running<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Running {
            gauge: &self.in_flight,
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition: the server's counters, and the
    /// pipeline's state from `checkpoint` and the stream's last sequence.
    pub fn render(&self, checkpoint: Option<&Checkpoint>, stream_last_seq: Option<u64>) -> String {
        let mut w = String::new();
        let head = |w: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut w,
            "tally_serve_queries_total",
            "counter",
            "Queries answered, by protocol.",
        );
        for (p, label) in PROTOCOLS {
            let v = self.per[index(p)].served.load(Ordering::Relaxed);
            let _ = writeln!(w, "tally_serve_queries_total{{protocol=\"{label}\"}} {v}");
        }
        head(
            &mut w,
            "tally_serve_query_errors_total",
            "counter",
            "Queries that failed, by protocol.",
        );
        for (p, label) in PROTOCOLS {
            let v = self.per[index(p)].failed.load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "tally_serve_query_errors_total{{protocol=\"{label}\"}} {v}"
            );
        }
        head(
            &mut w,
            "tally_serve_query_duration_seconds",
            "histogram",
            "Time from a query's arrival to its last row, by protocol.",
        );
        for (p, label) in PROTOCOLS {
            let per = &self.per[index(p)];
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += per.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    w,
                    "tally_serve_query_duration_seconds_bucket{{protocol=\"{label}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += per.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "tally_serve_query_duration_seconds_bucket{{protocol=\"{label}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum = per.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                w,
                "tally_serve_query_duration_seconds_sum{{protocol=\"{label}\"}} {sum}"
            );
            let _ = writeln!(
                w,
                "tally_serve_query_duration_seconds_count{{protocol=\"{label}\"}} {cumulative}"
            );
        }
        head(
            &mut w,
            "tally_serve_open_connections",
            "gauge",
            "Open client connections, by protocol.",
        );
        for (p, label) in PROTOCOLS {
            let v = self.per[index(p)].open.load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "tally_serve_open_connections{{protocol=\"{label}\"}} {v}"
            );
        }
        if let Some(cp) = checkpoint {
            head(
                &mut w,
                "tally_checkpoint_sequence",
                "gauge",
                "Last stream sequence the views cover.",
            );
            let _ = writeln!(w, "tally_checkpoint_sequence {}", cp.last_seq);
            if let Some(clock) = cp.stream_clock_us {
                head(
                    &mut w,
                    "tally_stream_clock_seconds",
                    "gauge",
                    "Stream clock (latest accepted event time), Unix seconds.",
                );
                let _ = writeln!(w, "tally_stream_clock_seconds {}", clock as f64 / 1e6);
            }
            head(
                &mut w,
                "tally_messages_accepted_total",
                "counter",
                "Messages accepted into the views.",
            );
            let _ = writeln!(w, "tally_messages_accepted_total {}", cp.counts.accepted);
            head(
                &mut w,
                "tally_messages_duplicate_total",
                "counter",
                "Messages dropped as duplicates.",
            );
            let _ = writeln!(w, "tally_messages_duplicate_total {}", cp.counts.duplicate);
            head(
                &mut w,
                "tally_messages_dead_lettered_total",
                "counter",
                "Messages sent to the dead-letter stream, by reason.",
            );
            for (reason, n) in &cp.counts.dead_lettered {
                let _ = writeln!(
                    w,
                    "tally_messages_dead_lettered_total{{reason=\"{reason}\"}} {n}"
                );
            }
            head(
                &mut w,
                "tally_gap_messages",
                "gauge",
                "Stream messages recorded as gaps (never seen by the views).",
            );
            let _ = writeln!(
                w,
                "tally_gap_messages {}",
                cp.gaps.iter().map(|g| g.messages).sum::<u64>()
            );
        }
        if let Some(last) = stream_last_seq {
            head(
                &mut w,
                "tally_stream_last_sequence",
                "gauge",
                "Last sequence in the event stream.",
            );
            let _ = writeln!(w, "tally_stream_last_sequence {last}");
            if let Some(cp) = checkpoint {
                head(
                    &mut w,
                    "tally_lag_messages",
                    "gauge",
                    "Stream messages after the checkpoint.",
                );
                let _ = writeln!(w, "tally_lag_messages {}", last.saturating_sub(cp.last_seq));
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe(Protocol::Pg, Duration::from_millis(3));
        m.observe(Protocol::Pg, Duration::from_millis(70));
        m.observe(Protocol::Pg, Duration::from_secs(100));
        m.served(Protocol::Pg);
        let text = m.render(None, None);
        assert!(text.contains(
            "tally_serve_query_duration_seconds_bucket{protocol=\"pgwire\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "tally_serve_query_duration_seconds_bucket{protocol=\"pgwire\",le=\"0.1\"} 2"
        ));
        assert!(text.contains(
            "tally_serve_query_duration_seconds_bucket{protocol=\"pgwire\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("tally_serve_queries_total{protocol=\"pgwire\"} 1"));
    }
}
