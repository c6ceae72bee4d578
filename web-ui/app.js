// Weir dashboard: a hash router over four pages, fed by the job manager's server-sent
// events (`/events`, one snapshot a second) with polling as the fallback when the stream
// drops. Pages update their parts in place, so forms keep their input and nothing jumps.

import { renderDag } from "./dag.js";
import {
  api, badge, esc, fmtBytes, fmtDuration, fmtNum, fmtRate, fmtTime, lineChart, short,
  sparkline, tmColor, token,
} from "./util.js";

const HISTORY_MS = 5 * 60 * 1000;
const state = {
  tick: null, // latest snapshot: {overview, jobs, taskmanagers, auth_required}
  colors: new Map(), // task manager id -> colour
  throughput: [], // [t, records/s] of the whole cluster
  opRates: new Map(), // job id -> task id -> [[t, records out/s]]
  page: null,
  job: null, // the job page's latest detail
};

const main = document.getElementById("main");
const live = document.getElementById("live");

// ---------------------------------------------------------------- live updates

let polling = null;

function connect() {
  const es = new EventSource("/events");
  es.addEventListener("tick", (e) => {
    stopPolling();
    setLive(true);
    onTick(JSON.parse(e.data));
  });
  es.onerror = () => {
    setLive(false);
    startPolling();
  };
}

function setLive(on) {
  live.textContent = on ? "live" : "disconnected — polling";
  live.className = "live " + (on ? "on" : "off");
}

function startPolling() {
  if (polling) return;
  polling = setInterval(async () => {
    try {
      const [o, j, t] = await Promise.all([api("GET", "/overview"), api("GET", "/jobs"), api("GET", "/taskmanagers")]);
      if (o.status === 200 && j.status === 200 && t.status === 200) {
        onTick({ overview: o.body, jobs: j.body.jobs, taskmanagers: t.body.taskmanagers, auth_required: state.tick?.auth_required ?? false });
      }
    } catch (_) {
      // The job manager is unreachable; the indicator already says so.
    }
  }, 2000);
}

function stopPolling() {
  if (polling) clearInterval(polling);
  polling = null;
}

function onTick(tick) {
  state.tick = tick;
  const now = Date.now();
  state.throughput.push([now, tick.overview.throughput]);
  state.throughput = state.throughput.filter((p) => p[0] >= now - HISTORY_MS);
  tick.taskmanagers.forEach((t) => tmColor(state.colors, t.id));
  render(false);
}

// ---------------------------------------------------------------- routing

window.addEventListener("hashchange", () => render(true));

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const parts = h.split("/").filter(Boolean);
  if (parts[0] === "jobs" && parts[1]) return { name: "job", id: parts[1] };
  if (parts[0] === "jobs") return { name: "jobs" };
  if (parts[0] === "taskmanagers" && parts[1]) return { name: "tm", id: parts[1] };
  return { name: "overview" };
}

function render(navigated) {
  const r = route();
  document.querySelectorAll("[data-nav]").forEach((a) =>
    a.classList.toggle("active", a.dataset.nav === ({ job: "jobs", tm: "overview" }[r.name] || r.name)));
  const key = r.name + (r.id || "");
  if (navigated || state.page !== key) {
    state.page = key;
    state.job = null;
    main.innerHTML = skeleton[r.name](r);
    bind[r.name]?.(r);
  }
  if (!state.tick) return;
  update[r.name](r);
}

const canMutate = () => !state.tick?.auth_required || !!token();

function askToken() {
  const t = prompt("API token (kept for this browser session):");
  if (t) sessionStorage.setItem("weir-token", t.trim());
  render(true);
}

function authNote() {
  if (canMutate()) return "";
  return `<span class="sub">Read-only: <a href="#" data-action="token">enter the API token</a> to enable actions.</span>`;
}

