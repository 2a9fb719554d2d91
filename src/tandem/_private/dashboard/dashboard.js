// tandem's dashboard: polls /-/dashboard/state (and /-/logs) and draws it.
// Counts arrive cumulative; rates and percentiles come from two readings
// WINDOW_S apart, so the server keeps no history for the page.
"use strict";

const POLL_MS = 1000;
const LOG_POLL_MS = 2000;
const WINDOW_S = 10;
const KEEP_S = 60;
const OUTSIDE = "";
const SVG = "http://www.w3.org/2000/svg";

const readings = []; // {time, state}, oldest first
let chosenApp = null;
let logFilter = { deployment: "", request_id: "" };

// -- small DOM helpers (text only: nothing a replica logs becomes markup) --------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  setAttrs(node, attrs);
  if (text !== undefined) node.textContent = text;
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function status(text) {
  return el("span", { class: "status", "data-status": text }, text);
}

// -- numbers -------------------------------------------------------------------

function ms(seconds) {
  if (seconds === null || !isFinite(seconds)) return "–";
  const v = seconds * 1000;
  return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
}

function ago(at, now) {
  const s = Math.max(0, now - at);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function quantile(q, buckets, bounds) {
  const total = buckets.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  const want = q * total;
  let seen = 0;
  for (let i = 0; i < buckets.length; i++) {
    if (buckets[i] > 0 && seen + buckets[i] >= want) {
      const low = i === 0 ? 0 : bounds[i - 1];
      const high = i < bounds.length ? bounds[i] : low; // above the last bound: its floor
      return low + (high - low) * ((want - seen) / buckets[i]);
    }
    seen += buckets[i];
  }
  return bounds[bounds.length - 1];
}

// The change of a series between the reading WINDOW_S ago (or the oldest) and now;
// counts that went down (their replicas were replaced) start the window over.
function windowed(pick) {
  const now = readings[readings.length - 1];
  const a = pick(now.state);
  if (!a) return null;
  let then = now;
  let b = a;
  for (let i = readings.length - 2; i >= 0; i--) {
    const older = pick(readings[i].state);
    if (!older || older.requests > b.requests) break;
    then = readings[i];
    b = older;
    if (now.time - then.time >= WINDOW_S) break;
  }
  if (then === now) return { rate: null, p50: null, p99: null, errors: null };
  const seconds = Math.max(now.time - then.time, 1e-9);
  const requests = a.requests - b.requests;
  const buckets = a.buckets.map((n, i) => Math.max(0, n - b.buckets[i]));
  const bounds = now.state.latency_buckets;
  return {
    rate: requests / seconds,
    p50: quantile(0.5, buckets, bounds),
    p99: quantile(0.99, buckets, bounds),
    errors: requests > 0 ? (a.errors - b.errors) / requests : 0,
  };
}

// Two short lines: the rate and errors, then the latency percentiles.
function describe(w) {
  if (!w || w.rate === null) return ["measuring…", ""];
  if (w.rate === 0) return ["0 calls/s", ""];
  const rate = w.rate >= 100 ? Math.round(w.rate) : w.rate.toFixed(1);
  return [`${rate}/s · ${(w.errors * 100).toFixed(1)}% errors`,
    `p50 ${ms(w.p50)} · p99 ${ms(w.p99)}`];
}

function twoLines(x, y, lines, attrs) {
  const text = svg("text", { x, y, ...attrs });
  lines.forEach((line, i) => {
    const span = svg("tspan", { x, dy: i === 0 ? 0 : 14 }, line);
    text.append(span);
  });
  return text;
}

function findApp(state, name) {
  return state.applications.find((a) => a.name === name);
}

function findDeployment(state, app, name) {
  const a = findApp(state, app);
  return a ? a.deployments.find((d) => d.name === name) : undefined;
}

function findEdge(state, app, from, to) {
  const a = findApp(state, app);
  return a ? a.edges.find((e) => e.from === from && e.to === to) : undefined;
}

// -- polling -------------------------------------------------------------------

async function poll() {
  try {
    const response = await fetch("/-/dashboard/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const state = await response.json();
    readings.push({ time: state.time, state });
    while (readings.length > 2 && state.time - readings[0].time > KEEP_S) readings.shift();
    connected(true, "");
    render(state);
  } catch (error) {
    connected(false, `not connected (${error.message}); retrying`);
  }
  setTimeout(poll, POLL_MS);
}

function connected(ok, text) {
  const badge = document.getElementById("connection");
  badge.dataset.connected = String(ok);
  badge.textContent = ok ? `live · ${new Date().toLocaleTimeString()}` : text;
}

function render(state) {
  const names = state.applications.map((a) => a.name);
  if (!names.includes(chosenApp)) chosenApp = names[0] || null;
  const nav = document.getElementById("apps");
  nav.replaceChildren(
    ...names.map((name) =>
      el("button", {
        type: "button",
        "aria-pressed": String(name === chosenApp),
        onclick: () => { chosenApp = name; render(readings[readings.length - 1].state); },
      }, name)
    )
  );
  const app = chosenApp === null ? null : findApp(state, chosenApp);
  renderSummary(state, app);
  renderGraph(state, app);
  renderDeployments(state, app);
  fillDeploymentChoice(app);
}

function renderSummary(state, app) {
  const box = document.getElementById("summary");
  if (!app) {
    box.replaceChildren(el("p", { class: "note" }, "No application runs on this server."));
    return;
  }
  box.replaceChildren(
    el("h2", {}, `Application ${app.name} `, status(app.status)),
    el("p", { class: "facts" },
      `backend ${state.backend} · ingress ${app.ingress} · route prefix ` +
        (app.route_prefix === null ? "none (handles only)" : app.route_prefix)),
    el("p", { class: "message" }, app.message || "")
  );
}

// -- the graph -----------------------------------------------------------------

const NODE_W = 240;
const NODE_H = 86;
const GAP_X = 190;
const GAP_Y = 36;

function layers(nodes, edges) {
  // Longest path from the sources: callers left of what they call.
  const depth = new Map(nodes.map((n) => [n, 0]));
  for (let round = 0; round < nodes.length; round++) {
    let moved = false;
    for (const e of edges) {
      if (e.from === e.to) continue;
      const want = depth.get(e.from) + 1;
      if (want > depth.get(e.to) && want < nodes.length) {
        depth.set(e.to, want);
        moved = true;
      }
    }
    if (!moved) break;
  }
  return depth;
}

function renderGraph(state, app) {
  const box = document.getElementById("graph");
  if (!app) { box.replaceChildren(); return; }
  const names = app.deployments.map((d) => d.name);
  if (!names.length) { box.replaceChildren(); return; }
  const nodes = [...names];
  for (const e of app.edges) {
    for (const end of [e.from, e.to]) if (!nodes.includes(end)) nodes.push(end);
  }
  const depth = layers(nodes, app.edges);
  const columns = [];
  for (const n of nodes) (columns[depth.get(n)] ||= []).push(n);
  const place = new Map();
  columns.forEach((column, x) =>
    column.forEach((n, y) =>
      place.set(n, { x: 20 + x * (NODE_W + GAP_X), y: 20 + y * (NODE_H + GAP_Y) })));
  const width = 40 + columns.length * (NODE_W + GAP_X) - GAP_X;
  const height = 40 + Math.max(...columns.map((c) => c.length)) * (NODE_H + GAP_Y) - GAP_Y;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Graph of application ${app.name}` });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8a8fa3" }));
  defs.append(marker);
  root.append(defs);
  for (const e of app.edges) {
    const a = place.get(e.from);
    const b = place.get(e.to);
    const w = windowed((s) => findEdge(s, app.name, e.from, e.to)?.series);
    const failing = w && w.errors > 0;
    const group = svg("g", {
      class: `edge${e.declared ? "" : " observed"}${failing ? " failing" : ""}`,
      "data-edge": `${label(app, e.from)}->${label(app, e.to)}`,
    });
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    const bend = Math.max(40, (x2 - x1) / 2);
    group.append(svg("path", {
      d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`,
      "marker-end": "url(#arrow)",
    }));
    const lines = e.series.requests > 0 || !e.declared ? describe(w) : ["no calls yet", ""];
    group.append(twoLines((x1 + x2) / 2, (y1 + y2) / 2 - 24, lines, { "text-anchor": "middle" }));
    root.append(group);
  }
  for (const n of nodes) {
    const p = place.get(n);
    const d = app.deployments.find((x) => x.name === n);
    const group = svg("g", {
      class: `node${d ? "" : " outside"}`,
      "data-node": label(app, n),
      "data-status": d ? d.status : "",
      transform: `translate(${p.x},${p.y})`,
    });
    group.append(svg("rect", { width: NODE_W, height: NODE_H, rx: 7 }));
    group.append(svg("text", { x: 10, y: 20, class: "name" }, label(app, n)));
    if (d) {
      const w = windowed((s) => findDeployment(s, app.name, n)?.series);
      group.append(svg("text", { x: 10, y: 38, class: "sub" },
        `${d.status} · ${d.running_replicas}/${d.target_replicas} replicas` +
          (d.queued ? ` · ${d.queued} queued` : "")));
      group.append(twoLines(10, 56, describe(w), {}));
    } else {
      group.append(svg("text", { x: 10, y: 38, class: "sub" },
        n === OUTSIDE ? "requests from outside" : "another application"));
    }
    root.append(group);
  }
  box.replaceChildren(root);
}

