// Maestro web UI: plain JavaScript over the server's JSON API (no build step).
// The token lives in localStorage and goes in an Authorization header on every call;
// live events are read with fetch (EventSource cannot send that header).
"use strict";

const TOKEN_KEY = "maestro-token";
const FINISHED = new Set(["Succeeded", "Failed", "Cancelled"]);
const main = document.getElementById("main");
let stopLive = () => {};

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function phaseBadge(phase) {
  return el("span", { class: `phase phase-${phase || "Pending"}`, "data-phase": phase || "" },
    phase || "Pending");
}

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const rsp = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    signal: options.signal,
  });
  if (rsp.status === 401) throw new Unauthorised((await rsp.json()).error.message);
  if (options.raw) return rsp;
  const body = await rsp.json();
  if (!rsp.ok) {
    const err = body.error || {};
    throw new Error(`${rsp.status}: ${err.field ? err.field + ": " : ""}${err.message}`);
  }
  return body;
}

function showLogin(message) {
  stopLive();
  main.replaceChildren(document.getElementById("login").content.cloneNode(true));
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    route();
  });
}

document.getElementById("logout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  showLogin();
});

// Runs list ------------------------------------------------------------------------------

function fmt(ts) {
  return ts ? new Date(ts).toLocaleString() : "";
}

async function showRuns(params) {
  const filters = el("form", { class: "filters card", id: "filters" });
  const fields = [
    ["namespace", "Namespace", "text"],
    ["workflow", "Workflow", "text"],
    ["since", "Created after", "datetime-local"],
    ["until", "Created before", "datetime-local"],
  ];
  for (const [name, label, type] of fields) {
    filters.append(el("label", {}, label, el("input", { name, type, value: params.get(name) || "" })));
  }
  const phase = el("select", { name: "phase" }, el("option", { value: "" }, "any phase"));
  for (const p of ["Pending", "Running", "Suspended", "Succeeded", "Failed", "Cancelled"]) {
    const opt = el("option", { value: p }, p);
    if (params.get("phase") === p) opt.selected = true;
    phase.append(opt);
  }
  filters.append(el("label", {}, "Phase", phase), el("button", { type: "submit", class: "primary" }, "Filter"));
  filters.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(filters)) if (v) q.set(k, v);
    location.hash = `#/?${q}`;
  });
  const body = el("tbody", { id: "runs" });
  const table = el("table", {},
    el("thead", {}, el("tr", {}, ...["Name", "Namespace", "Workflow", "Phase", "Created", "Finished", "Message"].map((h) => el("th", {}, h)))),
    body);
  const more = el("button", { type: "button", id: "more", hidden: "" }, "Load more");
  const error = el("p", { class: "error" });
  main.replaceChildren(filters, error, table, more);

  const query = new URLSearchParams();
  for (const k of ["namespace", "workflow", "phase"]) if (params.get(k)) query.set(k, params.get(k));
  for (const k of ["since", "until"]) if (params.get(k)) query.set(k, new Date(params.get(k)).toISOString());
  let cursor = null;
  let pages = 0;

  function rows(items) {
    return items.map((r) => {
      const tr = el("tr", { class: "run", "data-id": r.id, onclick: () => { location.hash = `#/runs/${r.id}`; } },
        el("td", {}, el("a", { href: `#/runs/${r.id}` }, r.name)), el("td", {}, r.namespace),
        el("td", {}, r.workflow || ""), el("td", {}, phaseBadge(r.phase)), el("td", {}, fmt(r.createdAt)),
        el("td", {}, fmt(r.finishedAt)), el("td", {}, r.message || ""));
      return tr;
    });
  }
  async function load(append) {
    const q = new URLSearchParams(query);
    if (append && cursor) q.set("cursor", cursor);
    try {
      const page = await api(`/api/runs?${q}`);
      error.textContent = "";
      if (append) body.append(...rows(page.items));
      else body.replaceChildren(...rows(page.items));
      cursor = page.nextCursor;
      more.hidden = !cursor;
      pages = append ? pages + 1 : 1;
    } catch (err) {
      if (err instanceof Unauthorised) return showLogin(err.message);
      error.textContent = err.message;
    }
  }
  more.addEventListener("click", () => load(true));
  await load(false);
  // Live updates: refresh the first page while the user has not paged further.
  const timer = setInterval(() => { if (pages <= 1) load(false); }, 3000);
  stopLive = () => clearInterval(timer);
}

// One run ---------------------------------------------------------------------------------

