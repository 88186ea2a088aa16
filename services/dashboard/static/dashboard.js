// wattflow dashboard: polls the service's JSON API about once a second and draws its charts on
// canvas. No libraries: the page must work offline and carry no third-party code.
// Times are integer microseconds since 1970 (UTC) everywhere, as the API gives them.
"use strict";

// Okabe-Ito: told apart with the common kinds of colour blindness; black is the total.
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"];
const TOTAL_COLOR = "#000000";
const LIVE_REFETCH_US = 10e6;   // each poll fetches again the last 10 s (late points)
const RELOAD_EVERY_MS = 300e3;  // and the whole window every 5 min (late points, rollups)

const S = {
  cfg: null, tz: "UTC", windowS: 300, range: null, // range: {from, to} µs when chosen
  step: 0, t0: 0, t1: 0, series: {}, now: null, skewUs: 0, loaded: 0, polls: 0,
  busy: false, lastOk: 0, error: null,
};
window.wattflow = S;  // for people poking around (and the browser tests)

// ---- formatting --------------------------------------------------------------------------

const PREFIXES = [[1e9, "G"], [1e6, "M"], [1e3, "k"], [1, ""], [1e-3, "m"]];

function prefixFor(magnitude) {
  for (const [f, p] of PREFIXES) if (magnitude >= f) return [f, p];
  return magnitude === 0 ? [1, ""] : [1e-3, "m"];
}

function si(value, unit, digits = 3) {
  if (value === null || value === undefined || !isFinite(value)) return "–";
  value = Number(value.toPrecision(digits)); // 9.9999999 Wh shows as 10.0 Wh, as 10.0000001 does
  const [f, p] = prefixFor(Math.abs(value));
  const x = value / f;
  const decimals = Math.max(0, digits - 1 - Math.floor(Math.log10(Math.max(Math.abs(x), 1))));
  return `${x.toFixed(decimals)} ${p}${unit}`;
}

const fmtCache = {};
function fmt(kind) {
  const opts = {
    hms: {hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"},
    hm: {hour: "2-digit", minute: "2-digit", hourCycle: "h23"},
    day: {month: "short", day: "numeric"},
    full: {year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
           minute: "2-digit", second: "2-digit", hourCycle: "h23"},
  }[kind];
  return fmtCache[kind] ??= new Intl.DateTimeFormat("en-GB", {...opts, timeZone: S.tz});
}

function wall(us) {  // the wall clock in the configured zone, as fields
  const parts = {};
  for (const p of fmt("full").formatToParts(new Date(us / 1000))) parts[p.type] = p.value;
  return parts;
}

function offsetUs(us) {  // zone offset at that instant (local wall clock minus UTC)
  const p = wall(us);
  const asUtc = Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour % 24, +p.minute, +p.second);
  return (asUtc - Math.floor(us / 1000 / 1000) * 1000) * 1000;
}

function isoLocal(us) {  // for datetime-local inputs: YYYY-MM-DDTHH:MM:SS in the zone
  const p = wall(us);
  return `${p.year}-${p.month}-${p.day}T${p.hour % 24 === 0 ? "00" : p.hour}:${p.minute}:${p.second}`;
}

function timeArg(us) {  // "@SECONDS.ffffff", exact for integer µs
  const s = Math.floor(us / 1e6), f = us - s * 1e6;
  return `@${s}.${String(f).padStart(6, "0")}`;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
  return `${(seconds / 86400).toFixed(1)} d ago`;
}

// ---- the API -----------------------------------------------------------------------------

async function api(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of params || []) q.append(k, v);
  const res = await fetch(`${path}?${q}`, {cache: "no-store"});
  const body = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function seriesParams() {
  return [...S.cfg.circuits.map(c => ["circuit", c.name]),
          ...S.cfg.meters.map(m => ["meter", m.ip])];
}

function serverNow() { return Date.now() * 1000 + S.skewUs; }

function windowBounds() {
  if (S.range) return [S.range.from, S.range.to];
  const t1 = serverNow();
  return [t1 - S.windowS * 1e6, t1];
}

async function loadWindow() {
  const [t0, t1] = windowBounds();
  const body = await api("/api/history", [...seriesParams(), ["from", timeArg(t0)],
                                          ["to", timeArg(t1)]]);
  S.step = body.step_us; S.t0 = body.from_us; S.t1 = body.to_us;
  S.series = body.series;
  S.loaded = Date.now();
  updateLinks();
}