function label(app, name) {
  if (name !== OUTSIDE) return name;
  return app.route_prefix === null ? "driver" : "HTTP";
}

// -- deployments ---------------------------------------------------------------

function renderDeployments(state, app) {
  const box = document.getElementById("deployments");
  if (!app) { box.replaceChildren(); return; }
  box.replaceChildren(...app.deployments.map((d) => deploymentCard(state, app, d)));
}

function deploymentCard(state, app, d) {
  const rows = d.replicas.map((r) =>
    el("tr", { "data-replica": r.replica_id, "data-state": r.state },
      el("td", { class: "mono" }, r.replica_id),
      el("td", {}, status(r.state)),
      el("td", {}, r.rank),
      el("td", { class: "mono" }, r.pid ?? "–", r.node ? ` @ ${r.node}` : ""),
      el("td", {}, r.in_flight),
      el("td", { class: "mono" }, r.models.length ? r.models.join(", ") : "–"),
      el("td", { class: "failure" }, r.last_failure ? failure(r.last_failure, state.time) : "–")));
  const card = el("article", { class: "deployment", "data-deployment": d.name },
    el("h3", {}, d.name, status(d.status)),
    d.message ? el("p", { class: "message" }, d.message) : null,
    el("p", { class: "facts" },
      `${d.running_replicas} of ${d.target_replicas} replicas running · ` +
        `${d.restarts} restart${d.restarts === 1 ? "" : "s"} · ` +
        `${d.queued} queued · ${d.series.requests} requests, ${d.series.errors} failed in all`),
    el("table", {},
      el("thead", {}, el("tr", {}, ...["replica", "state", "rank", "pid", "in flight", "models",
        "last failed request"].map((t) => el("th", {}, t)))),
      el("tbody", {}, ...rows)));
  if (d.retired.length) {
    card.append(el("ul", { class: "retired", "aria-label": "Replicas taken out of service" },
      ...d.retired.slice(-5).reverse().map((r) =>
        el("li", { "data-retired": r.replica_id },
          `${r.replica_id} (pid ${r.pid ?? "–"}) taken out of service ${ago(r.at, state.time)}: ` +
            r.reason))));
  }
  if (d.autoscaling !== null) card.append(scaling(d.autoscaling, d.target_replicas, state.time));
  return card;
}

