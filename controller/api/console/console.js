// ratepilot console: polls the admin API and renders it; the forms call the same API.
// Plain browser JavaScript, no build step, no library. Every request carries the token the
// operator typed (kept in this tab's sessionStorage only); API errors are shown as the API sent them.
"use strict";

const REFRESH_MS = Number(document.body.dataset.refreshMs) || 2000;
const MAX_TIERS_SHOWN = 50; // rows (and charts) drawn; the note says how many tiers there are
const CHART_POINTS = 120; // decisions per tier in the chart (10 minutes at a 5 s tick), fewer with many tiers
const MAX_DECISIONS = 1000; // GET /decisions answers at most this many
const TOKEN_KEY = "ratepilot-admin-token";
const RULE_NAMES = {
  none: "policy",
  policy_error: "policy error: held",
  non_finite: "non-finite proposal: held",
  step_limit: "step limit",
  stale_hold: "stale metrics: hold",
  stale_decay: "stale metrics: decay",
  emergency_brake: "emergency brake",
  tier_bounds: "tier bounds",
  override_caps: "override caps",
  pinned: "override: pinned",
  guard: "guard",
};

const $ = (id) => document.getElementById(id);
let auditTier = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// One API call: {ok, status, data, message}; message is the API's own error text, field by field.
async function api(method, path, body) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    return { ok: false, status: 0, data: null, message: "no answer from the controller: " + err.message };
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  return { ok: response.ok, status: response.status, data, message: response.ok ? "" : errorText(response.status, data) };
}

function errorText(status, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) {
    // FastAPI validation errors: name each field as the API located it
    const parts = detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".") || "body"}: ${e.msg}`);
    return `HTTP ${status}: ${parts.join("; ")}`;
  }
  return `HTTP ${status}: ${typeof detail === "string" ? detail : JSON.stringify(data)}`;
}

function fmt(value, digits = 1, unit = "") {
  if (value === null || value === undefined || !Number.isFinite(value)) return "-";
  return value.toFixed(digits) + unit;
}

function ruleLabel(rule, policyName) {
  const name = RULE_NAMES[rule] || rule;
  return rule === "none" ? `${name} (${policyName})` : name;
}

function ruleClass(rule) {
  if (rule === "none") return "rule-policy";
  return rule === "pinned" || rule === "override_caps" ? "rule-override" : "rule-safety";
}

function overrideText(o) {
  if (!o) return "-";
  const parts = [];
  if (o.pinned_rate != null) parts.push(`pinned ${o.pinned_rate}`);
  if (o.min_rate != null) parts.push(`min ${o.min_rate}`);
  if (o.max_rate != null) parts.push(`max ${o.max_rate}`);
  const until = o.expires_at ? ` until ${new Date(o.expires_at * 1000).toLocaleTimeString()}` : "";
  return `${parts.join(", ")} (${o.who}${until})`;
}

// rate (blue) and demand (grey) over the tier's last decisions, oldest left
function chart(decisions) {
  const w = 160, h = 36;
  const points = decisions.slice().reverse().filter((d) => Number.isFinite(d.t));
  const svg = `<svg class="chart" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img"`;
  if (points.length < 2) return `${svg} aria-label="no decisions yet"></svg>`;
  const demand = points.map((d) => (d.observation.admitted_rps || 0) + (d.observation.throttled_rps || 0));
  const rate = points.map((d) => d.rate);
  const t0 = points[0].t, span = Math.max(points[points.length - 1].t - t0, 1e-9);
  const top = Math.max(...rate.filter(Number.isFinite), ...demand.filter(Number.isFinite), 1e-9) * 1.1;
  const line = (values) =>
    values
      .map((v, i) => (Number.isFinite(v) ? `${(((points[i].t - t0) / span) * (w - 2) + 1).toFixed(1)},${(h - 1 - (v / top) * (h - 2)).toFixed(1)}` : null))
      .filter((p) => p !== null)
      .join(" ");
  const title = `last ${points.length} decisions over ${span.toFixed(0)} s; top ${top.toFixed(0)}/s`;
  return `${svg} aria-label="${title}"><title>${title}</title><polyline class="demand" points="${line(demand)}"/><polyline class="rate" points="${line(rate)}"/></svg>`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderSummary(status, health) {
  $("replica").textContent = status.replica;
  const role = status.leader ? "leader" : "follower";
  $("role").textContent = role + (status.fence ? ` (fence ${status.fence})` : "");
  $("role").className = "role-" + role;
  $("mode").textContent = status.mode;
  const policy = status.policy || {};
  const info = policy.info || {};
  $("policy").textContent = policy.name || "-";
  const loaded = policy.loaded_at ? `loaded ${new Date(policy.loaded_at * 1000).toLocaleTimeString()}` : "";
  const format = info.format_version ? `format v${info.format_version}` : "";
  const model = policy.model || (policy.name === "rl" ? "champion or default" : "");
  $("model").textContent = [model, info.algorithm, format, loaded].filter(Boolean).join(", ") || "-";
  const age = health ? health.last_tick_age_s : null;
  $("tick-age").textContent = age === null || age === undefined ? "no tick yet" : `${age.toFixed(1)} s ago`;
  const last = status.last_tick;
  $("tick-result").textContent = last ? `#${last.tick} ${last.result}` : "-";
  const problems = [];
  if (status.policy_error) problems.push("policy: " + status.policy_error);
  if (status.redis_error) problems.push("redis: " + status.redis_error);
  if (last && last.errors && Object.keys(last.errors).length) problems.push("last tick: " + JSON.stringify(last.errors));
  $("loop-problems").hidden = problems.length === 0;
  $("loop-problems").textContent = problems.join(" | ");
}

