// Tollgate customer dashboard. Plain JavaScript, no build step. Every call
// goes to the same origin with the customer's own key; the dashboard server
// forwards usage calls to the usage API and billing calls to the invoice API.
"use strict";

const $ = (id) => document.getElementById(id);
const store = window.sessionStorage;

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// stale is thrown for an answer to a key that has since been forgotten or
// replaced: it is not the page's to show.
function stale() {
  const e = new Error("the key changed");
  e.stale = true;
  return e;
}

// superseded is thrown for a usage read that a newer one replaced: the
// newer one draws the page.
function superseded() {
  const e = stale();
  e.superseded = true;
  return e;
}

async function api(path) {
  const key = store.getItem("tollgate.key");
  if (!key) throw stale();
  const resp = await fetch(path, { headers: { Authorization: "Bearer " + key } });
  const body = await resp.json().catch(() => ({}));
  // A refresh under way when the key was forgotten drew the forgotten
  // key's usage back onto the page.
  if (store.getItem("tollgate.key") !== key) throw stale();
  if (!resp.ok) {
    const e = body.error || {};
    const err = new Error(e.message || resp.statusText);
    err.code = e.code;
    err.status = resp.status;
    err.requestId = e.request_id;
    throw err;
  }
  return body;
}

function td(text, cls) {
  const c = document.createElement("td");
  c.textContent = text;
  if (cls) c.className = cls;
  return c;
}

function row(tbody, cells) {
  const tr = document.createElement("tr");
  cells.forEach((c) => tr.appendChild(typeof c === "string" ? td(c) : c));
  tbody.appendChild(tr);
}

// money renders integer minor units in the currency's own exponent.
function money(minor, currency) {
  const cur = (currency || "usd").toUpperCase();
  const fmt = new Intl.NumberFormat(undefined, { style: "currency", currency: cur });
  const digits = fmt.resolvedOptions().maximumFractionDigits;
  return fmt.format(Number(minor) / Math.pow(10, digits));
}

const num = new Intl.NumberFormat();

// zone is the account's time zone, as the last usage answer gave it: its
// day and month windows and its billing periods start at its midnight, so
// they are shown in it, not in the browser's zone.
let zone = "UTC";

function zoneOr(tz) {
  try {
    new Intl.DateTimeFormat(undefined, { timeZone: tz });
    return tz;
  } catch (e) {
    return "UTC";
  }
}

// when formats an instant in the account's zone: a day or month window by
// its date, anything else by date and time.
function when(t, windowName) {
  const d = new Date(t);
  if (windowName === "month") return d.toLocaleDateString(undefined, { timeZone: zone, year: "numeric", month: "long" });
  if (windowName === "day") return d.toLocaleDateString(undefined, { timeZone: zone });
  return d.toLocaleString(undefined, { timeZone: zone });
}

// midnight tells whether t is a midnight in the account's zone.
function midnight(t) {
  const parts = new Intl.DateTimeFormat("en-US", { timeZone: zone, hourCycle: "h23", hour: "2-digit", minute: "2-digit", second: "2-digit" })
    .formatToParts(new Date(t));
  return parts.filter((p) => p.type !== "literal").every((p) => Number(p.value) === 0);
}

// period formats a billing period, which ends (exclusively) at the next
// period's start: its last day is shown, the day before that start. A
// period made under another zone (the account's changed since) does not
// start and end at this zone's midnights: it is shown to the minute.
function period(p) {
  if (midnight(p.start) && midnight(p.end)) return when(p.start, "day") + " – " + when(Date.parse(p.end) - 1, "day");
  return when(p.start) + " – " + when(p.end) + " (" + zone + ")";
}

function rangeFor(windowName) {
  const to = new Date();
  const spans = { minute: 3600e3, hour: 2 * 86400e3, day: 30 * 86400e3, month: 365 * 86400e3 };
  return { from: new Date(to - spans[windowName]), to };
}