function failure(f, now) {
  return el("span", {},
    `${ago(f.at, now)}, request `,
    el("a", {
      class: "request mono", title: "Show this request's log lines",
      onclick: () => { showRequest(f.request_id); },
    }, f.request_id),
    `: ${f.error}`);
}

function scaling(decisions, target, now) {
  const box = el("div", { class: "scaling-box" });
  if (!decisions.length) {
    box.append(el("p", { class: "scaling" }, `Autoscaled; no change yet (target ${target}).`));
    return box;
  }
  // Target replicas over time: a step line from the first decision to now.
  const w = 420, h = 60, t0 = decisions[0].at, span = Math.max(now - t0, 1);
  const top = Math.max(1, ...decisions.map((x) => Math.max(x.from, x.to)));
  const x = (t) => 30 + ((t - t0) / span) * (w - 40);
  const y = (n) => h - 12 - (n / top) * (h - 22);
  let d = `M ${x(t0)} ${y(decisions[0].from)}`;
  for (const step of decisions) d += ` H ${x(step.at)} V ${y(step.to)}`;
  d += ` H ${x(now)}`;
  const chart = svg("svg", { class: "timeline", width: w, height: h, role: "img",
    "aria-label": "Target replicas over time" });
  chart.append(svg("path", { d }));
  chart.append(svg("text", { x: 2, y: y(top) + 4 }, String(top)));
  chart.append(svg("text", { x: 2, y: y(0) + 4 }, "0"));
  box.append(chart);
  box.append(el("ul", { class: "scaling", "aria-label": "Autoscaling decisions" },
    ...decisions.slice(-5).reverse().map((s) =>
      el("li", {}, `${ago(s.at, now)}: ${s.from} → ${s.to} (${s.reason})`))));
  return box;
}

