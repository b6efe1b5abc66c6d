//! A deterministic synthetic SaaS company, written as CloudEvents JSON
//! Lines (one event per line, valid per the event contract): what `tally
//! generate` prints, what `tally bench` publishes, and what the operators'
//! tests fold.
//!
//! This module is the model of the company with its own PRNG (SplitMix64);
//! [`writer`] writes its events with a hand-written JSON writer (no serde
//! on the hot path: a million events take about a second in an optimised
//! build). Calendar arithmetic is [`crate::event::time`]'s.
//!
//! # The synthetic company
//!
//! - At the start instant, `_system` publishes the catalog: five meters
//!   (`api_calls` sum grouped by `region`, `storage_gb` max, `seats`
//!   latest, `reports` count, `active_users` unique_count) and
//!   five plans: `free` (limits, no overage prices), `starter`, `pro`,
//!   `enterprise` (api calls unlimited) and `pro-eur` (EUR). If the run has at
//!   least four months, `starter` is republished in month 4 with a higher
//!   `api_calls` limit (a catalog version published mid-stream).
//! - Tenants `t0001`, `t0002`, ... sign up (`tenant.created`, onboarding
//!   steps) at instants spread over the run, most in the first months.
//! - Most start a subscription shortly after signing up: mostly `starter` and
//!   `pro`, some `free` (price 0), some `enterprise` (negotiated price),
//!   about 5% on `pro-eur` in EUR; about a quarter bill yearly (ten months'
//!   price, some negotiated prices with an exact half cent per month, such as
//!   28986 / 12 = 2415.5), about 30% of paid plans begin with a 14-day trial
//!   and a quarter of those cancel when it ends.
//! - Even-numbered tenants bill on their anniversary: their
//!   `subscription.started` carries a `billing_anchor` (the start, or the
//!   trial's end), so their `overages` periods run from that instant
//!   shifted by months, anchors on the 29th to 31st included; switching
//!   to yearly billing restarts the cycle (a `plan_changed` with a new
//!   anchor). Odd-numbered tenants bill by calendar month.
//! - Every month an active subscription may be upgraded (much likelier when
//!   its usage runs over the plan limits) or downgraded, switch to yearly
//!   billing, or be cancelled (with a `reason`, sometimes `effective_at` the
//!   end of this or the next month). Cancelled tenants sometimes come back
//!   months later with a new `subscription_id`. Rarely a stale cancellation
//!   names an old subscription, a plan change is written to the output
//!   before the `subscription.started` it follows (its time is minutes
//!   later), or a plan change is stamped minutes before the start of its
//!   subscription (so a fold by time ignores it).
//! - Usage (`usage.recorded`) is scaled from each tenant's plan limits and a
//!   per-tenant utilisation, so most tenants stay under their limits, some
//!   cross 80% / 90%, and some run into overage. Quantities are mostly
//!   integers, some decimals (`12.5`), some written as decimal strings.
//! - Paid subscriptions are invoiced (`invoice.paid`, preceded by a Stripe
//!   `billing.webhook_received`) monthly or every 12 months on the billing
//!   anniversary, once any trial is over; about 2% of invoices are refunded,
//!   fully or partly, days later.
//! - `api_calls` events carry `dimensions` (`region`, fixed per tenant,
//!   and `endpoint`); the meter groups them by `region`. Every login also
//!   records `active_users` with the user as `unique` (a `unique_count`
//!   meter: monthly active users).
//! - Corrections: about 0.4% of `api_calls` events are voided by the
//!   billing team (`event.voided`, actor `billing-ops`), minutes to three
//!   weeks later or, for about 30% of them, written just before the event
//!   they void; half are amendments, followed by the right quantity (a
//!   tenth) under a new id.
//! - Families that move no metric appear in realistic proportions:
//!   `auth.user_logged_in`, `auth.password_reset_requested`,
//!   `org.member_invited`, `org.member_removed`, `onboarding.step_completed`,
//!   `billing.webhook_received`.
//! - About 110 events per active tenant-month (about 70 of them usage).
//!   Signups spread over the run and churn leave about 9 active months per
//!   tenant in a 12-month run, so `--tenants 1000 --months 12` writes
//!   roughly a million events (about 960,000).
//!
//! # Output order, late events and duplicates
//!
//! Events are written in time order, month by month, except for deliberate
//! disorder that a stream processor must survive: about 1% of usage events
//! are written minutes to hours late (after events with a later time), and
//! about 0.5% of events are written twice (the identical line, same `source`
//! and `id`, a little later in the output). Both are counted in
//! [`GenerateStats`]. Every event time lies in `[start, start + months)`.
//!
//! # Determinism
//!
//! The output is a pure function of [`GenerateConfig`]: no wall clock, no
//! hashing with random state, no transcendental floating-point functions
//! (only IEEE-exact arithmetic), so the same configuration produces
//! byte-identical output on every run and platform. Event ids are
//! `evt_<seed hex>_<counter>`, unique per run except the deliberate
//! duplicates.

mod writer;

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};

use crate::event::time;
use writer::{EventWriter, write_json_str};

/// The `dimensions` of `api_calls` events (its meter groups by `region`).
pub(crate) const DIMENSIONS: [(&str, &str); 4] = [
    ("eu-west", "/v1/search"),
    ("eu-west", "/v1/ingest"),
    ("us-east", "/v1/search"),
    ("us-east", "/v1/export"),
];

/// The `source` written when the configuration leaves it empty.
pub const DEFAULT_SOURCE: &str = "tally-generate";

const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

