// The operators' dashboard: polls /api/v1/dashboard and draws it. No framework, no build.
// Every value from the engine is put in the page with textContent (campaign names and
// destinations come from mail headers and DNS: never HTML).
"use strict";

const REFRESH_MS = 2000;
const KEY = "mta-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const KINDS = ["received", "delivered", "deferred"];
const CHART = { width: 1000, height: 170, left: 48, right: 10, top: 10, bottom: 24 };
const TICKS = { 1: 600, 60: 3 * 3600 };  // seconds between time labels, by the data's step
let timer = null;

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem(KEY);

// What went wrong, in one wording per condition (the status line shows `message`).
class DashboardError extends Error {
  constructor(kind, message) { super(message); this.kind = kind; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Authorization: `Bearer ${token()}`, ...(options.headers || {}) },
    });
  } catch (error) {
    throw new DashboardError("unreachable", "engine unreachable (no answer from it)");
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    showLogin("The token was refused.");
    throw new DashboardError("unauthorized", "unauthorized");
  }
  if (response.status === 403) {
    throw new DashboardError("off", "admin API off: the engine has no [http] admin_token");
  }
  if (!response.ok) throw new DashboardError("error", body.error || response.statusText);
  return body;
}

function showLogin(message) {
  clearTimeout(timer);
  $("board").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  setStatus(message || "not connected", true);
}

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

function fmtInt(n) { return n == null ? "–" : Math.round(n).toLocaleString("en-US"); }
function fmtRate(n) { return n == null ? "–" : n < 10 ? n.toFixed(1) : fmtInt(n); }
function fmtPct(x) { return x == null ? "n/a" : `${(x * 100).toFixed(2)} %`; }
function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtClock(seconds) {
  const d = new Date(seconds * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text != null) node.textContent = text;
  return node;
}

function fillTable(id, rows, makeRow) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map(makeRow));
}

// --- figures ---------------------------------------------------------------------------

function drawTotals(data) {
  for (const k of ["received", "delivered", "deferred", "bounced", "expired"]) {
    $(`${k}-total`).textContent = fmtInt(data.totals[k]);
  }
  const now = data.throughput.current;
  for (const k of KINDS) $(`${k}-rate`).textContent = fmtRate(now[k]);
  $("chart-now").textContent = "now (last 10 s): " +
    KINDS.map((k) => `${k} ${fmtRate(now[k])}/s`).join(" · ");
}

function drawQueue(data) {
  const q = data.queue;
  $("queue-total").textContent = fmtInt(q.total);
  for (const s of ["queued", "deferred", "held"]) $(`queue-${s}`).textContent = fmtInt(q.by_state[s] || 0);
  $("queue-recipients").textContent = fmtInt(q.recipients);
  $("spool-used").textContent = fmtBytes(data.storage.used_bytes);
  $("disk-free").textContent = fmtBytes(data.storage.disk_free_bytes);
}

// --- the throughput charts: a time axis, a rate axis from zero, one line per kind -------

function niceTop(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((f) => f * power).find((v) => v >= value);
}

function drawChart(id, table) {
  const svg = $(id);
  const n = table.received.length;
  const perSecond = Object.fromEntries(KINDS.map((k) => [k, table[k].map((v) => v / table.step)]));
  const top = niceTop(Math.max(1, ...KINDS.flatMap((k) => perSecond[k])));
  const w = CHART.width - CHART.left - CHART.right;
  const h = CHART.height - CHART.top - CHART.bottom;
  const x = (i) => CHART.left + (i * w) / (n - 1);
  const y = (v) => CHART.top + h * (1 - v / top);
  const nodes = [svgEl("rect", { x: CHART.left, y: CHART.top, width: w, height: h, class: "plot" })];
  for (const v of [0, top / 2, top]) {
    nodes.push(svgEl("line", { x1: CHART.left, x2: CHART.left + w, y1: y(v), y2: y(v), class: "grid" }),
      svgEl("text", { x: CHART.left - 4, y: y(v) + 4, class: "value" }, `${fmtRate(v)}/s`));
  }
  const every = TICKS[table.step] || 600;
  const end = table.start + (n - 1) * table.step;
  for (let t = Math.ceil(table.start / every) * every; t <= end; t += every) {
    const at = x((t - table.start) / table.step);
    nodes.push(svgEl("line", { x1: at, x2: at, y1: CHART.top, y2: CHART.top + h, class: "grid" }),
      svgEl("text", { x: at, y: CHART.height - 6, class: "tick" }, fmtClock(t)));
  }
  for (const k of KINDS) {
    const points = perSecond[k].map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    nodes.push(svgEl("polyline", { points: points.join(" "), class: `k-${k}` }));
  }
  svg.replaceChildren(...nodes);
  for (const k of KINDS) svg.dataset[k] = String(table[k].reduce((a, b) => a + b, 0));
  svg.dataset.start = String(table.start);
}