document.addEventListener("click", async (e) => {
  const el = e.target.closest("[data-action]");
  if (!el) return;
  e.preventDefault();
  const a = el.dataset.action;
  if (a === "token") return askToken();
  if (a === "kill-tm") {
    if (!confirm(`Kill task manager ${el.dataset.id}?\n\nIts process exits at once, like a crash; jobs running on it fail over.`)) return;
    const r = await api("POST", `/taskmanagers/${el.dataset.id}/kill`);
    if (r.status === 401) return askToken();
    if (r.status >= 400) alert((r.body?.errors || ["failed"]).join("\n"));
  }
  if (a === "kill-subtask") {
    const { job, task, subtask, name, tm } = el.dataset;
    if (!confirm(`Kill subtask ${name} #${subtask} on task manager ${short(tm)}?\n\nIt fails at once, like a crash; the job recovers as its checkpointing mode says (without checkpoints it fails).`)) return;
    const r = await api("POST", `/jobs/${job}/tasks/${task}/${subtask}/kill`);
    if (r.status === 401) return askToken();
    if (r.status >= 400) alert((r.body?.errors || ["failed"]).join("\n"));
  }
  if (a === "cancel-job") {
    if (!confirm(`Cancel job ${el.dataset.id}?`)) return;
    await api("DELETE", `/jobs/${el.dataset.id}`);
  }
  if (a === "checkpoint") {
    const r = await api("POST", `/jobs/${el.dataset.id}/checkpoints`);
    if (r.status >= 400) alert((r.body?.errors || ["failed"]).join("\n"));
  }
});

// ---------------------------------------------------------------- pages

const skeleton = {
  overview: () => `
    <h1>Cluster</h1>
    <div class="cards" id="cards"></div>
    <div class="grid2">
      <section class="panel"><h2>Task managers</h2><div id="tms"></div></section>
      <section class="panel"><h2>Recent events</h2><div id="events"></div></section>
    </div>`,
  jobs: () => `
    <h1>Jobs</h1>
    <section class="panel"><div id="joblist"></div></section>
    <section class="panel">
      <h2>Submit a job</h2>
      <div class="actions" style="margin-bottom:8px">
        <label class="sub" for="example">Example</label>
        <select id="example"><option value="">— paste a spec, or pick one —</option></select>
        <span class="spacer"></span>
      </div>
      <textarea id="spec" spellcheck="false" placeholder='{"name": "...", "operators": [...]}'></textarea>
      <div class="actions" style="margin-top:8px">
        <button class="primary" id="submit">Submit</button>
        <span id="submit-note" class="sub"></span>
      </div>
      <div id="submit-error"></div>
    </section>`,
  job: (r) => `
    <div class="head" id="job-head"><h1>Job <span class="mono">${esc(short(r.id))}</span></h1></div>
    <div class="cards" id="job-cards"></div>
    <section class="panel"><h2>Graph</h2><div class="sub" id="dag-legend" style="margin-bottom:6px"></div><div class="dag" id="dag"></div></section>
    <div class="grid2">
      <section class="panel"><h2>Throughput per task (records/s, up to the last 5 min)</h2><div id="rate-chart"></div><div class="legend" id="rate-legend"></div></section>
      <section class="panel"><h2>Failovers</h2><div id="failovers"></div></section>
    </div>
    <section class="panel"><h2>Checkpoints</h2><div id="checkpoints"></div></section>
    <section class="panel"><h2>Subtasks</h2><div id="subtasks"></div></section>
    <section class="panel"><h2>Exceptions</h2><div id="exceptions"></div></section>`,
  tm: (r) => `
    <div class="head" id="tm-head"><h1>Task manager <span class="mono">${esc(short(r.id))}</span></h1></div>
    <div class="cards" id="tm-cards"></div>
    <div class="grid2">
      <section class="panel"><h2>Subtasks</h2><div id="tm-subtasks"></div></section>
      <section class="panel"><h2>Heartbeats (gap between two, ms)</h2><div id="tm-heartbeats"></div></section>
    </div>`,
};