/// What to generate: `tally generate --tenants N --months M --seed S [--start YYYY-MM]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateConfig {
    /// Number of tenants (`t0001` ..).
    pub tenants: u32,
    /// Number of calendar months covered, starting at `start_year-start_month`.
    pub months: u32,
    /// Seed of the generator; the output is a pure function of the config.
    pub seed: u64,
    /// Year of the first month (1970..=9999).
    pub start_year: i32,
    /// First month, 1..=12.
    pub start_month: u32,
    /// CloudEvents `source` of every event (default `tally-generate`).
    pub source: String,
    /// Product activity (usage and the families that move no metric); off,
    /// only the billing lifecycle is written (catalog, signups,
    /// subscriptions, invoices): the shape of a subscription-history
    /// benchmark with many tenants.
    pub activity: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            tenants: 100,
            months: 12,
            seed: 1,
            start_year: 2025,
            start_month: 1,
            source: DEFAULT_SOURCE.to_owned(),
            activity: true,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerateStats {
    /// Lines written, duplicates included.
    pub events: u64,
    /// Lines written per event `type`, duplicates included (sums to `events`).
    pub by_type: BTreeMap<String, u64>,
    /// Lines that repeat an earlier line exactly (same `source` and `id`).
    pub duplicates: u64,
    /// Usage events written after events with a later time.
    pub late: u64,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot write generated events: {0}")]
    Write(#[from] std::io::Error),
    #[error("invalid --start {0:?}: expected YYYY-MM, e.g. 2025-01")]
    BadStart(String),
}

/// Parses `--start YYYY-MM` (year 1970..=9999, month 01..=12).
///
/// # Errors
///
/// [`GenerateError::BadStart`] for anything else.
pub fn parse_start(s: &str) -> Result<(i32, u32), GenerateError> {
    let bad = || GenerateError::BadStart(s.to_owned());
    let b = s.as_bytes();
    if b.len() != 7 || b.get(4) != Some(&b'-') {
        return Err(bad());
    }
    let (y, m) = (s.get(..4).unwrap_or(""), s.get(5..).unwrap_or(""));
    if !y.bytes().chain(m.bytes()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u32 = m.parse().map_err(|_| bad())?;
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
        return Err(bad());
    }
    Ok((year, month))
}

/// Writes the synthetic company's events for `cfg` to `out` as JSON Lines.
///
/// Months past December 9999 are not generated. An empty `source` means
/// [`DEFAULT_SOURCE`].
///
/// # Errors
///
/// [`GenerateError::BadStart`] if `start_year` is outside 1970..=9999 or
/// `start_month` outside 1..=12; [`GenerateError::Write`] if `out` fails.
pub fn generate<W: Write>(cfg: &GenerateConfig, out: W) -> Result<GenerateStats, GenerateError> {
    if !(1970..=9999).contains(&cfg.start_year) || !(1..=12).contains(&cfg.start_month) {
        return Err(GenerateError::BadStart(format!(
            "{:04}-{:02}",
            cfg.start_year, cfg.start_month
        )));
    }
    let mut w = BufWriter::with_capacity(1 << 16, out);
    let start_idx = i64::from(cfg.start_year) * 12 + i64::from(cfg.start_month) - 1;
    let last_idx = 9999 * 12 + 11;
    let months = i64::from(cfg.months).min(last_idx - start_idx + 1);
    let mut stats = GenerateStats::default();
    if months <= 0 {
        w.flush()?;
        return Ok(stats);
    }
    let months = u32::try_from(months).unwrap_or(0);

    let source = if cfg.source.is_empty() {
        DEFAULT_SOURCE
    } else {
        &cfg.source
    };
    let mut source_json = Vec::with_capacity(source.len() + 2);
    write_json_str(&mut source_json, source)?;
    let writer = EventWriter {
        id_prefix: format!("evt_{:x}_", cfg.seed).into_bytes(),
        source_json,
    };

    let mut g = Gen {
        seq: 0,
        noise: Rng::new(mix(cfg.seed, 0x6c61_7465_5f64_7570)),
        range_end: month_start(start_idx + i64::from(months)),
        month_end: 0,
        buf: Vec::new(),
        pending: Vec::new(),
        activity: cfg.activity,
    };
    let range_start = month_start(start_idx);
    let mut tenants: Vec<Tenant> = (1..=cfg.tenants)
        .map(|num| Tenant::new(cfg.seed, num, months, start_idx))
        .collect();
    let mut counts = [0u64; Kind::ALL.len()];

    for m in 0..months {
        let ms = month_start(start_idx + i64::from(m));
        let me = month_start(start_idx + i64::from(m) + 1);
        g.month_end = me;
        let (now, later): (Vec<Ev>, Vec<Ev>) = std::mem::take(&mut g.pending)
            .into_iter()
            .partition(|e| e.time < me);
        g.buf.extend(now);
        g.pending = later;

        if m == 0 {
            let admin = Actor::System("catalog-admin");
            for metric in Metric::ALL {
                g.push(range_start, 0, admin, Body::MeterDefined { metric });
            }
            for plan in Plan::ALL {
                g.push(
                    range_start,
                    0,
                    admin,
                    Body::PlanPublished { plan, revision: 1 },
                );
            }
        }
        if m == 3 {
            let t = ms + 9 * DAY + 10 * HOUR;
            g.push(
                t,
                0,
                Actor::System("catalog-admin"),
                Body::PlanPublished {
                    plan: Plan::Starter,
                    revision: 2,
                },
            );
        }
        for t in &mut tenants {
            t.step(&mut g, m, ms, me);
        }

        let mut buf = std::mem::take(&mut g.buf);
        buf.sort_unstable_by_key(|e| (e.key, e.seq, e.dup));
        for e in &buf {
            writer.write(&mut w, e)?;
            stats.events += 1;
            if let Some(c) = counts.get_mut(e.body.kind() as usize) {
                *c += 1;
            }
            if e.dup {
                stats.duplicates += 1;
            } else if e.late {
                stats.late += 1;
            }
        }
        buf.clear();
        g.buf = buf;
    }
    w.flush()?;
    for (kind, n) in Kind::ALL.iter().zip(counts) {
        if n > 0 {
            stats.by_type.insert(kind.name().to_owned(), n);
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------
// Randomness and calendar
// ---------------------------------------------------------------------------

/// SplitMix64: tiny, fast, full-period, and fully specified (so the output
/// never depends on a crate version).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[lo, hi)`; `lo` when the range is empty.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi.abs_diff(lo)) as i64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn pick<T: Copy>(&mut self, items: &[T], fallback: T) -> T {
        let i = self.below(items.len() as u64) as usize;
        items.get(i).copied().unwrap_or(fallback)
    }
}

/// Derives an independent stream seed from the run seed and a stream number.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut r = Rng::new(seed ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93));
    r.next_u64()
}

/// Days since 1970-01-01 of a date ([`time::days_from_civil`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    time::days_from_civil(y, i64::from(m), i64::from(d))
}

/// (year, month, day) of a day count ([`time::civil_from_days`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let (y, m, d) = time::civil_from_days(z);
    (y, m as u32, d as u32)
}

/// First instant (µs since the epoch) of month index `idx` = year * 12 + month - 1.
fn month_start(idx: i64) -> i64 {
    let (y, m) = (idx.div_euclid(12), idx.rem_euclid(12) as u32 + 1);
    days_from_civil(y, m, 1) * DAY
}

/// Month index of an instant.
fn month_index(t: i64) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(DAY));
    y * 12 + i64::from(m) - 1
}

// ---------------------------------------------------------------------------
// The catalog
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    ApiCalls,
    StorageGb,
    Seats,
    Reports,
    ActiveUsers,
}

impl Metric {
    const ALL: [Metric; 5] = [
        Metric::ApiCalls,
        Metric::StorageGb,
        Metric::Seats,
        Metric::Reports,
        Metric::ActiveUsers,
    ];

