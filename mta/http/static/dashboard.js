// The operators' dashboard: polls /api/v1/dashboard and draws it. No framework, no build.
// Every value from the engine is put in the page with textContent (campaign names and
// destinations come from mail headers and DNS: never HTML).
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 90;
const KEY = "mta-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const history = [];
let previous = null;
let timer = null;

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem(KEY);

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, ...(options.headers || {}) },
  });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    showLogin("The token was refused.");
    throw new Error("unauthorized");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
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

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function fillTable(id, rows, makeRow) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map(makeRow));
}

function rates(totals, time) {
  if (!previous || time <= previous.time) return {};
  const dt = time - previous.time;
  const out = {};
  for (const k of ["received", "delivered", "deferred"]) {
    out[k] = Math.max(0, (totals[k] - previous.totals[k]) / dt);
  }
  return out;
}

function drawTotals(data) {
  const perSecond = rates(data.totals, data.time);
  for (const k of ["received", "delivered", "deferred", "bounced", "expired"]) {
    $(`${k}-total`).textContent = fmtInt(data.totals[k]);
  }
  for (const k of ["received", "delivered", "deferred"]) {
    $(`${k}-rate`).textContent = fmtRate(perSecond[k]);
  }
  if (perSecond.received != null) {
    history.push(perSecond);
    if (history.length > HISTORY) history.shift();
  }
  previous = { time: data.time, totals: data.totals };
}

function drawQueue(data) {
  const q = data.queue;
  $("queue-total").textContent = fmtInt(q.total);
  for (const s of ["queued", "deferred", "held"]) $(`queue-${s}`).textContent = fmtInt(q.by_state[s] || 0);
  $("queue-recipients").textContent = fmtInt(q.recipients);
  $("spool-used").textContent = fmtBytes(data.storage.used_bytes);
  $("disk-free").textContent = fmtBytes(data.storage.disk_free_bytes);
}

function drawChart() {
  const svg = $("chart");
  const top = Math.max(1, ...history.flatMap((p) => [p.received, p.delivered, p.deferred]));
  const lines = ["received", "delivered", "deferred"].map((k) => {
    const line = document.createElementNS(SVG, "polyline");
    const step = 600 / (HISTORY - 1);
    const points = history.map((p, i) => `${(i * step).toFixed(1)},${(115 - (p[k] / top) * 105).toFixed(1)}`);
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", `k-${k}`);
    return line;
  });
  $("chart-max").textContent = `top of the chart: ${fmtRate(top)}/s`;
  svg.replaceChildren(...lines);
}

// A bar for a rate, with the threshold drawn as a line; red at or past the threshold.
function rateBar(rate, threshold) {
  const cell = el("td", null, "rate");
  const scale = Math.max(threshold * 2, rate || 0);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 100 10");
  svg.setAttribute("class", "bar");
  const bar = document.createElementNS(SVG, "rect");
  bar.setAttribute("width", String(rate ? Math.min(100, (rate / scale) * 100) : 0));
  bar.setAttribute("height", "10");
  bar.setAttribute("class", rate != null && rate >= threshold ? "over" : "under");
  const mark = document.createElementNS(SVG, "line");
  const x = String((threshold / scale) * 100);
  for (const [a, v] of [["x1", x], ["x2", x], ["y1", "0"], ["y2", "10"]]) mark.setAttribute(a, v);
  mark.setAttribute("class", "threshold");
  svg.append(bar, mark);
  cell.append(svg, el("span", `${fmtPct(rate)} / ${fmtPct(threshold)}`));
  return cell;
}

function campaignKey(c) { return `${c.account}/${c.campaign}`; }

function drawCampaigns(data) {
  const t = data.thresholds;
  fillTable("campaigns", data.campaigns, (c) => {
    const row = el("tr");
    row.dataset.campaign = campaignKey(c);
    row.append(el("td", c.account), el("td", c.campaign),
      el("td", c.paused ? "paused" : "sending", c.paused ? "state-paused" : "state-ok"),
      el("td", fmtInt(c.delivered)),
      rateBar(c.rates.hard_bounce, t.hard_bounce), rateBar(c.rates.complaint, t.complaint),
      rateBar(c.rates.unsubscribe, t.unsubscribe), el("td", fmtInt(c.queued)), el("td", fmtInt(c.held)));
    return row;
  });
  const paused = data.campaigns.filter((c) => c.paused);
  $("no-paused").hidden = paused.length > 0;
  $("paused").hidden = paused.length === 0;
  fillTable("paused", paused, (c) => {
    const row = el("tr");
    row.dataset.campaign = campaignKey(c);
    const button = el("button", "Resume", "resume");
    button.type = "button";
    button.dataset.account = c.account;
    button.dataset.campaign = c.campaign;
    button.addEventListener("click", () => resume(button, c));
    const action = el("td");
    action.append(button);
    row.append(el("td", c.account), el("td", c.campaign), el("td", c.reason), el("td", fmtInt(c.held)), action);
    return row;
  });
}

async function resume(button, c) {
  button.disabled = true;
  try {
    const path = `/api/v1/campaigns/${encodeURIComponent(c.account)}/${encodeURIComponent(c.campaign)}/resume`;
    await api(path, { method: "POST" });
    setStatus(`resumed ${campaignKey(c)}`);
  } catch (error) {
    setStatus(`resume failed: ${error.message}`, true);
    button.disabled = false;
  }
  refresh();
}

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
    drawChart();
    drawCampaigns(data);
    drawDestinations(data);
    document.body.dataset.updated = String(data.time);
    setStatus(`updated ${new Date(data.time * 1000).toLocaleTimeString()}`);
  } catch (error) {
    if (error.message === "unauthorized") return;
    setStatus(`engine unreachable: ${error.message}`, true);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(); });
  refresh();
});