function drawChart(points) {
  const svg = $("chart");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const ns = "http://www.w3.org/2000/svg";
  if (points.length === 0) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 20); t.setAttribute("y", 110);
    t.textContent = "No usage in this range yet.";
    svg.appendChild(t);
    return;
  }
  // Bars stand on zero: MAX and LATEST meters can be negative.
  const max = Math.max(...points.map((p) => p.value), 0);
  const min = Math.min(...points.map((p) => p.value), 0);
  const scale = 190 / (max - min || 1);
  const zero = 5 + max * scale;
  const w = 800 / points.length;
  points.forEach((p, i) => {
    const h = Math.abs(p.value) * scale;
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", i * w + 1);
    r.setAttribute("y", p.value >= 0 ? zero - h : zero);
    r.setAttribute("width", Math.max(w - 2, 1));
    r.setAttribute("height", h);
    const title = document.createElementNS(ns, "title");
    title.textContent = p.label + ": " + num.format(p.value);
    r.appendChild(title);
    svg.appendChild(r);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4); label.setAttribute("y", 14);
  label.textContent = "max " + num.format(max) + (min < 0 ? " · min " + num.format(min) : "");
  svg.appendChild(label);
}

// meters are the meters /v1/meters lists, by key.
const meters = new Map();

async function loadMeters() {
  const sel = $("meter");
  if (sel.options.length > 0) return;
  const body = await api("/v1/meters");
  meters.clear();
  (body.data || []).forEach((m) => {
    meters.set(m.key, m);
    const o = document.createElement("option");
    o.value = m.key;
    o.textContent = m.key + " (" + m.aggregation.toLowerCase() + ")";
    sel.appendChild(o);
  });
  groupOptions();
}

// groupChoices is the group_by values the usage API accepts for meter m:
// none, or all of its group_by in its order; and, for COUNT, SUM and MAX
// meters, whose groups combine, each dimension alone as well. UNIQUE_COUNT
// and LATEST cannot be combined across groups, so the API refuses a part.
function groupChoices(m) {
  const dims = (m && m.group_by) || [];
  const combine = m && ["COUNT", "SUM", "MAX"].includes(m.aggregation);
  const choices = [""];
  if (combine) choices.push(...dims);
  if (dims.length > 0 && !(combine && dims.length === 1)) choices.push(dims.join(","));
  return choices;
}

// groupOptions offers the selected meter's groupChoices.
function groupOptions() {
  const sel = $("group");
  const keep = sel.value;
  sel.textContent = "";
  groupChoices(meters.get($("meter").value)).forEach((g) => {
    const o = document.createElement("option");
    o.value = g;
    o.textContent = g ? g.split(",").join(", ") : "nothing";
    sel.appendChild(o);
  });
  sel.value = [...sel.options].some((o) => o.value === keep) ? keep : "";
}

// maxUsageRows bounds how many rows one view reads. The range bounds the
// rows already (two days of hours is 48 windows a group), so only a view
// with more than 50,000 windows and groups stops short, and the note under
// the chart then says the figures are partial. It counts rows, not pages:
// the API serves at most its max_page_size a page, which an operator may
// set below the 1,000 asked for.
const maxUsageRows = 50000;

// usageRows reads a usage query to its last page, following next_cursor,
// or to maxUsageRows. Rows come oldest window first, so a partial read
// lacks the most recent windows.
async function usageRows(params, seq) {
  const data = [];
  for (;;) {
    let body;
    try {
      body = await api("/v1/usage?" + params);
    } catch (e) {
      // A read replaced meanwhile: its error is not the page's either.
      throw seq !== usageSeq ? superseded() : e;
    }
    if (seq !== usageSeq) throw superseded();
    data.push(...(body.data || []));
    if (!body.has_more || !body.next_cursor) return { body, data, partial: false, read: data.length };
    if (data.length >= maxUsageRows) {
      // Rows come window by window, so the last page may stop inside a
      // window's groups: that window was read only in part and is left
      // out, unless it is the only one read.
      const last = data[data.length - 1].window_start;
      const whole = data.filter((d) => d.window_start !== last);
      return { body, data: whole.length > 0 ? whole : data, partial: true, read: data.length };
    }
    params.set("cursor", body.next_cursor);
  }
}