function drawCharts(data) {
  drawChart("chart-hour", data.throughput.seconds);
  drawChart("chart-day", data.throughput.minutes);
}

// --- campaigns ---------------------------------------------------------------------------

// A bar for a rate, with the threshold drawn as a line: red at or past the threshold once
// the campaign is judged; grey ("judged after N sent") below the minimum volume.
function rateBar(rate, threshold, c) {
  const judged = c.judged !== false;
  const cell = el("td", null, judged ? "rate" : "rate pending");
  cell.dataset.judged = judged ? "yes" : "no";
  const scale = Math.max(threshold * 2, rate || 0);
  const svg = svgEl("svg", { viewBox: "0 0 100 10", class: "bar" });
  const over = judged && rate != null && rate >= threshold;
  const bar = svgEl("rect", { width: rate ? Math.min(100, (rate / scale) * 100) : 0, height: 10,
    class: judged ? (over ? "over" : "under") : "pending" });
  const x = (threshold / scale) * 100;
  svg.append(bar, svgEl("line", { x1: x, x2: x, y1: 0, y2: 10, class: "threshold" }));
  cell.append(svg, el("span", `${fmtPct(rate)} / ${fmtPct(threshold)}`));
  if (!judged) cell.title = `not judged yet: judged after ${fmtInt(c.judged_after)} sent`;
  return cell;
}

function campaignKey(c) { return `${c.account}/${c.campaign}`; }

function stateCell(c) {
  const state = c.paused ? "paused" : c.status === "dropped" ? "dropped" : "sending";
  const cell = el("td", state, c.paused || c.status === "dropped" ? "state-paused" : "state-ok");
  if (c.guard === false) {
    cell.append(el("span", ` · no guard: ${c.no_guard}`, "state-unguarded"));
  } else if (c.judged === false) {
    cell.append(el("span", ` · judged after ${fmtInt(c.judged_after)} sent`, "state-pending"));
  }
  return cell;
}

// Opens or clicks of a campaign: people's unique count and rate, then every request
// (machines' prefetches and scanners included) in the cell's title.
function engagementCell(e, kind) {
  if (!e) return el("td", "-");
  const rate = kind === "opens" ? e.open_rate : e.click_rate;
  const cell = el("td", `${fmtInt(e[`unique_${kind}`])} · ${fmtPct(rate)}`);
  cell.title = `all ${kind}: ${fmtInt(e[`${kind}_total`])} (human ${fmtInt(e[`${kind}_human`])}, ` +
    `machine ${fmtInt(e[`${kind}_machine`])})`;
  return cell;
}

// The campaign page: what the campaign did, from /api/v1/campaigns/ACCOUNT/CAMPAIGN.
async function showCampaign(c) {
  const path = `/api/v1/campaigns/${encodeURIComponent(c.account)}/${encodeURIComponent(c.campaign)}`;
  const row = await api(path);
  const e = row.engagement || {};
  $("campaign-title").textContent = `Campaign ${row.campaign} (account ${row.account})`;
  const figures = [
    ["sent", row.sent, null], ["delivered", row.delivered, null],
    ["deferred (in the queue)", row.deferred, null],
    ["hard bounces", row.hard_bounces, row.rates.hard_bounce],
    ["soft bounces", row.soft_bounces, null], ["complaints", row.complaints, row.rates.complaint],
    ["unsubscribes", row.unsubscribes, row.rates.unsubscribe],
    ["unique opens (people)", e.unique_opens, e.open_rate],
    ["opens: human / machine", `${fmtInt(e.opens_human)} / ${fmtInt(e.opens_machine)}`, null],
    ["unique clicks (people)", e.unique_clicks, e.click_rate],
    ["clicks: human / machine", `${fmtInt(e.clicks_human)} / ${fmtInt(e.clicks_machine)}`, null],
    ["clicks of unique opens", null, e.click_to_open],
  ];
  fillTable("campaign-figures", figures, ([label, count, rate]) => {
    const tr = el("tr");
    tr.append(el("td", label), el("td", typeof count === "string" ? count : fmtInt(count)),
      el("td", rate == null ? "" : fmtPct(rate)));
    return tr;
  });
  fillTable("campaign-links", e.top_links || [], (link) => {
    const tr = el("tr");
    tr.append(el("td", link.url), el("td", fmtInt(link.clicks_human)), el("td", fmtInt(link.clicks_machine)));
    return tr;
  });
  $("campaign-page").hidden = false;
}

