// Runs web/static/app.js against a small DOM and a fake usage API, one
// fresh page per case, and prints "ok <case>" or "FAIL <case>: <why>" per
// case. web/app_test.go runs it: node testdata/app_test.js static/app.js
"use strict";
const fs = require("fs");
const vm = require("vm");

const source = fs.readFileSync(process.argv[2], "utf8");

function element(tag) {
  return {
    tag, children: [], options: [], value: "", hidden: true, className: "", _text: "",
    set textContent(v) { this._text = String(v); this.children = []; this.options = []; },
    get textContent() { return this._text; },
    appendChild(c) { this.children.push(c); if (c.tag === "option") this.options.push(c); return c; },
    removeChild(c) { this.children = this.children.filter((x) => x !== c); },
    get firstChild() { return this.children[0]; },
    setAttribute() {}, addEventListener() {},
    querySelector() { return (this._tbody = this._tbody || element("tbody")); },
  };
}

// page loads app.js with the usage API answering from rows (oldest window
// first, as the API orders them), in pages of the asked-for limit.
function page(meter, rows, opts = {}) {
  const els = {};
  // gate, when set, holds every usage answer until it resolves.
  const calls = { usage: [], requests: 0, intervals: [], gate: null };
  let key = null; // no key while the script loads: it refreshes nothing then
  let first = null;
  const fetch = async (path) => {
    const u = new URL(path, "http://dashboard.test");
    const ok = (body) => ({ ok: true, status: 200, statusText: "OK", json: async () => body });
    if (u.pathname === "/v1/meters") return ok({ data: [meter] });
    if (u.pathname === "/v1/requests") { calls.requests++; return ok({ data: [] }); }
    if (u.pathname === "/v1/invoices/upcoming") return ok(opts.upcoming || { total: 0, currency: "usd", period: { start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z" }, as_of: "2026-11-15T00:00:00Z" });
    if (u.pathname === "/v1/invoices") {
      // Newest first, as the invoice API lists them; starting_after is the
      // last id of the page before.
      const all = opts.invoices || [];
      const limit = Number(u.searchParams.get("limit") || 10);
      const after = u.searchParams.get("starting_after");
      const at = after ? all.findIndex((inv) => inv.id === after) + 1 : 0;
      calls.invoicePages = (calls.invoicePages || 0) + 1;
      return ok({ data: all.slice(at, at + limit), has_more: at + limit < all.length });
    }
    if (u.pathname !== "/v1/usage") return ok({ data: [] });
    if (calls.gate) await calls.gate;
    const q = new URLSearchParams(u.searchParams);
    const cursor = q.get("cursor");
    q.delete("cursor");
    if (cursor === null) first = q.toString();
    if (q.toString() !== first) {
      return { ok: false, status: 400, statusText: "Bad Request",
        json: async () => ({ error: { code: "invalid_cursor", message: "cursor used with other parameters" } }) };
    }
    calls.usage.push(path);
    const at = cursor === null ? 0 : Number(cursor);
    // An operator's max_page_size serves a smaller page than asked for.
    const limit = Math.min(Number(q.get("limit") || 100), opts.maxPageSize || Infinity);
    const data = rows.slice(at, at + limit);
    const more = at + limit < rows.length;
    return ok({ meter: meter.key, data, has_more: more, next_cursor: more ? String(at + limit) : undefined, time_zone: opts.timeZone || "UTC" });
  };
  const ctx = vm.createContext({
    document: {
      getElementById: (id) => (els[id] = els[id] || element(id)),
      createElement: (tag) => element(tag),
      createElementNS: (_, tag) => element(tag),
    },
    window: { sessionStorage: { getItem: () => key, setItem() {}, removeItem() {} } },
    fetch, URL, URLSearchParams, console,
    setInterval: (fn, ms) => calls.intervals.push(ms),
  });
  vm.runInContext(source, ctx, { filename: "app.js" });
  key = "sk_live_" + "x".repeat(28);
  return { ctx, els, calls, setKey: (k) => (key = k) };
}

// windowRows is count windows of step ms up to now, oldest first, each with
// groups rows of value 1 (the API's order: window, then group).
function windowRows(count, step, groups) {
  const now = Date.now(), rows = [];
  for (let w = count - 1; w >= 0; w--) {
    const start = new Date(Math.floor((now - w * step) / step) * step).toISOString().replace(".000Z", "Z");
    for (let g = 0; g < groups; g++) rows.push({ window_start: start, group: { route: "/r" + String(g).padStart(4, "0") }, value: 1 });
  }
  return rows;
}
const hourRows = (hours, groups) => windowRows(hours, 3600e3, groups);
const minuteRows = (minutes, groups) => windowRows(minutes, 60e3, groups);

// bars are the chart's bar values, oldest first.
function bars(els) {
  return els.chart.children.filter((c) => c.tag === "rect")
    .map((r) => Number(r.children[0].textContent.split(": ").pop().replace(/[^0-9]/g, "")));
}

const digits = (s) => Number((s.match(/^[^ ]*[0-9][0-9,.\u00a0\u202f]*/) || [""])[0].replace(/[^0-9]/g, ""));

const countByRoute = { key: "api_calls", aggregation: "COUNT", group_by: ["route"] };

const cases = {
  "a grouped view of more rows than a page counts every page": async () => {
    const rows = hourRows(48, 40); // 1,920 rows: two pages of 1,000
    const { ctx, els, calls } = page(countByRoute, rows);
    await ctx.loadMeters();
    els.window.value = "hour";
    els.group.value = "route";
    await ctx.loadUsage();
    const b = bars(els);
    if (calls.usage.length !== 2) throw new Error(calls.usage.length + " usage pages read, want 2");
    if (digits(els["usage-total"].textContent) !== rows.length) throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ", want " + rows.length);
    if (b.reduce((a, v) => a + v, 0) !== rows.length) throw new Error("the chart's bars add up to " + b.reduce((a, v) => a + v, 0) + ", want " + rows.length);
    if (b.slice(-5).some((v) => v !== 40)) throw new Error("the last five hours' bars are " + b.slice(-5) + ", want 40 each");
    if (/only the first/.test(els["usage-note"].textContent)) throw new Error("note " + JSON.stringify(els["usage-note"].textContent) + " calls a full read partial");
    const table = els["usage-table"].querySelector("tbody").children;
    if (table.length !== 50) throw new Error(table.length + " table rows, want the 50 newest");
  },
  "past the page cap the view says it is partial and charts no unread window as empty": async () => {
    const rows = minuteRows(60, 1000); // 60,000 rows: more than 50 pages
    const { ctx, els, calls } = page(countByRoute, rows);
    await ctx.loadMeters();
    els.window.value = "minute";
    els.group.value = "route";
    await ctx.loadUsage();
    const b = bars(els);
    if (calls.usage.length !== 50) throw new Error(calls.usage.length + " usage pages read, want the cap of 50");
    if (!/only the first 50.000 rows/.test(els["usage-note"].textContent)) throw new Error("note " + JSON.stringify(els["usage-note"].textContent) + " does not say the read stopped");
    if (!/partial/.test(els["usage-total"].textContent)) throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + " does not say it is partial");
    if (b.length === 0 || b[b.length - 1] !== 1000) throw new Error("the last bar is " + b[b.length - 1] + ", want 1000 (the last window read, not an unread one shown empty)");
  },
  "with smaller pages than asked for the view still reads its 50,000 rows": async () => {
    const rows = minuteRows(60, 1000);
    const { ctx, els, calls } = page(countByRoute, rows, { maxPageSize: 500 });
    await ctx.loadMeters();
    els.window.value = "minute";
    els.group.value = "route";
    await ctx.loadUsage();
    if (calls.usage.length !== 100) throw new Error(calls.usage.length + " usage pages of 500 read, want 100 (50,000 rows)");
    if (!/only the first 50.000 rows/.test(els["usage-note"].textContent)) throw new Error("note " + JSON.stringify(els["usage-note"].textContent));
  },
  "a read that stops inside a window's groups leaves that window out": async () => {
    const rows = minuteRows(60, 1500); // 90,000 rows: the 50,000th is a third of the way into a window
    const { ctx, els } = page(countByRoute, rows);
    await ctx.loadMeters();
    els.window.value = "minute";
    els.group.value = "route";
    await ctx.loadUsage();
    const b = bars(els);
    if (b.length === 0 || b.some((v) => v !== 0 && v !== 1500)) throw new Error("bars " + b.slice(-3) + "…: a window read in part is shown");
    if (b[b.length - 1] !== 1500) throw new Error("the last bar is " + b[b.length - 1] + ", want 1500, the last whole window");
    const sum = b.reduce((a, v) => a + v, 0);
    if (sum !== 33 * 1500 || !/49.500 /.test(els["usage-total"].textContent)) {
      throw new Error("bars add up to " + sum + ", headline " + JSON.stringify(els["usage-total"].textContent) + "; want the 33 whole windows, 49,500");
    }
    if (!/only the first 50.000 rows/.test(els["usage-note"].textContent)) throw new Error("note " + JSON.stringify(els["usage-note"].textContent));
  },
  "hours off one grid are all charted": async () => {
    // Lord Howe's offset moves by 30 minutes: a day of hours on :00, then
    // a day on :30. Each window's usage is one bar; none is lost or zero.
    const rows = hourRows(47, 1).map((r, i) => ({
      window_start: i < 24 ? r.window_start : new Date(Date.parse(r.window_start) - 1800e3).toISOString().replace(".000Z", "Z"),
      value: 1,
    }));
    const { ctx, els } = page(countByRoute, rows, { timeZone: "Australia/Lord_Howe" });
    await ctx.loadMeters();
    els.window.value = "hour";
    await ctx.loadUsage();
    const b = bars(els);
    const sum = b.reduce((a, v) => a + v, 0);
    if (digits(els["usage-total"].textContent) !== 47 || sum !== 47 || b.length !== 47) {
      throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ", " + b.length + " bars adding up to " + sum + "; want 47 of 1");
    }
  },
  "an ungrouped view on one page": async () => {
    const rows = hourRows(48, 1).map((r) => ({ window_start: r.window_start, value: 3 }));
    const { ctx, els, calls } = page(countByRoute, rows);
    await ctx.loadMeters();
    els.window.value = "hour";
    await ctx.loadUsage();
    if (calls.usage.length !== 1) throw new Error(calls.usage.length + " usage pages read, want 1");
    if (digits(els["usage-total"].textContent) !== 3 * 48) throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ", want " + 3 * 48);
  },
  "a refresh whose key is forgotten meanwhile shows nothing": async () => {
    const { ctx, els, calls, setKey } = page(countByRoute, hourRows(2, 1));
    els.window.value = "hour";
    let release;
    calls.gate = new Promise((r) => (release = r));
    const running = ctx.refresh();
    await new Promise((r) => setTimeout(r, 10)); // the refresh waits on the usage answer
    setKey(null); // Forget key
    release();
    await running;
    const el = (id) => ctx.document.getElementById(id);
    if (!el("usage-section").hidden) throw new Error("the usage section is shown again after the key was forgotten");
    if (el("usage-table").querySelector("tbody").children.length !== 0) throw new Error("the forgotten key's usage rows were drawn");
    if (els.status.textContent !== "Loading…") throw new Error("status " + JSON.stringify(els.status.textContent) + " after a stale answer");
  },
  "the page refreshes usage every 10 s and the request log every 30 s": async () => {
    const { ctx, els, calls } = page(countByRoute, hourRows(2, 1));
    let now = Date.parse("2026-11-28T12:00:00Z");
    vm.runInContext("Date", ctx).now = () => now;
    els.window.value = "hour";
    if (!calls.intervals.includes(10000)) throw new Error("refresh intervals " + calls.intervals + ", want 10000");
    for (let i = 0; i < 7; i++) { // 0 s, 10 s, … 60 s
      await ctx.refresh();
      now += 10000;
    }
    if (calls.usage.length !== 7) throw new Error(calls.usage.length + " usage reads in 7 refreshes, want 7 (status: " + els.status.textContent + ")");
    if (calls.requests !== 3) throw new Error(calls.requests + " request-log reads over 60 s, want 3 (at 0, 30 and 60 s)");
    if (els["requests-section"].hidden) throw new Error("the request log is hidden");
  },
  "day windows and billing periods are shown in the account's zone, not the browser's": async () => {
    // Tokyo's 10 November starts at 15:00 UTC on the 9th.
    const rows = [{ window_start: "2026-11-09T15:00:00Z", value: 5 }];
    const tokyoMonth = { start: "2026-10-31T15:00:00Z", end: "2026-11-30T15:00:00Z" };
    const { ctx, els } = page(countByRoute, rows, { timeZone: "Asia/Tokyo", upcoming: { total: 0, currency: "usd", period: tokyoMonth, as_of: "2026-11-15T00:00:00Z" } });
    await ctx.loadMeters();
    els.window.value = "day";
    await ctx.loadUsage();
    const day = (iso, tz) => new Date(iso).toLocaleDateString(undefined, { timeZone: tz });
    const cell = els["usage-table"].querySelector("tbody").children[0].children[0].textContent;
    if (cell !== day("2026-11-10T00:00:00+09:00", "Asia/Tokyo") || cell === day("2026-11-09T15:00:00Z", "UTC")) {
      throw new Error("the day window is labelled " + JSON.stringify(cell) + ", want Tokyo's date, " + day("2026-11-10T00:00:00+09:00", "Asia/Tokyo"));
    }
    await ctx.loadBilling();
    const shown = els.upcoming.children[1].textContent;
    const want = "Period " + day("2026-11-01T00:00:00+09:00", "Asia/Tokyo") + " – " + day("2026-11-30T00:00:00+09:00", "Asia/Tokyo");
    if (!shown.startsWith(want)) throw new Error("the upcoming invoice says " + JSON.stringify(shown) + ", want it to start " + JSON.stringify(want) + " (its last day, in Tokyo)");
  },
  "every invoice is listed, not only the first page": async () => {
    const invoices = [];
    for (let i = 0; i < 150; i++) invoices.push({ id: "inv_" + String(150 - i).padStart(3, "0"), status: "paid", total: 100, currency: "usd", period: { start: "2014-01-01T00:00:00Z", end: "2014-02-01T00:00:00Z" } });
    const { ctx, els, calls } = page(countByRoute, [], { invoices });
    await ctx.loadBilling();
    const listed = els.invoices.querySelector("tbody").children.length;
    if (listed !== 150) throw new Error(listed + " invoices listed, want all 150");
    if (calls.invoicePages !== 2) throw new Error(calls.invoicePages + " invoice pages read, want 2 of 100");
    if (els["invoices-note"].textContent !== "") throw new Error("note " + JSON.stringify(els["invoices-note"].textContent) + " when every invoice is listed");
  },
  "a MAX meter's windows without events are not charted as zero": async () => {
    const peak = { key: "temperature_peak", aggregation: "MAX", group_by: [] };
    const rows = hourRows(48, 1).filter((_, i) => i % 2 === 0).map((r, i) => ({ window_start: r.window_start, value: -10 - i }));
    const { ctx, els } = page(peak, rows);
    await ctx.loadMeters();
    els.window.value = "hour";
    await ctx.loadUsage();
    const rects = els.chart.children.filter((c) => c.tag === "rect").length;
    if (rects !== rows.length) throw new Error(rects + " bars, want one per window with a value (" + rows.length + ")");
    if (!/^peak -10 /.test(els["usage-total"].textContent.replace(/\u2212/g, "-"))) throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ", want the peak of the values, -10");
  },
  "a SUM window past Int64 is left out of the total and the chart, and said so": async () => {
    const bytes = { key: "bytes", aggregation: "SUM", group_by: [] };
    const rows = [
      { window_start: "2026-11-27T00:00:00Z", value: 9223372036854775807, overflow: true },
      { window_start: "2026-11-28T00:00:00Z", value: 5 },
      { window_start: "2026-11-29T00:00:00Z", value: 7 },
    ];
    const { ctx, els } = page(bytes, rows);
    await ctx.loadMeters();
    els.window.value = "day";
    await ctx.loadUsage();
    if (digits(els["usage-total"].textContent) !== 12 || !/without 1 day too large to count/.test(els["usage-total"].textContent)) {
      throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ", want 12 without the overflowed day, and saying so");
    }
    const b = bars(els);
    if (b.join(",") !== "5,7") throw new Error("bars " + JSON.stringify(b) + ", want the two countable days, 5 and 7");
    if (!/1 day adds up past 9,223,372,036,854,775,807/.test(els["usage-note"].textContent)) throw new Error("note " + JSON.stringify(els["usage-note"].textContent) + " does not name the overflow");
    const cells = els["usage-table"].querySelector("tbody").children.map((r) => r.children[2].textContent);
    if (cells.join(",") !== "7,5,overflow") throw new Error("table values " + JSON.stringify(cells) + ", want 7, 5 and overflow (newest first)");
  },
  "a usage read that a newer one replaced draws nothing": async () => {
    const { ctx, els, calls } = page(countByRoute, hourRows(2, 1));
    await ctx.loadMeters();
    let release;
    calls.gate = new Promise((r) => (release = r));
    els.window.value = "day";
    const older = ctx.loadUsage().catch((e) => e);
    await new Promise((r) => setTimeout(r, 10));
    calls.gate = null;
    els.window.value = "hour";
    await ctx.loadUsage();
    const headline = els["usage-total"].textContent;
    release();
    const err = await older;
    if (!err || !err.superseded) throw new Error("the older read ended with " + err + ", want it set aside as superseded");
    if (els["usage-total"].textContent !== headline || !/2 days/.test(headline)) {
      throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + " after the older day read landed, want the hour read's " + JSON.stringify(headline));
    }
  },
  "a refresh asked for while one runs comes after it, and a slow view is drawn": async () => {
    const { ctx, els, calls } = page(countByRoute, hourRows(2, 1));
    await ctx.refresh(); // the page's first, with the key
    els.window.value = "hour";
    const before = calls.usage.length;
    let release;
    calls.gate = new Promise((r) => (release = r));
    const slow = ctx.refresh();
    await new Promise((r) => setTimeout(r, 10));
    const ticks = [ctx.refresh(), ctx.refresh()]; // 10 s ticks while the read waits
    calls.gate = null;
    release();
    await Promise.all([slow, ...ticks]);
    if (calls.usage.length - before !== 2) throw new Error((calls.usage.length - before) + " usage reads, want the slow one and one after it");
    if (!/2 days/.test(els["usage-total"].textContent)) throw new Error("headline " + JSON.stringify(els["usage-total"].textContent) + ": the slow view was not drawn");
    if (!/^Showing/.test(els.status.textContent)) throw new Error("status " + JSON.stringify(els.status.textContent));
  },
  "a billing period made under another zone is shown to the minute, with the zone": async () => {
    const utcJanuary = { start: "2026-01-01T00:00:00Z", end: "2026-02-01T00:00:00Z" };
    const invoices = [{ id: "inv_1", status: "paid", total: 100, currency: "usd", period: utcJanuary }];
    const { ctx, els } = page(countByRoute, [{ window_start: "2026-11-09T15:00:00Z", value: 1 }], { timeZone: "Asia/Tokyo", invoices });
    await ctx.loadMeters();
    els.window.value = "day";
    await ctx.loadUsage();
    await ctx.loadBilling();
    const shown = els.invoices.querySelector("tbody").children[0].children[0].textContent;
    const at = (iso) => new Date(iso).toLocaleString(undefined, { timeZone: "Asia/Tokyo" });
    if (shown !== at(utcJanuary.start) + " – " + at(utcJanuary.end) + " (Asia/Tokyo)") {
      throw new Error("a UTC month shown to a Tokyo account as " + JSON.stringify(shown) + ", want its instants in Tokyo time, with the zone");
    }
  },
};

(async () => {
  let failed = false;
  for (const [name, run] of Object.entries(cases)) {
    try {
      await run();
      console.log("ok " + name);
    } catch (e) {
      failed = true;
      console.log("FAIL " + name + ": " + (e && e.message ? e.message : e));
    }
  }
  process.exitCode = failed ? 1 : 0;
})();
