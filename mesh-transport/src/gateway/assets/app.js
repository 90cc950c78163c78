// The mesh dashboard: one WebSocket to the primary's gateway (JSON-RPC
// 2.0), live over `events.subscribe`. No framework, no build step; every
// text from the network goes in with textContent (never as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
};

let ws = null;
let nextId = 1;
const waiting = new Map();
let selected = null;
let retry = 500;
let signedIn = false;
const timers = {};

function setConn(on) {
  const c = $("#conn");
  c.textContent = on ? "live" : "offline";
  c.className = "pill " + (on ? "on" : "off");
}

function call(method, params) {
  return new Promise((resolve, reject) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return reject({ code: -1, message: "not connected" });
    const id = nextId++;
    waiting.set(id, { resolve, reject });
    ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }));
  });
}

// Runs `fn` once after a burst of calls (events often come in groups).
function soon(name, fn) {
  clearTimeout(timers[name]);
  timers[name] = setTimeout(fn, 100);
}

function connect() {
  const token = sessionStorage.getItem("meshToken");
  if (!token) return showLogin("");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/rpc";
  ws = new WebSocket(url);
  ws.onopen = async () => {
    setConn(true);
    retry = 500;
    try {
      const who = await call("auth.login", { token });
      if (who.principal !== "admin") throw { message: "this token is not the admin token" };
      signedIn = true;
      $("#login").hidden = true;
      $("#app").hidden = false;
      await call("events.subscribe", { patterns: ["device.*", "pairing.*", "action.*", "discovery.*", "peer.*"] });
      loadAll();
    } catch (e) {
      sessionStorage.removeItem("meshToken");
      signedIn = false;
      ws.close();
      showLogin(e.message || "sign-in failed");
    }
  };
  ws.onmessage = (m) => {
    let msg;
    try { msg = JSON.parse(m.data); } catch (_) { return; }
    for (const one of Array.isArray(msg) ? msg : [msg]) handle(one);
  };
  ws.onclose = (ev) => {
    setConn(false);
    for (const w of waiting.values()) w.reject({ code: -1, message: "connection closed" });
    waiting.clear();
    if (ev.code === 1008) {
      sessionStorage.removeItem("meshToken");
      return showLogin("Signed out: " + (ev.reason || "the token is no longer valid"));
    }
    if (sessionStorage.getItem("meshToken")) {
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    }
  };
}

function handle(msg) {
  if (msg.id !== undefined && msg.id !== null && waiting.has(msg.id)) {
    const w = waiting.get(msg.id);
    waiting.delete(msg.id);
    if (msg.error) w.reject(msg.error); else w.resolve(msg.result);
    return;
  }
  if (msg.method === "event") return onEvent(msg.params);
  if (msg.method === "event.lagged") return loadAll();
}

// A heartbeat (one per device every few seconds) updates its row in place:
// no reload, and it stays out of the feed.
function onHeartbeat(ev) {
  const id = ev.data && ev.data.node;
  const tr = id && document.querySelector('#devices tbody tr[data-id="' + CSS.escape(id) + '"]');
  if (!tr) return soon("devices", loadDevices);
  const score = ev.data.score;
  tr.children[3].textContent = score ?? "–";
  tr.children[3].className = "score " + band(score);
  tr.children[4].textContent = ago(ev.at);
}

function onEvent(ev) {
  if (ev.type === "device.heartbeat") return onHeartbeat(ev);
  const feed = $("#events");
  const li = el("li", new Date(ev.at).toLocaleTimeString() + "  " + ev.type + "  " + JSON.stringify(ev.data));
  feed.prepend(li);
  while (feed.children.length > 200) feed.lastChild.remove();
  const t = ev.type;
  if (t.startsWith("device.") || t.startsWith("pairing.")) {
    soon("devices", loadDevices);
    if (t.startsWith("pairing.")) soon("pending", loadPending);
    const node = ev.data && (ev.data.node || ev.data.device);
    if (selected && node === selected) soon("detail", () => showDetail(selected));
  }
  if (t.startsWith("action.")) soon("actions", loadActions);
  if (t.startsWith("discovery.")) soon("nodes", () => loadNodes(0));
}

