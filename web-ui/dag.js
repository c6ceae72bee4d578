// The job graph as SVG: tasks in columns by depth (longest path from a source), edges as
// curves labelled with their exchange, each subtask a square coloured by its task manager.

import { esc, fmtRate, tmColor } from "./util.js";

const W = 230, GAP_X = 90, GAP_Y = 28, PAD = 16, SQ = 14;

function nodeHeight(v) {
  const rows = Math.ceil(v.subtasks.length / 12);
  return 62 + rows * (SQ + 4);
}

export function layout(job) {
  const depth = new Map();
  const byId = new Map(job.vertices.map((v) => [v.id, v]));
  const visit = (id, seen = new Set()) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const ups = job.edges.filter((e) => e.target === id).map((e) => visit(e.source, seen) + 1);
    const d = ups.length ? Math.max(...ups) : 0;
    depth.set(id, d);
    return d;
  };
  job.vertices.forEach((v) => visit(v.id));
  const columns = [];
  job.vertices.forEach((v) => {
    const d = depth.get(v.id);
    (columns[d] = columns[d] || []).push(v);
  });
  const pos = new Map();
  let height = 0;
  columns.forEach((col, d) => {
    let y = PAD;
    col.forEach((v) => {
      const h = nodeHeight(v);
      pos.set(v.id, { x: PAD + d * (W + GAP_X), y, h });
      y += h + GAP_Y;
    });
    height = Math.max(height, y);
  });
  return { pos, byId, width: PAD * 2 + columns.length * (W + GAP_X) - GAP_X, height: height - GAP_Y + PAD };
}

export function renderDag(job, colors) {
  const { pos, width, height } = layout(job);
  const edges = job.edges.map((e) => {
    const a = pos.get(e.source), b = pos.get(e.target);
    if (!a || !b) return "";
    const x1 = a.x + W, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2;
    const mx = (x1 + x2) / 2;
    return `<path class="edge" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}" marker-end="url(#arrow)"/>
      <text class="edge-label" x="${mx}" y="${(y1 + y2) / 2 - 6}" text-anchor="middle">${esc(e.exchange)}</text>`;
  }).join("");
  const nodes = job.vertices.map((v) => {
    const p = pos.get(v.id);
    const rin = v.subtasks.reduce((s, x) => s + x.records_in_per_sec, 0);
    const rout = v.subtasks.reduce((s, x) => s + x.records_out_per_sec, 0);
    const bp = Math.max(0, ...v.subtasks.map((x) => x.backpressure));
    const squares = v.subtasks.map((s, i) => {
      const x = p.x + 12 + (i % 12) * (SQ + 4);
      const y = p.y + 58 + Math.floor(i / 12) * (SQ + 4);
      const dead = s.state === "FAILED" || s.state === "CANCELED";
      return `<rect x="${x}" y="${y}" width="${SQ}" height="${SQ}" rx="3"
        fill="${tmColor(colors, s.taskmanager)}" opacity="${dead ? 0.3 : 1}"
        stroke="${s.state === "RUNNING" ? "none" : "#d64545"}" stroke-width="${s.state === "RUNNING" ? 0 : 1.5}">
        <title>subtask ${s.subtask}: ${esc(s.state)} on ${esc(s.taskmanager)}</title></rect>`;
    }).join("");
    const title = v.operators.map((o) => o.id).join(" → ");
    const bpColor = bp > 0.5 ? "#d64545" : bp > 0.1 ? "#c27c0e" : "#1f9d55";
    return `<g class="node">
      <rect class="box" x="${p.x}" y="${p.y}" width="${W}" height="${p.h}" rx="8"/>
      <rect x="${p.x}" y="${p.y}" width="4" height="${p.h}" rx="2" fill="${bpColor}"><title>backpressure ${(bp * 100).toFixed(0)}%</title></rect>
      <text class="title" x="${p.x + 12}" y="${p.y + 20}">${esc(title.length > 30 ? title.slice(0, 29) + "…" : title)}<title>${esc(title)}</title></text>
      <text class="detail" x="${p.x + 12}" y="${p.y + 37}">×${v.parallelism} · in ${fmtRate(rin)} · out ${fmtRate(rout)}</text>
      <text class="detail" x="${p.x + 12}" y="${p.y + 51}">backpressure ${(bp * 100).toFixed(0)}%</text>
      ${squares}
    </g>`;
  }).join("");
  return `<svg class="dag-svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="job graph">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
      <path d="M 0 0 L 10 5 L 0 10 z" fill="#9aa5b5"/></marker></defs>
    ${edges}${nodes}</svg>`;
}
