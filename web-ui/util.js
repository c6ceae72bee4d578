// Formatting, colours and the API client shared by the pages.

export function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function fmtRate(r) {
  if (!isFinite(r) || r <= 0) return "0/s";
  if (r >= 1e6) return (r / 1e6).toFixed(2) + "M/s";
  if (r >= 1e3) return (r / 1e3).toFixed(1) + "k/s";
  return r.toFixed(0) + "/s";
}

export function fmtNum(n) {
  return Number(n ?? 0).toLocaleString("en-US");
}

export function fmtBytes(b) {
  if (b >= 1 << 30) return (b / (1 << 30)).toFixed(2) + " GiB";
  if (b >= 1 << 20) return (b / (1 << 20)).toFixed(1) + " MiB";
  if (b >= 1 << 10) return (b / (1 << 10)).toFixed(1) + " KiB";
  return (b ?? 0) + " B";
}

export function fmtDuration(ms) {
  if (ms == null) return "–";
  if (ms < 1000) return ms + " ms";
  const s = Math.floor(ms / 1000);
  if (s < 60) return (ms / 1000).toFixed(1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

export function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleTimeString("en-GB") : "–";
}

export const short = (id) => String(id ?? "").slice(0, 8);

export const badge = (state) => `<span class="badge s-${esc(state)}">${esc(state)}</span>`;

// Task managers keep one colour each, in order of first sight.
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#79706e"];

export function tmColor(colors, id) {
  if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]);
  return colors.get(id);
}

// API: bearer token kept for the session once given.
export function token() {
  return sessionStorage.getItem("weir-token") || "";
}

export async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const res = await fetch(path, { method, headers, body });
  let json = null;
  try { json = await res.json(); } catch (_) { json = null; }
  return { status: res.status, body: json };
}

export function sparkline(values, width = 160, height = 34, color = "#2f6fde") {
  if (values.length < 2) return `<svg width="${width}" height="${height}"></svg>`;
  const max = Math.max(...values, 1);
  const step = width / (values.length - 1);
  const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  return `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" aria-hidden="true">
    <polyline fill="none" stroke="${color}" stroke-width="1.5" points="${pts.join(" ")}"/></svg>`;
}

// A multi-series line chart: series = [{name, color, values:[[t, v]]}] over the last `span` ms.
export function lineChart(series, span, now, { height = 140, fmt = fmtRate, since = span >= 60000 ? `−${Math.round(span / 60000)} min` : `−${Math.round(span / 1000)} s` } = {}) {
  const width = 640, left = 48, bottom = 18;
  const max = Math.max(1, ...series.flatMap((s) => s.values.map((p) => p[1])));
  const x = (t) => left + ((t - (now - span)) / span) * (width - left - 4);
  const y = (v) => height - bottom - (v / max) * (height - bottom - 8);
  const lines = series.map((s) => {
    const pts = s.values.filter((p) => p[0] >= now - span);
    if (pts.length < 2) return "";
    const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    return `<path class="line" d="${d}" stroke="${s.color}"><title>${esc(s.name)}</title></path>`;
  }).join("");
  return `<svg class="chart" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img" aria-label="throughput over time">
    <line class="axis" x1="${left}" y1="${height - bottom}" x2="${width}" y2="${height - bottom}"/>
    <text x="${left - 6}" y="12" text-anchor="end">${esc(fmt(max))}</text>
    <text x="${left - 6}" y="${height - bottom}" text-anchor="end">0</text>
    <text x="${left}" y="${height - 4}">${esc(since)}</text>
    <text x="${width - 4}" y="${height - 4}" text-anchor="end">now</text>
    ${lines}</svg>`;
}
