//! The generator's output: each event as one line of CloudEvents JSON,
//! written by hand (no serde on the hot path).

use std::io::{self, Write};

use super::*;

pub(super) struct EventWriter {
    pub(super) id_prefix: Vec<u8>,
    pub(super) source_json: Vec<u8>,
}

impl EventWriter {
    pub(super) fn write<W: Write>(&self, w: &mut W, e: &Ev) -> io::Result<()> {
        w.write_all(b"{\"specversion\":\"1.0\",\"id\":\"")?;
        w.write_all(&self.id_prefix)?;
        write!(w, "{:08}", e.seq)?;
        w.write_all(b"\",\"source\":")?;
        w.write_all(&self.source_json)?;
        w.write_all(b",\"type\":")?;
        write_json_str(w, e.body.kind().name())?;
        w.write_all(b",\"time\":")?;
        write_time(w, e.time)?;
        w.write_all(b",\"tenant\":\"")?;
        write_tenant(w, e.tenant)?;
        w.write_all(b"\",\"actor\":")?;
        let actortype = match e.actor {
            Actor::System(name) => {
                write_json_str(w, name)?;
                "system"
            }
            Actor::User(u) => {
                write!(w, "\"user_{u}\"")?;
                "user"
            }
            Actor::Webhook(name) => {
                write_json_str(w, name)?;
                "webhook"
            }
            Actor::ApiKey(t, k) => {
                w.write_all(b"\"ak_")?;
                write_tenant(w, t)?;
                write!(w, "_{k}\"")?;
                "api_key"
            }
        };
        w.write_all(b",\"actortype\":")?;
        write_json_str(w, actortype)?;
        w.write_all(b",\"data\":")?;
        if let Body::Voided { target, reason } = e.body {
            w.write_all(b"{\"target_source\":")?;
            w.write_all(&self.source_json)?;
            w.write_all(b",\"target_id\":\"")?;
            w.write_all(&self.id_prefix)?;
            write!(w, "{target:08}\",\"reason\":")?;
            write_json_str(w, reason)?;
            w.write_all(b"}")?;
        } else {
            write_data(w, e)?;
        }
        w.write_all(b"}\n")
    }
}