// usageSeq numbers the usage reads: a read that a newer one has replaced
// (another window chosen, or the next refresh) shows nothing, or a slow
// day read could land after the hour read asked for since.
let usageSeq = 0;

async function loadUsage() {
  const seq = ++usageSeq;
  const windowName = $("window").value;
  const { from, to } = rangeFor(windowName);
  const params = new URLSearchParams({
    meter: $("meter").value || "api_calls",
    window: windowName,
    from: from.toISOString(),
    to: to.toISOString(),
    limit: "1000",
  });
  if ($("group").value) params.set("group_by", $("group").value);
  const { body, data, partial, read } = await usageRows(params, seq);
  zone = zoneOr(body.time_zone || "UTC");
  // COUNT and SUM add up over groups and windows; UNIQUE_COUNT, MAX and
  // LATEST do not (a user active on two days is one user, not two).
  const agg = (meters.get(body.meter) || {}).aggregation || "COUNT";
  const adds = agg === "COUNT" || agg === "SUM";
  // A SUM window past Int64 comes with overflow set and a stand-in value
  // (Int64's largest or smallest), not its total: such a window is left out
  // of the total and the chart, whole, and said so, rather than adding the
  // stand-in in (which a browser's numbers cannot even hold exactly).
  const overflowed = new Set(data.filter((d) => d.overflow).map((d) => d.window_start));
  // One bar per window: the groups' sum, or for the others the largest group.
  const byWindow = new Map();
  let total = 0;
  data.forEach((d) => {
    if (overflowed.has(d.window_start)) return;
    const had = byWindow.get(d.window_start);
    byWindow.set(d.window_start, had === undefined ? d.value : adds ? had + d.value : Math.max(had, d.value));
    total += d.value;
  });
  const lastStart = data.map((d) => d.window_start).sort().pop();
  const latest = lastStart === undefined ? undefined : byWindow.get(lastStart);
  // Fill windows with no usage so the chart's time axis is even. Days and
  // months vary in length (daylight saving time, the calendar), so they
  // are shown as returned. A partial read stops at its last window: the
  // windows after it were not read, not empty. Only counts and sums are
  // 0 in a window without events: a MAX or LATEST has no value there.
  // Hours are shown as returned too when they are not all on one grid
  // (a zone whose offset moves by 30 minutes, such as Lord Howe, or a time
  // zone change being rolled up again): filled, the off-grid windows were
  // lost from the chart, which then disagreed with the total.
  const step = adds ? { minute: 60e3, hour: 3600e3 }[windowName] : undefined;
  const starts = [...byWindow.keys()].map((k) => Date.parse(k)).sort((a, b) => a - b);
  if (step && starts.length > 0 && starts.every((s) => (s - starts[0]) % step === 0)) {
    const key = (t) => new Date(t).toISOString().replace(".000Z", "Z");
    const known = new Map([...byWindow.entries()].map(([k, v]) => [Date.parse(k), v]));
    const end = partial ? starts[starts.length - 1] : to.getTime();
    byWindow.clear();
    let t = starts[0];
    while (t - step >= from.getTime()) t -= step;
    for (; t <= end; t += step) if (!overflowed.has(key(t))) byWindow.set(key(t), known.get(t) || 0);
  }
  const points = [...byWindow.entries()].sort().map(([k, v]) => ({ label: when(k, windowName), value: v }));
  drawChart(points);
  const span = { minute: "hour", hour: "2 days", day: "30 days", month: "12 months" }[windowName];
  const values = [...byWindow.values()];
  const through = (partial ? " (partial: up to " + when(lastStart, windowName) + ")" : "") +
    (overflowed.size > 0 ? " (without " + num.format(overflowed.size) + " " + windowName + (overflowed.size === 1 ? "" : "s") + " too large to count)" : "");
  if (adds) {
    $("usage-total").textContent = num.format(total) + " " + body.meter + " in the last " + span + through;
  } else if (agg === "MAX" && values.length > 0) {
    $("usage-total").textContent = "peak " + num.format(Math.max(...values)) + " " + body.meter + " in the last " + span + through;
  } else if (agg === "LATEST" && latest !== undefined) {
    $("usage-total").textContent = "latest " + num.format(latest) + " " + body.meter + through;
  } else {
    $("usage-total").textContent = body.meter + " per " + windowName + " (" + agg + " values do not add up across windows)";
  }
  const notes = [];
  if (body.backfilling) notes.push("this meter's past is still being counted: windows may read low until that finishes");
  if (body.rezoning) notes.push("your time zone changed: these windows are being recounted in it and may read wrong for a few seconds");
  if (body.complete_through) notes.push("complete through " + when(body.complete_through));
  if (overflowed.size > 0) {
    notes.push(num.format(overflowed.size) + " " + windowName + (overflowed.size === 1 ? " adds" : "s add") +
      " up past 9,223,372,036,854,775,807 (or below -9,223,372,036,854,775,808), more than can be counted: left out of the total and the chart, and marked overflow below");
  }
  if (body.too_late_events) notes.push(num.format(body.too_late_events) + " events arrived too late to count and were reported");
  if (partial) {
    notes.push("only the first " + num.format(read) + " rows were read: the total, the chart and the table stop at " + when(lastStart, windowName) +
      "; choose a coarser window or fewer groups to see the whole range");
  }
  if (!adds && $("group").value) notes.push("each bar is the largest group's");
  notes.push("time zone " + zone);
  $("usage-note").textContent = notes.join(" · ");
  const tbody = $("usage-table").querySelector("tbody");
  tbody.textContent = "";
  data.slice().reverse().slice(0, 50).forEach((d) => {
    const group = d.group ? Object.entries(d.group).map(([k, v]) => k + "=" + v).join(", ") : "";
    row(tbody, [when(d.window_start, windowName), group, td(d.overflow ? "overflow" : num.format(d.value), "num")]);
  });
}