function showLogin(message) {
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

function loadAll() {
  loadDevices(); loadPending(); loadActions(); loadNodes(0); loadInfo();
}

function band(score) {
  if (score === null || score === undefined) return "";
  return score >= 80 ? "good" : score >= 50 ? "warn" : "bad";
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(ms).toLocaleString();
}

async function loadDevices() {
  const { devices } = await call("devices.list", {});
  const body = $("#devices tbody");
  body.replaceChildren();
  for (const d of devices) {
    const tr = el("tr");
    tr.dataset.id = d.id;
    tr.append(el("td", d.name), el("td", d.platform), el("td", d.status, "status-" + d.status));
    tr.append(el("td", d.healthScore ?? "–", "score " + band(d.healthScore)));
    tr.append(el("td", ago(d.lastSeen)));
    tr.onclick = () => showDetail(d.id);
    body.append(tr);
  }
  $("#devices-empty").hidden = devices.length > 0;
  if (selected && !devices.some((d) => d.id === selected)) {
    selected = null;
    $("#detail").hidden = true;
  }
}

async function loadPending() {
  const { requests } = await call("devices.pending_pairings", {});
  const list = $("#pending");
  list.replaceChildren();
  for (const r of requests) {
    const li = el("li");
    li.dataset.request = r.requestId;
    li.append(el("b", r.deviceName), el("span", r.devicePlatform + (r.kind === "web" ? " (web)" : "")));
    const code = el("input");
    code.placeholder = "6-digit code";
    code.inputMode = "numeric";
    code.maxLength = 6;
    code.className = "code";
    const approve = el("button", "Approve");
    approve.className = "approve";
    const reason = el("input");
    reason.placeholder = "reason (optional)";
    const reject = el("button", "Reject", "danger");
    const status = el("span", "", "error");
    approve.onclick = async () => {
      try {
        await call("devices.approve_pairing", { requestId: r.requestId, code: code.value.trim() });
        loadPending(); loadDevices();
      } catch (e) { status.textContent = e.message; }
    };
    reject.onclick = async () => {
      try {
        await call("devices.reject_pairing", { requestId: r.requestId, reason: reason.value || null });
        loadPending();
      } catch (e) { status.textContent = e.message; }
    };
    li.append(code, approve, reason, reject, status);
    list.append(li);
  }
  $("#pending-empty").hidden = requests.length > 0;
}

async function showDetail(id) {
  selected = id;
  $("#detail").hidden = false;
  const [health, history, policy] = await Promise.all([
    call("devices.get_health", { deviceId: id }),
    call("devices.get_health_history", { deviceId: id }),
    call("policies.get_exec_policy", { deviceId: id }),
  ]);
  const row = document.querySelector(`#devices tr[data-id="${CSS.escape(id)}"]`);
  $("#detail-name").textContent = row ? row.firstChild.textContent : id;
  const m = $("#detail-metrics");
  m.replaceChildren();
  const metric = (label, value) => { const d = el("div"); d.append(el("b", value ?? "–"), el("span", label)); m.append(d); };
  metric("health", health.healthScore);
  metric("online", health.isOnline ? "yes" : "no");
  metric("latency ms", health.latencyMs !== null && health.latencyMs !== undefined ? Math.round(health.latencyMs) : null);
  metric("battery %", health.batteryPercent);
  metric("memory %", health.memoryPercent);
  metric("last heartbeat", ago(health.lastHeartbeat));
  drawChart(history.samples);
  fillPolicy(policy.policy || {});
}

function drawChart(samples) {
  const c = $("#chart");
  const g = c.getContext("2d");
  const W = c.width, H = c.height, pad = 28;
  g.clearRect(0, 0, W, H);
  g.strokeStyle = "#e3e6eb"; g.fillStyle = "#667085"; g.font = "11px system-ui";
  for (const v of [0, 50, 100]) {
    const y = H - pad - (v / 100) * (H - 2 * pad);
    g.beginPath(); g.moveTo(pad, y); g.lineTo(W - 8, y); g.stroke();
    g.fillText(String(v), 4, y + 4);
  }
  const now = Date.now(), span = 3600 * 1000;
  const x = (t) => pad + ((t - (now - span)) / span) * (W - pad - 8);
  const line = (key, max, color) => {
    const pts = samples.filter((s) => s[key] !== null && s[key] !== undefined);
    if (!pts.length) return;
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 2; g.beginPath();
    pts.forEach((s, i) => {
      const y = H - pad - Math.min(1, s[key] / max) * (H - 2 * pad);
      if (i === 0) g.moveTo(x(s.at), y); else g.lineTo(x(s.at), y);
    });
    g.stroke();
    for (const s of pts) {
      const y = H - pad - Math.min(1, s[key] / max) * (H - 2 * pad);
      g.fillRect(x(s.at) - 2, y - 2, 4, 4);
    }
    g.lineWidth = 1;
  };
  const maxLatency = Math.max(100, ...samples.map((s) => s.latencyMs || 0));
  line("healthScore", 100, "#2f5bd3");
  line("latencyMs", maxLatency, "#b7791f");
  g.fillStyle = "#2f5bd3"; g.fillText("health score", W - 170, 14);
  g.fillStyle = "#b7791f"; g.fillText("latency (max " + Math.round(maxLatency) + " ms)", W - 170, 28);
  c.dataset.points = String(samples.length);
}

function fillPolicy(p) {
  const f = $("#policy-form");
  const lines = (v) => (Array.isArray(v) ? v.join("\n") : "");
  f.allowedCommands.value = lines(p.allowedCommands);
  f.blockedCommands.value = lines(p.blockedCommands);
  f.allowedHoursUtc.value = Array.isArray(p.allowedHoursUtc) ? p.allowedHoursUtc.join(", ") : (p.allowedHoursUtc || "");
  for (const k of ["maxCostPerHour", "maxTokensPerCall", "maxConcurrentCalls", "maxFileBytes"]) f[k].value = p[k] ?? "";
  for (const k of ["requireApproval", "disallowOnBattery", "requireVpn"]) f[k].checked = !!p[k];
  for (const s of f.querySelectorAll(".field-error")) s.textContent = "";
  $("#policy-status").textContent = "";
}

$("#policy-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  for (const s of f.querySelectorAll(".field-error")) s.textContent = "";
  const list = (v) => v.split("\n").map((s) => s.trim()).filter(Boolean);
  const num = (v) => (v.trim() === "" ? undefined : Number(v));
  const params = { deviceId: selected, allowedCommands: list(f.allowedCommands.value) };
  const blocked = list(f.blockedCommands.value);
  if (blocked.length) params.blockedCommands = blocked;
  const hours = f.allowedHoursUtc.value.split(",").map((s) => s.trim()).filter(Boolean);
  if (hours.length) params.allowedHoursUtc = hours.length === 1 ? hours[0] : hours;
  for (const k of ["maxCostPerHour", "maxTokensPerCall", "maxConcurrentCalls", "maxFileBytes"]) {
    const v = num(f[k].value);
    if (v !== undefined) params[k] = v;
  }
  for (const k of ["requireApproval", "disallowOnBattery", "requireVpn"]) params[k] = f[k].checked;
  try {
    const r = await call("policies.set_exec_policy", params);
    $("#policy-status").textContent = "Saved (" + r.policyId + ")";
  } catch (e) {
    const field = (e.data && e.data.field) || "params";
    const span = f.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`) || f.querySelector('.field-error[data-field="params"]');
    span.textContent = e.message;
  }
};

async function deviceAction(method, confirmText) {
  if (!selected || (confirmText && !confirm(confirmText))) return;
  try {
    const r = await call(method, { deviceId: selected });
    $("#detail-status").textContent = r.token ? "New token (give it to the device): " + r.token : "Done.";
    loadDevices();
  } catch (e) { $("#detail-status").textContent = e.message; }
}
$("#revoke").onclick = () => deviceAction("devices.revoke", "Revoke this device? It is refused everywhere at once.");
$("#unpair").onclick = () => deviceAction("devices.unpair", "Unpair this device?");
$("#rotate").onclick = () => deviceAction("devices.rotate_token");
$("#ping").onclick = async () => {
  try {
    const r = await call("devices.command", { deviceId: selected, command: "ping" });
    $("#detail-status").textContent = "Pong in " + r.latencyMs.toFixed(1) + " ms";
  } catch (e) { $("#detail-status").textContent = e.message; }
};

async function loadActions() {
  const { actions } = await call("actions.list", {});
  const list = $("#actions");
  list.replaceChildren();
  for (const a of actions.slice(0, 50)) {
    const li = el("li");
    li.append(el("b", a.command), el("span", a.state), el("span", new Date(a.createdAt).toLocaleString(), "hint"));
    if (a.state === "proposed") {
      const ok = el("button", "Approve");
      const no = el("button", "Reject", "danger");
      ok.onclick = () => call("actions.approve", { actionId: a.id }).then(loadActions, (e) => alert(e.message));
      no.onclick = () => call("actions.reject", { actionId: a.id }).then(loadActions, (e) => alert(e.message));
      li.append(ok, no);
    }
    if (a.result !== null && a.result !== undefined) li.append(el("code", JSON.stringify(a.result)));
    if (a.error) li.append(el("span", a.error, "error"));
    list.append(li);
  }
  $("#actions-empty").hidden = actions.length > 0;
}

async function loadNodes(timeout) {
  const { nodes } = await call("nodes.discover", timeout ? { timeout } : {});
  const list = $("#nodes");
  list.replaceChildren();
  for (const n of nodes) {
    const li = el("li");
    li.append(el("b", n.name), el("span", (n.host || "?") + ":" + (n.port || "?")), el("span", n.platform || ""),
      el("span", n.isPaired ? "paired" : "not paired", "hint"), el("span", "seen " + n.discoveryCount + "×, " + ago(n.lastDiscovered), "hint"));
    list.append(li);
  }
  if (!nodes.length) list.append(el("li", "Nothing discovered.", "hint"));
}
$("#discover").onclick = () => loadNodes(2000);

async function loadInfo() {
  const info = await call("gateway.info", {});
  $("#primary-name").textContent = info.name ? "· " + info.name : "";
  $("#worker-command").textContent = info.workerCommand || "worker --connect " + info.nodeId + "@HOST:PORT";
  $("#fingerprint").textContent = info.fingerprint;
}

$("#login-form").onsubmit = (ev) => {
  ev.preventDefault();
  const t = $("#token").value.trim();
  if (!t) return;
  sessionStorage.setItem("meshToken", t);
  $("#token").value = "";
  connect();
};

connect();
