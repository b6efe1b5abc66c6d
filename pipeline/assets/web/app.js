// Tally's dashboard and tenant pages. Every number comes from /api/...,
// which runs the same SQL views as `tally sql` for the logged-in account;
// this file only lays numbers out (money in major units, months as
// months) and never computes a metric itself.
"use strict";

const page = document.body.dataset.page;
const app = document.getElementById("app");

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function money(cents, currency) {
  if (cents === null || cents === undefined) return "–";
  try {
    return new Intl.NumberFormat("en-US", { style: "currency", currency }).format(Number(cents) / 100);
  } catch (_) {
    return (Number(cents) / 100).toFixed(2) + " " + currency;
  }
}
function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits ?? 2 });
}
function pct(v) {
  return v === null || v === undefined ? "–" : (Number(v) * 100).toFixed(1) + "%";
}
// Minor units as "49.00 USD": an event carries its own currency.
function amount(v, currency) {
  if (typeof v !== "number") return show(v);
  return (v / 100).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }) + (currency ? " " + currency : "");
}
// A JSON value as text: "" for null, objects as JSON.
function show(v) {
  return v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
}
// "2025-01-18T19:16:32.5Z" as "2025-01-18 19:16:32" (columns say UTC).
function when(t) {
  return t ? String(t).replace("T", " ").replace(/\.\d+/, "").replace(/Z$/, "") : "–";
}
// A billing period [start, end) as "Aug 2, 2025 08:03 – Sep 2, 2025 08:03"
// (times shown only when not midnight), UTC.
function period(start, end) {
  if (!start) return "–";
  const f = (t) => {
    const d = new Date(String(t).replace(" ", "T").replace(/(Z|[+-]00:?00)?$/, "Z"));
    const day = d.toLocaleString("en-US", { month: "short", day: "numeric", year: "numeric", timeZone: "UTC" });
    const hm = d.toISOString().slice(11, 16);
    return hm === "00:00" ? day : `${day} ${hm}`;
  };
  return end ? `${f(start)} – ${f(end)} (UTC)` : f(start);
}
// A `usage_by_dimension` group ({"region":"eu-west"}) as "region=eu-west".
function groupLabel(g) {
  try {
    const o = JSON.parse(g);
    return Object.entries(o).map(([k, v]) => `${k}=${v === null ? "(none)" : v}`).join(", ") || "(all)";
  } catch (_) {
    return String(g);
  }
}
function groupKeys(g) {
  try {
    return Object.keys(JSON.parse(g)).join(", ");
  } catch (_) {
    return "group";
  }
}
function month(m) {
  if (!m) return "–";
  const [y, mo] = String(m).split("-");
  return new Date(Date.UTC(+y, +mo - 1, 1)).toLocaleString("en-US", { month: "short", year: "numeric", timeZone: "UTC" });
}
// A table cell that carries its raw value, so a test can compare it with `tally sql`.
function cell(key, raw, shown, cls) {
  return `<td data-cell="${esc(key)}" data-raw="${esc(raw === null || raw === undefined ? "" : raw)}"${cls ? ` class="${cls}"` : ""}>${esc(shown)}</td>`;
}
// `left`: the columns of text, aligned left (numbers align right).
function table(headers, rows, left = [0]) {
  return `<div class="scroll"><table><thead><tr>${headers.map((h, i) => `<th${left.includes(i) ? ' class="text"' : ""}>${esc(h)}</th>`).join("")}</tr></thead><tbody>${rows.join("") || `<tr><td colspan="${headers.length}" class="text">none</td></tr>`}</tbody></table></div>`;
}
function chart(id, option) {
  const el = document.getElementById(id);
  if (!el || typeof echarts === "undefined") return;
  // Drawn again (another granularity): the same instance, the option replaced.
  let c = echarts.getInstanceByDom(el);
  if (!c) {
    c = echarts.init(el, null, { renderer: "svg" });
    window.addEventListener("resize", () => c.resize());
  }
  c.setOption(Object.assign({ animation: false, tooltip: { trigger: "axis" }, grid: { left: 60, right: 20, top: 30, bottom: 40 } }, option), true);
}
function kpi(label, key, raw, shown, note) {
  return `<div class="card kpi"><div class="label">${esc(label)}</div><div class="value" data-cell="${esc(key)}" data-raw="${esc(raw ?? "")}">${esc(shown)}</div>${note ? `<div class="note">${esc(note)}</div>` : ""}</div>`;
}
async function get(url) {
  // location.origin, not a relative URL: a page opened as http://user:pw@host/
  // has a base URL with credentials, which fetch refuses.
  const r = await fetch(location.origin + url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}
function fail(e) {
  app.innerHTML = `<div class="error">Cannot load the numbers: ${esc(e.message)}</div>`;
}
function stamp(d) {
  document.getElementById("meta").innerHTML =
    `checkpoint <b data-cell="checkpoint_seq" data-raw="${esc(d.checkpoint_seq)}">${esc(d.checkpoint_seq)}</b> · stream clock ${esc(d.stream_clock ?? "–")}`;
}

function dashboard(d) {
  stamp(d);
  const currencies = [...new Set(d.mrr_waterfall.map((r) => r.currency))].sort();
  let html = "";
  for (const cur of currencies) {
    const wf = d.mrr_waterfall.filter((r) => r.currency === cur);
    const ch = d.churn.filter((r) => r.currency === cur);
    const lt = d.ltv.filter((r) => r.currency === cur);
    const rv = d.revenue_by_month.filter((r) => r.currency === cur);
    const last = wf[wf.length - 1] || {};
    const lastCh = ch[ch.length - 1] || {};
    const lastLt = lt[lt.length - 1] || {};
    const k = (col) => `mrr_waterfall|${last.month}|${cur}|${col}`;
    html += `<h2>${esc(cur)}</h2><div class="kpis">
      ${kpi(`MRR, ${month(last.month)}`, k("mrr_end"), last.mrr_end, money(last.mrr_end, cur))}
      ${kpi("Net new MRR", k("net_new_mrr"), last.net_new_mrr, money(last.net_new_mrr, cur))}
      ${kpi("Paying tenants", k("paying_tenants"), last.paying_tenants, num(last.paying_tenants, 0))}
      ${kpi("Logo churn", `churn|${lastCh.month}|${cur}|logo_churn_rate`, lastCh.logo_churn_rate, pct(lastCh.logo_churn_rate))}
      ${kpi("Net MRR churn", `churn|${lastCh.month}|${cur}|net_mrr_churn_rate`, lastCh.net_mrr_churn_rate, pct(lastCh.net_mrr_churn_rate))}
      ${kpi("NRR", `churn|${lastCh.month}|${cur}|nrr`, lastCh.nrr, pct(lastCh.nrr))}
      ${kpi("ARPA", `ltv|${lastLt.month}|${cur}|arpa`, lastLt.arpa, money(lastLt.arpa, cur))}
      ${kpi("LTV", `ltv|${lastLt.month}|${cur}|ltv`, lastLt.ltv, money(lastLt.ltv, cur))}
    </div>
    <div class="grid" style="margin-top:1rem">
      <div class="card"><h3>MRR waterfall</h3><div class="chart" id="wf-${esc(cur)}"></div></div>
      <div class="card"><h3>Logo churn, net MRR churn and NRR</h3><div class="chart" id="churn-${esc(cur)}"></div></div>
      <div class="card"><h3>Collected revenue (net of refunds)</h3><div class="chart" id="rev-${esc(cur)}"></div></div>
      <div class="card"><h3>ARPA and LTV</h3><div class="chart" id="ltv-${esc(cur)}"></div></div>
    </div>
    <div class="card" style="margin-top:1rem"><h3>MRR movements by month</h3>${table(
      ["Month", "Start", "New", "Expansion", "Reactivation", "Contraction", "Churned", "End", "Paying"],
      wf.map((r) => {
        const c = (col, cls) => cell(`mrr_waterfall|${r.month}|${cur}|${col}`, r[col], money(r[col], cur), cls);
        return `<tr><td class="text">${esc(month(r.month))}</td>${c("mrr_start")}${c("new_mrr", "pos")}${c("expansion_mrr", "pos")}${c("reactivation_mrr", "pos")}${c("contraction_mrr", "neg")}${c("churned_mrr", "neg")}${c("mrr_end")}${cell(`mrr_waterfall|${r.month}|${cur}|paying_tenants`, r.paying_tenants, num(r.paying_tenants, 0))}</tr>`;
      }))}</div>`;
  }
  html += `<div class="grid wide" style="margin-top:1rem">
    <div class="card"><h3>Top tenants by MRR</h3>${table(["Tenant", "Plan", "MRR", "Revenue to date"],
      d.top_tenants.map((r) => `<tr><td class="text"><a href="/tenants/${encodeURIComponent(r.tenant)}">${esc(r.name || r.tenant)}</a></td><td class="text">${esc(r.plan)}</td>${cell(`top_tenants|${r.tenant}|mrr`, r.mrr, money(r.mrr, r.currency))}${cell(`top_tenants|${r.tenant}|revenue_to_date`, r.revenue_to_date, money(r.revenue_to_date, r.currency))}</tr>`), [0, 1])}</div>
    <div class="card"><h3>Over quota this month</h3>${table(["Tenant", "Metric", "Used", "Included", "Overage"],
      d.over_quota.map((r) => `<tr><td class="text"><a href="/tenants/${encodeURIComponent(r.tenant)}">${esc(r.tenant)}</a></td><td class="text">${esc(r.metric)}</td>${cell(`over_quota|${r.tenant}|${r.metric}|used`, r.used, num(r.used))}${cell(`over_quota|${r.tenant}|${r.metric}|included`, r.included, num(r.included))}${cell(`over_quota|${r.tenant}|${r.metric}|overage_amount`, r.overage_amount, money(r.overage_amount, r.currency), "neg")}</tr>`), [0, 1])}</div>
    <div class="card"><h3>Corrections and restatements</h3>${table(["Final numbers restated", "Cause", "Rows", "Tenants"],
      d.restatements.map((r) => `<tr><td class="text">${esc(r.view)}</td><td class="text">${esc(r.cause)}</td><td>${esc(show(r.rows))}</td><td>${esc(show(r.tenants))}</td></tr>`), [0, 1])}
      <p class="caption">${esc(show((d.corrections[0] || {}).voids) || "0")} voids, ${esc(show((d.corrections[0] || {}).voided) || "0")} events voided (counted nowhere but the archive).</p></div>
    <div class="card"><h3>Pipeline</h3>${pipeline(d.pipeline)}</div>
  </div>`;
  app.innerHTML = html;
  for (const cur of currencies) {
    const wf = d.mrr_waterfall.filter((r) => r.currency === cur);
    const months = wf.map((r) => month(r.month));
    const m = (v) => (v === null || v === undefined ? null : Number(v) / 100);
    const bar = (name, col, sign) => ({ name, type: "bar", stack: "moves", data: wf.map((r) => (m(r[col]) === null ? null : sign * m(r[col]))) });
    chart(`wf-${cur}`, {
      legend: { top: 0 }, xAxis: { type: "category", data: months }, yAxis: { type: "value" },
      series: [bar("New", "new_mrr", 1), bar("Expansion", "expansion_mrr", 1), bar("Reactivation", "reactivation_mrr", 1),
        bar("Contraction", "contraction_mrr", -1), bar("Churned", "churned_mrr", -1),
        { name: "MRR", type: "line", data: wf.map((r) => m(r.mrr_end)) }],
    });
    const ch = d.churn.filter((r) => r.currency === cur);
    const p = (v) => (v === null || v === undefined ? null : Number(v) * 100);
    chart(`churn-${cur}`, {
      legend: { top: 0 }, xAxis: { type: "category", data: ch.map((r) => month(r.month)) }, yAxis: { type: "value", axisLabel: { formatter: "{value}%" } },
      series: [{ name: "Logo churn", type: "line", data: ch.map((r) => p(r.logo_churn_rate)) },
        { name: "Net MRR churn", type: "line", data: ch.map((r) => p(r.net_mrr_churn_rate)) },
        { name: "NRR", type: "line", data: ch.map((r) => p(r.nrr)) }],
    });
    const rv = d.revenue_by_month.filter((r) => r.currency === cur);
    chart(`rev-${cur}`, { xAxis: { type: "category", data: rv.map((r) => month(r.month)) }, yAxis: { type: "value" },
      series: [{ name: "Net revenue", type: "bar", data: rv.map((r) => m(r.net)) }, { name: "Refunded", type: "bar", data: rv.map((r) => m(r.refunded)) }] });
    const lt = d.ltv.filter((r) => r.currency === cur);
    chart(`ltv-${cur}`, { legend: { top: 0 }, xAxis: { type: "category", data: lt.map((r) => month(r.month)) }, yAxis: { type: "value" },
      series: [{ name: "ARPA", type: "line", data: lt.map((r) => m(r.arpa)) }, { name: "LTV", type: "line", data: lt.map((r) => m(r.ltv)) }] });
  }
}

function pipeline(p) {
  if (!p) return "";
  const dl = Object.entries(p.dead_lettered || {});
  const rows = [
    `<tr><td class="text">Checkpoint</td>${cell("pipeline|checkpoint_seq", p.checkpoint_seq, num(p.checkpoint_seq, 0))}</tr>`,
    `<tr><td class="text">Stream last sequence</td>${cell("pipeline|stream_last_seq", p.stream_last_seq, p.stream_last_seq === null ? "unknown (NATS)" : num(p.stream_last_seq, 0))}</tr>`,
    `<tr><td class="text">Lag (messages)</td>${cell("pipeline|lag", p.lag, p.lag === null ? "–" : num(p.lag, 0), p.lag > 0 ? "bad" : "ok")}</tr>`,
    `<tr><td class="text">Stream clock</td>${cell("pipeline|stream_clock", p.stream_clock, p.stream_clock ?? "–")}</tr>`,
    `<tr><td class="text">Accepted</td>${cell("pipeline|accepted", p.accepted, num(p.accepted, 0))}</tr>`,
    `<tr><td class="text">Duplicates dropped</td>${cell("pipeline|duplicate", p.duplicate, num(p.duplicate, 0))}</tr>`,
    ...dl.map(([reason, n]) => `<tr><td class="text">Dead-lettered: ${esc(reason)}</td>${cell(`pipeline|dead_lettered|${reason}`, n, num(n, 0), "bad")}</tr>`),
    `<tr><td class="text">Recorded gaps</td>${cell("pipeline|gaps", p.gaps.length, p.gaps.length ? p.gaps.map((g) => `${g.first_seq}–${g.last_seq}`).join(", ") : "none", p.gaps.length ? "bad" : "ok")}</tr>`,
  ];
  if (p.stream_error) rows.push(`<tr><td class="text bad" colspan="2">${esc(p.stream_error)}</td></tr>`);
  return table(["", "Value"], rows);
}

// An event's `data` text as an object; null when it is not a JSON object.
function parse(text) {
  try {
    const v = JSON.parse(text);
    return v && typeof v === "object" && !Array.isArray(v) ? v : null;
  } catch (_) {
    return null;
  }
}
// The fields of `data` without a column of their own: "reason: too expensive · effective at: ...".
function details(j, columns) {
  return Object.entries(j)
    .filter(([k, v]) => !columns.includes(k) && v !== null && v !== "")
    .map(([k, v]) => `${k.replace(/_/g, " ")}: ${show(v)}`)
    .join(" · ");
}
// A row of an event table: time, type, `cells(data)`, then the rest of
// `data`; the text itself when it does not parse.
function eventRow(r, n, cells, columns) {
  const head = `<td class="text time" title="${esc(r.time)}">${esc(when(r.time))}</td><td class="text">${esc(r.type).replace(/\./g, ".<wbr>")}</td>`;
  const j = parse(r.data);
  if (!j) return `<tr>${head}<td class="text details" colspan="${n + 1}">${esc(r.data)}</td></tr>`;
  return `<tr>${head}${cells(j)}<td class="text details">${esc(details(j, columns))}</td></tr>`;
}
// Money of an event, its exact minor units in data-raw.
function priced(key, v, currency, cls) {
  return typeof v === "number" ? cell(key, v, amount(v, currency), cls) : `<td>${esc(show(v))}</td>`;
}
// The Plan card. The row holds the current plan only: a cancelled tenant's
// last plan is the last subscription.started/plan_changed of the timeline,
// and its end that subscription's cancellation (effective_at, else time).
function planCard(t, timeline) {
  let terms = null;
  let end = null;
  for (const r of timeline) {
    const j = parse(r.data) || {};
    if (r.type === "subscription.started" || r.type === "subscription.plan_changed") {
      terms = j;
      end = null;
    } else if (r.type === "subscription.cancelled" && terms && j.subscription_id === terms.subscription_id) {
      end = String(j.effective_at || r.time);
    }
  }
  if (t.plan) {
    const ends = end && terms.subscription_id === t.subscription_id ? `ends ${end.slice(0, 10)}` : "";
    return kpi("Plan", "tenants|plan", t.plan, `${t.plan} (${t.billing_cycle ?? "–"})`, ends);
  }
  if (terms) {
    return kpi("Last plan", "tenants|plan", t.plan, `${show(terms.plan) || "–"} (${show(terms.billing_cycle) || "–"})`, end ? `ended ${end.slice(0, 10)}` : "ended");
  }
  return kpi("Plan", "tenants|plan", t.plan, "–");
}
// Metrics read as a level (seats in use, GB stored): their daily sum means
// little, their highest value does. The tenant JSON has no meter
// aggregation, so the name decides.
function isLevel(metric) {
  return /seat|storage|user|gb|byte|active/i.test(metric);
}

function tenantPage(d) {
  stamp(d);
  const t = d.tenant || {};
  const cur = t.currency || (d.overages[0] || {}).currency || "USD";
  // The open billing period (holding the stream clock), as the invoice
  // will show it; with no usage in it yet, the latest period.
  const starts = [...new Set(d.overages.map((r) => r.period_start))].sort();
  const current = (d.open_period[0] || {}).period_start || starts[starts.length - 1];
  const open = d.overages.filter((r) => r.period_start === current);
  const ends = (open[0] || {}).period_end;
  const planned = open.find((r) => r.plan !== null);
  const metrics = [...new Set(d.usage.map((r) => r.metric))].sort();
  const grouped = [...new Set(d.by_dimension.map((r) => r.metric))].sort();
  const usage = metrics.length
    ? `<div class="tabs" id="gran">${["hour", "day", "month"].map((g) => `<button data-g="${g}" aria-pressed="${g === "day"}">${g}</button>`).join(" ")}</div>
      <div class="grid">${metrics.map((m, i) => `<div><h3>${esc(m)}</h3><div class="chart" id="u-${i}"></div><p class="caption" id="uc-${i}"></p></div>`).join("")}
      ${grouped.map((m, i) => `<div><h3>${esc(m)} by ${esc(groupKeys(d.by_dimension.find((r) => r.metric === m).group))}</h3><div class="chart" id="g-${i}"></div><p class="caption" id="gc-${i}"></p></div>`).join("")}</div>`
    : `<p class="empty">No usage recorded for this tenant yet.</p>`;
  const sub = ["subscription_id", "plan", "billing_cycle", "price", "currency"];
  const inv = ["invoice_id", "amount", "currency"];
  let html = `<h2>${esc(t.name || d.tenant_id)} <span class="meta">(${esc(d.tenant_id)})</span></h2>
    <div class="kpis">
      ${planCard(t, d.timeline)}
      ${kpi("Status", "tenants|status", t.status, t.status ?? "–")}
      ${kpi("MRR", "tenants|mrr", t.mrr, money(t.mrr, cur))}
      ${kpi("Revenue to date", "tenants|revenue_to_date", t.revenue_to_date, money(t.revenue_to_date, cur))}
    </div>
    <div class="card" style="margin-top:1rem"><h3>Usage</h3>${usage}</div>
    <div class="grid wide" style="margin-top:1rem">
    <div class="card"><h3>This billing period: ${esc(period(current, ends))}${planned ? ` on ${esc(planned.plan)}` : ""}</h3>${table(["Metric", "Used", "Included", "Used %", "Overage", "Amount", "Threshold reached"],
      open.map((r) => `<tr><td class="text">${esc(r.metric)}</td>${cell(`overages|${r.period_start}|${r.metric}|used`, r.used, num(r.used))}${cell(`overages|${r.period_start}|${r.metric}|included`, r.included, r.included === null ? "unlimited" : num(r.included))}${cell(`overages|${r.period_start}|${r.metric}|pct_used`, r.pct_used, r.pct_used === null ? "–" : num(r.pct_used, 1) + "%")}${cell(`overages|${r.period_start}|${r.metric}|overage_quantity`, r.overage_quantity, num(r.overage_quantity))}${cell(`overages|${r.period_start}|${r.metric}|overage_amount`, r.overage_amount, money(r.overage_amount, r.currency), r.overage_amount > 0 ? "neg" : "")}${cell(`overages|${r.period_start}|${r.metric}|threshold`, r.threshold, r.threshold === null ? "–" : r.threshold + "%")}</tr>`))}</div>
    <div class="card"><h3>Alerts: thresholds reached</h3>${table(["Period", "Metric", "Threshold", "Used %"],
      d.overages.filter((r) => r.threshold !== null).map((r) => `<tr><td class="text">${esc(period(r.period_start, r.period_end))}</td><td class="text">${esc(r.metric)}</td>${cell(`alerts|${r.period_start}|${r.metric}|threshold`, r.threshold, r.threshold + "%", "bad")}${cell(`alerts|${r.period_start}|${r.metric}|pct_used`, r.pct_used, num(r.pct_used, 1) + "%")}</tr>`), [0, 1])}</div>
    </div>
    <div class="card" style="margin-top:1rem"><h3>Subscription timeline</h3>${table(["Time (UTC)", "Event", "Plan", "Cycle", "Price", "Subscription", "Details"],
      d.timeline.map((r) => eventRow(r, 5, (j) => `<td class="text">${esc(show(j.plan))}</td><td class="text">${esc(show(j.billing_cycle))}</td>${priced(`timeline|${r.time}|${r.type}|price`, j.price, j.currency)}<td class="text">${esc(show(j.subscription_id))}</td>`, sub)), [0, 1, 2, 3, 5, 6])}</div>
    <div class="grid wide" style="margin-top:1rem">
    <div class="card"><h3>Invoices and refunds</h3>${table(["Time (UTC)", "Event", "Invoice", "Amount", "Details"],
      d.invoices.map((r) => eventRow(r, 2, (j) => `<td class="text">${esc(show(j.invoice_id))}</td>${priced(`invoices|${r.time}|${r.type}|amount`, j.amount, j.currency, r.type === "invoice.refunded" ? "neg" : "")}`, inv)), [0, 1, 2, 4])}</div>
    <div class="card"><h3>Revenue by month</h3>${table(["Month", "Paid", "Refunded", "Net"],
      d.revenue.map((r) => `<tr><td class="text">${esc(month(r.month))}</td>${cell(`revenue|${r.month}|paid`, r.paid, money(r.paid, r.currency))}${cell(`revenue|${r.month}|refunded`, r.refunded, money(r.refunded, r.currency))}${cell(`revenue|${r.month}|net`, r.net, money(r.net, r.currency))}</tr>`))}</div>
    </div>
    <div class="grid wide" style="margin-top:1rem">
    <div class="card"><h3>Corrections: voided events</h3>${table(["Published (UTC)", "Voided event", "Reason", "Events hit"],
      d.corrections.map((r) => `<tr><td class="text">${esc(String(r.published_at).slice(0, 19))}</td><td class="text">${esc(r.target_source)} / ${esc(r.target_id)}</td><td class="text">${esc(show(r.reason))}</td><td>${esc(show(r.targets))}</td></tr>`), [0, 1, 2])}</div>
    <div class="card"><h3>Restatements: final numbers that changed</h3>${table(["Published (UTC)", "View", "Row", "Before", "After", "Cause"],
      d.restatements.map((r) => `<tr><td class="text">${esc(String(r.published_at).slice(0, 19))}</td><td class="text">${esc(r.view)}</td><td class="text json">${esc(r.key)}</td><td class="text json">${esc(show(r.before) || "(none)")}</td><td class="text json">${esc(show(r.after) || "(none)")}</td><td class="text">${esc(r.cause)}</td></tr>`), [0, 1, 2, 3, 4, 5])}</div>
    </div>`;
  app.innerHTML = html;
  const value = (v) => (v === null || v === undefined ? null : Number(v));
  const draw = (g) => {
    metrics.forEach((m, i) => {
      const rows = d.usage.filter((r) => r.metric === m && r.granularity === g);
      // A unique_count meter (monthly active users): what it bills is the
      // distinct values, not the quantities.
      const distinct = d.overages.some((r) => r.metric === m && r.aggregation === "unique_count");
      const level = !distinct && isLevel(m);
      const series = [distinct
        ? { name: "distinct (unique_count)", type: "bar", data: rows.map((r) => [r.window_start, value(r.unique_count)]) }
        : level
        ? { name: "highest (max)", type: "line", showSymbol: rows.length <= 60, data: rows.map((r) => [r.window_start, value(r.max)]) }
        : { name: "total (sum)", type: "bar", data: rows.map((r) => [r.window_start, value(r.sum)]) }];
      let caption = distinct
        ? `Bars: the distinct unique values (such as users) seen in each ${g} (unique_count).`
        : level
        ? `Line: the highest value recorded in each ${g} (max), read as a level.`
        : `Bars: the total recorded in each ${g} (sum).`;
      if (g === "month") {
        const lim = d.overages.filter((r) => r.metric === m && r.included !== null).map((r) => [r.period_start, Number(r.included)]);
        if (lim.length) {
          series.push({ name: "included", type: "line", step: "end", data: lim, lineStyle: { type: "dashed" } });
          caption += " Dashed: included in the plan.";
        }
      }
      chart(`u-${i}`, { legend: { top: 0 }, xAxis: { type: "time" }, yAxis: { type: "value" }, series });
      document.getElementById(`uc-${i}`).textContent = caption;
    });
    grouped.forEach((m, i) => {
      const rows = d.by_dimension.filter((r) => r.metric === m && r.granularity === g);
      const level = isLevel(m);
      const groups = [...new Set(rows.map((r) => r.group))].sort();
      const series = groups.map((gr) => ({
        name: groupLabel(gr),
        type: "bar",
        stack: "total",
        data: rows.filter((r) => r.group === gr).map((r) => [r.window_start, value(level ? r.max : r.sum)]),
      }));
      chart(`g-${i}`, { legend: { top: 0 }, tooltip: { trigger: "axis" }, xAxis: { type: "time" }, yAxis: { type: "value" }, series });
      document.getElementById(`gc-${i}`).textContent = `Stacked bars: the ${level ? "highest value (max)" : "total (sum)"} in each ${g}, one colour per group of the meter's group_by.`;
    });
  };
  draw("day");
  for (const b of document.querySelectorAll("#gran button")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll("#gran button")) o.setAttribute("aria-pressed", String(o === b));
      draw(b.dataset.g);
    });
  }
}

if (page === "dashboard") {
  get("/api/dashboard").then(dashboard).catch(fail);
} else if (page === "tenant") {
  get(`/api/tenants/${encodeURIComponent(document.body.dataset.tenant)}`).then(tenantPage).catch(fail);
}