pub(super) fn write_data<W: Write>(w: &mut W, e: &Ev) -> io::Result<()> {
    match e.body {
        Body::MeterDefined { metric } => {
            w.write_all(b"{\"metric\":")?;
            write_json_str(w, metric.name())?;
            w.write_all(b",\"aggregation\":")?;
            write_json_str(w, metric.aggregation())?;
            if let Some(g) = metric.group_by() {
                w.write_all(b",\"group_by\":")?;
                w.write_all(g.as_bytes())?;
            }
            w.write_all(b"}")
        }
        Body::PlanPublished { plan, revision } => {
            w.write_all(plan.catalog_json(revision).as_bytes())
        }
        Body::TenantCreated { name } => {
            let part =
                |list: &[&'static str], i: u8| list.get(usize::from(i)).copied().unwrap_or("");
            w.write_all(b"{\"name\":")?;
            let name = format!(
                "{} {} {}",
                part(&NAME_A, name[0]),
                part(&NAME_B, name[1]),
                part(&NAME_C, name[2])
            );
            write_json_str(w, &name)?;
            w.write_all(b"}")
        }
        Body::SubStarted {
            sub,
            plan,
            yearly,
            price,
            trial_end,
            anchor,
        } => {
            write_sub_terms(w, e.tenant, sub, plan, yearly, price)?;
            if let Some(te) = trial_end {
                w.write_all(b",\"trial_ends_at\":")?;
                write_time(w, te)?;
            }
            write_anchor(w, anchor)?;
            w.write_all(b"}")
        }
        Body::PlanChanged {
            sub,
            plan,
            yearly,
            price,
            anchor,
        } => {
            write_sub_terms(w, e.tenant, sub, plan, yearly, price)?;
            write_anchor(w, anchor)?;
            w.write_all(b"}")
        }
        Body::Cancelled {
            sub,
            reason,
            effective,
        } => {
            w.write_all(b"{\"subscription_id\":")?;
            write_sub_id(w, e.tenant, sub)?;
            w.write_all(b",\"reason\":")?;
            write_json_str(w, reason)?;
            if let Some(t) = effective {
                w.write_all(b",\"effective_at\":")?;
                write_time(w, t)?;
            }
            w.write_all(b"}")
        }
        Body::Usage {
            metric,
            milli,
            string,
            dims,
            user,
        } => {
            w.write_all(b"{\"metric\":")?;
            write_json_str(w, metric.name())?;
            w.write_all(b",\"quantity\":")?;
            if string {
                w.write_all(b"\"")?;
            }
            write_milli(w, milli)?;
            if string {
                w.write_all(b"\"")?;
            }
            if let Some((region, endpoint)) = usize::from(dims)
                .checked_sub(1)
                .and_then(|i| DIMENSIONS.get(i))
            {
                w.write_all(b",\"dimensions\":{\"region\":")?;
                write_json_str(w, region)?;
                w.write_all(b",\"endpoint\":")?;
                write_json_str(w, endpoint)?;
                w.write_all(b"}")?;
            }
            if user > 0 {
                write!(w, ",\"unique\":\"user_{user}\"")?;
            }
            w.write_all(b"}")
        }
        Body::InvoicePaid {
            inv,
            amount,
            currency,
        }
        | Body::InvoiceRefunded {
            inv,
            amount,
            currency,
        } => {
            w.write_all(b"{\"invoice_id\":\"inv_")?;
            write_tenant(w, e.tenant)?;
            write!(w, "_{:04}_{:02}", inv.year, inv.month)?;
            if inv.n > 1 {
                write!(w, "_{}", inv.n)?;
            }
            write!(w, "\",\"amount\":{amount},\"currency\":")?;
            write_json_str(w, currency)?;
            w.write_all(b"}")
        }
        Body::Login { method } => {
            w.write_all(b"{\"method\":")?;
            write_json_str(w, method)?;
            w.write_all(b"}")
        }
        Body::PasswordReset => w.write_all(b"{\"channel\":\"email\"}"),
        Body::MemberInvited { invitee, role } => {
            write!(w, "{{\"invitee\":\"user_{invitee}\",\"role\":")?;
            write_json_str(w, role)?;
            w.write_all(b"}")
        }
        Body::MemberRemoved { user } => write!(w, "{{\"user\":\"user_{user}\"}}"),
        Body::Onboarding { step } => {
            let name = ONBOARDING.get(usize::from(step)).copied().unwrap_or("step");
            w.write_all(b"{\"step\":")?;
            write_json_str(w, name)?;
            write!(w, ",\"step_index\":{}}}", u32::from(step) + 1)
        }
        Body::Webhook { event, delivery } => {
            w.write_all(b"{\"provider\":\"stripe\",\"event\":")?;
            write_json_str(w, event)?;
            write!(w, ",\"delivery_id\":\"whd_{delivery:012x}\"}}")
        }
        // Written by [`EventWriter::write`], which knows the ids' prefix.
        Body::Voided { .. } => w.write_all(b"{}"),
    }
}

pub(super) fn write_sub_terms<W: Write>(
    w: &mut W,
    tenant: u32,
    sub: u32,
    plan: Plan,
    yearly: bool,
    price: i64,
) -> io::Result<()> {
    w.write_all(b"{\"subscription_id\":")?;
    write_sub_id(w, tenant, sub)?;
    w.write_all(b",\"plan\":")?;
    write_json_str(w, plan.code())?;
    w.write_all(b",\"billing_cycle\":")?;
    write_json_str(w, if yearly { "yearly" } else { "monthly" })?;
    write!(w, ",\"price\":{price},\"currency\":")?;
    write_json_str(w, plan.currency())
}

fn write_anchor<W: Write>(w: &mut W, anchor: Option<i64>) -> io::Result<()> {
    match anchor {
        Some(a) => {
            w.write_all(b",\"billing_anchor\":")?;
            write_time(w, a)
        }
        None => Ok(()),
    }
}

pub(super) fn write_sub_id<W: Write>(w: &mut W, tenant: u32, sub: u32) -> io::Result<()> {
    w.write_all(b"\"sub_")?;
    write_tenant(w, tenant)?;
    write!(w, "_{sub}\"")
}

pub(super) fn write_tenant<W: Write>(w: &mut W, tenant: u32) -> io::Result<()> {
    if tenant == 0 {
        w.write_all(b"_system")
    } else {
        write!(w, "t{tenant:04}")
    }
}

/// A quantity in thousandths as a plain decimal (`12`, `12.5`, `7.25`).
pub(super) fn write_milli<W: Write>(w: &mut W, milli: u64) -> io::Result<()> {
    let (int, frac) = (milli / 1000, milli % 1000);
    if frac == 0 {
        write!(w, "{int}")
    } else if frac % 100 == 0 {
        write!(w, "{int}.{}", frac / 100)
    } else if frac % 10 == 0 {
        write!(w, "{int}.{:02}", frac / 10)
    } else {
        write!(w, "{int}.{frac:03}")
    }
}

/// A JSON string holding the RFC 3339 UTC time `t` (µs since the epoch):
/// second precision when whole, else microseconds.
pub(super) fn write_time<W: Write>(w: &mut W, t: i64) -> io::Result<()> {
    let (y, mo, d) = civil_from_days(t.div_euclid(DAY));
    let rem = t.rem_euclid(DAY);
    let secs = rem / SEC;
    let us = rem % SEC;
    let mut b = *b"\"0000-00-00T00:00:00.000000Z\"";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            if let Some(c) = b.get_mut(i) {
                *c = b'0' + (v % 10) as u8;
            }
            v /= 10;
        }
    };
    put(1, 4, y.rem_euclid(10_000));
    put(6, 2, i64::from(mo));
    put(9, 2, i64::from(d));
    put(12, 2, secs / 3600);
    put(15, 2, secs / 60 % 60);
    put(18, 2, secs % 60);
    if us == 0 {
        w.write_all(b.get(..20).unwrap_or(&[]))?;
        w.write_all(b"Z\"")
    } else {
        put(21, 6, us);
        w.write_all(&b)
    }
}

/// Writes `s` as a JSON string, escaping what JSON requires.
pub(super) fn write_json_str<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_all(b"\"")?;
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        if c == b'"' || c == b'\\' || c < 0x20 {
            w.write_all(bytes.get(start..i).unwrap_or(&[]))?;
            match c {
                b'"' => w.write_all(b"\\\"")?,
                b'\\' => w.write_all(b"\\\\")?,
                _ => write!(w, "\\u{c:04x}")?,
            }
            start = i + 1;
        }
    }
    w.write_all(bytes.get(start..).unwrap_or(&[]))?;
    w.write_all(b"\"")
}
