//! The synchronous core of a run: validation, dedup and the operators,
//! batch by batch, on two cores. No I/O at all (restore is handed the
//! archived events and stored rows; compaction asks it for snapshots) and no
//! clock in any result: the same messages in the same order give the same
//! state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use tracing::debug;

use super::RuntimeError;
use crate::config::Settings;
use crate::event::Payload;
use crate::event::alert::Alert;
use crate::event::partition::{Owner, Partition};
use crate::event::{Event, Limits, validate_message};
use crate::operator::restatements::{self, Restatement};
use crate::operator::subscription::SubEvent;
use crate::operator::window::month_bounds;
use crate::operator::{self, FinalRow, Ledger, Operator, OperatorError, Step, Storage, Verdict};
use crate::sink::dlq::DeadLetter;
use crate::state::cardinality::DimensionGuard;
use crate::state::dedup::{self, Dedup};
use crate::store::checkpoint::Checkpoint;

/// One message as the processor sees it.
pub struct Incoming<'a> {
    pub stream_seq: u64,
    pub published_at: i64,
    pub subject: &'a str,
    pub payload: &'a Bytes,
}

/// A view's rows for one batch.
pub struct ViewRows {
    pub view: &'static str,
    pub schema: SchemaRef,
    pub batch: RecordBatch,
    /// The column a versioned view's files are sorted by (the writer sorts
    /// them, off the processor's thread); `None` for an appended view, whose
    /// rows stay in stream order.
    pub sort_by: Option<&'static str>,
}

/// A versioned view's snapshot, in the chunks it was built in (see
/// [`Processor::take_due_snapshots`]).
pub struct SnapshotRows {
    pub view: &'static str,
    pub schema: SchemaRef,
    pub chunks: Vec<RecordBatch>,
}

/// What a view's version files are sorted by: `tenant`, which most point
/// queries (and every tenant account's) filter on, else the key's first
/// column.
fn sort_column(storage: Storage, schema: &SchemaRef) -> Option<&'static str> {
    match storage {
        Storage::Versioned { .. } if schema.column_with_name("tenant").is_some() => Some("tenant"),
        Storage::Versioned { key, .. } => key.first().copied(),
        Storage::Append => None,
    }
}

/// Operators (with their registry index) that run on one thread.
type Group<'a> = Vec<(usize, &'a mut Box<dyn Operator>)>;

/// The synchronous core: validation, dedup and the operators. No I/O and no
/// clock in any result (a monotonic timer only measures operator costs to
/// share them between two threads); the same messages in the same order
/// give the same state.
pub struct Processor {
    limits: Limits,
    prefix: String,
    dedup: Dedup,
    /// Which accepted events are voided, and what a void needs to retract.
    ledger: Ledger,
    /// The bound on distinct dimension values.
    dimensions: DimensionGuard,
    operators: Vec<Box<dyn Operator>>,
    /// Each operator's measured cost (apply + cut rows) over recent
    /// batches, to split them into two groups of about equal work. Only
    /// which thread runs an operator depends on it, never a result.
    costs: Vec<Duration>,
    live: bool,
    /// Allowed lateness (µs): what is final, for restatements.
    lateness_us: i64,
    /// Restatements to publish (a live run's).
    restated: Vec<Restatement>,
    /// Tenants that ever sent a `billing_anchor`: their billing periods
    /// need not end with calendar months, so any of their messages older
    /// than the lateness may restate (a superset is safe: it only folds
    /// more messages alone).
    anchored: HashSet<Arc<str>>,
    /// Operators rebuilding from the archive during a restore.
    restoring: Vec<usize>,
    /// Archived events folded by the current restore.
    restored: u64,
    /// Rows written per versioned view since its last snapshot (compaction policy).
    versions_written: HashMap<&'static str, usize>,
    /// In-memory state of the checkpoint (counts, positions); saved by the shell.
    pub checkpoint: Checkpoint,
    /// The consumer delivers only this partition's subjects: no message
    /// is another partition's (see [`Processor::set_server_filtered`]).
    server_filtered: bool,
}

impl Processor {
    pub fn new(settings: &Settings, prefix: &str, checkpoint: Checkpoint) -> Processor {
        Processor {
            limits: settings.limits(),
            prefix: prefix.to_owned(),
            dedup: Dedup::new(settings.dedup_horizon_us),
            ledger: Ledger::new(),
            dimensions: DimensionGuard::new(settings.max_dimension_values),
            operators: operator::registry(settings),
            costs: Vec::new(),
            live: true,
            lateness_us: settings.lateness_us,
            restated: Vec::new(),
            anchored: HashSet::new(),
            restoring: Vec::new(),
            restored: 0,
            versions_written: HashMap::new(),
            checkpoint,
            server_filtered: false,
        }
    }