// -- logs ----------------------------------------------------------------------

function fillDeploymentChoice(app) {
  const select = document.getElementById("log-deployment");
  const names = app ? app.deployments.map((d) => d.name) : [];
  const have = [...select.options].map((o) => o.value).slice(1);
  if (have.join("\n") === names.join("\n")) return;
  select.replaceChildren(el("option", { value: "" }, "all"),
    ...names.map((n) => el("option", { value: n }, n)));
  select.value = names.includes(logFilter.deployment) ? logFilter.deployment : "";
}

function showRequest(requestId) {
  logFilter = { deployment: "", request_id: requestId };
  document.getElementById("log-deployment").value = "";
  document.getElementById("log-request").value = requestId;
  document.querySelector("#logs tbody").replaceChildren(); // not another filter's lines
  pollLogs();
  document.getElementById("logs").scrollIntoView({ behavior: "smooth" });
}

let logTimer = null;
let logRead = 0; // the latest read: an older one's answer (another filter) is dropped

async function pollLogs() {
  if (logTimer !== null) { clearTimeout(logTimer); logTimer = null; }
  const mine = ++logRead;
  const note = document.getElementById("log-note");
  const params = new URLSearchParams({ limit: "200" });
  if (chosenApp !== null) params.set("app", chosenApp);
  if (logFilter.deployment) params.set("deployment", logFilter.deployment);
  if (logFilter.request_id) params.set("request_id", logFilter.request_id);
  try {
    const response = await fetch(`/-/logs?${params}`, { cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (mine !== logRead) return; // a newer read took over (and polls on)
    if (!response.ok) {
      note.textContent = body.error || `The server answered ${response.status}.`;
    } else {
      const lines = Array.isArray(body) ? body : body.lines || [];
      showLines(lines);
      note.textContent = lines.length ? "" : "No log lines match.";
    }
  } catch (error) {
    if (mine !== logRead) return;
    note.textContent = `Could not read the logs (${error.message}).`;
  }
  logTimer = setTimeout(pollLogs, LOG_POLL_MS);
}

function showLines(lines) {
  const body = document.querySelector("#logs tbody");
  body.replaceChildren(...lines.slice().reverse().map((line) => {
    const message = el("td", { class: "message" }, line.message);
    if (line.exception) {
      message.append(el("details", {}, el("summary", {}, "traceback"),
        el("pre", {}, line.exception)));
    }
    return el("tr", { "data-level": line.level, "data-request": line.request_id || "" },
      el("td", { class: "mono" }, new Date(line.time * 1000).toLocaleTimeString()),
      el("td", {}, line.level),
      el("td", { class: "mono" }, line.replica),
      el("td", { class: "mono" }, line.request_id || ""),
      message);
  }));
}

function start() {
  document.getElementById("log-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    logFilter = {
      deployment: document.getElementById("log-deployment").value,
      request_id: document.getElementById("log-request").value.trim(),
    };
    pollLogs();
  });
  document.getElementById("log-clear").addEventListener("click", () => {
    document.getElementById("log-request").value = "";
    document.getElementById("log-deployment").value = "";
    logFilter = { deployment: "", request_id: "" };
    pollLogs();
  });
  poll();
  pollLogs();
}

document.addEventListener("DOMContentLoaded", start);