const bind = {
  jobs: async () => {
    const sel = document.getElementById("example");
    const r = await api("GET", "/examples");
    (r.body?.examples || []).forEach((ex) => {
      const o = document.createElement("option");
      o.value = ex.spec;
      o.textContent = ex.name;
      sel.appendChild(o);
    });
    sel.addEventListener("change", () => { if (sel.value) document.getElementById("spec").value = sel.value; });
    document.getElementById("submit").addEventListener("click", submit);
  },
};

async function submit() {
  const text = document.getElementById("spec").value;
  const out = document.getElementById("submit-error");
  const note = document.getElementById("submit-note");
  out.innerHTML = "";
  note.textContent = "submitting…";
  const r = await api("POST", "/jobs", text);
  note.textContent = "";
  if (r.status === 200) {
    location.hash = `#/jobs/${r.body.jobid}`;
    return;
  }
  if (r.status === 401) return askToken();
  const b = r.body || {};
  const where = [b.operator && `operator '${b.operator}'`, b.field && `field '${b.field}'`,
    b.line && `line ${b.line}, column ${b.column}`].filter(Boolean).join(" · ");
  out.innerHTML = `<div class="error" role="alert">${where ? `<b>${esc(where)}</b>\n` : ""}${esc((b.errors || ["HTTP " + r.status]).join("\n"))}</div>`;
}

const update = {
  overview: () => {
    const { overview: o, taskmanagers } = state.tick;
    setHtml("cards", `
      <div class="card"><div class="label">Task managers</div><div class="value">${o.taskmanagers} <small>alive · ${o.taskmanagers_dead} dead</small></div></div>
      <div class="card"><div class="label">Slots</div><div class="value">${o.slots_used} <small>used of ${o.slots_total}</small></div>${meter(o.slots_used, o.slots_total)}</div>
      <div class="card"><div class="label">Cache memory</div><div class="value">${fmtBytes(o.cache_bytes)} <small>of ${fmtBytes(o.cache_limit)}</small></div>${meter(o.cache_bytes, o.cache_limit)}</div>
      <div class="card"><div class="label">Jobs</div><div class="value">${o.jobs_running} <small>running · ${o.jobs_finished} finished · ${o.jobs_failed} failed</small></div></div>
      <div class="card"><div class="label">Throughput</div><div class="value">${fmtRate(o.throughput)}</div>${sparkline(state.throughput.map((p) => p[1]))}</div>`);
    const rows = taskmanagers.map((t) => `<tr>
        <td class="nowrap">${tmLink(t.id)}</td>
        <td>${badge(t.state)}</td>
        <td class="num">${t.state === "ALIVE" ? `${t.slots_used} / ${t.slots}` : "–"}</td>
        <td class="num">${t.cache ? `${fmtBytes(t.cache.bytes)} ${meter(t.cache.bytes, t.cache.limit)}` : "–"}</td>
        <td class="num">${t.state === "ALIVE" ? t.heartbeat_age_ms + " ms" : "–"}</td>
        <td>${t.state === "ALIVE" ? `<button class="danger" data-action="kill-tm" data-id="${esc(t.id)}" ${canMutate() ? "" : "disabled"}>Kill</button>` : esc(t.death_reason || "")}</td>
      </tr>`).join("");
    setHtml("tms", taskmanagers.length
      ? `<table><thead><tr><th>Id</th><th>State</th><th class="num">Slots used</th><th class="num">Cache memory</th><th class="num">Heartbeat age</th><th></th></tr></thead><tbody>${rows}</tbody></table>${authNote()}`
      : `<div class="empty">No task manager has registered.</div>`);
    setHtml("events", o.events.length
      ? `<table><tbody>${o.events.slice(0, 12).map((e) => `<tr><td class="num">${fmtTime(e.at)}</td><td class="nowrap">${tmLink(e.taskmanager)}</td><td>${badge(e.kind === "LOST" ? "DEAD" : "ALIVE")}</td><td class="sub">${esc(e.detail)}</td></tr>`).join("")}</tbody></table>`
      : `<div class="empty">No events yet.</div>`);
  },

  jobs: () => {
    const rows = state.tick.jobs.map((j) => `<tr>
        <td><a href="#/jobs/${esc(j.jid)}">${esc(j.name)}</a><div class="sub mono">${esc(short(j.jid))}</div></td>
        <td>${badge(j.state)}</td>
        <td>${esc(j.mode.toUpperCase())}</td>
        <td class="num">${fmtTime(j.start_time)}</td>
        <td class="num">${fmtDuration(j.duration)}</td>
        <td class="num">${fmtRate(j.throughput)}</td>
      </tr>`).join("");
    setHtml("joblist", state.tick.jobs.length
      ? `<table><thead><tr><th>Name</th><th>State</th><th>Mode</th><th class="num">Started</th><th class="num">Duration</th><th class="num">Throughput</th></tr></thead><tbody>${rows}</tbody></table>`
      : `<div class="empty">No jobs yet: submit one below.</div>`);
    document.getElementById("submit").disabled = !canMutate();
  },

  job: async (r) => {
    let d, c, f;
    try {
      [d, c, f] = await Promise.all([
        api("GET", `/jobs/${r.id}`), api("GET", `/jobs/${r.id}/checkpoints`), api("GET", `/jobs/${r.id}/failovers`),
      ]);
    } catch (_) {
      return; // unreachable for now; the next tick tries again
    }
    if (state.page !== "job" + r.id) return;
    if (d.status !== 200) {
      main.innerHTML = `<h1>Job ${esc(short(r.id))}</h1><div class="error">${esc((d.body?.errors || ["not found"]).join("\n"))}</div>`;
      return;
    }
    renderJob(d.body, c.body, f.body?.failovers || []);
  },

  tm: async (r) => {
    let d;
    try {
      d = await api("GET", `/taskmanagers/${r.id}`);
    } catch (_) {
      return;
    }
    if (state.page !== "tm" + r.id) return;
    if (d.status !== 200) {
      main.innerHTML = `<h1>Task manager ${esc(short(r.id))}</h1><div class="error">${esc((d.body?.errors || ["not found"]).join("\n"))}</div>`;
      return;
    }
    renderTaskManager(d.body);
  },
};