    /// Processes a batch of messages in stream order; returns the dead
    /// letters. Messages at or below the checkpoint are ignored
    /// (redeliveries). Gives exactly the state of processing the messages
    /// one at a time, using two cores: validation (a pure function of
    /// each message) runs on both halves of the batch at once, and the
    /// operators (independent state machines that each see every accepted
    /// event in order) run in two groups at once.
    pub fn process_batch(&mut self, msgs: &[Incoming<'_>]) -> Vec<DeadLetter> {
        let (prefix, limits) = (self.prefix.as_str(), &self.limits);
        let partition = self.checkpoint.partition;
        let filtered = self.server_filtered;
        // The dedup key is hashed here too, on both halves. Another
        // partition's message is passed over from its subject alone.
        let validate = |m: &Incoming<'_>| {
            let owner = match partition {
                None => Owner::Own,
                // The server delivered this partition's subjects only.
                Some(_) if filtered => Partition::owner_of_delivered(m.subject, prefix),
                Some(p) => p.owner(m.subject, prefix),
            };
            if owner == Owner::Other {
                return None;
            }
            let checked = validate_message(
                m.payload,
                m.subject,
                prefix,
                m.stream_seq,
                m.published_at,
                limits,
            )
            .map(|event| {
                let key = dedup::key(&event.tenant, &event.source, &event.id);
                (event, key)
            });
            Some((owner, checked))
        };
        let results = on_two_cores(msgs, validate);
        let cp = &mut self.checkpoint;
        let mut letters = Vec::new();
        let mut accepted = Vec::with_capacity(msgs.len());
        // Events stay where validation put them; the operators see them by
        // reference (moving the large events would cost more than the dedup).
        for (m, result) in msgs.iter().zip(&results) {
            if m.stream_seq <= cp.last_seq {
                continue;
            }
            cp.advance(m.stream_seq, m.published_at);
            let Some((owner, result)) = result else {
                continue;
            };
            // Refused by validation, or past a tenant's dimension bound.
            let checked = result
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|(event, key)| Ok((event, key, self.dimensions.check(event)?)));
            let (event, key, values) = match checked {
                Ok(checked) => checked,
                // A refused catalog message is partition 0's to report.
                Err(_)
                    if *owner == Owner::Shared && !partition.is_none_or(|p| p.reports_shared()) =>
                {
                    continue;
                }
                Err(reject) => {
                    cp.counts.dead_letter(reject.reason);
                    letters.push(DeadLetter {
                        stream_seq: m.stream_seq,
                        subject: m.subject.to_owned(),
                        payload: m.payload.clone(),
                        reject,
                    });
                    continue;
                }
            };
            if !self.dedup.admit(*key, m.published_at) {
                cp.counts.duplicate += 1;
                continue;
            }
            if let Some(values) = &values {
                self.dimensions.record_values(values);
            }
            let clock = cp.stream_clock_us;
            cp.accept(event.time);
            let verdict = classify(&mut self.ledger, event, *key);
            accepted.push(Accepted {
                event,
                verdict,
                clock,
            });
        }
        self.fold(&accepted, None);
        letters
    }

    /// Moves the checkpoint to `through`: the sequences after the last
    /// message processed were other partitions' messages, which a consumer
    /// that filters by subject passed over.
    pub fn pass_over(&mut self, through: u64) {
        let cp = &mut self.checkpoint;
        cp.last_seq = cp.last_seq.max(through);
    }

    /// Whether the server delivers only this partition's messages (its
    /// consumer filters by the partition stored in the subject), so every
    /// message delivered is this partition's or the catalog's.
    pub fn set_server_filtered(&mut self, filtered: bool) {
        self.server_filtered = filtered;
    }

    /// Folds events that an `events` archive holds for sequences the
    /// stream no longer has, in stream order, and moves the checkpoint to
    /// `through` (the sequences between them were messages that were not
    /// accepted: duplicates and dead letters, counted by the run that
    /// archived them). They were accepted once, so they are not validated
    /// again; they pass the dedup horizon like any event, so that it is the
    /// same as a run over the complete stream.
    ///
    /// With `linked`, the `events` view is left out: its rows for these
    /// sequences are the archive's file itself. Returns how many of the
    /// events were duplicates (none, for an archive built with the same
    /// settings).
    pub fn process_archived(&mut self, events: &[Event], through: u64, linked: bool) -> u64 {
        let cp = &mut self.checkpoint;
        let duplicates_before = cp.counts.duplicate;
        let mut accepted = Vec::with_capacity(events.len());
        for e in events {
            if e.stream_seq <= cp.last_seq {
                continue;
            }
            cp.advance(e.stream_seq, e.published_at);
            let key = dedup::key(&e.tenant, &e.source, &e.id);
            if !self.dedup.admit(key, e.published_at) {
                cp.counts.duplicate += 1;
                continue;
            }
            self.dimensions.record(e);
            let clock = cp.stream_clock_us;
            cp.accept(e.time);
            let verdict = classify(&mut self.ledger, e, key);
            accepted.push(Accepted {
                event: e,
                verdict,
                clock,
            });
        }
        cp.last_seq = cp.last_seq.max(through);
        let duplicates = cp.counts.duplicate - duplicates_before;
        self.fold(&accepted, linked.then_some(operator::events::VIEW));
        duplicates
    }

    /// Applies classified accepted events to every operator but `skip`, in
    /// order, the operators in two groups at once; around each message that
    /// may change a final row, alone, to decide its restatements.
    fn fold(&mut self, accepted: &[Accepted<'_>], skip: Option<&'static str>) {
        let subs = subscription_changes(accepted);
        let (steps, units) = steps(accepted, &subs);
        // The ledger is read by the operators while they run on two threads.
        let ledger = std::mem::take(&mut self.ledger);
        let mut restated = Vec::new();
        let mut done = 0;
        for (a, unit) in accepted.iter().zip(&units) {
            self.note_anchor(a.event);
            let Some(final_before) = self.may_restate(a) else {
                continue;
            };
            self.fold_steps(&steps[done..unit.start], skip, &ledger);
            let unit_steps = &steps[unit.clone()];
            let before: Vec<Vec<FinalRow>> = self
                .operators
                .iter()
                .map(|op| op.final_rows(unit_steps, final_before, &ledger))
                .collect();
            self.fold_steps(unit_steps, skip, &ledger);
            for (op, before) in self.operators.iter().zip(before) {
                let after = op.final_rows(unit_steps, final_before, &ledger);
                restatements::diff(op.view(), a.event, before, after, &mut restated);
            }
            done = unit.end;
        }
        self.fold_steps(&steps[done..], skip, &ledger);
        self.ledger = ledger;
        if !restated.is_empty() {
            for op in &mut self.operators {
                op.record_restatements(&restated);
            }
            if self.live {
                self.restated.extend(restated);
            }
        }
    }

    /// `Some(end)` when the message `a` may change a row that was final
    /// before it (one whose window, period or month ends at or before
    /// `end`): a late usage or invoice event, a subscription event
    /// effective in a final month, a catalog event or a void that hit
    /// something. The first accepted message restates nothing.
    fn may_restate(&self, a: &Accepted<'_>) -> Option<i64> {
        let clock = a.clock?;
        let final_before = clock.saturating_sub(self.lateness_us);
        // The earliest a period holding `t` can end: the calendar month's
        // end, or just after `t` for a tenant with anchored periods.
        let anchored = self.anchored.contains(a.event.tenant.as_str());
        let final_at = |t: i64| {
            if anchored {
                t < final_before
            } else {
                month_bounds(t).1 <= final_before
            }
        };
        let may = match (&a.verdict, &a.event.payload) {
            (Verdict::Voided { .. }, _) => false,
            (Verdict::Void { targets, .. }, _) => !targets.is_empty(),
            (_, Payload::PlanPublished(_) | Payload::MeterDefined { .. }) => true,
            (_, Payload::UsageRecorded { .. })
            | (_, Payload::InvoicePaid { .. })
            | (_, Payload::InvoiceRefunded { .. }) => final_at(a.event.time),
            (_, Payload::SubscriptionCancelled { effective_at, .. }) => {
                final_at(effective_at.unwrap_or(a.event.time))
            }
            (_, Payload::SubscriptionStarted(_) | Payload::PlanChanged(_)) => {
                final_at(a.event.time)
            }
            _ => false,
        };
        may.then_some(final_before)
    }

    /// Remembers a tenant whose subscription carries a billing anchor.
    fn note_anchor(&mut self, e: &Event) {
        if let Payload::SubscriptionStarted(t) | Payload::PlanChanged(t) = &e.payload
            && t.billing_anchor.is_some()
            && !self.anchored.contains(e.tenant.as_str())
        {
            self.anchored.insert(Arc::from(e.tenant.as_str()));
        }
    }

    /// Applies `steps` to every operator but `skip`, in order, the
    /// operators in two groups at once.
    fn fold_steps(&mut self, steps: &[Step<'_>], skip: Option<&'static str>, ledger: &Ledger) {
        if steps.is_empty() {
            return;
        }
        if steps.len() < SEQUENTIAL_STEPS {
            // A few steps (a message folded alone, between restatements):
            // not worth a second thread.
            for op in &mut self.operators {
                if skip != Some(op.view()) {
                    for step in steps {
                        op.step(step, ledger);
                    }
                }
            }
            return;
        }
        let (first, second) = self.groups();
        let apply = |ops: Group<'_>| -> Vec<(usize, Duration)> {
            ops.into_iter()
                .map(|(i, op)| {
                    let started = Instant::now();
                    if skip != Some(op.view()) {
                        for step in steps {
                            op.step(step, ledger);
                        }
                    }
                    (i, started.elapsed())
                })
                .collect()
        };
        let (a, b) = run_pair(first, second, apply, apply);
        self.measured(a.into_iter().chain(b), true);
    }

    /// Restatements decided since the last call (live runs only).
    pub fn take_restated(&mut self) -> Vec<Restatement> {
        std::mem::take(&mut self.restated)
    }

    /// Events held in the dedup horizon now.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Makes room in the dedup horizon for `messages` more events (the
    /// stream's backlog), so that it does not grow step by step.
    pub fn reserve_dedup(&mut self, messages: u64) {
        let n = usize::try_from(messages).unwrap_or(usize::MAX);
        self.dedup.reserve(n);
    }

    /// The operators in two groups of about equal measured cost, for
    /// [`run_pair`]: largest first, each to the group with less so far.
    fn groups(&mut self) -> (Group<'_>, Group<'_>) {
        self.costs.resize(self.operators.len(), Duration::ZERO);
        let mut order: Vec<usize> = (0..self.operators.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(self.costs[*i]));
        let mut in_first = vec![false; self.operators.len()];
        let (mut first, mut second) = (Duration::ZERO, Duration::ZERO);
        for i in order {
            if first <= second {
                first += self.costs[i];
                in_first[i] = true;
            } else {
                second += self.costs[i];
            }
        }
        self.operators
            .iter_mut()
            .enumerate()
            .partition(|(i, _)| in_first[*i])
    }

    /// Records measured costs: `apply` starts a batch's figure (half the
    /// previous one carried over, so the split follows the stream's mix
    /// without jumping on one odd batch); cutting rows adds to it.
    fn measured(&mut self, times: impl Iterator<Item = (usize, Duration)>, apply: bool) {
        for (i, t) in times {
            if let Some(c) = self.costs.get_mut(i) {
                *c = if apply { *c / 2 + t } else { *c + t };
            }
        }
    }

    /// The rows the operators produced since the last call (cut in the
    /// same two groups at once), in registry order.
    pub fn take_rows(&mut self) -> Result<Vec<ViewRows>, OperatorError> {
        let seq = self.checkpoint.last_seq;
        let (first, second) = self.groups();
        type Cut = Result<Vec<(usize, Duration, Option<ViewRows>)>, OperatorError>;
        let cut = |ops: Group<'_>| -> Cut {
            let mut out = Vec::new();
            for (i, op) in ops {
                let started = Instant::now();
                let rows = op.take_rows(seq)?.map(|batch| ViewRows {
                    view: op.view(),
                    schema: op.schema(),
                    batch,
                    sort_by: sort_column(op.storage(), &op.schema()),
                });
                out.push((i, started.elapsed(), rows));
            }
            Ok(out)
        };
        let (a, b) = run_pair(first, second, cut, cut);
        let mut cut = a?;
        cut.extend(b?);
        self.measured(cut.iter().map(|(i, t, _)| (*i, *t)), false);
        let mut rows: Vec<(usize, ViewRows)> = cut
            .into_iter()
            .filter_map(|(i, _, rows)| rows.map(|r| (i, r)))
            .collect();
        rows.sort_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(rows.len());
        for (_, r) in rows {
            *self.versions_written.entry(r.view).or_insert(0) += r.batch.num_rows();
            out.push(r);
        }
        Ok(out)
    }

    /// Starts rebuilding the state at start-up, without any I/O of its
    /// own: the caller hands over every archived event in stream order
    /// ([`Processor::restore_archived`]), then the stored rows of each
    /// versioned view ([`Processor::restore_view`]), then
    /// [`Processor::finish_restore`]. Operators that rebuild from the
    /// archive are quiet (no alerts) until then.
    pub fn start_restore(&mut self) {
        self.restoring = (0..self.operators.len())
            .filter(|i| self.operators[*i].rebuilds_from_archive())
            .collect();
        for i in &self.restoring {
            self.operators[*i].set_live(false);
        }
        self.restored = 0;
    }

    /// One archived event: remembered for dedup, and folded by the
    /// operators that rebuild from the archive.
    pub fn restore_archived(&mut self, event: &Event) {
        let key = dedup::key(&event.tenant, &event.source, &event.id);
        self.dedup.admit(key, event.published_at);
        self.dimensions.record(event);
        self.note_anchor(event);
        let accepted = [Accepted {
            event,
            verdict: classify(&mut self.ledger, event, key),
            clock: None,
        }];
        let subs = subscription_changes(&accepted);
        for step in steps(&accepted, &subs).0 {
            for i in &self.restoring {
                self.operators[*i].step(&step, &self.ledger);
            }
        }
        self.restored += 1;
    }

    /// The views whose stored rows [`Processor::restore_view`] takes (the
    /// versioned ones), once the archive is folded.
    pub fn versioned_views(&mut self) -> Result<Vec<&'static str>, RuntimeError> {
        for i in &self.restoring {
            let op = &mut self.operators[*i];
            op.take_rows(0)?;
            op.take_alerts();
        }
        debug!(
            replayed = self.restored,
            dedup_entries = self.dedup.len(),
            "state re-folded from the events archive"
        );
        Ok(self
            .operators
            .iter()
            .filter(|op| op.storage() != Storage::Append)
            .map(|op| op.view())
            .collect())
    }

    /// Stored rows of versioned view `view`.
    pub fn restore_view(&mut self, view: &str, batch: &RecordBatch) -> Result<(), RuntimeError> {
        if let Some(op) = self.operators.iter_mut().find(|op| op.view() == view) {
            op.restore(batch)?;
        }
        Ok(())
    }

    /// Ends the restore: the rebuilt operators go back to the run's mode.
    pub fn finish_restore(&mut self) {
        for i in std::mem::take(&mut self.restoring) {
            self.operators[i].set_live(self.live);
        }
    }

    /// Whether alerts are published (a live run) or not (replay).
    pub fn set_live(&mut self, live: bool) {
        self.live = live;
        for op in &mut self.operators {
            op.set_live(live);
        }
    }

    /// Alerts decided by the last [`Processor::take_rows`].
    pub fn take_alerts(&mut self) -> Vec<Alert> {
        self.operators
            .iter_mut()
            .flat_map(|o| o.take_alerts())
            .collect()
    }

    /// What compacting each view's files would take now: appended views
    /// merge their small files; a versioned view is due a snapshot of its
    /// state covering the whole prefix once it wrote as many versions as
    /// it has rows (each written version costs at most one snapshot row),
    /// and is left out before that. Whether the files are many enough to
    /// be worth it is the caller's to check: that takes I/O.
    pub fn compactions(&self) -> Vec<(&'static str, SchemaRef, Compaction)> {
        self.operators
            .iter()
            .filter_map(|op| {
                let how = match op.storage() {
                    Storage::Append => Compaction::Merge,
                    Storage::Versioned { .. } => {
                        let written = self.versions_written.get(op.view()).copied().unwrap_or(0);
                        if written < op.state_rows() {
                            return None;
                        }
                        Compaction::Snapshot
                    }
                };
                Some((op.view(), op.schema(), how))
            })
            .collect()
    }

    /// The rows of versioned view `view`'s state, one per key, sorted by
    /// key (`None` for a view without any).
    #[cfg(test)]
    pub fn snapshot(&self, view: &str) -> Result<Option<RecordBatch>, RuntimeError> {
        let upto = self.checkpoint.last_seq;
        match self.operators.iter().find(|op| op.view() == view) {
            Some(op) => Ok(op.snapshot(upto)?),
            None => Ok(None),
        }
    }

    /// Snapshots of the versioned views that wrote, since their last one,
    /// at least `factor` times as many versions as they hold rows, as of
    /// the last batch. Each version written costs at most 1 / `factor`
    /// snapshot row, built on this thread; a view's files stay one snapshot
    /// and newer versions of at most about `factor` times its rows, so a
    /// reader resolves versions over that, not over the whole history. A
    /// run asks with [`BUSY_FACTOR`] between batches and with
    /// [`QUIET_FACTOR`] when the stream is drained and when it stops. The
    /// views' counts start again whether or not the writer gets the
    /// snapshot to disk (a failed one waits for the next round).
    pub fn take_due_snapshots(&mut self, factor: usize) -> Result<Vec<SnapshotRows>, RuntimeError> {
        let mut out = Vec::new();
        for (view, schema) in self.due_snapshots(factor) {
            let chunks = self.snapshot_chunks(view).collect::<Result<Vec<_>, _>>()?;
            if !chunks.is_empty() {
                out.push(SnapshotRows {
                    view,
                    schema,
                    chunks,
                });
            }
            self.snapshot_written(view);
        }
        Ok(out)
    }

    /// The versioned views due a snapshot at `factor` (see
    /// [`Processor::take_due_snapshots`]).
    pub fn due_snapshots(&self, factor: usize) -> Vec<(&'static str, SchemaRef)> {
        self.compactions()
            .into_iter()
            .filter(|(view, _, how)| {
                let written = self.versions_written.get(view).copied().unwrap_or(0);
                *how == Compaction::Snapshot
                    && written > 0
                    && written >= factor * self.state_rows(view)
            })
            .map(|(view, schema, _)| (view, schema))
            .collect()
    }

    /// Rows of `view`'s state (0 for a view without one).
    fn state_rows(&self, view: &str) -> usize {
        self.operators
            .iter()
            .find(|op| op.view() == view)
            .map_or(0, |op| op.state_rows())
    }

    /// [`Processor::snapshot`] in chunks, built as they are taken (see
    /// [`Operator::snapshot_chunks`]); empty for a view without rows.
    pub fn snapshot_chunks<'a>(
        &'a self,
        view: &str,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        let upto = self.checkpoint.last_seq;
        match self.operators.iter().find(|op| op.view() == view) {
            Some(op) => op.snapshot_chunks(upto),
            None => Box::new(std::iter::empty()),
        }
    }

    /// A snapshot of `view` replaced its files: the versions it wrote
    /// before are gone.
    pub fn snapshot_written(&mut self, view: &'static str) {
        self.versions_written.insert(view, 0);
    }

    pub fn view_schemas(&self) -> Vec<(&'static str, SchemaRef)> {
        self.operators
            .iter()
            .map(|o| (o.view(), o.schema()))
            .collect()
    }
}