    fn name(self) -> &'static str {
        match self {
            Metric::ApiCalls => "api_calls",
            Metric::StorageGb => "storage_gb",
            Metric::Seats => "seats",
            Metric::Reports => "reports",
            Metric::ActiveUsers => "active_users",
        }
    }

    fn aggregation(self) -> &'static str {
        match self {
            Metric::ApiCalls => "sum",
            Metric::StorageGb => "max",
            Metric::Seats => "latest",
            Metric::Reports => "count",
            Metric::ActiveUsers => "unique_count",
        }
    }

    /// The meter's `group_by`, as JSON text.
    fn group_by(self) -> Option<&'static str> {
        match self {
            Metric::ApiCalls => Some(r#"["region"]"#),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Free,
    Starter,
    Pro,
    Enterprise,
    ProEur,
}

impl Plan {
    const ALL: [Plan; 5] = [
        Plan::Free,
        Plan::Starter,
        Plan::Pro,
        Plan::Enterprise,
        Plan::ProEur,
    ];

    fn code(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Starter => "starter",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
            Plan::ProEur => "pro-eur",
        }
    }

    fn currency(self) -> &'static str {
        match self {
            Plan::ProEur => "EUR",
            _ => "USD",
        }
    }

    /// The `data` of `catalog.plan_published` for this plan and catalog revision.
    fn catalog_json(self, revision: u8) -> &'static str {
        match (self, revision) {
            (Plan::Free, _) => {
                r#"{"plan":"free","currency":"USD","limits":{"api_calls":1000,"storage_gb":1,"seats":2}}"#
            }
            (Plan::Starter, 2) => {
                r#"{"plan":"starter","currency":"USD","limits":{"api_calls":75000,"storage_gb":10,"seats":5},"overage":{"api_calls":{"unit_price":100,"per":1000},"storage_gb":{"unit_price":200,"per":1}}}"#
            }
            (Plan::Starter, _) => {
                r#"{"plan":"starter","currency":"USD","limits":{"api_calls":50000,"storage_gb":10,"seats":5},"overage":{"api_calls":{"unit_price":100,"per":1000},"storage_gb":{"unit_price":200,"per":1}}}"#
            }
            (Plan::Pro, _) => {
                r#"{"plan":"pro","currency":"USD","limits":{"api_calls":500000,"storage_gb":100,"seats":25},"overage":{"api_calls":{"unit_price":80,"per":1000},"storage_gb":{"unit_price":150,"per":1},"seats":{"unit_price":1500,"per":1}}}"#
            }
            (Plan::Enterprise, _) => {
                r#"{"plan":"enterprise","currency":"USD","limits":{"storage_gb":1000},"overage":{"storage_gb":{"unit_price":100,"per":1}}}"#
            }
            (Plan::ProEur, _) => {
                r#"{"plan":"pro-eur","currency":"EUR","limits":{"api_calls":500000,"storage_gb":100,"seats":25},"overage":{"api_calls":{"unit_price":75,"per":1000},"storage_gb":{"unit_price":140,"per":1},"seats":{"unit_price":1400,"per":1}}}"#
            }
        }
    }

    /// `api_calls` limit (None = unlimited); `raised` after starter's republication.
    fn api_limit(self, raised: bool) -> Option<u64> {
        match self {
            Plan::Free => Some(1_000),
            Plan::Starter if raised => Some(75_000),
            Plan::Starter => Some(50_000),
            Plan::Pro | Plan::ProEur => Some(500_000),
            Plan::Enterprise => None,
        }
    }

    fn storage_limit_gb(self) -> u64 {
        match self {
            Plan::Free => 1,
            Plan::Starter => 10,
            Plan::Pro | Plan::ProEur => 100,
            Plan::Enterprise => 1000,
        }
    }

    /// Team size a tenant on this plan grows towards: (min, spread).
    fn team(self) -> (u64, u64) {
        match self {
            Plan::Free => (1, 2),
            Plan::Starter => (1, 5),
            Plan::Pro | Plan::ProEur => (3, 22),
            Plan::Enterprise => (20, 120),
        }
    }

    fn list_price_monthly(self) -> i64 {
        match self {
            Plan::Free => 0,
            Plan::Starter => 2_900,
            Plan::Pro => 9_900,
            Plan::ProEur => 8_900,
            Plan::Enterprise => 49_900,
        }
    }

    fn upgrade(self) -> Option<Plan> {
        match self {
            Plan::Free => Some(Plan::Starter),
            Plan::Starter => Some(Plan::Pro),
            Plan::Pro => Some(Plan::Enterprise),
            Plan::Enterprise | Plan::ProEur => None,
        }
    }

    fn downgrade(self) -> Option<Plan> {
        match self {
            Plan::Enterprise => Some(Plan::Pro),
            Plan::Pro => Some(Plan::Starter),
            Plan::Starter => Some(Plan::Free),
            Plan::Free | Plan::ProEur => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    MeterDefined,
    PlanPublished,
    TenantCreated,
    SubStarted,
    PlanChanged,
    Cancelled,
    Usage,
    InvoicePaid,
    InvoiceRefunded,
    Login,
    PasswordReset,
    MemberInvited,
    MemberRemoved,
    Onboarding,
    Webhook,
    Voided,
}

impl Kind {
    const ALL: [Kind; 16] = [
        Kind::MeterDefined,
        Kind::PlanPublished,
        Kind::TenantCreated,
        Kind::SubStarted,
        Kind::PlanChanged,
        Kind::Cancelled,
        Kind::Usage,
        Kind::InvoicePaid,
        Kind::InvoiceRefunded,
        Kind::Login,
        Kind::PasswordReset,
        Kind::MemberInvited,
        Kind::MemberRemoved,
        Kind::Onboarding,
        Kind::Webhook,
        Kind::Voided,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::MeterDefined => "catalog.meter_defined",
            Kind::PlanPublished => "catalog.plan_published",
            Kind::TenantCreated => "tenant.created",
            Kind::SubStarted => "subscription.started",
            Kind::PlanChanged => "subscription.plan_changed",
            Kind::Cancelled => "subscription.cancelled",
            Kind::Usage => "usage.recorded",
            Kind::InvoicePaid => "invoice.paid",
            Kind::InvoiceRefunded => "invoice.refunded",
            Kind::Login => "auth.user_logged_in",
            Kind::PasswordReset => "auth.password_reset_requested",
            Kind::MemberInvited => "org.member_invited",
            Kind::MemberRemoved => "org.member_removed",
            Kind::Onboarding => "onboarding.step_completed",
            Kind::Webhook => "billing.webhook_received",
            Kind::Voided => "event.voided",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Actor {
    System(&'static str),
    User(u32),
    Webhook(&'static str),
    /// (tenant number, key number)
    ApiKey(u32, u32),
}

#[derive(Debug, Clone, Copy)]
struct InvoiceId {
    year: i64,
    month: u32,
    /// 1 for the first invoice of the month, 2.. for more.
    n: u32,
}

#[derive(Debug, Clone, Copy)]
enum Body {
    MeterDefined {
        metric: Metric,
    },
    PlanPublished {
        plan: Plan,
        revision: u8,
    },
    TenantCreated {
        name: [u8; 3],
    },
    SubStarted {
        sub: u32,
        plan: Plan,
        yearly: bool,
        price: i64,
        trial_end: Option<i64>,
        /// `billing_anchor`: `None` bills by calendar month.
        anchor: Option<i64>,
    },
    PlanChanged {
        sub: u32,
        plan: Plan,
        yearly: bool,
        price: i64,
        anchor: Option<i64>,
    },
    Cancelled {
        sub: u32,
        reason: &'static str,
        effective: Option<i64>,
    },
    /// `milli`: quantity in thousandths; `string`: written as a decimal
    /// string; `dims`: an index into [`DIMENSIONS`] plus one (0: none);
    /// `user`: the `unique` user (0: none).
    Usage {
        metric: Metric,
        milli: u64,
        string: bool,
        dims: u8,
        user: u32,
    },
    InvoicePaid {
        inv: InvoiceId,
        amount: i64,
        currency: &'static str,
    },
    InvoiceRefunded {
        inv: InvoiceId,
        amount: i64,
        currency: &'static str,
    },
    Login {
        method: &'static str,
    },
    PasswordReset,
    MemberInvited {
        invitee: u32,
        role: &'static str,
    },
    MemberRemoved {
        user: u32,
    },
    Onboarding {
        step: u8,
    },
    Webhook {
        event: &'static str,
        delivery: u64,
    },
    /// A correction of the event with id counter `target` (same source).
    Voided {
        target: u64,
        reason: &'static str,
    },
}

impl Body {
    fn kind(&self) -> Kind {
        match self {
            Body::MeterDefined { .. } => Kind::MeterDefined,
            Body::PlanPublished { .. } => Kind::PlanPublished,
            Body::TenantCreated { .. } => Kind::TenantCreated,
            Body::SubStarted { .. } => Kind::SubStarted,
            Body::PlanChanged { .. } => Kind::PlanChanged,
            Body::Cancelled { .. } => Kind::Cancelled,
            Body::Usage { .. } => Kind::Usage,
            Body::InvoicePaid { .. } => Kind::InvoicePaid,
            Body::InvoiceRefunded { .. } => Kind::InvoiceRefunded,
            Body::Login { .. } => Kind::Login,
            Body::PasswordReset => Kind::PasswordReset,
            Body::MemberInvited { .. } => Kind::MemberInvited,
            Body::MemberRemoved { .. } => Kind::MemberRemoved,
            Body::Onboarding { .. } => Kind::Onboarding,
            Body::Webhook { .. } => Kind::Webhook,
            Body::Voided { .. } => Kind::Voided,
        }
    }
}

#[derive(Debug, Clone)]
struct Ev {
    /// Output order (µs): the event time, later for late events and duplicates.
    key: i64,
    /// Event time, µs since the epoch.
    time: i64,
    /// Id counter.
    seq: u64,
    /// Tenant number; 0 is `_system`.
    tenant: u32,
    actor: Actor,
    body: Body,
    late: bool,
    dup: bool,
}

/// Collects events month by month; events dated after the current month wait
/// in `pending`.
struct Gen {
    seq: u64,
    /// Decides lateness and duplication, in push order.
    noise: Rng,
    range_end: i64,
    month_end: i64,
    buf: Vec<Ev>,
    pending: Vec<Ev>,
    /// See [`GenerateConfig::activity`].
    activity: bool,
}

impl Gen {
    fn push(&mut self, time: i64, tenant: u32, actor: Actor, body: Body) {
        self.push_at(time, None, tenant, actor, body);
    }

    /// Pushes an event; `key` overrides its output position (out-of-order events).
    fn push_at(&mut self, time: i64, key: Option<i64>, tenant: u32, actor: Actor, body: Body) {
        if time >= self.range_end {
            return;
        }
        self.seq += 1;
        let late = key.is_none() && matches!(body, Body::Usage { .. }) && self.noise.chance(0.01);
        let key = match key {
            Some(k) => k,
            None if late => time + self.noise.range(5 * MIN, 4 * HOUR),
            None => time,
        };
        let ev = Ev {
            key,
            time,
            seq: self.seq,
            tenant,
            actor,
            body,
            late,
            dup: false,
        };
        if self.noise.chance(0.005) {
            let mut d = ev.clone();
            d.dup = true;
            d.key = ev.key + self.noise.range(SEC, 20 * MIN);
            self.store(d);
        }
        self.store(ev);
    }

    fn store(&mut self, ev: Ev) {
        if ev.time < self.month_end {
            self.buf.push(ev);
        } else {
            self.pending.push(ev);
        }
    }
}

// ---------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------

const NAME_A: [&str; 24] = [
    "Acme", "Blue", "Bright", "Cedar", "Copper", "Crimson", "Delta", "Ember", "Granite", "Harbor",
    "Iron", "Juniper", "Lumen", "Maple", "North", "Nova", "Orbit", "Pine", "Quartz", "Silver",
    "Summit", "Terra", "Vertex", "Willow",
];
const NAME_B: [&str; 20] = [
    "Analytics",
    "Bridge",
    "Cloud",
    "Data",
    "Dynamics",
    "Falcon",
    "Forge",
    "Grid",
    "Harvest",
    "Insight",
    "Labs",
    "Logic",
    "Metrics",
    "Path",
    "Pixel",
    "Signal",
    "Stack",
    "Systems",
    "Wave",
    "Works",
];
const NAME_C: [&str; 8] = ["Inc", "LLC", "Ltd", "GmbH", "Co", "Group", "AG", "SAS"];

const ONBOARDING: [&str; 6] = [
    "account_created",
    "profile_completed",
    "first_project_created",
    "teammate_invited",
    "integration_connected",
    "first_report_generated",
];
const CANCEL_REASONS: [&str; 6] = [
    "too_expensive",
    "missing_features",
    "switched_to_competitor",
    "no_longer_needed",
    "poor_support",
    "payment_failed",
];

struct Sub {
    seq: u32,
    plan: Plan,
    yearly: bool,
    price: i64,
    trial_end: Option<i64>,
    start: i64,
    /// When the cancellation takes effect, once cancelled.
    ends_at: Option<i64>,
    next_invoice: i64,
    anchor_day: u32,
    anchor_secs: i64,
    /// Billed from a `billing_anchor` (anniversary billing), not by
    /// calendar month.
    anchored: bool,
}

struct Tenant {
    num: u32,
    rng: Rng,
    /// Decides corrections: a stream of its own, so that adding them left
    /// every other draw of the company as it was.
    fixes: Rng,
    /// Where its API calls are served from: the first index of its region
    /// in [`DIMENSIONS`] (0 or 2); the endpoint varies per call (both drawn
    /// apart from `rng`, for the same reason as `fixes`).
    region: u8,
    signup_month: u32,
    signup_at: i64,
    never_subscribes: bool,
    name: [u8; 3],
    sub: Option<Sub>,
    sub_seq: u32,
    /// (first month without a subscription, its plan) after a cancellation.
    last_end: Option<(u32, Plan)>,
    users: Vec<u32>,
    next_user: u32,
    team_target: usize,
    util_api: f64,
    util_storage: f64,
    /// Monthly api calls of an enterprise tenant (no limit to scale from).
    enterprise_api: f64,
    api_keys: u32,
    last_invoice: (i64, u32, u32),
}

impl Tenant {
    fn new(seed: u64, num: u32, months: u32, start_idx: i64) -> Self {
        let mut rng = Rng::new(mix(seed, u64::from(num)));
        let r = rng.unit();
        let signup_month = if months <= 1 || r < 0.62 {
            0
        } else if months == 2 || r < 0.80 {
            1
        } else {
            2 + rng.below(u64::from(months - 2)) as u32
        };
        let ms = month_start(start_idx + i64::from(signup_month));
        let me = month_start(start_idx + i64::from(signup_month) + 1);
        let signup_at = rng.range(ms + HOUR, me - 2 * DAY) / SEC * SEC;
        let name = [
            rng.below(NAME_A.len() as u64) as u8,
            rng.below(NAME_B.len() as u64) as u8,
            rng.below(NAME_C.len() as u64) as u8,
        ];
        let never_subscribes = rng.chance(0.04);
        let enterprise_api = 200_000.0 + rng.unit() * 2_800_000.0;
        let api_keys = 1 + rng.below(3) as u32;
        let mut t = Tenant {
            num,
            rng,
            fixes: Rng::new(mix(seed ^ 0xC0_22EC_7104, u64::from(num))),
            region: 2 * (mix(seed ^ 0x2E_6104, u64::from(num)) % 2) as u8,
            signup_month,
            signup_at,
            never_subscribes,
            name,
            sub: None,
            sub_seq: 0,
            last_end: None,
            users: Vec::new(),
            next_user: num.saturating_mul(1000),
            team_target: 1,
            util_api: 0.0,
            util_storage: 0.0,
            enterprise_api,
            api_keys,
            last_invoice: (0, 0, 0),
        };
        t.util_api = t.draw_util();
        t.util_storage = t.draw_storage_util();
        t
    }

    /// Share of a plan limit a tenant uses: most well below, some near, some over.
    fn draw_util(&mut self) -> f64 {
        let (r, u) = (self.rng.unit(), self.rng.unit());
        if r < 0.70 {
            0.05 + 0.5 * u
        } else if r < 0.88 {
            0.6 + 0.35 * u
        } else {
            0.97 + 0.8 * u
        }
    }

    /// Share of the storage limit a tenant starts from (it grows 2% a month).
    fn draw_storage_util(&mut self) -> f64 {
        let (r, u) = (self.rng.unit(), self.rng.unit());
        if r < 0.80 {
            0.05 + 0.5 * u
        } else if r < 0.94 {
            0.55 + 0.3 * u
        } else {
            0.9 + 0.5 * u
        }
    }

    fn admin(&self) -> u32 {
        self.users.first().copied().unwrap_or(self.next_user)
    }

    fn any_user(&mut self) -> u32 {
        let i = self.rng.below(self.users.len() as u64) as usize;
        self.users.get(i).copied().unwrap_or_else(|| self.admin())
    }

    fn add_user(&mut self) -> u32 {
        let u = self.next_user;
        self.next_user += 1;
        self.users.push(u);
        u
    }

    /// A time in `[a, b)`, leaning towards business hours; whole seconds
    /// unless `micros`.
    fn time_in(&mut self, a: i64, b: i64, micros: bool) -> i64 {
        let mut t = self.rng.range(a, b);
        let hour = t.rem_euclid(DAY) / HOUR;
        if !(7..19).contains(&hour) && self.rng.chance(0.6) {
            t = self.rng.range(a, b);
        }
        if !micros {
            t -= t.rem_euclid(SEC);
            if t < a {
                t += SEC;
            }
        }
        t
    }

    fn draw_plan(&mut self) -> Plan {
        let r = self.rng.unit();
        if r < 0.15 {
            Plan::Free
        } else if r < 0.58 {
            Plan::Starter
        } else if r < 0.88 {
            Plan::Pro
        } else if r < 0.95 {
            Plan::Enterprise
        } else {
            Plan::ProEur
        }
    }

    /// Price per cycle in minor units: yearly is ten months, sometimes a
    /// negotiated price whose twelfth has an exact half cent.
    fn price(&mut self, plan: Plan, yearly: bool) -> i64 {
        let monthly = if plan == Plan::Enterprise {
            plan.list_price_monthly() + 10_000 * self.rng.below(16) as i64
        } else {
            plan.list_price_monthly()
        };
        if !yearly || monthly == 0 {
            return monthly;
        }
        let p = monthly * 10;
        if self.rng.chance(0.35) {
            p - p % 12 - 6
        } else {
            p
        }
    }

    fn sub_id(&self) -> u32 {
        self.sub.as_ref().map_or(self.sub_seq, |s| s.seq)
    }

    fn webhook(&mut self, g: &mut Gen, t: i64, event: &'static str) {
        let delivery = self.rng.next_u64() >> 16;
        g.push(
            t,
            self.num,
            Actor::Webhook("stripe"),
            Body::Webhook { event, delivery },
        );
    }

    fn step(&mut self, g: &mut Gen, m: u32, ms: i64, me: i64) {
        if m < self.signup_month {
            return;
        }
        let ended = self
            .sub
            .as_ref()
            .and_then(|s| s.ends_at.filter(|&e| e <= ms).map(|_| s.plan));
        if let Some(plan) = ended {
            self.sub = None;
            self.last_end = Some((m, plan));
        }
        let from = if m == self.signup_month {
            self.signup(g, me);
            self.signup_at
        } else {
            self.lifecycle(g, m, ms, me);
            ms
        };
        self.bill(g, me);
        if g.activity {
            self.activity(g, m, from, ms, me);
        }
    }

    fn signup(&mut self, g: &mut Gen, me: i64) {
        let admin = self.add_user();
        let t0 = self.signup_at;
        g.push(
            t0,
            self.num,
            Actor::User(admin),
            Body::TenantCreated { name: self.name },
        );
        let steps = 2 + self.rng.below(5) as u8;
        let mut t = t0;
        for step in 0..steps {
            t += self.rng.range(2 * MIN, 6 * HOUR) / SEC * SEC;
            g.push(t, self.num, Actor::User(admin), Body::Onboarding { step });
        }
        if !self.never_subscribes {
            let t = t0 + self.rng.range(3 * MIN, 2 * DAY) / SEC * SEC;
            let plan = self.draw_plan();
            self.start_sub(g, t, plan, true, me);
        }
    }

    fn start_sub(&mut self, g: &mut Gen, t: i64, plan: Plan, allow_trial: bool, me: i64) {
        self.sub_seq += 1;
        let seq = self.sub_seq;
        let yearly = plan != Plan::Free && self.rng.chance(0.25);
        let price = self.price(plan, yearly);
        let trial_p = match plan {
            Plan::Free => 0.0,
            Plan::Enterprise => 0.1,
            _ => 0.38,
        };
        let trial_end = (allow_trial && self.rng.chance(trial_p)).then_some(t + 14 * DAY);
        let actor = Actor::User(self.admin());
        // Even tenants bill on the anniversary of their start (or of their
        // trial's end), as Stripe's default billing cycle anchor does.
        let anchored = self.num.is_multiple_of(2);
        g.push(
            t,
            self.num,
            actor,
            Body::SubStarted {
                sub: seq,
                plan,
                yearly,
                price,
                trial_end,
                anchor: anchored.then_some(trial_end.unwrap_or(t)),
            },
        );
        if price > 0 {
            let wt = t + self.rng.range(SEC, 20 * SEC);
            self.webhook(g, wt, "customer.subscription.created");
        }
        let first_invoice = trial_end.unwrap_or(t + self.rng.range(30 * SEC, 5 * MIN) / SEC * SEC);
        let (_, _, day) = civil_from_days(first_invoice.div_euclid(DAY));
        let mut sub = Sub {
            seq,
            plan,
            yearly,
            price,
            trial_end,
            start: t,
            ends_at: None,
            next_invoice: first_invoice,
            anchor_day: day.min(28),
            anchor_secs: first_invoice.rem_euclid(DAY),
            anchored,
        };
        self.util_api = self.draw_util();
        let (lo, spread) = plan.team();
        self.team_target = (lo + self.rng.below(spread)) as usize;

        // Rarely, an upgrade minutes after the start that reaches the output
        // before the start (a producer race; ordering by time applies it),
        // or one stamped before the start (no current subscription then: a
        // fold by time ignores it, and so does this model).
        let r = self.rng.unit();
        if let Some(up) = plan.upgrade().filter(|_| r < 0.015) {
            let price = self.price(up, yearly);
            let body = Body::PlanChanged {
                sub: seq,
                plan: up,
                yearly,
                price,
                anchor: None,
            };
            if r < 0.01 {
                let ct = t + self.rng.range(2 * MIN, 15 * MIN) / SEC * SEC;
                if ct < me {
                    let key = t - self.rng.range(MIN, 10 * MIN);
                    g.push_at(ct, Some(key), self.num, actor, body);
                    sub.plan = up;
                    sub.price = price;
                }
            } else {
                let ct = t - self.rng.range(MIN, 30 * MIN) / SEC * SEC;
                g.push(ct, self.num, actor, body);
            }
        }
        // A quarter of trials end without converting.
        if let Some(te) = trial_end.filter(|_| self.rng.chance(0.25)) {
            let ct = (te - self.rng.range(0, 36 * HOUR) / SEC * SEC).max(t + HOUR);
            let body = Body::Cancelled {
                sub: seq,
                reason: "trial_expired",
                effective: None,
            };
            g.push(ct, self.num, Actor::System("billing-service"), body);
            sub.ends_at = Some(ct);
        }
        self.sub = Some(sub);
    }

    fn lifecycle(&mut self, g: &mut Gen, m: u32, ms: i64, me: i64) {
        let state = self
            .sub
            .as_ref()
            .map(|s| (s.ends_at.is_none() && s.start < ms, s.plan, s.yearly));
        match state {
            None => {
                if let Some((em, plan)) = self.last_end {
                    if m >= em + 2 && self.rng.chance(0.07) {
                        let t = self.time_in(ms + HOUR, me - DAY, false);
                        let plan = if self.rng.chance(0.7) {
                            plan
                        } else {
                            self.draw_plan()
                        };
                        self.start_sub(g, t, plan, false, me);
                    }
                } else if self.never_subscribes && self.rng.chance(0.08) {
                    self.never_subscribes = false;
                    let t = self.time_in(ms + HOUR, me - DAY, false);
                    let plan = if self.rng.chance(0.5) {
                        Plan::Free
                    } else {
                        Plan::Starter
                    };
                    self.start_sub(g, t, plan, true, me);
                }
            }
            Some((true, plan, yearly)) => {
                let raised = m >= 3;
                let over = plan.api_limit(raised).is_some() && self.util_api > 0.95;
                let p_change = if over { 0.15 } else { 0.035 };
                let p_cancel = if plan == Plan::Free { 0.04 } else { 0.028 };
                if self.rng.chance(p_change) {
                    self.change_plan(g, ms, me, plan, yearly, over);
                } else if self.rng.chance(p_cancel) {
                    self.cancel(g, ms, me);
                }
            }
            Some((false, ..)) => {}
        }
        // Rarely, a stale cancellation of an earlier subscription.
        if self.sub_seq >= 2 && self.rng.chance(0.04) {
            let t = self.time_in(ms, me, false);
            let body = Body::Cancelled {
                sub: self.sub_seq - 1,
                reason: "duplicate_request",
                effective: None,
            };
            g.push(t, self.num, Actor::System("billing-service"), body);
        }
    }

    fn change_plan(&mut self, g: &mut Gen, ms: i64, me: i64, plan: Plan, yearly: bool, over: bool) {
        let up = over || self.rng.chance(0.55);
        let target = if self.rng.chance(0.15) {
            None
        } else if up {
            plan.upgrade()
        } else {
            plan.downgrade()
        };
        let (new_plan, new_yearly) = match target {
            Some(p) if p == Plan::Free => (p, false),
            Some(p) => (p, yearly),
            // Same plan, switching to yearly billing.
            None if !yearly && plan != Plan::Free => (plan, true),
            None => return,
        };
        let t = self.time_in(ms + HOUR, me - HOUR, false);
        let price = self.price(new_plan, new_yearly);
        let sub = self.sub_id();
        // Switching an anniversary-billed subscription to yearly billing
        // restarts its cycle at the change (a new anchor).
        let anchored = self.sub.as_ref().is_some_and(|s| s.anchored);
        let body = Body::PlanChanged {
            sub,
            plan: new_plan,
            yearly: new_yearly,
            price,
            anchor: (anchored && new_yearly && !yearly).then_some(t),
        };
        g.push(t, self.num, Actor::User(self.admin()), body);
        if price > 0 {
            let wt = t + self.rng.range(SEC, 20 * SEC);
            self.webhook(g, wt, "customer.subscription.updated");
        }
        if new_plan != plan {
            let u = self.rng.unit();
            self.util_api = if up { 0.1 + 0.45 * u } else { 0.4 + 0.9 * u };
            let (lo, spread) = new_plan.team();
            self.team_target = (lo + self.rng.below(spread)) as usize;
        }
        if let Some(s) = self.sub.as_mut() {
            s.plan = new_plan;
            s.yearly = new_yearly;
            s.price = price;
        }
    }

    fn cancel(&mut self, g: &mut Gen, ms: i64, me: i64) {
        let t = self.time_in(ms + HOUR, me - HOUR, false);
        let reason = self.rng.pick(&CANCEL_REASONS, "no_longer_needed");
        let r = self.rng.unit();
        let effective = if r < 0.5 {
            None
        } else if r < 0.8 {
            Some(me)
        } else {
            Some(month_start(month_index(me) + 1))
        };
        let sub = self.sub_id();
        g.push(
            t,
            self.num,
            Actor::User(self.admin()),
            Body::Cancelled {
                sub,
                reason,
                effective,
            },
        );
        if self.sub.as_ref().is_some_and(|s| s.price > 0) {
            let wt = t + self.rng.range(SEC, 20 * SEC);
            self.webhook(g, wt, "customer.subscription.deleted");
        }
        if let Some(s) = self.sub.as_mut() {
            s.ends_at = Some(effective.unwrap_or(t));
        }
    }

    /// Invoices due before the end of the month (and of the subscription).
    fn bill(&mut self, g: &mut Gen, me: i64) {
        let Some(mut s) = self.sub.take() else { return };
        let end = s.ends_at.map_or(me, |e| e.min(me));
        while s.next_invoice < me {
            let t = s.next_invoice;
            if t < end && s.price > 0 && s.trial_end.is_none_or(|te| t >= te) {
                self.invoice(g, t, s.price, s.plan.currency());
            }
            let step = if s.yearly { 12 } else { 1 };
            let idx = month_index(t) + step;
            let (y, mo) = (idx.div_euclid(12), idx.rem_euclid(12) as u32 + 1);
            s.next_invoice = days_from_civil(y, mo, s.anchor_day) * DAY + s.anchor_secs;
        }
        self.sub = Some(s);
    }

    fn invoice(&mut self, g: &mut Gen, t: i64, amount: i64, currency: &'static str) {
        let (y, mo, _) = civil_from_days(t.div_euclid(DAY));
        let n = if self.last_invoice.0 == y && self.last_invoice.1 == mo {
            self.last_invoice.2 + 1
        } else {
            1
        };
        self.last_invoice = (y, mo, n);
        let inv = InvoiceId {
            year: y,
            month: mo,
            n,
        };
        let wt = t - self.rng.range(2 * SEC, 40 * SEC);
        self.webhook(g, wt, "invoice.payment_succeeded");
        let billing = Actor::System("billing-service");
        g.push(
            t,
            self.num,
            billing,
            Body::InvoicePaid {
                inv,
                amount,
                currency,
            },
        );
        if self.rng.chance(0.02) {
            let rt = t + self.rng.range(DAY, 20 * DAY) / SEC * SEC;
            let refund = if self.rng.chance(0.5) {
                amount
            } else {
                (amount * (10 + self.rng.below(81) as i64) / 100).max(1)
            };
            let wt = rt - self.rng.range(2 * SEC, 40 * SEC);
            self.webhook(g, wt, "charge.refunded");
            g.push(
                rt,
                self.num,
                billing,
                Body::InvoiceRefunded {
                    inv,
                    amount: refund,
                    currency,
                },
            );
        }
    }

    /// Product usage and the families that move no metric, in `[from, end)`.
    /// A correction of the api_calls event just pushed (at `t`, `milli`):
    /// voided by the billing team, sometimes sent before the event it
    /// voids (written just ahead of it), and half the time amended with
    /// the right quantity under a new id.
    fn correct(&mut self, g: &mut Gen, t: i64, milli: u64) {
        if t >= g.range_end {
            return;
        }
        let target = g.seq;
        let num = self.num;
        let ops = Actor::System("billing-ops");
        let before = self.fixes.chance(0.3);
        let (time, key) = if before {
            (t, Some(t - SEC))
        } else {
            // Minutes to weeks later: a correction after the invoice
            // restates a month that was already final.
            let at = t + self.fixes.range(MIN, 21 * DAY);
            (at, None)
        };
        let reason = if self.fixes.chance(0.5) {
            "duplicate report from a retried batch"
        } else {
            "quantity reported 10x"
        };
        g.push_at(time, key, num, ops, Body::Voided { target, reason });
        if reason == "quantity reported 10x" {
            let body = Body::Usage {
                metric: Metric::ApiCalls,
                milli: (milli / 10000).max(1) * 1000,
                string: false,
                dims: 1 + self.region + self.fixes.below(2) as u8,
                user: 0,
            };
            g.push_at(time, key, num, ops, body);
        }
    }

    fn activity(&mut self, g: &mut Gen, m: u32, from: i64, ms: i64, me: i64) {
        let num = self.num;
        let Some((plan, start, ends_at)) = self.sub.as_ref().map(|s| (s.plan, s.start, s.ends_at))
        else {
            // No subscription: someone still logs in now and then.
            if self.rng.chance(0.3) && me - from > HOUR {
                for _ in 0..1 + self.rng.below(3) {
                    let t = self.time_in(from, me, false);
                    let user = self.any_user();
                    g.push(
                        t,
                        num,
                        Actor::User(user),
                        Body::Login { method: "password" },
                    );
                }
            }
            return;
        };
        let a = from.max(start).max(ms);
        let b = ends_at.map_or(me, |e| e.min(me));
        if b - a < 6 * HOUR {
            return;
        }
        let f = (b - a) as f64 / (me - ms) as f64;
        let scaled = |rng: &mut Rng, base: f64| -> u64 {
            (base * f * (0.8 + 0.4 * rng.unit())).round() as u64
        };

        // api_calls (sum): batches reported by API keys.
        let n_api = scaled(&mut self.rng, 58.0).max(1);
        let base = plan
            .api_limit(m >= 3)
            .map_or(self.enterprise_api, |l| l as f64);
        let total = base * self.util_api * (0.85 + 0.35 * self.rng.unit()) * f;
        let per = total / n_api as f64;
        for _ in 0..n_api {
            let q = (per * (0.5 + self.rng.unit())).max(1.0);
            let (milli, string) = if self.rng.chance(0.08) {
                ((q as u64) * 1000 + 500, self.rng.chance(0.5))
            } else {
                ((q.round() as u64) * 1000, self.rng.chance(0.04))
            };
            let t = self.time_in(a, b, true);
            let key = 1 + self.rng.below(u64::from(self.api_keys)) as u32;
            let body = Body::Usage {
                metric: Metric::ApiCalls,
                milli,
                string,
                dims: 1 + self.region + self.fixes.below(2) as u8,
                user: 0,
            };
            g.push(t, num, Actor::ApiKey(num, key), body);
            if self.fixes.chance(0.004) {
                self.correct(g, t, milli);
            }
        }

        // storage_gb (max): periodic snapshots, growing with the tenant's age.
        let age = f64::from(m - self.signup_month);
        let gb = plan.storage_limit_gb() as f64 * self.util_storage * (1.0 + 0.02 * age);
        for _ in 0..scaled(&mut self.rng, 10.0).max(1) {
            let v = gb * (0.95 + 0.1 * self.rng.unit());
            let milli = ((v * 100.0).round() as u64) * 10;
            let string = self.rng.chance(0.25);
            let t = self.time_in(a, b, true);
            let body = Body::Usage {
                metric: Metric::StorageGb,
                milli,
                string,
                dims: 0,
                user: 0,
            };
            g.push(t, num, Actor::System("metering"), body);
        }

        // Team changes (seats, latest): snapshot at the start, invitations and
        // removals in time order, snapshot near the end.
        let seats = |n: usize| Body::Usage {
            metric: Metric::Seats,
            milli: n as u64 * 1000,
            string: false,
            dims: 0,
            user: 0,
        };
        let t = a + self.rng.range(10 * MIN, 2 * HOUR);
        g.push(t, num, Actor::System("metering"), seats(self.users.len()));
        let gap = self.team_target.saturating_sub(self.users.len()) as u64;
        let mut invites = if gap > 0 {
            1 + self.rng.below(gap.min(4))
        } else {
            u64::from(self.rng.chance(0.15 * f))
        };
        if self.users.len() >= 400 {
            invites = 0;
        }
        let removals = u64::from(self.users.len() > 1 && self.rng.chance(0.12 * f));
        let mut changes: Vec<(i64, bool)> = (0..invites + removals)
            .map(|i| (self.time_in(a + 2 * HOUR, b - 3 * HOUR, false), i < invites))
            .collect();
        changes.sort_unstable();
        let admin = Actor::User(self.admin());
        for (t, invite) in changes {
            if invite {
                let role = if self.rng.chance(0.15) {
                    "admin"
                } else {
                    "member"
                };
                let invitee = self.add_user();
                g.push(t, num, admin, Body::MemberInvited { invitee, role });
            } else {
                let i = 1 + self.rng.below(self.users.len() as u64 - 1) as usize;
                if i < self.users.len() {
                    let user = self.users.remove(i);
                    g.push(t, num, admin, Body::MemberRemoved { user });
                }
            }
            let st = t + self.rng.range(MIN, HOUR) / SEC * SEC;
            g.push(st, num, Actor::System("metering"), seats(self.users.len()));
        }
        let t = b - self.rng.range(30 * MIN, 2 * HOUR);
        g.push(t, num, Actor::System("metering"), seats(self.users.len()));

        // reports (count): quantity 1 each.
        for _ in 0..scaled(&mut self.rng, 8.0) {
            let t = self.time_in(a, b, true);
            let user = self.any_user();
            let body = Body::Usage {
                metric: Metric::Reports,
                milli: 1000,
                string: false,
                dims: 0,
                user: 0,
            };
            g.push(t, num, Actor::User(user), body);
        }

        // Logins and password resets.
        let team = self.users.len().min(25) as f64;
        for _ in 0..scaled(&mut self.rng, 16.0 + 2.4 * team) {
            let t = self.time_in(a, b, false);
            let user = self.any_user();
            let r = self.rng.unit();
            let method = if r < 0.6 {
                "password"
            } else if r < 0.85 {
                "sso"
            } else {
                "google"
            };
            g.push(t, num, Actor::User(user), Body::Login { method });
            // Monthly active users: a unique_count meter over logins.
            let active = Body::Usage {
                metric: Metric::ActiveUsers,
                milli: 1000,
                string: false,
                dims: 0,
                user,
            };
            g.push(t, num, Actor::System("metering"), active);
        }
        if self.rng.chance(0.25 * f) {
            let t = self.time_in(a, b, false);
            let user = self.any_user();
            g.push(t, num, Actor::User(user), Body::PasswordReset);
        }
        if plan != Plan::Free && self.rng.chance(0.08 * f) {
            let t = self.time_in(a, b, false);
            self.webhook(g, t, "payment_method.updated");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write_milli, write_time};
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn cfg(tenants: u32, months: u32, seed: u64) -> GenerateConfig {
        GenerateConfig {
            tenants,
            months,
            seed,
            ..GenerateConfig::default()
        }
    }

    fn run(c: &GenerateConfig) -> (Vec<u8>, GenerateStats) {
        let mut out = Vec::new();
        let stats = generate(c, &mut out).unwrap();
        (out, stats)
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` to µs since the epoch.
    fn parse_time(s: &str) -> Option<i64> {
        let b = s.as_bytes();
        if !(b.len() == 20 || b.len() == 27) || *b.last()? != b'Z' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
        let (y, mo, d) = (num(0..4)?, num(5..7)? as u32, num(8..10)? as u32);
        if &s[4..5] != "-"
            || &s[7..8] != "-"
            || &s[10..11] != "T"
            || !(1..=12).contains(&mo)
            || !(1..=31).contains(&d)
        {
            return None;
        }
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || mi > 59 || se > 59 {
            return None;
        }
        let us = if b.len() == 27 {
            if &s[19..20] != "." {
                return None;
            }
            num(20..26)?
        } else {
            0
        };
        Some(days_from_civil(y, mo, d) * DAY + ((h * 60 + mi) * 60 + se) * SEC + us)
    }

    fn is_type(s: &str) -> bool {
        let parts: Vec<&str> = s.split('.').collect();
        parts.len() >= 2
            && parts.iter().all(|p| {
                p.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
                    && p.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            })
    }

    fn is_quantity(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) => n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0),
            serde_json::Value::String(s) => {
                !s.is_empty()
                    && s.bytes().all(|c| c.is_ascii_digit() || c == b'.')
                    && s.parse::<f64>().is_ok()
            }
            _ => false,
        }
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let c = cfg(40, 5, 7);
        let (a, sa) = run(&c);
        let (b, sb) = run(&c);
        assert!(!a.is_empty());
        assert_eq!(a, b, "same config must give byte-identical output");
        assert_eq!(sa, sb);
        let (d, _) = run(&cfg(40, 5, 8));
        assert_ne!(a, d, "a different seed must give different output");
    }

    #[test]
    fn every_line_is_a_valid_event() {
        let c = cfg(50, 6, 42);
        let (out, stats) = run(&c);
        let text = std::str::from_utf8(&out).unwrap();
        let start = month_start(2025 * 12);
        let end = month_start(2025 * 12 + 6);
        let mut types: HashMap<String, u64> = HashMap::new();
        let mut seen: HashMap<(String, String), &str> = HashMap::new();
        let mut dups = 0u64;
        let mut lines = 0u64;
        let mut prev_time = i64::MIN;
        let mut out_of_order = 0u64;
        let mut subs_started: HashSet<String> = HashSet::new();
        let mut anchors = 0;
        for line in text.lines() {
            lines += 1;
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"));
            assert_eq!(o["specversion"], "1.0");
            let id = o["id"].as_str().unwrap();
            let source = o["source"].as_str().unwrap();
            assert!((1..=128).contains(&id.len()) && (1..=256).contains(&source.len()));
            assert_eq!(source, "tally-generate");
            let ty = o["type"].as_str().unwrap();
            assert!(is_type(ty), "bad type {ty}");
            let tenant = o["tenant"].as_str().unwrap();
            assert!(
                (1..=64).contains(&tenant.len())
                    && tenant
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
                "bad tenant {tenant}"
            );
            assert_eq!(ty.starts_with("catalog."), tenant == "_system", "{line}");
            let time = parse_time(o["time"].as_str().unwrap())
                .unwrap_or_else(|| panic!("bad time: {line}"));
            assert!(time >= start && time < end, "time out of range: {line}");
            if time < prev_time {
                out_of_order += 1;
            }
            prev_time = prev_time.max(time);
            if let Some(a) = o.get("actor") {
                assert!(a.is_string() && o["actortype"].is_string());
            }
            let data = o["data"]
                .as_object()
                .unwrap_or_else(|| panic!("data not an object: {line}"));
            match ty {
                "usage.recorded" => {
                    assert!(
                        [
                            "api_calls",
                            "storage_gb",
                            "seats",
                            "reports",
                            "active_users"
                        ]
                        .contains(&data["metric"].as_str().unwrap())
                    );
                    assert!(is_quantity(&data["quantity"]), "{line}");
                }
                "subscription.started" | "subscription.plan_changed" => {
                    assert!(data["subscription_id"].is_string() && data["plan"].is_string());
                    assert!(
                        ["monthly", "yearly"].contains(&data["billing_cycle"].as_str().unwrap())
                    );
                    assert!(data["price"].as_i64().is_some_and(|p| p >= 0));
                    assert!(["USD", "EUR"].contains(&data["currency"].as_str().unwrap()));
                    if let Some(te) = data.get("trial_ends_at") {
                        assert!(parse_time(te.as_str().unwrap()).is_some());
                    }
                    if let Some(a) = data.get("billing_anchor") {
                        assert!(parse_time(a.as_str().unwrap()).is_some());
                        anchors += 1;
                    }
                    if ty == "subscription.started" {
                        subs_started.insert(data["subscription_id"].as_str().unwrap().to_owned());
                    }
                }
                "subscription.cancelled" => {
                    assert!(data["subscription_id"].is_string());
                    if let Some(t) = data.get("effective_at") {
                        assert!(parse_time(t.as_str().unwrap()).is_some());
                    }
                }
                "invoice.paid" | "invoice.refunded" => {
                    assert!(data["invoice_id"].is_string());
                    assert!(data["amount"].as_i64().is_some_and(|a| a > 0));
                    assert!(["USD", "EUR"].contains(&data["currency"].as_str().unwrap()));
                }
                "catalog.plan_published" => {
                    assert!(
                        data["plan"].is_string()
                            && data["currency"].is_string()
                            && data["limits"].is_object()
                    );
                }
                "catalog.meter_defined" => {
                    assert!(
                        ["sum", "count", "max", "latest", "unique_count"]
                            .contains(&data["aggregation"].as_str().unwrap())
                    );
                }
                _ => {}
            }
            match seen.get(&(source.to_owned(), id.to_owned())) {
                Some(earlier) => {
                    assert_eq!(*earlier, line, "a repeated id must repeat the exact line");
                    dups += 1;
                }
                None => {
                    seen.insert((source.to_owned(), id.to_owned()), line);
                }
            }
            *types.entry(ty.to_owned()).or_default() += 1;
        }
        assert_eq!(lines, stats.events);
        assert_eq!(dups, stats.duplicates);
        assert!(stats.duplicates > 0, "expected deliberate duplicates");
        assert!(stats.late > 0, "expected late events");
        assert!(out_of_order > 0);
        assert_eq!(stats.by_type.values().sum::<u64>(), stats.events);
        for (t, n) in &types {
            assert_eq!(stats.by_type.get(t), Some(n), "{t}");
        }
        for t in [
            "tenant.created",
            "catalog.plan_published",
            "catalog.meter_defined",
            "subscription.started",
            "subscription.plan_changed",
            "subscription.cancelled",
            "usage.recorded",
            "invoice.paid",
            "invoice.refunded",
            "auth.user_logged_in",
            "auth.password_reset_requested",
            "org.member_invited",
            "org.member_removed",
            "onboarding.step_completed",
            "billing.webhook_received",
        ] {
            assert!(
                types.get(t).is_some_and(|&n| n > 0),
                "no {t} events in {types:?}"
            );
        }
        // Starter republished mid-stream, five plans at the start.
        assert_eq!(types["catalog.plan_published"], 6);
        assert_eq!(types["catalog.meter_defined"], 5);
        assert_eq!(types["tenant.created"], 50);
        assert!(subs_started.contains("sub_t0001_1") || subs_started.len() > 40);
        assert!(anchors > 20, "anniversary billing: {anchors} anchors");
    }

    #[test]
    fn catalog_first_and_edge_cases_present() {
        let (out, _) = run(&cfg(300, 12, 3));
        let text = std::str::from_utf8(&out).unwrap();
        let first: Vec<serde_json::Value> = text
            .lines()
            .take(9)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            first
                .iter()
                .all(|v| v["tenant"] == "_system" && v["time"] == "2025-01-01T00:00:00Z")
        );
        assert!(text.contains(r#""billing_cycle":"yearly""#));
        assert!(text.contains(r#""trial_ends_at":"#));
        assert!(text.contains(r#""currency":"EUR""#));
        assert!(text.contains(r#""effective_at":"#));
        assert!(
            text.contains(r#""reason":"duplicate_request""#),
            "stale cancellations"
        );
        assert!(
            text.contains("_2\",\"plan\""),
            "reactivations with a new subscription id"
        );
        assert!(
            text.contains(r#""quantity":""#),
            "decimal-string quantities"
        );
        assert!(
            text.contains(r#".5,"#) || text.contains(r#".5}"#),
            "decimal quantities"
        );
        // A yearly price whose twelfth has an exact half cent.
        let half_cent = text.lines().any(|l| {
            l.contains(r#""billing_cycle":"yearly""#) && {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["data"]["price"].as_i64().is_some_and(|p| p % 12 == 6)
            }
        });
        assert!(half_cent);
        // A plan change written before the start of its subscription.
        let mut started = HashSet::new();
        let mut early_change = false;
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let sid = v["data"]["subscription_id"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            match v["type"].as_str().unwrap() {
                "subscription.started" => {
                    started.insert(sid);
                }
                "subscription.plan_changed" if !started.contains(&sid) => early_change = true,
                _ => {}
            }
        }
        assert!(early_change);
    }

    #[test]
    fn empty_and_tiny_configs() {
        let (out, stats) = run(&cfg(0, 0, 1));
        assert!(out.is_empty());
        assert_eq!(stats.events, 0);
        let (_, stats) = run(&cfg(0, 3, 1));
        assert_eq!(stats.events, 10);
        let (_, stats) = run(&cfg(1, 1, 1));
        assert!(stats.events > 10);
        let bad = GenerateConfig {
            start_month: 13,
            ..cfg(1, 1, 1)
        };
        assert!(matches!(
            generate(&bad, Vec::new()),
            Err(GenerateError::BadStart(_))
        ));
    }

    #[test]
    fn start_month_and_year_boundaries() {
        let c = GenerateConfig {
            start_year: 2024,
            start_month: 11,
            ..cfg(20, 4, 9)
        };
        let (out, _) = run(&c);
        let text = std::str::from_utf8(&out).unwrap();
        let (start, end) = (month_start(2024 * 12 + 10), month_start(2025 * 12 + 2));
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let t = parse_time(v["time"].as_str().unwrap()).unwrap();
            assert!(t >= start && t < end);
        }
        assert!(text.contains("\"time\":\"2025-02-"));
    }

    #[test]
    fn parse_start_accepts_and_rejects() {
        assert_eq!(parse_start("2025-01").unwrap(), (2025, 1));
        assert_eq!(parse_start("1999-12").unwrap(), (1999, 12));
        for bad in [
            "2025-13",
            "2025-00",
            "25-01",
            "",
            "2025-1",
            "2025/01",
            "+025-01",
            "2025-01 ",
            "２０２５-01",
        ] {
            let e = parse_start(bad).unwrap_err();
            assert!(
                matches!(e, GenerateError::BadStart(ref s) if s == bad),
                "{bad}"
            );
        }
        assert_eq!(
            parse_start("2025-13").unwrap_err().to_string(),
            "invalid --start \"2025-13\": expected YYYY-MM, e.g. 2025-01"
        );
    }

    #[test]
    fn calendar_round_trip_and_formatting() {
        for days in [-1, 0, 59, 10_957, 20_089, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let t = days_from_civil(2024, 2, 29) * DAY + 13 * HOUR + 5 * MIN + 7 * SEC;
        let mut b = Vec::new();
        write_time(&mut b, t).unwrap();
        write_time(&mut b, t + 42).unwrap();
        assert_eq!(b, br#""2024-02-29T13:05:07Z""2024-02-29T13:05:07.000042Z""#);
        let mut b = Vec::new();
        for q in [0, 12_000, 12_500, 7_250, 1, 1_000_000_000] {
            write_milli(&mut b, q).unwrap();
            b.push(b' ');
        }
        assert_eq!(b, b"0 12 12.5 7.25 0.001 1000000 ");
        let mut b = Vec::new();
        write_json_str(&mut b, "a\"b\\c\nd\u{1}é").unwrap();
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#""a\"b\\c\u000ad\u0001é""#
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn custom_source_is_escaped() {
        let c = GenerateConfig {
            source: "svc \"x\"".into(),
            ..cfg(2, 1, 1)
        };
        let (out, _) = run(&c);
        let first = std::str::from_utf8(&out).unwrap().lines().next().unwrap();
        let v: serde_json::Value = serde_json::from_str(first).unwrap();
        assert_eq!(v["source"], "svc \"x\"");
    }
}