function drawDag(graph, tasks) {
  const phase = new Map(tasks.map((t) => [t.name, t]));
  const pos = new Map(graph.nodes.map((n) => [n.name, n]));
  const w = graph.nodeWidth;
  const h = graph.nodeHeight;
  const parts = [`<svg xmlns="http://www.w3.org/2000/svg" width="${graph.width}" height="${graph.height}">`];
  for (const [from, to] of graph.edges) {
    const a = pos.get(from);
    const b = pos.get(to);
    const x1 = a.x + w, y1 = a.y + h / 2, x2 = b.x, y2 = b.y + h / 2, mx = (x1 + x2) / 2;
    parts.push(`<path d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}"/>`);
  }
  for (const n of graph.nodes) {
    const t = phase.get(n.name) || {};
    const label = n.name.length > 22 ? n.name.slice(0, 21) + "…" : n.name;
    parts.push(`<g class="node ${esc(t.phase || "Pending")}${t.kind === "approval" ? " gate" : ""}" data-task="${esc(n.name)}" transform="translate(${n.x},${n.y})">` +
      `<title>${esc(n.name)}: ${esc(t.phase || "not started")}</title><rect width="${w}" height="${h}"/>` +
      `<text x="10" y="${h / 2 + 4}">${t.kind === "approval" ? "◆ " : ""}${esc(label)}</text></g>`);
  }
  parts.push("</svg>");
  return parts.join("");
}

// The task whose panel is open, kept across redraws of its run's page (the run's end
// redraws it, and the panel a user is reading must not vanish under them).
let openTask = { run: null, task: null };

async function showRun(id) {
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err instanceof Unauthorised) return showLogin(err.message);
    main.replaceChildren(el("p", { class: "error" }, err.message));
    return;
  }
  const badge = phaseBadge(run.phase);
  badge.id = "run-phase";
  const title = el("h2", {}, `${run.namespace}/${run.name} `, badge);
  if (run.deleted) title.append(" ", el("span", { class: "badge-deleted", id: "deleted" }, "resource deleted: history only"));
  const info = el("p", { class: "muted" }, `workflow ${run.workflow || "(inline)"} · id ${run.id} · created ${fmt(run.createdAt)}` +
    (run.finishedAt ? ` · finished ${fmt(run.finishedAt)}` : "") + (run.message ? ` · ${run.message}` : ""));
  const status = el("p", { class: "error", id: "action-error" });
  const actions = el("div", { class: "actions" });
  if (!run.deleted && !FINISHED.has(run.phase)) {
    actions.append(el("button", { class: "danger", id: "cancel", onclick: () => act(`/api/runs/${run.id}/cancel`) }, "Cancel"));
  }
  if (!run.deleted && FINISHED.has(run.phase)) {
    actions.append(el("button", { id: "retry", onclick: async () => {
      const r = await act(`/api/runs/${run.id}/retry`);
      if (r) status.textContent = `started ${r.name}`;
    } }, "Retry"));
  }
  const dag = el("div", { id: "dag" });
  const panel = el("div", { class: "card", id: "task" }, el("p", { class: "muted" }, "Click a task to see its attempts, outputs and logs."));
  main.replaceChildren(title, info, actions, status, el("div", { class: "layout" }, dag, panel));
  if (run.graph) dag.innerHTML = drawDag(run.graph, run.tasks);
  else dag.append(el("p", { class: "muted" }, "No workflow snapshot recorded for this run."));
  const nodes = new Map();
  for (const g of dag.querySelectorAll("g.node")) nodes.set(g.dataset.task, g);
  const byName = new Map(run.tasks.map((t) => [t.name, t]));
  let selected = null;
  function select(g) {
    if (selected) selected.classList.remove("selected");
    selected = g;
    g.classList.add("selected");
    openTask = { run: run.id, task: g.dataset.task };
    showTask(run, byName.get(g.dataset.task), panel, status);
  }
  dag.addEventListener("click", (ev) => {
    const g = ev.target.closest("g.node");
    if (g) select(g);
  });
  if (openTask.run === run.id && nodes.has(openTask.task)) select(nodes.get(openTask.task));
  // Milliseconds from navigation to a drawn run page (read by bench/server_list.py).
  window.maestroRenderedMs = performance.now();
  document.body.dataset.rendered = run.id;

  async function act(path, body) {
    try {
      status.textContent = "";
      return await api(path, { method: "POST", body });
    } catch (err) {
      status.textContent = err.message;
      return null;
    }
  }
  showRun.act = act;

  if (FINISHED.has(run.phase)) return;
  // Live: apply task transitions to the drawing as they arrive.
  const controller = new AbortController();
  let redraw = null;
  stopLive = () => { controller.abort(); clearTimeout(redraw); };
  follow(run.id, controller.signal, (kind, data) => {
    if (kind === "end") {
      if (location.hash === `#/runs/${run.id}`) showRun(run.id);
      return;
    }
    if (data.kind === "TaskPhase" && data.task && nodes.has(data.task)) {
      const g = nodes.get(data.task);
      g.classList.remove("Pending", "Running", "Succeeded", "Failed", "Cancelled", "Skipped");
      g.classList.add(data.to);
      const t = byName.get(data.task);
      if (t) t.phase = data.to;
      if (g === selected) showTask(run, t, panel, status);
    } else if (data.kind === "TaskPhase" && data.task && nodes.has(data.task.split("[")[0])) {
      // A fan-out instance: its node sums up all instances, so the page is read again,
      // at most once a second however fast the instances move.
      if (!redraw) {
        redraw = setTimeout(() => {
          if (location.hash !== `#/runs/${run.id}`) return;
          stopLive(); // this page's stream; the redrawn page opens its own
          showRun(run.id);
        }, 1000);
      }
    } else if (data.kind === "RunPhase" && data.to) {
      badge.className = `phase phase-${data.to}`;
      badge.dataset.phase = data.to;
      badge.textContent = data.to;
    }
  }).catch(() => {});
}