async function loadTail() {
  const [t0, t1] = windowBounds();
  // the last 10 s again (late points), or from the newest bucket held if that is older
  let newest = 0;
  for (const s of Object.values(S.series)) if (s.t.length) newest = Math.max(newest, s.t.at(-1));
  const from = Math.max(t0, Math.min(t1 - LIVE_REFETCH_US, newest || t0));
  const body = await api("/api/history", [...seriesParams(), ["from", timeArg(from)],
                                          ["to", timeArg(t1)], ["step", String(S.step)]]);
  if (body.step_us !== S.step) return loadWindow();
  for (const [key, tail] of Object.entries(body.series)) {
    const old = S.series[key] || {t: [], n: [], min: [], max: [], mean: [], gap: []};
    const first = tail.t.length ? tail.t[0] : body.from_us - body.from_us % S.step;
    const keepFrom = t0 - t0 % S.step;
    const merged = {};
    const lo = old.t.findIndex(t => t >= keepFrom);
    let hi = old.t.findIndex(t => t >= first);
    if (hi < 0) hi = old.t.length;
    for (const k of Object.keys(old)) {
      merged[k] = (lo < 0 ? [] : old[k].slice(lo, Math.max(lo, hi))).concat(tail[k]);
    }
    S.series[key] = merged;
  }
  S.t0 = t0; S.t1 = t1;
}

async function poll() {
  if (S.busy) return;
  S.busy = true;
  try {
    const [t0, t1] = windowBounds();
    const now = await api("/api/now", [["from", timeArg(t0)], ["to", timeArg(t1)]]);
    S.skewUs = now.now_us - Date.now() * 1000;
    S.now = now;
    if (!S.range) {
      if (!S.loaded || Date.now() - S.loaded > RELOAD_EVERY_MS || !S.step) await loadWindow();
      else await loadTail();
    } else if (!S.loaded) {
      await loadWindow();
    }
    S.polls += 1;
    S.lastOk = Date.now();
    S.error = null;
    render();
  } catch (err) {
    S.error = String(err.message || err);
    renderStatus();
  } finally {
    S.busy = false;
  }
}

// ---- the numbers -------------------------------------------------------------------------

function circuitColor(i) { return PALETTE[i % PALETTE.length]; }

function buildStatic() {
  const box = document.getElementById("circuits");
  S.cfg.circuits.forEach((c, i) => {
    const card = document.createElement("div");
    card.className = "card circuit";
    card.dataset.circuit = c.name;
    card.style.setProperty("--c", circuitColor(i));
    card.innerHTML = `<div class="label">circuit <b class="name"></b> <span class="badge"></span></div>
      <div class="value watts" data-w="">–</div>
      <div class="detail"><span class="volts">–</span> · <span class="amps">–</span></div>
      <div class="detail muted"><span class="age"></span></div>`;
    card.querySelector(".name").textContent = c.name;
    box.append(card);
  });
  const tbody = document.getElementById("meters");
  for (const m of S.cfg.meters) {
    const tr = document.createElement("tr");
    tr.dataset.meter = m.ip;
    tr.innerHTML = `<td class="ip"></td><td class="latest">–</td><td class="when">–</td>
      <td class="state"></td>`;
    tr.querySelector(".ip").textContent = `${m.ip} (${m.unit})`;
    tbody.append(tr);
  }
  document.getElementById("stale-rule").textContent =
    `(stale after ${S.cfg.stale_after_s} s without a reading)`;
  document.getElementById("range-zone").textContent = `times in ${S.tz}`;
  document.getElementById("gap-s").textContent = String(S.cfg.gap_us / 1e6);
}

function render() {
  renderStatus();
  renderNumbers();
  renderCharts();
  updateLinks();
  document.body.dataset.polls = String(S.polls);
}

function renderStatus() {
  const el = document.getElementById("status");
  if (S.error) {
    el.textContent = `not updating: ${S.error} (retrying)`;
    el.classList.add("bad");
  } else if (S.now) {
    el.textContent = S.range ? "chosen range (numbers live)" : "live";
    el.classList.remove("bad");
  }
  const clock = document.getElementById("clock");
  const p = wall(serverNow());
  clock.textContent = `${p.year}-${p.month}-${p.day} ${p.hour % 24 === 0 ? "00" : p.hour}:${p.minute}:${p.second} ${S.tz}`;
}

function setEnergy(id, e) {
  const el = document.getElementById(id);
  if (!e) { el.textContent = "–"; el.dataset.wh = ""; return; }
  el.dataset.wh = String(e.total_wh);
  el.textContent = si(e.total_wh, "Wh");
}