function renderTaskManager(t) {
  const alive = t.state === "ALIVE";
  setHtml("tm-head", `
    <h1>Task manager <span class="mono">${esc(short(t.id))}</span></h1>${badge(t.state)}
    <span class="meta"><span class="swatch" style="background:${tmColor(state.colors, t.id)}"></span><span class="mono">${esc(t.id)}</span> · pid ${t.pid} · data plane <span class="mono">${esc(t.data_addr)}</span></span>
    <span class="spacer" style="flex:1"></span>
    <div class="actions"><button class="danger" data-action="kill-tm" data-id="${esc(t.id)}" ${alive && canMutate() ? "" : "disabled"}>Kill task manager</button></div>`);
  const c = t.cache;
  setHtml("tm-cards", `
    <div class="card"><div class="label">Slots</div><div class="value">${alive ? t.slots_used : "–"} <small>used of ${t.slots}</small></div>${meter(alive ? t.slots_used : 0, t.slots)}</div>
    <div class="card"><div class="label">Heartbeat</div><div class="value">${alive ? t.heartbeat_age_ms + " <small>ms ago</small>" : "–"}</div></div>
    <div class="card"><div class="label">Cache memory</div><div class="value">${c ? fmtBytes(c.bytes) : "–"} <small>${c ? "of " + fmtBytes(c.limit) : ""}</small></div>${c ? meter(c.bytes, c.limit) : ""}</div>
    <div class="card"><div class="label">Cache partitions</div><div class="value">${c ? c.primaries : "–"} <small>${c ? `primary · ${c.backups} backup` : ""}</small></div></div>
    <div class="card"><div class="label">Cache entries</div><div class="value">${c ? fmtNum(c.map_entries) : "–"} <small>${c ? `map · ${fmtNum(c.list_items)} list items` : ""}</small></div></div>
    <div class="card"><div class="label">${alive ? "Registered" : "Died"}</div><div class="value">${fmtTime(alive ? t.registered : t.died)}</div><div class="sub cause" title="${esc(t.death_reason || "")}">${esc(shortIds(t.death_reason || ""))}</div></div>`);
  const rows = t.subtasks.map((s) => `<tr>
      <td><a href="#/jobs/${esc(s.job)}">${esc(s.job_name)}</a></td>
      <td>${esc(s.task_name)} <span class="sub">#${s.subtask}</span></td>
      <td>${badge(s.state)}</td>
      <td class="num">${fmtRate(s.records_in_per_sec)}</td>
      <td>${killSubtask(s.job, s.task, s.task_name, { ...s, taskmanager: t.id }, alive)}</td>
    </tr>`).join("");
  setHtml("tm-subtasks", rows
    ? `<table><thead><tr><th>Job</th><th>Task</th><th>State</th><th class="num">In/s</th><th></th></tr></thead><tbody>${rows}</tbody></table>${authNote()}`
    : `<div class="empty">${alive ? "No subtask of a running job is placed here." : "Dead: its subtasks were moved."}</div>`);
  // Heartbeat arrival times, reconstructed backwards from the last one.
  let at = t.last_heartbeat;
  const points = t.heartbeat_gaps_ms.slice().reverse().map((g) => { const p = [at, g]; at -= g; return p; }).reverse();
  const end = alive ? Date.now() : t.last_heartbeat;
  const span = Math.max(1000, end - (points[0]?.[0] ?? end));
  setHtml("tm-heartbeats", points.length > 1
    ? lineChart([{ name: "gap", color: tmColor(state.colors, t.id), values: points }], span, end, { height: 120, fmt: (v) => `${Math.round(v)} ms` })
      + `<div class="sub">Last ${points.length} gaps: median ${median(t.heartbeat_gaps_ms)} ms, longest ${Math.max(...t.heartbeat_gaps_ms)} ms.</div>`
    : `<div class="empty">Not enough heartbeats yet.</div>`);
}