// requestsEvery is how often the request log is read again. Each read is of
// the key's raw events, dearer than the usage rollups the page reads every
// refresh, and a log a few seconds late is as useful.
const requestsEvery = 30000;
let requestsAt = 0;

async function loadRequests() {
  const body = await api("/v1/requests?limit=20");
  const tbody = $("requests").querySelector("tbody");
  tbody.textContent = "";
  (body.data || []).forEach((r) => {
    row(tbody, [
      when(r.time), r.method, r.route,
      td(String(r.status), "num"), td((r.latency_us / 1000).toFixed(1) + " ms", "num"),
      td(r.request_id),
    ]);
  });
  $("requests-section").hidden = false;
}

function linesText(inv) {
  return (inv.lines || []).map((l) => l.description + ": " + money(l.amount, inv.currency)).join("; ");
}

async function loadBilling() {
  const up = await api("/v1/invoices/upcoming");
  const box = $("upcoming");
  box.textContent = "";
  const p = document.createElement("p");
  p.className = "big";
  p.textContent = money(up.total, up.currency) + " so far";
  box.appendChild(p);
  const detail = document.createElement("p");
  detail.className = "muted";
  detail.textContent = "Period " + period(up.period) + " · as of " + when(up.as_of) +
    (linesText(up) ? " · " + linesText(up) : "");
  box.appendChild(detail);

  const { invoices, more } = await invoiceList();
  const tbody = $("invoices").querySelector("tbody");
  tbody.textContent = "";
  invoices.forEach((inv) => {
    const link = document.createElement("td");
    if (inv.hosted_invoice_url) {
      const a = document.createElement("a");
      a.href = inv.hosted_invoice_url;
      a.textContent = "view / pay";
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      link.appendChild(a);
    }
    row(tbody, [period(inv.period), inv.status, td(money(inv.total, inv.currency), "num"), linesText(inv), link]);
  });
  $("invoices-note").textContent = more ? "the newest " + num.format(invoices.length) +
    " invoices are shown; older ones are in the invoice API (GET /v1/invoices?starting_after=…)" : "";
  $("billing-section").hidden = false;
}