function renderNumbers() {
  const now = S.now;
  const total = document.getElementById("total-w");
  total.dataset.w = String(now.total_w);
  total.textContent = si(now.total_w, "W");
  setEnergy("energy-today", now.energy.today);
  setEnergy("energy-window", now.energy.window);
  const since = wall(now.energy.today.from_us);
  document.getElementById("today-since").textContent = `(since ${since.day}.${since.month}. 00:00)`;
  for (const card of document.querySelectorAll(".circuit")) {
    const c = now.circuits[card.dataset.circuit];
    const w = card.querySelector(".watts");
    const badge = card.querySelector(".badge");
    if (!c) {
      w.textContent = "no data"; w.dataset.w = ""; card.classList.add("stale");
      badge.textContent = "no data"; badge.className = "badge stale";
      continue;
    }
    w.textContent = si(c.watts, "W");
    w.dataset.w = String(c.watts);
    w.dataset.ts = String(c.ts_us);
    card.querySelector(".volts").textContent = si(c.volts, "V");
    card.querySelector(".amps").textContent = si(c.amps, "A");
    card.querySelector(".age").textContent = `last point ${ago(c.age_s)}`;
    card.classList.toggle("stale", c.stale);
    card.dataset.stale = String(c.stale);
    badge.textContent = c.stale ? "⚠ stale" : "";
    badge.className = c.stale ? "badge stale" : "badge";
  }
  for (const tr of document.querySelectorAll("#meters tr")) {
    const m = now.meters[tr.dataset.meter];
    tr.dataset.stale = String(m.stale);
    tr.dataset.value = m.value === null ? "" : String(m.value);
    tr.dataset.ts = m.ts_us === null ? "" : String(m.ts_us);
    tr.dataset.age = m.age_s === null ? "" : String(m.age_s);
    tr.classList.toggle("stale", m.stale);
    tr.querySelector(".latest").textContent = m.value === null ? "–" : si(m.value, m.unit);
    tr.querySelector(".when").textContent = ago(m.age_s);
    tr.querySelector(".state").textContent =
      m.ts_us === null ? "⚠ no data" : m.stale ? "⚠ STALE" : "fresh";
  }
}

function updateLinks() {
  const [t0, t1] = S.range ? [S.range.from, S.range.to] : [S.t0, S.t1];
  const base = [["from", timeArg(t0)], ["to", timeArg(t1)]];
  const link = (id, extra) => {
    document.getElementById(id).href = `/api/export?${new URLSearchParams([...base, ...extra])}`;
  };
  link("dl-power", [["power", "1"], ["format", "csv"]]);
  link("dl-readings", [["format", "csv"]]);
  link("dl-log", [["format", "power-log"]]);
}

// ---- the charts --------------------------------------------------------------------------

function renderCharts() {
  const power = [], volts = [], amps = [];
  const circuitOf = {};
  S.cfg.circuits.forEach((c, i) => {
    const s = S.series[`circuit:${c.name}`];
    if (s) power.push({label: c.name, color: circuitColor(i), s});
    circuitOf[c.current] = [c.name, i];
  });
  if (power.length > 1) power.push({label: "total", color: TOTAL_COLOR, s: totalOf(power),
                                    dash: [6, 3], width: 2});
  let v = 0;
  for (const m of S.cfg.meters) {
    const s = S.series[`meter:${m.ip}`];
    if (!s) continue;
    if (m.unit === "V") volts.push({label: m.ip, color: PALETTE[(v++ + 4) % PALETTE.length], s});
    else {
      const [name, i] = circuitOf[m.ip] || [null, amps.length];
      const label = name && name !== m.ip ? `${m.ip} (circuit ${name})` : m.ip;
      amps.push({label, color: circuitColor(i), s});
    }
  }
  draw("power", power, "W");
  draw("voltage", volts, "V");
  draw("current", amps, "A");
}

function totalOf(lines) {
  // each circuit's mean held from its bucket until its next (not past a gap, nor longer than
  // a bucket or the gap limit): the sum on the union of the bucket times
  const hold = Math.max(S.step, S.cfg.gap_us);
  const times = [...new Set(lines.flatMap(l => l.s.t))].sort((a, b) => a - b);
  const out = {t: [], mean: [], min: [], max: [], n: [], gap: []};
  const pos = lines.map(() => -1);
  let had = false, lastT = -Infinity;
  for (const t of times) {
    let sum = 0, any = false;
    lines.forEach((l, j) => {
      const s = l.s;
      while (pos[j] + 1 < s.t.length && s.t[pos[j] + 1] <= t) pos[j]++;
      const i = pos[j];
      if (i >= 0 && t - s.t[i] <= hold) {
        sum += s.mean[i]; any = true;
      }
    });
    if (!any) { had = false; continue; }
    out.t.push(t); out.mean.push(sum); out.min.push(sum); out.max.push(sum); out.n.push(1);
    out.gap.push(!had || t - lastT > hold);
    had = true; lastT = t;
  }
  return out;
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

const TIME_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
                      21600, 43200, 86400, 172800, 604800];