function drawCampaigns(data) {
  const t = data.thresholds;
  fillTable("campaigns", data.campaigns, (c) => {
    const row = el("tr");
    row.dataset.campaign = campaignKey(c);
    const name = el("td");
    const open = el("button", c.campaign, "link");
    open.type = "button";
    open.addEventListener("click", () => showCampaign(c).catch((e) => setStatus(e.message, true)));
    name.append(open);
    row.append(el("td", c.account), name, stateCell(c), el("td", fmtInt(c.delivered)),
      rateBar(c.rates.hard_bounce, t.hard_bounce, c), rateBar(c.rates.complaint, t.complaint, c),
      rateBar(c.rates.unsubscribe, t.unsubscribe, c), el("td", fmtInt(c.queued)), el("td", fmtInt(c.held)),
      engagementCell(c.engagement, "opens"), engagementCell(c.engagement, "clicks"));
    return row;
  });
  const paused = data.campaigns.filter((c) => c.paused);
  $("no-paused").hidden = paused.length > 0;
  $("paused").hidden = paused.length === 0;
  fillTable("paused", paused, (c) => {
    const row = el("tr");
    row.dataset.campaign = campaignKey(c);
    const action = el("td");
    action.append(actionButton("Resume", "resume", c, resumeQuestion(c, t)),
      actionButton("Drop", "drop", c, dropQuestion(c)));
    row.append(el("td", c.account), el("td", c.campaign), el("td", c.reason), el("td", fmtInt(c.held)), action);
    return row;
  });
}

function resumeQuestion(c, t) {
  return `Resume ${campaignKey(c)}? Its ${fmtInt(c.held)} held jobs go out now. The guard ` +
    `keeps judging it on the mail sent from now on: past a threshold after ` +
    `${fmtInt(t.min_volume)} sent, it is paused again.`;
}

function dropQuestion(c) {
  return `Drop ${campaignKey(c)}? Its ${fmtInt(c.queued + c.deferred + c.held)} queued and ` +
    `held jobs are removed for good (not sent), and new mail for it stays refused.`;
}

function actionButton(label, action, c, question) {
  const button = el("button", label, action);
  button.type = "button";
  button.addEventListener("click", () => act(button, action, c, question));
  return button;
}