/// Asks the ledger about an accepted event with dedup key `key`.
fn classify(ledger: &mut Ledger, e: &Event, key: u128) -> Verdict {
    let target = match &e.payload {
        Payload::EventVoided {
            target_source,
            target_id,
            ..
        } => Some(dedup::key(&e.tenant, target_source, target_id)),
        _ => None,
    };
    ledger.classify(e, key, target)
}

/// Between batches, a view is snapshotted once it wrote twice its rows in
/// versions (see [`Processor::take_due_snapshots`]): at most half a
/// snapshot row per version on the busy path.
pub const BUSY_FACTOR: usize = 2;

/// With the stream drained, and when a run stops, once it wrote as many
/// versions as it has rows: the time is spare, and readers then resolve
/// at most as many versions as the view has rows.
pub const QUIET_FACTOR: usize = 1;

/// How a view's files are compacted ([`Processor::compactions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    /// Merge the small files of an appended view.
    Merge,
    /// Replace a versioned view's files with a snapshot of its state.
    Snapshot,
}

/// Below this many steps the operators fold on this thread alone.
const SEQUENTIAL_STEPS: usize = 256;

/// An accepted event as the fold sees it.
struct Accepted<'a> {
    event: &'a Event,
    verdict: Verdict,
    /// The stream clock before it: finality for restatements.
    clock: Option<i64>,
}