function timeTicks(t0, t1, widthPx) {
  const want = Math.max(2, Math.floor(widthPx / 110));
  const spanS = (t1 - t0) / 1e6;
  const stepS = TIME_STEPS_S.find(s => spanS / s <= want) || TIME_STEPS_S.at(-1);
  const step = stepS * 1e6;
  const ticks = [];
  // aligned on the zone's wall clock (a day tick is local midnight)
  let off = offsetUs(t0);
  let k = Math.ceil((t0 + off) / step) * step;
  for (let guard = 0; guard < 200; guard++) {
    let t = k - off;
    const o2 = offsetUs(t);
    if (o2 !== off) { t = k - o2; }  // a DST change inside the range
    if (t > t1) break;
    if (t >= t0) ticks.push(t);
    off = o2;
    k += step;
  }
  return {ticks, stepS};
}

function tickLabel(t, stepS, first) {
  const p = wall(t);
  const hh = p.hour % 24 === 0 ? "00" : p.hour;
  const day = fmt("day").format(new Date(t / 1000));
  if (stepS >= 86400) return [day, ""];
  const time = stepS < 60 ? `${hh}:${p.minute}:${p.second}` : `${hh}:${p.minute}`;
  const midnight = hh === "00" && p.minute === "00" && p.second === "00";
  return [time, first || midnight ? day : ""];
}

