// The fluxmesh web console: one page, hash routes, no dependencies.
// Everything it shows comes from the node's admin API with the token the
// user entered; data is put into the page as text, never as HTML.
"use strict";

const TOKEN_KEY = "fluxmesh-admin-token";
const view = document.getElementById("view");
let token = sessionStorage.getItem(TOKEN_KEY);
// Timers and streams of the page on screen, stopped when it changes.
let cleanups = [];

// `#/route&token=…` (or `#token=…`): keep the token, drop it from the address.
(function takeToken() {
  const m = location.hash.match(/[#&]token=([^&]*)/);
  if (!m) return;
  token = decodeURIComponent(m[1]);
  sessionStorage.setItem(TOKEN_KEY, token);
  const rest = location.hash.replace(/[#&]token=[^&]*/, "").replace(/^#?&?/, "#");
  history.replaceState(null, "", location.pathname + (rest.length > 1 ? rest : "#/cluster"));
})();

/** An element: h("td", {class: "num"}, "12", child…). Strings become text. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

/** A request to the admin API: the JSON answer, or an ApiError. */
async function api(path, options = {}) {
  const headers = Object.assign({ authorization: `Bearer ${token}` }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    signOut("The token was refused.");
    throw new ApiError(401, { error: "not signed in" });
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch (_) { body = { error: text }; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

/** Marks the page rendered with its data: for people and for tests. */
function ready(page) {
  document.body.dataset.ready = page;
  document.body.dataset.renderMs = String(Math.round(performance.now() - routeStarted));
}

function usTime(us) {
  if (us === null || us === undefined) return "-";
  return new Date(us / 1000).toISOString().replace("T", " ").replace("Z", "");
}

// Distinct colours for the live nodes, in the order of their ids; a name
// not among them (a holder that just left) gets one by hash.
const PALETTE = ["#2563eb", "#d97706", "#059669", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777", "#4b5563", "#7c3aed"];
let nodeColours = {};

function colorOf(name) {
  if (name in nodeColours) return nodeColours[name];
  let x = 0;
  for (const c of name) x = (x * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[x % PALETTE.length];
}

function fail(where, e) {
  where.replaceChildren(h("p", { class: "error" }, e.message));
}

// ---- cluster -------------------------------------------------------------

async function clusterPage() {
  const cards = h("div", { class: "cards" });
  const nodes = h("div");
  const map = h("div");
  view.replaceChildren(h("h1", {}, "Cluster"), cards, h("h2", {}, "Nodes"), nodes, h("h2", {}, "Shards"), map);
  let last = null;
  const rate = h("div", { class: "v", id: "ingest-rate" }, "…");

  async function ingestTotal() {
    const text = await (await fetch("/metrics")).text();
    let sum = 0;
    for (const line of text.split("\n")) {
      if (line.startsWith("fluxmesh_ingest_messages_total")) sum += Number(line.split(" ").pop()) || 0;
    }
    return sum;
  }

  async function refresh() {
    const c = await api("/api/v1/cluster");
    document.getElementById("node").textContent = `node ${c.node}`;
    nodeColours = Object.fromEntries(c.nodes.map((n) => n.node_id).sort().map((id, i) => [id, PALETTE[i % PALETTE.length]]));
    const held = {};
    const pending = {};
    let unowned = 0;
    let moving = 0;
    for (const s of c.shards) {
      if (!s.lease_valid) { unowned++; continue; }
      held[s.holder] = (held[s.holder] || 0) + 1;
      pending[s.holder] = (pending[s.holder] || 0) + (s.pending || 0);
      if (s.holder !== s.desired_owner) moving++;
    }
    const backlog = Object.values(pending).reduce((a, b) => a + b, 0);
    cards.replaceChildren(
      h("div", { class: "card" }, h("div", { class: "muted" }, "live nodes"), h("div", { class: "v", id: "node-count" }, c.nodes.length)),
      h("div", { class: "card" }, h("div", { class: "muted" }, "shards"), h("div", { class: "v" }, c.shard_count)),
      h("div", { class: "card" }, h("div", { class: "muted" }, "without an owner"), h("div", { class: "v" }, unowned)),
      h("div", { class: "card" }, h("div", { class: "muted" }, "backlog (messages)"), h("div", { class: "v" }, backlog)),
      h("div", { class: "card" }, h("div", { class: "muted" }, `ingest on ${c.node} (msg/s)`), rate),
    );
    nodes.replaceChildren(h("table", { id: "nodes" },
      h("tr", {}, h("th", {}, "node"), h("th", { class: "num" }, "shards"), h("th", { class: "num" }, "pending"),
        h("th", {}, "HTTP"), h("th", {}, "MQTT"), h("th", {}, "version"), h("th", {}, "started")),
      c.nodes.map((n) => h("tr", {},
        h("td", {}, h("i", { style: `display:inline-block;width:.8rem;height:.8rem;margin-right:.4rem;background:${colorOf(n.node_id)}` }), n.node_id),
        h("td", { class: "num" }, held[n.node_id] || 0), h("td", { class: "num" }, pending[n.node_id] || 0),
        h("td", { class: "mono" }, n.http), h("td", { class: "mono" }, n.mqtt), h("td", {}, n.version), h("td", {}, usTime(n.started_us)))),
    ));
    map.replaceChildren(
      h("div", { class: "shards", id: "shard-map" }, c.shards.map((s) => h("div", {
        class: `shard${s.lease_valid ? "" : " unowned"}${s.lease_valid && s.holder !== s.desired_owner ? " moving" : ""}`,
        style: s.lease_valid ? `background:${colorOf(s.holder)}` : "",
        title: `shard ${s.shard}: ${s.lease_valid ? `held by ${s.holder} (epoch ${s.epoch})` : "no owner"}; placement: ${s.desired_owner || "-"}; pending ${s.pending ?? "-"}`,
      }, s.shard))),
      h("p", { class: "legend muted" }, h("span", {}, "colour: the node holding the shard"),
        h("span", {}, "amber outline: moving to placement's choice"), h("span", {}, "dashed red: no owner")),
    );
    const now = performance.now();
    const total = await ingestTotal();
    if (last) rate.textContent = ((total - last.total) / ((now - last.at) / 1000)).toFixed(1);
    last = { total, at: now };
  }

  try {
    await refresh();
    ready("cluster");
  } catch (e) {
    return fail(view, e);
  }
  const timer = setInterval(() => refresh().catch((e) => { rate.textContent = "?"; console.warn(e); }), 2000);
  cleanups.push(() => clearInterval(timer));
}

// ---- devices -------------------------------------------------------------

/** Numeric fields of a telemetry payload, one level deep. */
function numericFields(payload) {
  const out = {};
  if (typeof payload === "number") out.value = payload;
  else if (payload && typeof payload === "object") {
    for (const [k, v] of Object.entries(payload)) if (typeof v === "number" && Number.isFinite(v)) out[k] = v;
  }
  return out;
}

/** A line chart of one field over time, as SVG. */
function chart(name, points) {
  const W = 760, H = 150, L = 48, R = 10, T = 12, B = 22;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => L + (x1 === x0 ? (W - L - R) / 2 : ((x - x0) / (x1 - x0)) * (W - L - R));
  const sy = (y) => H - B - (y1 === y0 ? (H - T - B) / 2 : ((y - y0) / (y1 - y0)) * (H - T - B));
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  return svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-field": name },
    svg("text", { x: L, y: 10 }, `${name} (${points.length} points)`),
    svg("text", { x: 2, y: sy(y1) + 4 }, String(+y1.toPrecision(4))),
    svg("text", { x: 2, y: sy(y0) + 4 }, String(+y0.toPrecision(4))),
    svg("text", { x: L, y: H - 6 }, usTime(x0)),
    svg("text", { x: W - R - 150, y: H - 6 }, usTime(x1)),
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d1d5db" }),
    svg("path", { d, fill: "none", stroke: "#2563eb", "stroke-width": 1.6 }),
    points.map((p) => svg("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2, fill: "#2563eb" })));
}

async function devicePage(id) {
  const input = h("input", { id: "device-id", value: id || "", placeholder: "device id", size: 30 });
  const form = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); location.hash = `#/device/${encodeURIComponent(input.value.trim())}`; } },
    input, h("button", { type: "submit" }, "Show"));
  view.replaceChildren(h("h1", {}, "Devices"), form);
  if (!id) { ready("device"); return; }
  const state = h("div", { id: "device-state" });
  const history = h("div", { id: "device-history" });
  const events = h("div", { id: "device-events" });
  view.append(h("h2", {}, `State of ${id}`), state, h("h2", {}, "Telemetry history"), history, h("h2", {}, "Recent events"), events);
  const enc = encodeURIComponent(id);
  const [dev, tel, evt] = await Promise.allSettled([
    api(`/api/v1/devices/${enc}`),
    api(`/api/v1/devices/${enc}/telemetry?limit=200`),
    api(`/api/v1/devices/${enc}/events?limit=20`),
  ]);

  if (dev.status === "fulfilled") {
    const d = dev.value, st = d.state;
    state.replaceChildren(
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("div", { class: "muted" }, "messages"), h("div", { class: "v" }, st.count)),
        h("div", { class: "card" }, h("div", { class: "muted" }, "shard / owner"), h("div", { class: "v" }, `${d.shard} / ${d.owner_node || "-"}`)),
        h("div", { class: "card" }, h("div", { class: "muted" }, "connected to"), h("div", { class: "v" }, d.connected_node || "offline")),
        h("div", { class: "card" }, h("div", { class: "muted" }, "last seen"), h("div", {}, usTime(st.last_seen_us)))),
      h("table", {}, h("tr", {}, h("th", {}, "channel"), h("th", {}, "last value"), h("th", {}, "received")),
        Object.entries(st.channels || {}).map(([ch, v]) => h("tr", {},
          h("td", { class: "mono" }, ch),
          h("td", { class: "mono" }, v.value !== undefined ? JSON.stringify(v.value) : `base64 ${v.value_base64}`),
          h("td", {}, usTime(v.received_time_us))))));
  } else if (dev.reason.status === 404) {
    const b = dev.reason.body;
    state.replaceChildren(h("p", { class: "muted" }, `No state yet: the mesh has not processed a message of ${id}. Shard ${b.shard}, owner ${b.owner_node || "-"}.`));
  } else fail(state, dev.reason);

  if (tel.status === "fulfilled") {
    const series = {};
    for (const item of tel.value.items.slice().reverse()) {
      for (const [k, v] of Object.entries(numericFields(item.payload))) {
        const key = `${item.channel} ${k}`;
        (series[key] = series[key] || []).push([item.received_us, v]);
      }
    }
    const names = Object.keys(series).sort();
    history.replaceChildren(...(names.length
      ? names.map((n) => chart(n, series[n]))
      : [h("p", { class: "muted" }, `${tel.value.items.length} rows, no numeric fields to draw.`)]));
  } else fail(history, tel.reason);

  if (evt.status === "fulfilled") {
    events.replaceChildren(evt.value.items.length
      ? h("table", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "kind"), h("th", {}, "channel"), h("th", {}, "producer"), h("th", {}, "what")),
        evt.value.items.map((e) => h("tr", {}, h("td", {}, usTime(e.received_us)), h("td", {}, e.kind), h("td", { class: "mono" }, e.channel),
          h("td", {}, e.producer), h("td", { class: "mono" }, e.message || JSON.stringify(e.body ?? e.body_base64 ?? "")))))
      : h("p", { class: "muted" }, "No events."));
  } else fail(events, evt.reason);
  ready("device");
}

// ---- rules and plugins ---------------------------------------------------

function editor(script, badLine) {
  const area = h("textarea", { id: "rule-script", spellcheck: "false" });
  area.value = script;
  const gutter = h("div", { class: "gutter", id: "rule-gutter" });
  const draw = (bad) => {
    const n = Math.max(1, area.value.split("\n").length);
    gutter.replaceChildren(...Array.from({ length: n }, (_, i) => h("span", { class: i + 1 === bad ? "bad" : "" }, `${i + 1}\n`)));
  };
  area.addEventListener("input", () => draw(null));
  area.addEventListener("scroll", () => { gutter.scrollTop = area.scrollTop; });
  draw(badLine);
  return { el: h("div", { class: "editor" }, gutter, area), area, mark: draw };
}

async function rulesPage(editId) {
  const rulesBox = h("div", { id: "rules" });
  const edit = h("div", { id: "rule-edit" });
  const pluginsBox = h("div", { id: "plugins" });
  // Outside the list, so that it outlives the list's redraw.
  const msg = h("p", { id: "plugin-message" });
  view.replaceChildren(h("h1", {}, "Rules & plugins"), rulesBox, edit, h("h2", {}, "Plugins"), pluginsBox, msg);

  async function showRules() {
    const { rules } = await api("/api/v1/rules");
    rulesBox.replaceChildren(
      h("p", {}, h("a", { href: "#/rules/new" }, "New rule")),
      rules.length ? h("table", {}, h("tr", {}, h("th", {}, "id"), h("th", {}, "device"), h("th", {}, "channel"), h("th", {}, "enabled"), h("th", {}, "description")),
        rules.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/rules/${encodeURIComponent(r.id)}` }, r.id)), h("td", { class: "mono" }, r.device),
          h("td", { class: "mono" }, r.channel), h("td", {}, r.enabled ? "yes" : "no"), h("td", {}, r.description))))
        : h("p", { class: "muted" }, "No rules yet."));
  }

  async function showEditor(id) {
    let rule = { id: "", device: "*", channel: "*", description: "", enabled: true, script: "" };
    if (id !== "new") rule = await api(`/api/v1/rules/${encodeURIComponent(id)}`);
    const idIn = h("input", { id: "rule-id", value: rule.id, placeholder: "id", required: true, readonly: id !== "new" });
    const dev = h("input", { id: "rule-device", value: rule.device, size: 12 });
    const ch = h("input", { id: "rule-channel", value: rule.channel, size: 12 });
    const desc = h("input", { id: "rule-description", value: rule.description, size: 40 });
    const on = h("input", { id: "rule-enabled", type: "checkbox", checked: rule.enabled });
    const ed = editor(rule.script, null);
    const msg = h("p", { id: "rule-message" });
    const save = async (e) => {
      e.preventDefault();
      const body = { device: dev.value, channel: ch.value, description: desc.value, enabled: on.checked, script: ed.area.value };
      try {
        const r = await api(`/api/v1/rules/${encodeURIComponent(idIn.value.trim())}`, {
          method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
        msg.className = "ok";
        msg.textContent = `Stored rule ${r.rule.id} (revision ${r.revision}).`;
        ed.mark(null);
        await showRules();
      } catch (err) {
        msg.className = "error";
        const b = err.body || {};
        msg.textContent = b.line ? `line ${b.line}, column ${b.column}: ${err.message}` : err.message;
        ed.mark(b.line || null);
      }
    };
    const remove = async () => {
      try { await api(`/api/v1/rules/${encodeURIComponent(idIn.value)}`, { method: "DELETE" }); location.hash = "#/rules"; }
      catch (err) { msg.className = "error"; msg.textContent = err.message; }
    };
    edit.replaceChildren(h("h2", {}, id === "new" ? "New rule" : `Rule ${rule.id}`),
      h("form", { class: "inline", onsubmit: save }, "id", idIn, "devices", dev, "channels", ch, "description", desc,
        h("label", {}, on, " enabled"), h("button", { type: "submit", id: "rule-save" }, "Save"),
        id !== "new" && h("button", { type: "button", onclick: remove }, "Delete")),
      ed.el, msg);
  }

  async function showPlugins() {
    const { plugins } = await api("/api/v1/plugins");
    const name = h("input", { id: "plugin-name", placeholder: "name", required: true });
    const file = h("input", { id: "plugin-file", type: "file", accept: ".wasm,.wat", required: true });
    const upload = async (e) => {
      e.preventDefault();
      try {
        const bytes = await file.files[0].arrayBuffer();
        await api(`/api/v1/plugins/${encodeURIComponent(name.value.trim())}`, {
          method: "PUT", headers: { "content-type": "application/octet-stream" }, body: bytes });
        msg.className = "ok";
        msg.textContent = `Stored plugin ${name.value}.`;
        await showPlugins();
      } catch (err) { msg.className = "error"; msg.textContent = err.message; }
    };
    const remove = (n) => async () => {
      try { await api(`/api/v1/plugins/${encodeURIComponent(n)}`, { method: "DELETE" }); await showPlugins(); }
      catch (err) { msg.className = "error"; msg.textContent = err.message; }
    };
    pluginsBox.replaceChildren(
      plugins.length ? h("table", {}, h("tr", {}, h("th", {}, "name"), h("th", { class: "num" }, "bytes"), h("th", {}, "digest"), h("th", {}, "loaded here"), h("th", {})),
        plugins.map((p) => h("tr", {}, h("td", {}, p.name), h("td", { class: "num" }, p.size), h("td", { class: "mono" }, (p.digest || "-").slice(0, 16)),
          h("td", {}, p.loaded ? "yes" : "no"), h("td", {}, h("button", { type: "button", onclick: remove(p.name) }, "Delete")))))
        : h("p", { class: "muted" }, "No plugins yet."),
      h("h2", {}, "Upload a plugin"),
      h("form", { class: "inline", onsubmit: upload }, name, file, h("button", { type: "submit" }, "Upload")));
  }

  try {
    await Promise.all([showRules(), showPlugins(), editId ? showEditor(editId) : null]);
    ready("rules");
  } catch (e) {
    fail(view, e);
  }
}

// ---- live tail -----------------------------------------------------------

function tailPage(query) {
  const subject = new URLSearchParams(query).get("subject") || "fm.evt.>";
  const input = h("input", { id: "tail-subject", value: subject, size: 40 });
  const status = h("span", { id: "tail-status", class: "muted" }, "connecting…");
  const list = h("ul", { id: "tail-list" });
  const form = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); location.hash = `#/tail?subject=${encodeURIComponent(input.value.trim())}`; } },
    "subject", input, h("button", { type: "submit" }, "Watch"), status);
  view.replaceChildren(h("h1", {}, "Live tail"), form, list);
  const stop = new AbortController();
  cleanups.push(() => stop.abort());
  let count = 0;

  const show = (line) => {
    count++;
    const f = line.frame;
    const what = f ? `${f.kind} ${f.device} ${f.channel}` : line.json !== undefined ? "JSON" : "bytes";
    list.prepend(h("li", {}, h("span", { class: "muted" }, `${new Date().toISOString().slice(11, 23)} `),
      h("b", {}, what), " ", h("span", { class: "mono muted" }, line.subject),
      h("pre", {}, JSON.stringify(f ? f.body : line.json ?? line.payload_base64))));
    while (list.children.length > 200) list.lastChild.remove();
    status.textContent = `${count} messages`;
  };

  (async () => {
    try {
      const response = await fetch(`/api/v1/tail?subject=${encodeURIComponent(subject)}`, {
        headers: { authorization: `Bearer ${token}` }, signal: stop.signal });
      if (response.status === 401) return signOut("The token was refused.");
      if (!response.ok) {
        const b = await response.json().catch(() => ({}));
        status.className = "error";
        status.textContent = b.error || `HTTP ${response.status}`;
        return;
      }
      status.textContent = `watching ${subject}`;
      ready("tail");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data) { try { show(JSON.parse(data)); } catch (e) { console.warn("bad event", e); } }
        }
      }
      status.textContent = `ended after ${count} messages`;
    } catch (e) {
      if (e.name !== "AbortError") { status.className = "error"; status.textContent = e.message; }
    }
  })();
}

// ---- routing -------------------------------------------------------------

let routeStarted = 0;
let routed = false;

function signOut(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

function showLogin(message) {
  for (const c of cleanups.splice(0)) c();
  view.replaceChildren();
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.body.dataset.ready = "login";
}

document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("login").hidden = true;
  route();
});
document.getElementById("logout").addEventListener("click", () => signOut(""));

function route() {
  for (const c of cleanups.splice(0)) c();
  delete document.body.dataset.ready;
  // The first page counts from navigation start: loading included.
  routeStarted = routed ? performance.now() : 0;
  routed = true;
  if (!token) return showLogin("");
  document.getElementById("logout").hidden = false;
  const hash = location.hash.replace(/^#\/?/, "") || "cluster";
  const [path, query] = hash.split("?");
  const [page, ...rest] = path.split("/");
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === page);
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : "";
  if (page === "device") devicePage(arg);
  else if (page === "rules") rulesPage(arg);
  else if (page === "tail") tailPage(query || "");
  else clusterPage();
}

window.addEventListener("hashchange", route);
route();