/// Each effective event's subscription change, built once and shared by
/// the operators.
fn subscription_changes(accepted: &[Accepted<'_>]) -> Vec<Option<Arc<SubEvent>>> {
    accepted
        .iter()
        .map(|a| match a.verdict {
            Verdict::Voided { .. } => None,
            _ => SubEvent::from_event(a.event).map(Arc::new),
        })
        .collect()
}

/// The operators' steps for classified events (`subs`: each event's
/// subscription change): a void is applied, then retracts its targets.
/// Also each event's range of steps.
fn steps<'a>(
    accepted: &'a [Accepted<'a>],
    subs: &'a [Option<Arc<SubEvent>>],
) -> (Vec<Step<'a>>, Vec<std::ops::Range<usize>>) {
    let mut steps = Vec::with_capacity(accepted.len());
    let mut units = Vec::with_capacity(accepted.len());
    for (a, sub) in accepted.iter().zip(subs) {
        let (event, verdict) = (a.event, &a.verdict);
        let start = steps.len();
        match verdict {
            Verdict::Effective => steps.push(Step::Apply {
                event,
                sub: sub.as_ref(),
            }),
            Verdict::Voided { by } => steps.push(Step::Voided { event, by }),
            Verdict::Void { targets, hits } => {
                steps.push(Step::Apply {
                    event,
                    sub: sub.as_ref(),
                });
                if !hits.is_empty() {
                    steps.push(Step::Retract {
                        void: event,
                        targets,
                        hits,
                    });
                }
            }
        }
        units.push(start..steps.len());
    }
    (steps, units)
}