// Replaces an element's content only when it changed: a button under the pointer survives
// the next tick, and unchanged parts cost nothing.
const shown = new WeakMap(); // element -> the HTML it shows
function setHtml(id, html) {
  const el = document.getElementById(id);
  if (el && shown.get(el) !== html) {
    el.innerHTML = html;
    shown.set(el, html);
  }
}

const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function killSubtask(job, task, name, s, enabled) {
  if (s.state !== "RUNNING") return "";
  return `<button class="danger small" data-action="kill-subtask" data-job="${esc(job)}" data-task="${task}" data-subtask="${s.subtask}"
    data-name="${esc(name)}" data-tm="${esc(s.taskmanager)}" ${enabled && canMutate() ? "" : "disabled"}>Kill</button>`;
}

function tmLink(id) {
  return `<a class="nowrap" href="#/taskmanagers/${esc(id)}" title="${esc(id)}"><span class="swatch" style="background:${tmColor(state.colors, id)}"></span><span class="mono">${esc(short(id))}</span></a>`;
}

function meter(value, total) {
  const pct = total > 0 ? Math.min(100, (value / total) * 100) : 0;
  return `<span class="meter" title="${pct.toFixed(0)}%"><i style="width:${pct.toFixed(1)}%"></i></span>`;
}

// The sinks' end-to-end latency (the slowest sink's), from their latest latency markers.
function latency(job) {
  const ms = job.vertices.flatMap((v) => v.subtasks.map((s) => s.latency_ms)).filter((l) => l != null);
  return ms.length ? `${Math.max(...ms)} <small>ms</small>` : "–";
}