async function follow(id, signal, onEvent) {
  const rsp = await api(`/api/runs/${id}/events`, { raw: true, signal });
  const reader = rsp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const fields = {};
      for (const line of block.split("\n")) {
        const i = line.indexOf(": ");
        if (i > 0) fields[line.slice(0, i)] = line.slice(i + 2);
      }
      if (fields.event) onEvent(fields.event, JSON.parse(fields.data || "{}"));
    }
  }
  reader.cancel();
}

async function showTask(run, task, panel, status) {
  panel.replaceChildren(el("h3", {}, task.name, " ", phaseBadge(task.phase)), el("p", { class: "muted" }, `${task.kind} task`));
  if (task.kind === "approval") {
    panel.append(el("p", { id: "gate-message" }, task.gate || "Approve this gate?"));
    if (task.phase === "Running" && !run.deleted) {
      panel.append(el("button", { class: "primary", id: "approve", onclick: async (ev) => {
        ev.target.disabled = true;
        if (await showRun.act(`/api/runs/${run.id}/approve`, { task: task.name })) {
          ev.target.textContent = "Approved";
        } else {
          ev.target.disabled = false;
        }
      } }, "Approve"));
    }
  }
  if (task.instances) {
    // A fan-out: its instances (each with its own attempts) in item order.
    const rows = el("table", { id: "instances" }, el("tr", {}, ...["Instance", "Phase", "Attempts"].map((h) => el("th", {}, h))));
    for (const i of task.instances) rows.append(el("tr", {}, el("td", {}, i.name), el("td", {}, phaseBadge(i.phase)), el("td", {}, i.attempts)));
    panel.append(el("p", {}, task.message || ""), el("h4", {}, "Instances"), rows);
    return;
  }
  let detail;
  try {
    detail = await api(`/api/runs/${run.id}/tasks/${task.name}`);
  } catch (err) {
    panel.append(el("p", { class: "error" }, err.message));
    return;
  }
  const attempts = el("table", { id: "attempts" }, el("tr", {}, ...["#", "Phase", "Started", "Finished", "Message"].map((h) => el("th", {}, h))));
  for (const a of detail.attempts) {
    attempts.append(el("tr", {}, el("td", {}, a.attempt), el("td", {}, phaseBadge(a.phase)), el("td", {}, fmt(a.startedAt)),
      el("td", {}, fmt(a.finishedAt)), el("td", {}, a.message || "")));
  }
  panel.append(el("h4", {}, "Attempts"), attempts);
  const last = detail.attempts[detail.attempts.length - 1];
  if (last && last.outputs) panel.append(el("h4", {}, "Outputs"), el("pre", {}, JSON.stringify(last.outputs, null, 2)));
  if (task.kind === "container") {
    const out = el("pre", { id: "logs" }, "");
    panel.append(el("button", { onclick: async () => {
      try {
        const rsp = await api(`/api/runs/${run.id}/tasks/${task.name}/logs`, { raw: true });
        out.textContent = await rsp.text();
      } catch (err) {
        out.textContent = err.message;
      }
    } }, "Logs"), out);
  }
}

// Routing ---------------------------------------------------------------------------------

async function route() {
  stopLive();
  stopLive = () => {};
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/runs\/([0-9a-f-]+)$/);
  if (m) return showRun(m[1]);
  const q = hash.indexOf("?");
  return showRuns(new URLSearchParams(q >= 0 ? hash.slice(q + 1) : ""));
}

window.addEventListener("hashchange", route);
route();