/// Maps `f` over `items` in order, on two threads (one per half) when
/// there are enough items to pay for it.
fn on_two_cores<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() < 1024 {
        return items.iter().map(&f).collect();
    }
    let (a, b) = items.split_at(items.len() / 2);
    let map = |half: &[T]| half.iter().map(&f).collect::<Vec<R>>();
    let (mut out, second) = run_pair(a, b, map, map);
    out.extend(second);
    out
}

/// Runs `fa(a)` on a second thread and `fb(b)` on this one, at once.
pub(crate) fn run_pair<A: Send, B, RA: Send, RB>(
    a: A,
    b: B,
    fa: impl FnOnce(A) -> RA + Send,
    fb: impl FnOnce(B) -> RB,
) -> (RA, RB) {
    std::thread::scope(|s| {
        let first = s.spawn(|| fa(a));
        let second = fb(b);
        match first.join() {
            Ok(ra) => (ra, second),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Limits, subject_for, validate_payload};
    use crate::generator::{GenerateConfig, generate};

    /// A generated SaaS as (subject, event time, payload), in stream order.
    fn messages() -> Vec<(String, i64, Bytes)> {
        let cfg = GenerateConfig {
            tenants: 6,
            months: 3,
            seed: 11,
            ..GenerateConfig::default()
        };
        let mut text = Vec::new();
        generate(&cfg, &mut text).unwrap();
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let e = validate_payload(l, &Limits::default()).unwrap();
                let subject = subject_for("tally.events", &e.tenant, &e.event_type);
                (subject, e.time, Bytes::copy_from_slice(l))
            })
            .collect()
    }

    /// Processes `msgs` (stream sequences from `first`) in batches of 97;
    /// every view's rows, in order.
    fn feed(
        p: &mut Processor,
        msgs: &[(String, i64, Bytes)],
        first: u64,
    ) -> Vec<(&'static str, RecordBatch)> {
        feed_in(p, msgs, first, 97)
    }

    /// [`feed`] in batches of `size`.
    fn feed_in(
        p: &mut Processor,
        msgs: &[(String, i64, Bytes)],
        first: u64,
        size: usize,
    ) -> Vec<(&'static str, RecordBatch)> {
        let mut rows = Vec::new();
        for (k, chunk) in msgs.chunks(size).enumerate() {
            let base = first + (k * size) as u64;
            let incoming: Vec<Incoming<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(i, (subject, time, payload))| Incoming {
                    stream_seq: base + i as u64,
                    published_at: *time,
                    subject,
                    payload,
                })
                .collect();
            p.process_batch(&incoming);
            for r in p.take_rows().unwrap() {
                rows.push((r.view, r.batch));
            }
        }
        rows
    }

    /// Each batch's rows as sorted text lines: a batch's row order follows
    /// hash maps, and no view depends on it.
    fn text(rows: &[(&'static str, RecordBatch)]) -> String {
        let mut out = String::new();
        for (view, batch) in rows {
            let table = arrow::util::pretty::pretty_format_batches(std::slice::from_ref(batch))
                .unwrap()
                .to_string();
            let mut lines: Vec<&str> = table.lines().collect();
            lines.sort_unstable();
            out.push_str(view);
            out.push('\n');
            out.push_str(&lines.join("\n"));
            out.push('\n');
        }
        out
    }

    /// Every view's current rows (public columns, tombstones left out),
    /// as sorted text lines per view.
    fn current(p: &Processor, skip: &[&str]) -> String {
        use arrow::array::{Array, BooleanArray};
        let mut out = String::new();
        for op in &p.operators {
            if skip.contains(&op.view()) {
                continue;
            }
            let Some(batch) = op.snapshot(0).unwrap() else {
                continue;
            };
            let keep: Vec<usize> = match batch.column_by_name("_deleted") {
                Some(d) => {
                    let d = d.as_any().downcast_ref::<BooleanArray>().unwrap();
                    (0..batch.num_rows()).filter(|i| !d.value(*i)).collect()
                }
                None => (0..batch.num_rows()).collect(),
            };
            let idx =
                arrow::array::UInt32Array::from(keep.iter().map(|i| *i as u32).collect::<Vec<_>>());
            let columns = op.storage().public_columns(&op.schema());
            let projected: Vec<usize> = columns
                .iter()
                .map(|c| batch.schema().index_of(c).unwrap())
                .collect();
            let batch = batch.project(&projected).unwrap();
            let batch = arrow::compute::take_record_batch(&batch, &idx).unwrap();
            out.push_str(&text(&[(op.view(), batch)]));
        }
        out
    }

    /// The operator of `view`.
    fn operator_of<'a>(p: &'a Processor, view: &str) -> &'a dyn Operator {
        p.operators
            .iter()
            .find(|o| o.view() == view)
            .map(|o| &**o)
            .unwrap()
    }

    /// A void event of `target` at event time `time`.
    fn void_of(target: &Event, n: usize, time: i64) -> (String, i64, Bytes) {
        let json = format!(
            r#"{{"specversion":"1.0","id":"void-{n}","source":"corrections","type":"event.voided","time":"{}","tenant":"{}","data":{{"target_source":"{}","target_id":"{}","reason":"test"}}}}"#,
            crate::event::time::format_micros(time),
            target.tenant,
            target.source,
            target.id
        );
        let subject = subject_for("tally.events", &target.tenant, "event.voided");
        (subject, time, Bytes::from(json))
    }

    type Msgs = Vec<(String, i64, Bytes)>;

    /// The generated stream with voids of every seventh event (of every
    /// kind; half of the voids sent before the whole stream, half after),
    /// the same stream without the voided events, and how many voids.
    fn voided_stream() -> (Msgs, Msgs, usize) {
        let msgs = messages();
        let events: Vec<Event> = msgs
            .iter()
            .map(|(_, _, p)| validate_payload(p, &Limits::default()).unwrap())
            .collect();
        let max_time = events.iter().map(|e| e.time).max().unwrap();
        let targets: Vec<usize> = (0..events.len())
            .filter(|i| {
                i % 7 == 3 && events[*i].time < max_time && events[*i].event_type != "event.voided"
            })
            .collect();
        let kinds: std::collections::BTreeSet<&str> = targets
            .iter()
            .map(|i| events[*i].event_type.as_str())
            .collect();
        assert!(kinds.len() >= 6, "targets of too few kinds: {kinds:?}");
        let voids: Vec<(String, i64, Bytes)> = targets
            .iter()
            .enumerate()
            .map(|(n, i)| void_of(&events[*i], n, max_time))
            .collect();
        let (before, after) = voids.split_at(voids.len() / 2);
        let with_voids: Vec<_> = before.iter().chain(&msgs).chain(after).cloned().collect();
        let without: Vec<_> = before
            .iter()
            .chain(
                msgs.iter()
                    .enumerate()
                    .filter(|(i, _)| !targets.contains(i))
                    .map(|(_, m)| m),
            )
            .chain(after)
            .cloned()
            .collect();
        let generated = events
            .iter()
            .filter(|e| e.event_type == "event.voided")
            .count();
        (with_voids, without, voids.len() + generated)
    }

    /// The one rule of corrections: with voids (half sent before their
    /// targets, half after, of every kind of event), every view but the
    /// archive and `corrections` holds exactly what a run over the stream
    /// without the voided events holds.
    #[test]
    fn voided_events_count_nowhere_but_the_archive() {
        let (with_voids, without, voids) = voided_stream();
        let settings = Settings::default();
        let run = |stream: &[(String, i64, Bytes)]| {
            let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
            let mut p = Processor::new(&settings, "tally.events", cp);
            feed(&mut p, stream, 1);
            p
        };
        let (a, b) = (run(&with_voids), run(&without));
        let skip = [operator::events::VIEW, operator::corrections::VIEW];
        let (x, y) = (current(&a, &skip), current(&b, &skip));
        assert!(x.contains("usage") && x.contains("mrr"));
        assert!(x == y, "views differ:\n{x}\n----\n{y}");
        assert_eq!(a.ledger.voids(), voids as u64);

        // Each of the test's voids hit exactly its one target.
        let corrections = operator_of(&a, operator::corrections::VIEW)
            .snapshot(0)
            .unwrap()
            .unwrap();
        let col = |name: &str| corrections.column_by_name(name).unwrap().clone();
        let reasons = col("reason");
        let reasons = reasons
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let targets = col("targets");
        let targets = targets
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let ours: Vec<i64> = (0..corrections.num_rows())
            .filter(|i| reasons.value(*i) == "test")
            .map(|i| targets.value(i))
            .collect();
        assert!(ours.len() > 10, "{}", ours.len());
        assert!(ours.iter().all(|t| *t == 1), "{ours:?}");
    }

    /// A message as the tests publish it: subject, publish time = event
    /// time, payload.
    fn msg(id: &str, tenant: &str, ty: &str, time: &str, data: &str) -> (String, i64, Bytes) {
        let json = format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"{ty}","time":"{time}","tenant":"{tenant}","data":{data}}}"#
        );
        let t = crate::event::time::parse_rfc3339_micros(time).unwrap();
        (
            subject_for("tally.events", tenant, ty),
            t,
            Bytes::from(json),
        )
    }

    /// The `restatements` rows written, as (view, key, before, after, cause) lines.
    fn restated(rows: &[(&'static str, RecordBatch)]) -> Vec<String> {
        use arrow::util::display::{ArrayFormatter, FormatOptions};
        let mut out = Vec::new();
        for (view, b) in rows {
            if *view != operator::restatements::VIEW {
                continue;
            }
            let opts = FormatOptions::default().with_null("NULL");
            let f: Vec<ArrayFormatter<'_>> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                let cols: Vec<String> = [0, 2, 3, 4, 5, 6, 7]
                    .iter()
                    .map(|c| f[*c].value(i).to_string())
                    .collect();
                out.push(cols.join(" "));
            }
        }
        out
    }

    /// Restatements from a late event, a void and a catalog change into a
    /// final month; none from events into open months.
    #[test]
    fn final_rows_that_change_are_restated() {
        let catalog = |id: &str, time: &str, limit: u32| {
            msg(
                id,
                "_system",
                "catalog.plan_published",
                time,
                &format!(
                    r#"{{"plan":"pro","currency":"USD","limits":{{"api_calls":{limit}}},"overage":{{"api_calls":{{"unit_price":5,"per":10}}}}}}"#
                ),
            )
        };
        let usage = |id: &str, time: &str, q: u32| {
            msg(
                id,
                "acme",
                "usage.recorded",
                time,
                &format!(r#"{{"metric":"api_calls","quantity":{q}}}"#),
            )
        };
        let stream = vec![
            catalog("c1", "2024-12-01T00:00:00Z", 100),
            msg(
                "s1",
                "acme",
                "subscription.started",
                "2025-01-01T00:00:00Z",
                r#"{"subscription_id":"sub1","plan":"pro","billing_cycle":"monthly","price":1000,"currency":"USD"}"#,
            ),
            usage("u1", "2025-01-10T00:00:00Z", 50),
            usage("u2", "2025-03-05T00:00:00Z", 1),
            usage("u3", "2025-01-20T00:00:00Z", 70),
            msg(
                "v1",
                "acme",
                "event.voided",
                "2025-03-06T00:00:00Z",
                r#"{"target_source":"s","target_id":"u3"}"#,
            ),
            catalog("c2", "2024-12-02T00:00:00Z", 200),
            usage("u4", "2025-03-07T00:00:00Z", 1),
            msg(
                "i1",
                "acme",
                "invoice.paid",
                "2025-01-31T00:00:00Z",
                r#"{"invoice_id":"inv1","amount":1000,"currency":"USD"}"#,
            ),
        ];
        let settings = Settings::default();
        let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut p = Processor::new(&settings, "tally.events", cp);
        let rows = feed_in(&mut p, &stream, 1, 1);
        let got = restated(&rows);
        let usage_key = r#"{"granularity":"month","metric":"api_calls","window_start":"2025-01-01T00:00:00.000000Z"}"#;
        let over_key = r#"{"metric":"api_calls","period_start":"2025-01-01T00:00:00.000000Z"}"#;
        let want = vec![
            format!(r#"5 acme usage {usage_key} {{"events":1,"last":"50.000000000","max":"50.000000000","min":"50.000000000","sum":"50.000000000","unique_count":null,"window_end":"2025-02-01T00:00:00.000000Z"}} {{"events":2,"last":"70.000000000","max":"70.000000000","min":"50.000000000","sum":"120.000000000","unique_count":null,"window_end":"2025-02-01T00:00:00.000000Z"}} late_event"#),
            format!(r#"5 acme overages {over_key} {{"aggregation":"sum","currency":"USD","included":"100.000000000","overage_amount":0,"overage_quantity":"0.000000000","pct_used":50.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":null,"used":"50.000000000"}} {{"aggregation":"sum","currency":"USD","included":"100.000000000","overage_amount":10,"overage_quantity":"20.000000000","pct_used":120.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":100,"used":"120.000000000"}} late_event"#),
            format!(r#"6 acme usage {usage_key} {{"events":2,"last":"70.000000000","max":"70.000000000","min":"50.000000000","sum":"120.000000000","unique_count":null,"window_end":"2025-02-01T00:00:00.000000Z"}} {{"events":1,"last":"50.000000000","max":"50.000000000","min":"50.000000000","sum":"50.000000000","unique_count":null,"window_end":"2025-02-01T00:00:00.000000Z"}} void"#),
            format!(r#"6 acme overages {over_key} {{"aggregation":"sum","currency":"USD","included":"100.000000000","overage_amount":10,"overage_quantity":"20.000000000","pct_used":120.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":100,"used":"120.000000000"}} {{"aggregation":"sum","currency":"USD","included":"100.000000000","overage_amount":0,"overage_quantity":"0.000000000","pct_used":50.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":null,"used":"50.000000000"}} void"#),
            format!(r#"7 acme overages {over_key} {{"aggregation":"sum","currency":"USD","included":"100.000000000","overage_amount":0,"overage_quantity":"0.000000000","pct_used":50.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":null,"used":"50.000000000"}} {{"aggregation":"sum","currency":"USD","included":"200.000000000","overage_amount":0,"overage_quantity":"0.000000000","pct_used":25.0,"period":"2025-01-01","period_end":"2025-02-01T00:00:00.000000Z","plan":"pro","threshold":null,"used":"50.000000000"}} catalog"#),
            r#"9 acme revenue {"currency":"USD","month":"2025-01-01"} NULL {"invoices_paid":1,"net":1000,"paid":1000,"refunded":0} late_event"#.to_owned(),
        ];
        assert_eq!(got, want);
        // The same in one batch.
        let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut q = Processor::new(&settings, "tally.events", cp);
        assert_eq!(restated(&feed_in(&mut q, &stream, 1, 100)), want);
    }

    /// Two anchored series with one `period_start` are one `overages` row
    /// whose `period_end` is the later: a message that moves that end
    /// across the finality line restates the row once, judged on its end
    /// before the message (a late event into a final row), and its void
    /// (into a row no longer final) restates nothing.
    #[test]
    fn a_merged_overages_row_is_judged_final_on_its_end_before_the_message() {
        let stream = vec![
            msg(
                "p1",
                "_system",
                "catalog.plan_published",
                "2024-01-01T00:00:00Z",
                r#"{"plan":"pro","currency":"USD","limits":{"tokens":"100"},"overage":{"tokens":{"unit_price":1,"per":1}}}"#,
            ),
            msg(
                "s",
                "m",
                "subscription.started",
                "2025-01-01T00:00:00Z",
                r#"{"subscription_id":"s1","plan":"pro","billing_cycle":"monthly","price":1000,"currency":"USD","billing_anchor":"2025-02-28T10:00:00Z"}"#,
            ),
            msg(
                "m1",
                "m",
                "usage.recorded",
                "2025-03-01T00:00:00Z",
                r#"{"metric":"tokens","quantity":1}"#,
            ),
            msg(
                "clk",
                "other",
                "usage.recorded",
                "2025-03-29T00:00:00Z",
                r#"{"metric":"tokens","quantity":1}"#,
            ),
            msg(
                "c",
                "m",
                "subscription.plan_changed",
                "2025-03-02T00:00:00Z",
                r#"{"subscription_id":"s1","plan":"pro","billing_cycle":"monthly","price":1500,"currency":"USD","billing_anchor":"2025-01-31T10:00:00Z"}"#,
            ),
            msg(
                "m2",
                "m",
                "usage.recorded",
                "2025-03-03T00:00:00Z",
                r#"{"metric":"tokens","quantity":1}"#,
            ),
            msg(
                "vm1",
                "m",
                "event.voided",
                "2025-03-29T00:00:00Z",
                r#"{"target_source":"s","target_id":"m2"}"#,
            ),
        ];
        let settings = Settings::default();
        for size in [1, 100] {
            let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
            let mut p = Processor::new(&settings, "tally.events", cp);
            let got: Vec<String> = restated(&feed_in(&mut p, &stream, 1, size))
                .into_iter()
                .filter(|r| r.contains(" overages "))
                .collect();
            assert_eq!(got.len(), 1, "batch {size}: {got:#?}");
            let row = &got[0];
            assert!(row.starts_with("6 m overages "), "{row}");
            assert!(row.ends_with(" late_event"), "{row}");
            assert!(
                row.contains(r#""period_end":"2025-03-28T10:00:00.000000Z","plan":"pro","threshold":null,"used":"1.000000000"}"#),
                "{row}"
            );
            assert!(
                row.contains(r#""period_end":"2025-03-31T10:00:00.000000Z","plan":"pro","threshold":null,"used":"2.000000000"}"#),
                "{row}"
            );
        }
    }

    /// Restatements are decided message by message: any batching, and a
    /// restore between any two batches, give the same rows.
    #[test]
    fn restatements_do_not_depend_on_batching() {
        let (msgs, _, _) = voided_stream();
        let settings = Settings::default();
        let run = |size: usize| {
            let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
            let mut p = Processor::new(&settings, "tally.events", cp);
            let mut r = restated(&feed_in(&mut p, &msgs, 1, size));
            r.sort();
            r
        };
        let one = run(1);
        assert!(one.len() > 20, "{}", one.len());
        assert!(one.iter().any(|r| r.ends_with(" void")));
        assert!(one.iter().any(|r| r.ends_with(" late_event")));
        assert_eq!(run(53), one);
        assert_eq!(run(msgs.len()), one);
    }

    /// A void flood (a producer voiding ids that never arrive) costs one
    /// ledger entry and one `corrections` row per void, nothing else, and
    /// no message of it restates or retracts anything.
    #[test]
    fn a_flood_of_voids_of_nothing_costs_one_entry_per_void() {
        let flood: Vec<_> = (0..20_000)
            .map(|i| {
                msg(
                    &format!("f{i}"),
                    "evil",
                    "event.voided",
                    "2025-01-05T00:00:00Z",
                    &format!(r#"{{"target_source":"s","target_id":"nothing-{i}"}}"#),
                )
            })
            .collect();
        let settings = Settings::default();
        let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut p = Processor::new(&settings, "tally.events", cp);
        let rows = feed_in(&mut p, &flood, 1, 5000);
        assert_eq!(p.ledger.voids(), 20_000);
        assert_eq!(p.ledger.remembered(), 0, "a void is never a target");
        assert_eq!(p.ledger.voids(), 20_000);
        let corrections = operator_of(&p, operator::corrections::VIEW);
        assert_eq!(corrections.state_rows(), 20_000);
        assert!(restated(&rows).is_empty());
    }

    /// `corrections.targets` counts every accepted event a void voids, also
    /// one another void voided first, before or after it arrived.
    #[test]
    fn every_void_of_an_event_counts_it() {
        let usage = |id: &str| {
            msg(
                id,
                "acme",
                "usage.recorded",
                "2025-01-05T00:00:00Z",
                r#"{"metric":"m","quantity":1}"#,
            )
        };
        let void = |id: &str, target: &str| {
            msg(
                id,
                "acme",
                "event.voided",
                "2025-01-06T00:00:00Z",
                &format!(r#"{{"target_source":"s","target_id":"{target}"}}"#),
            )
        };
        let stream = vec![
            usage("a"),
            void("v1", "a"),
            void("v2", "a"),
            void("v3", "b"),
            usage("b"),
            void("v4", "b"),
            void("v5", "nothing"),
        ];
        let settings = Settings::default();
        let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut p = Processor::new(&settings, "tally.events", cp);
        feed_in(&mut p, &stream, 1, 2);
        let c = operator_of(&p, operator::corrections::VIEW)
            .snapshot(0)
            .unwrap()
            .unwrap();
        let targets = c.column_by_name("targets").unwrap();
        let targets = targets
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let first = c.column_by_name("first_target_seq").unwrap();
        let first = first
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .unwrap();
        let got: Vec<(i64, Option<u64>)> = (0..c.num_rows())
            .map(|i| {
                (
                    targets.value(i),
                    (!first.is_null(i)).then(|| first.value(i)),
                )
            })
            .collect();
        use arrow::array::Array;
        assert_eq!(
            got,
            [
                (1, Some(1)),
                (1, Some(1)),
                (1, Some(5)),
                (1, Some(5)),
                (0, None)
            ]
        );
        // And `usage` counts neither `a` nor `b`.
        assert!(!current(&p, &[]).contains("| m "));
    }

    /// The restore needs no data directory: handed the archive and the
    /// stored rows, a new processor goes on exactly as the one that wrote
    /// them.
    #[test]
    fn a_restored_processor_goes_on_as_the_one_it_replaces() {
        // With voids on both sides of the cut, and of targets on both sides.
        let (msgs, _, _) = voided_stream();
        let cut = msgs.len() * 2 / 3;
        let settings = Settings::default();
        let checkpoint = || Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut first = Processor::new(&settings, "tally.events", checkpoint());
        let written = feed(&mut first, &msgs[..cut], 1);
        let before = first.take_alerts().len();

        let mut restored = Processor::new(&settings, "tally.events", first.checkpoint.clone());
        restored.start_restore();
        for (view, batch) in &written {
            if *view == operator::events::VIEW {
                operator::events::decode(batch, |e| restored.restore_archived(&e)).unwrap();
            }
        }
        for view in restored.versioned_views().unwrap() {
            for (_, batch) in written.iter().filter(|(v, _)| *v == view) {
                restored.restore_view(view, batch).unwrap();
            }
        }
        restored.finish_restore();
        assert_eq!(restored.dedup_len(), first.dedup_len());

        let next = cut as u64 + 1;
        let a = feed(&mut first, &msgs[cut..], next);
        let b = feed(&mut restored, &msgs[cut..], next);
        assert!(!a.is_empty());
        assert!(text(&a) == text(&b), "the restored processor's rows differ");
        let (x, y) = (first.take_alerts(), restored.take_alerts());
        assert!(before + x.len() > 0, "the stream crosses no threshold");
        assert_eq!(
            x.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
            y.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>()
        );
    }

    /// A versioned view is due a snapshot once it wrote as many versions
    /// as its state has rows, and not after the snapshot replaced them;
    /// appended views always merge. The snapshot holds each key once.
    #[test]
    fn a_view_is_due_a_snapshot_once_its_versions_outnumber_its_rows_and_a_run_takes_it_at_twice() {
        let (msgs, _, _) = voided_stream();
        let settings = Settings::default();
        let cp = Checkpoint::new("S", "2025-01-01T00:00:00Z", &settings);
        let mut p = Processor::new(&settings, "tally.events", cp);
        let due = |p: &Processor, how: Compaction| -> Vec<&'static str> {
            p.compactions()
                .into_iter()
                .filter(|(_, _, h)| *h == how)
                .map(|(v, _, _)| v)
                .collect()
        };
        assert!(due(&p, Compaction::Merge).contains(&operator::events::VIEW));
        // Fed one message per batch, `usage` writes a version per event.
        feed_in(&mut p, &msgs, 1, 1);
        let usage = operator::usage::VIEW;
        assert!(due(&p, Compaction::Snapshot).contains(&usage));
        let snapshot = p.snapshot(usage).unwrap().expect("usage has rows");
        let keys = snapshot.num_rows();
        assert!(keys > 0 && keys <= p.versions_written[usage]);
        // A run takes one only at twice its rows, then counts from zero.
        let rows = p.state_rows(usage);
        assert!(rows >= keys && p.versions_written[usage] >= rows);
        let twice: Vec<&str> = due(&p, Compaction::Snapshot)
            .into_iter()
            .filter(|v| p.versions_written[v] >= 2 * p.state_rows(v).max(1))
            .collect();
        let taken: Vec<&str> = p
            .take_due_snapshots(BUSY_FACTOR)
            .unwrap()
            .iter()
            .map(|r| r.view)
            .collect();
        assert_eq!(taken, twice);
        assert!(!taken.is_empty() && !taken.contains(&usage), "{taken:?}");
        assert!(taken.iter().all(|v| p.versions_written[v] == 0));
        assert!(p.take_due_snapshots(BUSY_FACTOR).unwrap().is_empty());
        p.snapshot_written(usage);
        assert!(!due(&p, Compaction::Snapshot).contains(&usage));
        assert!(p.snapshot("no such view").unwrap().is_none());
    }
}