function renderTiers(status, config, overrides, history) {
  const body = $("tiers").querySelector("tbody");
  const names = Object.keys(config);
  const shown = names.slice(0, MAX_TIERS_SHOWN);
  const policyName = (status.policy || {}).name || "policy";
  const rows = shown.map((tier) => {
    const d = (status.tiers || {})[tier];
    const caps = config[tier];
    const obs = d ? d.observation : {};
    const tr = document.createElement("tr");
    tr.dataset.tier = tier;
    tr.append(
      cell(tier),
      cell(d ? fmt(d.rate, 1, "/s") : "-", "rate"),
      cell(`${caps.min_rate} / ${caps.max_rate}`),
      cell(overrideText(overrides[tier]), "override left"),
      cell(d ? fmt((obs.admitted_rps || 0) + (obs.throttled_rps || 0), 1, "/s") : "-"),
      cell(d ? fmt(obs.p99_latency_ms, 0, " ms") : "-"),
      cell(d && Number.isFinite(obs.error_rate) ? fmt(obs.error_rate * 100, 2, " %") : "-"),
      cell(d && Number.isFinite(obs.cpu) ? fmt(obs.cpu * 100, 0, " %") : "-"),
    );
    const rule = cell(d ? ruleLabel(d.rule, policyName) : "no decision yet", "rule " + (d ? ruleClass(d.rule) : ""));
    if (d) rule.dataset.rule = d.rule;
    const graph = document.createElement("td");
    graph.innerHTML = chart(history[tier] || []);
    tr.append(rule, graph);
    return tr;
  });
  body.replaceChildren(...rows);
  $("tiers-note").textContent = names.length > shown.length ? `showing ${shown.length} of ${names.length} tiers` : "";
  const select = $("ov-tier");
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (auditTier === null && names.length) auditTier = names[0];
    select.value = auditTier;
  }
}

// the stored override of an audit entry, as the tier rows write it (the raw text if it does not parse)
function auditOverride(text) {
  if (!text) return "-";
  try {
    return overrideText(JSON.parse(text));
  } catch (_) {
    return text;
  }
}

function renderAudit(entries) {
  $("audit-tier").textContent = auditTier || "-";
  const rows = entries.map((e) => {
    const tr = document.createElement("tr");
    const at = Number(e.at);
    tr.append(
      cell(Number.isFinite(at) ? new Date(at * 1000).toLocaleString() : e.at, "left"),
      cell(e.action, "left"),
      cell(e.who, "left"),
      cell(e.reason, "reason"),
      cell(auditOverride(e.override), "left"),
    );
    return tr;
  });
  $("audit").querySelector("tbody").replaceChildren(...rows);
}