// maxInvoicePages bounds the pages of 100 invoices one view reads: eight
// years of monthly invoices take one.
const maxInvoicePages = 10;

// invoiceList reads the invoices, newest first, page after page; more is
// true when it stopped at maxInvoicePages with older ones left.
async function invoiceList() {
  const invoices = [];
  let after = "";
  for (let pages = 1; ; pages++) {
    const list = await api("/v1/invoices?limit=100" + (after ? "&starting_after=" + encodeURIComponent(after) : ""));
    const data = list.data || [];
    invoices.push(...data);
    if (!list.has_more || data.length === 0) return { invoices, more: false };
    if (pages >= maxInvoicePages) return { invoices, more: true };
    after = data[data.length - 1].id;
  }
}

// running is the refresh under way, if any. One asked for meanwhile (the
// next 10 s tick, a new key) runs after it rather than beside it, once for
// however many were asked: side by side, a view slower than 10 s to read
// was replaced by the next tick's every time and never drawn.
let running = null;
let again = false;

function refresh() {
  if (running) {
    again = true;
    return running;
  }
  running = (async () => {
    try {
      do {
        again = false;
        await refreshOnce();
      } while (again);
    } finally {
      running = null;
    }
  })();
  return running;
}

async function refreshOnce() {
  const key = store.getItem("tollgate.key");
  if (!key) return;
  setStatus("Loading…");
  let drawn = true;
  try {
    await loadMeters();
    // A read replaced by one the page asked for since (another window
    // chosen) is drawn by that one.
    await loadUsage().catch((e) => {
      if (!e.superseded) throw e;
      drawn = false;
    });
    $("usage-section").hidden = false;
    // The request log is a secret key's: a publishable key is public.
    if (key.startsWith("sk_")) {
      if (Date.now() - requestsAt >= requestsEvery) {
        await loadRequests();
        requestsAt = Date.now();
      }
    } else {
      $("requests-section").hidden = true;
    }
  } catch (e) {
    if (!e.stale) setStatus("Usage: " + e.message + (e.code ? " (" + e.code + ")" : ""), true);
    return;
  }
  // Billing is live usage's, read with a live secret key only.
  if (key.startsWith("sk_live_")) {
    try {
      await loadBilling();
    } catch (e) {
      if (!e.stale) setStatus("Billing: " + e.message + (e.code ? " (" + e.code + ")" : ""), true);
      return;
    }
  } else {
    $("billing-section").hidden = true;
  }
  if (!drawn) return;
  setStatus("Showing " + (key.startsWith("pk_") ? "usage for a publishable key" : key.startsWith("sk_live_") ? "usage and billing" : "usage") +
    (key.includes("_test_") ? " in test mode (metered, never billed)" : "") + ". Updated " + new Date().toLocaleTimeString() + ".");
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!/^(pk|sk)_(live|test)_[0-9A-Za-z]{28}$/.test(key)) {
    setStatus("That does not look like a Tollgate key (pk_live_…, sk_live_…, pk_test_… or sk_test_…).", true);
    return;
  }
  store.setItem("tollgate.key", key);
  requestsAt = 0;
  $("key").value = "";
  $("meter").textContent = "";
  meters.clear();
  refresh();
});
$("forget").addEventListener("click", () => {
  store.removeItem("tollgate.key");
  zone = "UTC";
  ["usage-section", "billing-section", "requests-section"].forEach((id) => ($(id).hidden = true));
  // What the key read leaves the page with it.
  ["usage-table", "requests", "invoices"].forEach((id) => ($(id).querySelector("tbody").textContent = ""));
  ["usage-total", "usage-note", "upcoming", "chart", "invoices-note"].forEach((id) => ($(id).textContent = ""));
  setStatus("Key forgotten.");
});
$("meter").addEventListener("change", groupOptions);
["meter", "window", "group"].forEach((id) => $(id).addEventListener("change", () => loadUsage().catch((e) => e.stale || setStatus(e.message, true))));
setInterval(refresh, 10000);
refresh();