function renderJob(job, cps, failovers) {
  const now = Date.now();
  const hist = state.opRates.get(job.jid) || new Map();
  state.opRates.set(job.jid, hist);
  job.vertices.forEach((v) => {
    const series = hist.get(v.id) || [];
    // Records a task sends on, or, for a task ending in a sink, records it takes in.
    const out = v.subtasks.reduce((s, x) => s + x.records_out_per_sec, 0);
    const taken = v.subtasks.reduce((s, x) => s + x.records_in_per_sec, 0);
    series.push([now, out > 0 ? out : taken]);
    hist.set(v.id, series.filter((p) => p[0] >= now - HISTORY_MS));
  });
  const running = !["FINISHED", "CANCELED", "FAILED"].includes(job.state);
  setHtml("job-head", `
    <h1>${esc(job.name)}</h1>${badge(job.state)}
    <span class="meta mono">${esc(job.jid)}</span>
    <span class="spacer" style="flex:1"></span>
    <div class="actions">
      ${job.mode === "abs" || job.spec?.checkpointing?.fallback_abs_interval_ms ? `<button data-action="checkpoint" data-id="${esc(job.jid)}" ${running && canMutate() ? "" : "disabled"}>Trigger checkpoint</button>` : ""}
      <button class="danger" data-action="cancel-job" data-id="${esc(job.jid)}" ${running && canMutate() ? "" : "disabled"}>Cancel job</button>
    </div>`);
  setHtml("job-cards", `
    <div class="card"><div class="label">Mode</div><div class="value">${esc(job.mode.toUpperCase())}</div></div>
    <div class="card"><div class="label">Duration</div><div class="value">${fmtDuration(job.duration)}</div></div>
    <div class="card"><div class="label">Source throughput</div><div class="value">${fmtRate(job.throughput)}</div></div>
    <div class="card" title="How old the latest latency marker from the sources was when it reached a sink (the slowest sink)"><div class="label">End-to-end latency</div><div class="value">${latency(job)}</div></div>
    <div class="card"><div class="label">Restarts</div><div class="value">${job.restarts} <small>generation ${job.generation}</small></div></div>
    <div class="card"><div class="label">Checkpoints</div><div class="value">${cps?.counts?.completed ?? 0} <small>completed · ${cps?.counts?.failed ?? 0} failed</small></div></div>`);
  const tms = [...new Set(job.vertices.flatMap((v) => v.subtasks.map((s) => s.taskmanager)))];
  setHtml("dag-legend", "Subtasks by task manager: " + tms.map((t) =>
    `<span style="margin-right:12px"><span class="swatch" style="background:${tmColor(state.colors, t)}"></span><span class="mono">${esc(short(t))}</span></span>`).join(""));
  setHtml("dag", renderDag(job, state.colors));
  const palette = ["#2f6fde", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2"];
  const series = job.vertices.map((v, i) => ({ name: v.name, color: palette[i % palette.length], values: hist.get(v.id) }));
  // The window grows with the history this page has seen, up to 5 minutes.
  const first = Math.min(now, ...series.map((s) => (s.values[0] || [now])[0]));
  const span = Math.min(HISTORY_MS, Math.max(10000, now - first));
  setHtml("rate-chart", lineChart(series, span, now));
  setHtml("rate-legend", series.map((s) => `<span><span class="swatch" style="background:${s.color}"></span>${esc(s.name)}</span>`).join(""));
  renderCheckpoints(cps, job.mode);
  renderFailovers(failovers);
  const rows = job.vertices.flatMap((v) => v.subtasks.map((s) => `<tr>
      <td>${esc(v.name)} <span class="sub">#${s.subtask}</span></td>
      <td>${badge(s.state)}</td>
      <td class="nowrap">${tmLink(s.taskmanager)}</td>
      <td class="num">${fmtNum(s.records_in)}</td><td class="num">${fmtRate(s.records_in_per_sec)}</td>
      <td class="num">${fmtNum(s.records_out)}</td><td class="num">${fmtRate(s.records_out_per_sec)}</td>
      <td><span class="bp" title="${(s.backpressure * 100).toFixed(0)}%"><i style="width:${(s.backpressure * 100).toFixed(0)}%"></i></span></td>
      <td>${killSubtask(job.jid, v.id, v.name, s, running && job.state === "RUNNING")}</td>
    </tr>`)).join("");
  setHtml("subtasks", `<table><thead><tr><th>Task</th><th>State</th><th>Task manager</th><th class="num">In</th><th class="num">In/s</th><th class="num">Out</th><th class="num">Out/s</th><th>Backpressure</th><th></th></tr></thead><tbody>${rows}</tbody></table>`);
  setHtml("exceptions", job.exceptions.length || job.failure
    ? `${job.failure ? `<div class="error">${esc(job.failure)}</div>` : ""}<table><tbody>${job.exceptions.slice().reverse().slice(0, 20).map((e) => `<tr><td class="num">${fmtTime(e.at)}</td><td>${esc(e.location)}</td><td class="sub">${esc(shortIds(e.message))}</td></tr>`).join("")}</tbody></table>`
    : `<div class="empty">None.</div>`);
}

function renderCheckpoints(cps, mode) {
  const el = document.getElementById("checkpoints");
  const h = cps?.history || [];
  // Alignment is reported in µs: behind short queues it takes well under a millisecond.
  const fmtAlign = (us = 0) => (us >= 10_000 ? `${Math.round(us / 1000)} ms` : `${(us / 1000).toFixed(2)} ms`);
  if (!h.length) {
    el.innerHTML = `<div class="empty">${cps?.interval_ms ? "No checkpoint yet." : "This job does not checkpoint."}</div>`;
    return;
  }
  const done = h.filter((c) => c.status === "COMPLETED").slice(0, 30).reverse();
  const chart = done.length > 1 ? lineChart([{ name: "duration", color: "#2f6fde", values: done.map((c) => [c.trigger_ms, c.duration_ms]) },
    { name: "alignment", color: "#c27c0e", values: done.map((c) => [c.trigger_ms, c.alignment_us / 1000]) }],
    Math.max(1, done[done.length - 1].trigger_ms - done[0].trigger_ms), done[done.length - 1].trigger_ms,
    { height: 100, fmt: (v) => `${Math.round(v)} ms`, since: `#${done[0].id}` }) : "";
  el.innerHTML = `${chart ? `<div class="sub">Duration (blue) and alignment (amber), ms</div>${chart}` : ""}
    <table><thead><tr><th class="num">Id</th><th>Mode</th><th>Status</th><th>Trigger</th><th class="num">At</th><th class="num">Duration</th><th class="num">Alignment</th><th class="num">Size</th><th class="num">Acks</th><th>Failure</th></tr></thead><tbody>
    ${h.slice(0, 15).map((c) => `<tr><td class="num">${c.id}</td><td>${esc(String(mode).toUpperCase())}</td><td>${badge(c.status)}</td><td>${esc(c.trigger)}</td><td class="num">${fmtTime(c.trigger_ms)}</td>
      <td class="num">${c.duration_ms} ms</td><td class="num">${fmtAlign(c.alignment_us)}</td><td class="num">${fmtBytes(c.state_bytes)}</td>
      <td class="num">${c.acknowledged}/${c.total}</td><td class="sub">${esc(c.failure || "")}</td></tr>`).join("")}
    </tbody></table>`;
}

// Ids in running text, shortened to their first 8 characters as everywhere on the page.
const shortIds = (text) => String(text).replace(/\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b/g, "$1");

// A recovery's phases as [from, to, name, colour]: ABS cancels and redeploys the whole job
// and restores a checkpoint; DCAS places only the lost subtasks, which restore their
// snapshots and replay their logs while the rest keeps running.
const PHASE_COLOURS = { cancel: "#e15759", place: "#f28e2b", start: "#b07aa1", replay: "#9c755f", first: "#4e79a7", catchup: "#59a14f", drain: "#8cd17d" };
function phases(f) {
  const dcas = f.mode === "dcas";
  const ready = dcas ? "replayed_ms" : "restored_ms";
  return [
    ["detected_ms", "canceled_ms", "cancel"],
    ["canceled_ms", "deployed_ms", "place"],
    ["deployed_ms", "restored_ms", "start"],
    ...(dcas ? [["restored_ms", "replayed_ms", "replay"]] : []),
    [ready, "first_record_ms", "first"],
    ["first_record_ms", "inputs_caught_up_ms", "catchup"],
    ["inputs_caught_up_ms", "caught_up_ms", "drain"],
  ];
}
const PHASE_NAMES = { cancel: "cancel", place: "place / redeploy", start: "start, restore (ABS)", replay: "restore + replay log (DCAS)", first: "first record", catchup: "sources catch up", drain: "latency back to normal" };

function renderFailovers(list) {
  const el = document.getElementById("failovers");
  if (!list.length) {
    el.innerHTML = `<div class="empty">No failure so far.</div>`;
    return;
  }
  const longest = Math.max(1, ...list.map((f) => (f.caught_up_ms || f.superseded_ms || Date.now()) - f.detected_ms));
  el.innerHTML = `<div class="legend" style="margin-bottom:8px">${Object.entries(PHASE_NAMES).map(([k, name]) => `<span><span class="swatch" style="background:${PHASE_COLOURS[k]}"></span>${name}</span>`).join("")}</div>
    <table class="fixed"><colgroup><col style="width:30px"><col style="width:76px"><col style="width:76px"><col><col style="width:92px"></colgroup>
    <thead><tr><th>#</th><th class="num">At</th><th>Mode</th><th>Recovery and cause</th><th class="num">Total</th></tr></thead><tbody>
    ${list.slice().reverse().slice(0, 10).map((f) => {
      const bars = phases(f).map(([a, b, key]) => {
        if (f[a] == null) return "";
        const w = ((f[b] ?? f.superseded_ms ?? Date.now()) - f[a]) / longest * 100;
        return `<span style="width:${Math.max(w, 0.5)}%;background:${PHASE_COLOURS[key]};opacity:${f[b] == null ? 0.45 : 1}" title="${PHASE_NAMES[key]}: ${f[b] == null ? "in progress" : (f[b] - f[a]) + " ms"}"></span>`;
      }).join("");
      // DCAS: what restarted and what it read back, on a line of its own (it wraps).
      const count = (n, one, many) => `${n} ${n === 1 ? one : many}`;
      const scope = f.mode === "dcas"
        ? `<div class="sub scope">${[
          `${count(f.subtasks_restarted, "subtask", "subtasks")} restarted`,
          ...(f.replayed_ms ? [`${count(f.log_replayed, "log entry", "log entries")} replayed`] : []),
          ...(f.snapshot_links ? [`${count(f.snapshot_links, "incremental snapshot", "incremental snapshots")} applied`] : []),
        ].join(" · ")}</div>`
        : "";
      const total = f.caught_up_ms ? (f.caught_up_ms - f.detected_ms) + " ms" : f.superseded_ms ? "superseded" : "in progress";
      return `<tr><td class="num">${f.attempt}</td><td class="num">${fmtTime(f.detected_ms)}</td><td>${esc(f.mode.toUpperCase())}</td>
        <td><div class="bars">${bars}</div>${scope}<div class="sub cause" title="${esc(f.cause)}">${esc(shortIds(f.cause))}</div></td><td class="num">${total}</td></tr>`;
    }).join("")}</tbody></table>`;
}

render(true);
connect();