function showReadError(message) {
  $("read-error").hidden = !message;
  $("read-error").textContent = message ? "reading the API failed: " + message : "";
}

async function refresh() {
  const [status, health, config, overrides] = await Promise.all([
    api("GET", "/status"), api("GET", "/health"), api("GET", "/tiers"), api("GET", "/overrides"),
  ]);
  const failed = [status, config, overrides].find((r) => !r.ok);
  if (failed) {
    showReadError(failed.message);
    return;
  }
  showReadError("");
  // one read of the stream for every chart: the newest entries, split by tier
  const names = Object.keys(config.data).slice(0, MAX_TIERS_SHOWN);
  const limit = Math.min(MAX_DECISIONS, CHART_POINTS * names.length);
  const decisions = await api("GET", `/decisions?limit=${limit}`);
  const history = Object.fromEntries(names.map((t) => [t, []]));
  for (const d of decisions.ok ? decisions.data : []) {
    if (history[d.tier]) history[d.tier].push(d);
  }
  renderSummary(status.data, health.ok ? health.data : null);
  renderTiers(status.data, config.data, overrides.data, history);
  if (auditTier) {
    const audit = await api("GET", `/overrides/${encodeURIComponent(auditTier)}/audit?limit=20`);
    if (audit.ok) renderAudit(audit.data);
  }
  $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
}

// a field typed as a number is sent as one; anything else is sent as typed, for the API to judge
function fieldValue(text) {
  const trimmed = text.trim();
  return /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(trimmed) ? Number(trimmed) : trimmed;
}

function report(id, result, okText) {
  const el = $(id);
  el.textContent = result.ok ? okText : result.message;
  el.className = "result " + (result.ok ? "ok" : "error");
}

async function setOverride(event) {
  event.preventDefault();
  const form = $("override-form");
  const body = {};
  for (const name of ["min_rate", "max_rate", "pinned_rate", "ttl_s", "who", "reason"]) {
    const text = form.elements[name].value;
    if (text.trim() !== "") body[name] = ["who", "reason"].includes(name) ? text : fieldValue(text);
  }
  const tier = form.elements.tier.value;
  const result = await api("PUT", `/overrides/${encodeURIComponent(tier)}`, body);
  report("override-result", result, `override set for ${tier}: ${overrideText(result.data)}`);
  refresh();
}

async function clearOverride() {
  const form = $("override-form");
  const tier = form.elements.tier.value;
  const query = new URLSearchParams({ who: form.elements.who.value, reason: form.elements.reason.value });
  const result = await api("DELETE", `/overrides/${encodeURIComponent(tier)}?${query}`);
  report("override-result", result, `override of ${tier} cleared`);
  refresh();
}

async function setMode(event) {
  event.preventDefault();
  const mode = $("mode-form").elements.mode.value;
  const result = await api("POST", "/mode", { mode });
  report("admin-result", result, `mode set to ${mode} from the next tick`);
  refresh();
}

async function reloadPolicy() {
  const result = await api("POST", "/policy/reload");
  const model = result.ok && result.data.model ? ` ${result.data.model}` : "";
  report("admin-result", result, result.ok ? `policy reloaded: ${result.data.name}${model}` : "");
  refresh();
}

function start() {
  $("token").value = token();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    refresh();
  });
  $("override-form").addEventListener("submit", setOverride);
  $("ov-clear").addEventListener("click", clearOverride);
  $("ov-tier").addEventListener("change", (event) => {
    auditTier = event.target.value;
    refresh();
  });
  $("mode-form").addEventListener("submit", setMode);
  $("reload").addEventListener("click", reloadPolicy);
  if (document.body.dataset.writesEnabled !== "true") {
    $("admin-result").textContent = "writes are disabled: the controller has no admin token configured";
    $("admin-result").className = "result warning";
  }
  poll();
}

// one refresh at a time: the next starts REFRESH_MS after the last one finished
async function poll() {
  try {
    await refresh();
  } catch (err) {
    showReadError(String(err));
  }
  setTimeout(poll, REFRESH_MS);
}

start();