// An in-page confirmation (a modal <dialog>): resolves true for OK, false otherwise.
function confirmAction(question, verb) {
  const dialog = $("confirm");
  $("confirm-text").textContent = question;
  $("confirm-ok").textContent = verb;
  return new Promise((resolve) => {
    const answer = (ok) => { if (dialog.open) dialog.close(); resolve(ok); };
    $("confirm-ok").onclick = () => answer(true);
    $("confirm-cancel").onclick = () => answer(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
  });
}

async function act(button, action, c, question) {
  const verb = action === "drop" ? "Drop" : "Resume";
  if (!(await confirmAction(question, verb))) return;
  button.disabled = true;
  try {
    const path = `/api/v1/campaigns/${encodeURIComponent(c.account)}/${encodeURIComponent(c.campaign)}/${action}`;
    await api(path, { method: "POST" });
    setStatus(`${action === "drop" ? "dropped" : "resumed"} ${campaignKey(c)}`);
  } catch (error) {
    setStatus(`${action} failed: ${error.message}`, true);
    button.disabled = false;
  }
  refresh();
}

// --- destinations and throttle -------------------------------------------------------------

function drawDestinations(data) {
  fillTable("destinations", data.destinations, (d) => {
    const row = el("tr");
    row.append(el("td", d.destination), el("td", fmtInt(d.waiting)), el("td", fmtInt(d.queued || 0)),
      el("td", fmtInt(d.deferred || 0)), el("td", fmtInt(d.held || 0)), el("td", d.throttle, `state-${d.throttle}`));
    return row;
  });
  fillTable("throttle", data.throttle, (r) => {
    const row = el("tr");
    row.append(el("td", r.destination), el("td", r.kind), el("td", r.state, `state-${r.state}`),
      el("td", r.rate == null ? "∞" : fmtRate(r.rate)), el("td", `${fmtInt(r.connections)}/${fmtInt(r.max_connections)}`),
      el("td", fmtInt(r.sent)), el("td", r.reason || ""));
    return row;
  });
}

// --- sending sources ([[egress.sources]]) -------------------------------------------------

function fmtPercent(x) { return x == null ? "–" : `${x.toFixed(2)} %`; }

function warmupText(w) {
  if (!w) return "established";
  const steps = Object.entries(w.providers || {}).map(([provider, p]) =>
    `${provider}: step ${p.step + 1}/${p.steps}, cap ${p.cap == null ? "∞" : fmtInt(p.cap)}` +
    ` (${p.verdict}${p.reason ? ": " + p.reason : ""})`);
  return ["warming", ...steps].join("; ");
}

function drawEgress(data) {
  const sources = data.egress || [];
  $("egress-panel").hidden = sources.length === 0;
  const rows = [];
  for (const s of sources) {
    const providers = Object.entries(s.providers || {});
    for (const [provider, p] of providers.length ? providers : [["–", null]]) {
      rows.push([s, provider, p]);
    }
  }
  fillTable("egress", rows, ([s, provider, p]) => {
    const row = el("tr");
    const state = s.up ? "up" : `down${s.reason ? ": " + s.reason : ""}`;
    row.append(el("td", s.name), el("td", s.address), el("td", s.ehlo_name),
      el("td", (s.pools || []).join(", ")), el("td", state, s.up ? "" : "state-suspended"),
      el("td", warmupText(s.warmup)), el("td", provider));
    for (const k of ["delivered", "deferred", "bounced", "complained"]) row.append(el("td", fmtInt(p ? p[k] : 0)));
    for (const k of ["delivery_rate", "deferral_rate", "bounce_rate", "complaint_rate"]) row.append(el("td", fmtPercent(p ? p[k] : null)));
    return row;
  });
}

// --- accounts waiting at their pace ([[accounts]] max_rate) ----------------------------------

function drawAccountWaits(data) {
  const waits = Object.entries(data.account_waits || {}).filter(([, wait]) => wait > 0)
    .sort((a, b) => b[1] - a[1]);
  fillTable("account-waits", waits, ([account, wait]) => {
    const row = el("tr");
    row.append(el("td", account), el("td", `${wait.toFixed(1)} s`));
    return row;
  });
  $("no-account-waits").hidden = waits.length > 0;
}

// --- event sinks ([[webhooks]], [[amqp]]) and their outbox -----------------------------------

function drawWebhooks(data) {
  const hooks = data.webhooks;
  $("webhooks-panel").hidden = !hooks;
  if (!hooks) return;
  const box = hooks.outbox;
  $("outbox-figures").textContent =
    `${fmtInt(box.depth)} events waiting, the oldest for ${Math.round(box.oldest_age)} s`;
  $("outbox-alert").hidden = !box.over_limit;
  $("outbox-alert").textContent = box.over_limit ? `The outbox is past its limits ` +
    `(${fmtInt(box.alert_depth)} events or ${Math.round(box.alert_age)} s): a sink is not ` +
    `taking its events (mta webhook status).` : "";
  fillTable("webhooks", hooks.sinks, (s) => {
    const row = el("tr");
    row.append(el("td", s.name), el("td", s.kind), el("td", s.target), el("td", fmtInt(s.pending)),
      el("td", fmtInt(s.dead), s.dead ? "state-suspended" : ""),
      el("td", s.delivered == null ? "–" : fmtInt(s.delivered)),
      el("td", s.last_error || "–", s.last_error ? "state-suspended" : ""));
    return row;
  });
}

async function refresh() {
  clearTimeout(timer);
  if (!token()) { showLogin(); return; }
  try {
    const data = await api("/api/v1/dashboard");
    $("login").hidden = true;
    $("board").hidden = false;
    $("forget").hidden = false;
    drawTotals(data);
    drawQueue(data);
    drawCharts(data);
    drawCampaigns(data);
    drawDestinations(data);
    drawAccountWaits(data);
    drawEgress(data);
    drawWebhooks(data);
    document.body.dataset.updated = String(data.time);
    setStatus(`updated ${new Date(data.time * 1000).toLocaleTimeString()}`);
  } catch (error) {
    if (error.kind === "unauthorized") return;
    document.body.dataset.problem = error.kind || "error";
    setStatus(error.message, true);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("campaign-close").addEventListener("click", () => { $("campaign-page").hidden = true; });
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(); });
  refresh();
});