function draw(name, lines, unit) {
  const canvas = document.getElementById(`chart-${name}`);
  const legend = document.getElementById(`legend-${name}`);
  legend.replaceChildren(...lines.map(l => {
    const span = document.createElement("span");
    span.textContent = l.label;
    span.style.setProperty("--c", l.color);
    if (l.dash) span.style.setProperty("--dash", "dashed");
    return span;
  }));
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const m = {l: 62, r: 10, t: 8, b: 36};
  const pw = w - m.l - m.r, ph = h - m.t - m.b;
  const t0 = S.t0, t1 = S.t1;
  let lo = Infinity, hi = -Infinity, points = 0, lastT = 0;
  for (const l of lines) {
    const s = l.s;
    for (let i = 0; i < s.t.length; i++) {
      if (s.t[i] + S.step < t0 || s.t[i] > t1) continue;
      lo = Math.min(lo, s.min[i]); hi = Math.max(hi, s.max[i]);
      points++; lastT = Math.max(lastT, s.t[i]);
    }
  }
  canvas.dataset.points = String(points);
  canvas.dataset.lastT = String(lastT);
  ctx.font = "12px system-ui, sans-serif";
  ctx.strokeStyle = "#d0d0d0"; ctx.fillStyle = "#5f5f5f"; ctx.lineWidth = 1;
  if (!points) {
    ctx.textAlign = "center";
    ctx.fillText(S.error ? "no data (not updating)" : "no data in this window", m.l + pw / 2, m.t + ph / 2);
    lo = 0; hi = 1;
  }
  if (hi - lo < 1e-9 * Math.max(1, Math.abs(hi))) { lo -= 0.5 * Math.max(1, Math.abs(lo) * 0.01); hi += 0.5 * Math.max(1, Math.abs(hi) * 0.01); }
  const pad = (hi - lo) * 0.06;
  lo -= pad; hi += pad;
  if (lo < 0 && lines.every(l => l.s.min.every(v => v >= 0))) lo = 0;
  const x = t => m.l + (t - t0) / (t1 - t0) * pw;
  const y = v => m.t + (hi - v) / (hi - lo) * ph;
  // y axis: one SI prefix for the whole axis
  const ystep = niceStep(hi - lo, Math.max(2, Math.floor(ph / 45)));
  const [f, p] = prefixFor(Math.max(Math.abs(lo), Math.abs(hi)));
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let v = Math.ceil(lo / ystep) * ystep; v <= hi; v += ystep) {
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(m.l, yy); ctx.lineTo(m.l + pw, yy); ctx.stroke();
    const digits = Math.max(0, -Math.floor(Math.log10(ystep / f) + 1e-9));
    ctx.fillText(`${(v / f).toFixed(Math.min(digits, 6))} ${p}${unit}`, m.l - 4, yy);
  }
  // time axis, in the configured zone
  const {ticks, stepS} = timeTicks(t0, t1, pw);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  const labels = [];
  ticks.forEach((t, i) => {
    const xx = Math.round(x(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(xx, m.t); ctx.lineTo(xx, m.t + ph); ctx.stroke();
    const [a, b] = tickLabel(t, stepS, i === 0);
    labels.push([t, a, b]);
    ctx.fillText(a, xx, m.t + ph + 4);
    if (b) ctx.fillText(b, xx, m.t + ph + 18);
  });
  canvas.dataset.ticks = JSON.stringify(labels);
  ctx.textAlign = "right";
  ctx.fillText(`time (${S.tz})`, m.l + pw, m.t + ph + 18);
  ctx.strokeStyle = "#888"; ctx.strokeRect(m.l + 0.5, m.t + 0.5, pw, ph);
  // the data: min..max band, mean line, broken at gaps
  ctx.save();
  ctx.beginPath(); ctx.rect(m.l, m.t, pw, ph); ctx.clip();
  const half = S.step / 2;
  for (const l of lines) {
    const s = l.s;
    ctx.fillStyle = l.color; ctx.globalAlpha = 0.18;
    for (let i = 0; i < s.t.length; i++) {
      if (s.max[i] > s.min[i]) {
        const xa = x(s.t[i]), xb = Math.max(x(s.t[i] + S.step), xa + 1);
        ctx.fillRect(xa, y(s.max[i]), xb - xa, Math.max(1, y(s.min[i]) - y(s.max[i])));
      }
    }
    ctx.globalAlpha = 1;
    ctx.strokeStyle = l.color; ctx.lineWidth = l.width || 1.5;
    ctx.setLineDash(l.dash || []);
    ctx.beginPath();
    for (let i = 0; i < s.t.length; i++) {
      const xx = x(s.t[i] + half), yy = y(s.mean[i]);
      const alone = s.gap[i] && (i + 1 >= s.t.length || s.gap[i + 1]);
      if (s.gap[i]) ctx.moveTo(xx, yy); else ctx.lineTo(xx, yy);
      if (alone) { ctx.fillStyle = l.color; ctx.fillRect(xx - 1.5, yy - 1.5, 3, 3); }
    }
    ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.restore();
}

// ---- controls ----------------------------------------------------------------------------

function setWindow(seconds) {
  S.range = null;
  S.windowS = seconds;
  S.loaded = 0;
  for (const b of document.querySelectorAll("[data-window]")) {
    b.setAttribute("aria-pressed", String(+b.dataset.window === seconds));
  }
  document.getElementById("range-toggle").setAttribute("aria-pressed", "false");
  history.replaceState(null, "", `#window=${seconds}`);
  poll();
}

async function setRange(fromText, toText) {
  // the server reads zone-less times in the configured zone
  try {
    const body = await api("/api/history", [...seriesParams(), ["from", fromText],
                                            ["to", toText]]);
    S.range = {from: body.from_us, to: body.to_us};
    S.step = body.step_us; S.t0 = body.from_us; S.t1 = body.to_us;
    S.series = body.series; S.loaded = Date.now();
    for (const b of document.querySelectorAll("[data-window]")) b.setAttribute("aria-pressed", "false");
    document.getElementById("range-toggle").setAttribute("aria-pressed", "true");
    history.replaceState(null, "", `#from=${encodeURIComponent(fromText)}&to=${encodeURIComponent(toText)}`);
    updateLinks();
    S.error = null;
    await poll();
  } catch (err) {
    S.error = String(err.message || err);
    renderStatus();
  }
}

function wireControls() {
  for (const b of document.querySelectorAll("[data-window]")) {
    b.addEventListener("click", () => setWindow(+b.dataset.window));
  }
  const form = document.getElementById("range-form");
  const toggle = document.getElementById("range-toggle");
  toggle.addEventListener("click", () => {
    form.hidden = !form.hidden;
    toggle.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) {
      const [t0, t1] = [S.t0 || serverNow() - 3600e6, S.t1 || serverNow()];
      document.getElementById("range-from").value = isoLocal(t0);
      document.getElementById("range-to").value = isoLocal(t1);
    }
  });
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    setRange(document.getElementById("range-from").value, document.getElementById("range-to").value);
  });
  window.addEventListener("resize", () => { if (S.now) renderCharts(); });
}

async function start() {
  try {
    S.cfg = await api("/api/config");
  } catch (err) {
    document.getElementById("status").textContent = `cannot reach the dashboard: ${err.message}`;
    setTimeout(start, 2000);
    return;
  }
  S.tz = S.cfg.timezone;
  buildStatic();
  wireControls();
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("from") && hash.get("to")) setRange(hash.get("from"), hash.get("to"));
  else setWindow(+(hash.get("window") || 300));
  setInterval(poll, S.cfg.refresh_s * 1000);
}

start();
