// diffaudit explorer: plain JavaScript and canvas, no dependencies. State in `S`; the test hooks in window.explorer.
"use strict";
const $ = (id) => document.getElementById(id);
const S = { meta: null, model: null, run: "baseline", layer: null, metric: "cosine", images: [0, 1, 2, 3],
            token: null, pinned: false, maps: null, strip: null, norms: null, curves: null, stripImage: -1,
            inflight: false, pending: null, timings: [], seq: 0, mitigation: "none", mitigationInfo: null,
            pairs: null, pair: null, corr: null, corrToken: null, corrSeq: 0 };
window.explorer = S;

// ---- colour maps (tests/test_explorer_browser.py repeats them in numpy) ----
const BLUE = [26, 89, 255], ORANGE = [255, 140, 0], WHITE = [255, 255, 255];
const SEQ = [[68, 1, 84], [33, 145, 140], [253, 231, 37]];
function lerp(a, b, t) { return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * t)); }
function diverging(t) {  // t in [-1, 1]
  t = Math.max(-1, Math.min(1, t));
  return t < 0 ? lerp(WHITE, BLUE, -t) : lerp(WHITE, ORANGE, t);
}
function sequential(t) {  // t in [0, 1]
  t = Math.max(0, Math.min(1, t));
  return t < 0.5 ? lerp(SEQ[0], SEQ[1], t * 2) : lerp(SEQ[1], SEQ[2], (t - 0.5) * 2);
}
const SIGNED = { cosine: true, centred_cosine: true, dot: true, l2: false, rel_norm: false };
function scaleFor(metric, maps) {  // -> {lo, hi, color(v)}
  if (metric === "cosine" || metric === "centred_cosine") return { lo: -1, hi: 1, color: (v) => diverging(v) };
  if (metric === "dot") {
    let m = 0; for (const x of maps) m = Math.max(m, Math.abs(x.min), Math.abs(x.max));
    m = m || 1; return { lo: -m, hi: m, color: (v) => diverging(v / m) };
  }
  let hi = 0; for (const x of maps) hi = Math.max(hi, x.max);
  hi = hi || 1; return { lo: 0, hi, color: (v) => sequential(v / hi) };
}
window.explorerColor = { diverging, sequential };

function decode(b64) {
  const bin = atob(b64), buf = new ArrayBuffer(bin.length), u8 = new Uint8Array(buf);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return new Float32Array(buf);
}
function paint(canvas, w, h, data, color) {
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const c = color(data[i]); img.data[4 * i] = c[0]; img.data[4 * i + 1] = c[1]; img.data[4 * i + 2] = c[2];
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

async function api(path, params, opts) {
  const url = path + (params ? "?" + new URLSearchParams(params).toString() : "");
  const t0 = performance.now();
  const r = await fetch(url, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  const st = r.headers.get("Server-Timing"), m = st && st.match(/dur=([\d.]+)/);
  body._server_ms = m ? parseFloat(m[1]) : null; body._fetch_ms = performance.now() - t0;
  return body;
}
function status(msg, err) { const s = $("status"); s.textContent = msg; s.className = err ? "err" : ""; }

// ---- selection ----
function runMeta() { return S.meta.models[S.model][S.run]; }
function layerMeta(name) { return runMeta().layers.find((l) => l.name === (name || S.layer)); }
function fillSelect(sel, items, value) {
  sel.innerHTML = "";
  for (const [v, text] of items) { const o = document.createElement("option"); o.value = v; o.textContent = text; sel.appendChild(o); }
  sel.value = value;
}
function parseImages(text, n) {
  const out = [];
  for (const part of text.split(",")) {
    const p = part.trim(); if (!p) continue;
    const m = p.match(/^(\d+)\s*-\s*(\d+)$/);
    if (m) { for (let i = +m[1]; i <= +m[2] && out.length < 64; i++) out.push(i); } else if (/^\d+$/.test(p)) out.push(+p);
  }
  return [...new Set(out)].filter((i) => i < n).slice(0, 64);
}
function fileUrl(f) { return f ? "/files/" + f.split("/").map(encodeURIComponent).join("/") : null; }
function imageUrl(i) { return fileUrl(S.meta.image_files[runMeta().image_ids[i]]); }

function setModel(model) {
  S.model = model;
  const runs = Object.keys(S.meta.models[model]);
  if (!runs.includes(S.run)) S.run = runs[0];
  fillSelect($("run"), runs.map((r) => [r, r]), S.run);
  setRun(S.run);
}
function setRun(run) {
  S.run = run;
  const layers = runMeta().layers;
  if (!layers.find((l) => l.name === S.layer)) {
    const ref = layers.find((l) => l.name === (runMeta().ref_layer || S.meta.ref_layer));
    S.layer = (ref || layers[Math.floor(layers.length / 2)]).name;
  }
  fillSelect($("layer"), layers.map((l) => [l.name, `${l.index}: ${l.name} (${l.height}x${l.width}x${l.channels})`]), S.layer);
  S.images = parseImages($("images").value, runMeta().n_images);
  if (!S.images.length) S.images = [0];
  fillSelect($("strip-image"), [[-1, "the clicked image"], ...S.images.map((i) => [i, `${i}`])],
             S.images.includes(+S.stripImage) ? S.stripImage : -1);
  S.stripImage = +$("strip-image").value;
  S.token = null; S.pinned = false; S.strip = null;
  $("strip").innerHTML = ""; $("strip-info").textContent = "(click a token)";
  buildPanels(); loadCurves(); loadNorms(); loadPairs(); writeHash();
  $("labels-path").textContent = "labels file: " + S.meta.labels[S.model];
}
function setLayer(layer, keepToken) {
  if (!layerMeta(layer)) return;
  const old = layerMeta(), lm = layerMeta(layer);
  if (S.token && keepToken !== false) {  // keep the token's position across resolutions
    S.token.y = Math.min(lm.height - 1, Math.floor((S.token.y + 0.5) / old.height * lm.height));
    S.token.x = Math.min(lm.width - 1, Math.floor((S.token.x + 0.5) / old.width * lm.width));
  }
  if (S.corrToken) {
    S.corrToken.y = Math.min(lm.height - 1, Math.floor((S.corrToken.y + 0.5) / old.height * lm.height));
    S.corrToken.x = Math.min(lm.width - 1, Math.floor((S.corrToken.x + 0.5) / old.width * lm.width));
  }
  S.layer = layer; $("layer").value = layer;
  buildPanels(); drawCurves(); loadNorms(); writeHash();
  document.querySelectorAll(".strip-item").forEach((el) => el.classList.toggle("current", el.dataset.layer === layer));
  if (S.token) requestMaps(true);
  loadCorr();
}

// ---- similarity panels ----
function panelEl(i, cls) {
  const d = document.createElement("div"); d.className = "panelbox";
  const p = document.createElement("div"); p.className = "panel " + cls; p.dataset.image = i;
  const url = imageUrl(i);
  if (url) { const im = document.createElement("img"); im.src = url; im.alt = `image ${i}`; p.appendChild(im); }
  const map = document.createElement("canvas"); map.className = "map"; map.width = 1; map.height = 1;
  const mk = document.createElement("canvas"); mk.className = "marks"; mk.width = 240; mk.height = 240;
  const cap = document.createElement("div"); cap.className = "cap"; cap.textContent = `image ${i} (${runMeta().image_ids[i]})`;
  p.append(map, mk, cap); d.appendChild(p); return [d, p];
}
function tokenAt(ev, el) {
  const lm = layerMeta(), r = el.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) / r.width * lm.width), y = Math.floor((ev.clientY - r.top) / r.height * lm.height);
  return { x: Math.max(0, Math.min(lm.width - 1, x)), y: Math.max(0, Math.min(lm.height - 1, y)) };
}
function buildPanels() {
  const box = $("panels"); box.innerHTML = "";
  for (const i of S.images) {
    const [d, p] = panelEl(i, "sim");
    p.addEventListener("mousemove", (ev) => {
      if (S.pinned) return;
      const t = tokenAt(ev, p);
      if (S.token && S.token.ref === i && S.token.x === t.x && S.token.y === t.y) return;
      S.token = { ref: i, ...t }; S.tClick = performance.now(); requestMaps(false);
    });
    p.addEventListener("click", (ev) => {
      const t = tokenAt(ev, p);
      const same = S.pinned && S.token && S.token.ref === i && S.token.x === t.x && S.token.y === t.y;
      S.pinned = !same; S.token = { ref: i, ...t }; S.tClick = performance.now();
      requestMaps(true);
    });
    box.appendChild(d);
  }
  applyOpacity();
  if (S.maps) S.maps = null;
}
function applyOpacity() {
  const o = $("opacity").value / 100;
  document.querySelectorAll(".panel.sim canvas.map, .panel.norm canvas.map, .panel.corr canvas.map").forEach((c) => (c.style.opacity = o));
}

async function requestMaps(withStrip) {
  if (!S.token) return;
  const req = { model: S.model, run: S.run, layer: S.layer, ref: S.token.ref, y: S.token.y, x: S.token.x,
                images: S.images.join(","), metric: S.metric, mitigation: S.mitigation };
  const key = JSON.stringify(req);
  if (S.inflight) {
    if (key === S.inflightKey) { S.stripAfter = S.stripAfter || withStrip; S.pending = null; return; }  // already asked
    S.pending = [req, withStrip]; return;
  }
  S.inflight = true; S.inflightKey = key; S.stripAfter = withStrip;
  const t0 = S.tClick || performance.now();
  try {
    const res = await api("/api/similarity", req);
    if (res.layer === S.layer) drawMaps(res, t0);
  } catch (e) { status(e.message, true); }
  S.inflight = false; S.inflightKey = null;
  if (S.stripAfter) loadStrip();
  if (S.pending) { const [p, ws] = S.pending; S.pending = null; if (p.layer === S.layer) requestMaps(ws); }
}
function drawMaps(res, t0) {
  S.maps = res; showMitigation(res.mitigation);
  const sc = scaleFor(res.metric, res.maps), lm = layerMeta(res.layer);
  const panels = [...document.querySelectorAll(".panel.sim")];
  for (const m of res.maps) {
    const p = panels.find((el) => +el.dataset.image === m.image); if (!p) continue;
    const data = decode(m.data); m.values = data;
    paint(p.querySelector("canvas.map"), res.width, res.height, data, sc.color);
    const mk = p.querySelector("canvas.marks"), ctx = mk.getContext("2d");
    ctx.clearRect(0, 0, mk.width, mk.height);
    const cw = mk.width / res.width, ch = mk.height / res.height;
    const [ty, tx] = res.token, [by, bx] = m.best;
    ctx.lineWidth = 2;
    ctx.strokeStyle = m.image === res.ref_image ? "#fff" : "rgba(255,255,255,.9)";
    ctx.setLineDash(m.image === res.ref_image ? [] : [4, 3]);
    ctx.strokeRect(tx * cw, ty * ch, cw, ch);   // the clicked token / the same position
    ctx.setLineDash([]); ctx.strokeStyle = "#e53935";
    ctx.beginPath(); ctx.arc((bx + 0.5) * cw, (by + 0.5) * ch, Math.max(4, cw * 0.6), 0, 2 * Math.PI); ctx.stroke();
  }
  drawColorbar(res.metric, sc);
  requestAnimationFrame(() => {
    const total = performance.now() - t0;
    S.timings.push({ server_ms: res._server_ms, fetch_ms: res._fetch_ms, paint_ms: total, layer: res.layer });
    if (S.timings.length > 200) S.timings.shift();
    status(`token (${res.token[0]}, ${res.token[1]}) of image ${res.ref_image} ${lm.height}x${lm.width} · server ${res._server_ms?.toFixed(1)} ms · painted ${total.toFixed(0)} ms${S.pinned ? " · pinned" : ""}`);
    S.seq++;
    writeHash();
  });
}
function drawColorbar(metric, sc) {
  const c = $("colorbar"), ctx = c.getContext("2d"), img = ctx.createImageData(c.width, c.height);
  for (let x = 0; x < c.width; x++) {
    const v = sc.lo + (sc.hi - sc.lo) * x / (c.width - 1), col = sc.color(v);
    for (let y = 0; y < c.height; y++) { const k = 4 * (y * c.width + x); img.data.set([...col, 255], k); }
  }
  ctx.putImageData(img, 0, 0);
  const f = (v) => Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
  $("cb-lo").textContent = f(sc.lo); $("cb-hi").textContent = f(sc.hi); $("cb-mid").textContent = f((sc.lo + sc.hi) / 2);
  $("cb-name").textContent = { cosine: "cosine similarity", centred_cosine: "centred cosine", dot: "dot product",
                              l2: "L2 distance", rel_norm: "|token| / |clicked token|" }[metric];
}

// ---- the layer strip ----
async function loadStrip() {
  if (!S.token) return;
  try {
    const res = await api("/api/strip", { model: S.model, run: S.run, layer: S.layer, ref: S.token.ref, y: S.token.y,
                                          x: S.token.x, image: S.stripImage < 0 ? S.token.ref : S.stripImage,
                                          metric: S.metric });
    S.strip = res; drawStrip(res);
  } catch (e) { status(e.message, true); }
}
function drawStrip(res) {
  const box = $("strip"); box.innerHTML = "";
  $("strip-info").textContent = `token of image ${res.ref_image} on image ${res.image}, ${res.metric}, U-Net order` +
    (S.mitigation !== "none" ? " · features as stored (a mitigation is fitted per layer: see the maps above)" : "");
  for (const l of res.layers) {
    const d = document.createElement("div"); d.className = "strip-item" + (l.layer === S.layer ? " current" : "");
    d.dataset.layer = l.layer; d.title = `${l.index}: ${l.layer} (${l.height}x${l.width})`;
    const c = document.createElement("canvas");
    paint(c, l.width, l.height, decode(l.data), scaleFor(res.metric, [l]).color);
    const ctx = c.getContext("2d"); ctx.strokeStyle = "#e53935"; ctx.lineWidth = Math.max(0.1, l.width / 84);
    ctx.setLineDash(res.image === res.ref_image ? [] : [1, 1]);
    ctx.strokeRect(l.token[1], l.token[0], 1, 1);  // the clicked token (or its position on another image)
    const s = document.createElement("span"); s.textContent = `${l.index} ${l.layer}`;
    d.append(c, s); d.addEventListener("click", () => setLayer(l.layer)); box.appendChild(d);
  }
}

// ---- norm maps and the labeller ----
async function loadNorms() {
  const layer = S.layer;
  try {
    const mitigation = S.mitigation;
    const res = await api("/api/norms", { model: S.model, run: S.run, layer, images: S.images.join(","), mitigation });
    if (res.layer === S.layer && mitigation === S.mitigation) { S.norms = res; showMitigation(res.mitigation); drawNorms(res); }
  } catch (e) { status(e.message, true); }
}
function drawNorms(res) {
  const box = $("norms"); box.innerHTML = "";
  const labelling = res.is_ref_layer && S.run === "baseline";
  $("norm-info").textContent = `${res.layer}, L2 norm over channels / image max` +
    (res.mitigation.name !== "none" ? ` after ${res.mitigation.name} (anomalies detected on the features as stored)` : "") +
    (labelling ? " · click toggles a 2x2 label" : " · labelling happens on the baseline's reference layer") +
    (res.labels_error ? " · labels not shown: " + res.labels_error : "");
  $("to-ref").classList.toggle("active", labelling);
  for (const m of res.maps) {
    const [d, p] = panelEl(m.image, "norm");
    const data = decode(m.data); m.values = data;
    paint(p.querySelector("canvas.map"), res.width, res.height, data, (v) => sequential(v / (m.max || 1)));
    const mk = p.querySelector("canvas.marks"), ctx = mk.getContext("2d");
    const cw = mk.width / res.width, ch = mk.height / res.height;
    const box2 = (b, color, dash) => { ctx.strokeStyle = color; ctx.setLineDash(dash); ctx.lineWidth = 2;
                                        ctx.strokeRect(b[1] * cw + 1, b[0] * ch + 1, b[2] * cw - 2, b[2] * ch - 2); };
    m.paper.forEach((b) => box2(b, "#ff4081", []));
    m.labelled.forEach((b) => box2(b, "#76ff03", []));
    m.detected.forEach((b) => box2(b, "#00e5ff", [3, 3]));
    if (labelling) {
      p.addEventListener("click", async (ev) => {
        const t = tokenAt(ev, p);
        try {
          const r = await api("/api/labels", null, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ model: S.model, image: m.image, x: t.x, y: t.y }) });
          status(`label ${r.action}: image ${r.patch[0]}, x ${r.patch[1]}, y ${r.patch[2]} -> ${r.path} (${r.labels.length} labels)`);
          S.lastLabels = r; loadNorms();
        } catch (e) { status(e.message, true); }
      });
    }
    box.appendChild(d);
  }
  applyOpacity();
}


// ---- mitigations ----
function showMitigation(info) {
  if (!info || info.name !== S.mitigation) return;
  S.mitigationInfo = info;
  const el = $("acts-on");
  el.textContent = (info.active ? "" : "nothing to act on: ") + info.acts_on +
    (info.fit_images ? ` (fitted on ${info.fit_images} fit images)` : "");
  el.title = el.textContent; el.classList.toggle("idle", !info.active);
}
function setMitigation(name) {
  S.mitigation = name; $("mitigation").value = name; writeHash();
  loadNorms(); if (S.token) requestMaps(false); loadCorr();
}

// ---- correspondence on the harm pairs ----
async function loadPairs() {
  const box = $("corr-box"), model = S.model, run = S.run;
  S.pairs = null; S.corr = null; S.corrToken = null; $("corr").innerHTML = "";
  if (!runMeta().harm_pairs) { box.hidden = true; return; }
  let res;
  try { res = await api("/api/pairs", { model, run }); } catch (e) { box.hidden = true; status(e.message, true); return; }
  if (model !== S.model || run !== S.run || !res.pairs.length) return;
  S.pairs = res.pairs; box.hidden = false;
  const keep = S.pairs.find((p) => p.pair === S.pair);
  fillSelect($("pair"), S.pairs.map((p) => [p.pair, `${p.task} #${p.pair}` + (p.source_image ? ` (image ${p.source_image})` : "")]),
             keep ? S.pair : S.pairs[0].pair);
  S.pair = +$("pair").value;
  buildCorr();
}
function corrPanel(file, cls, caption) {
  const d = document.createElement("div"); d.className = "panelbox";
  const p = document.createElement("div"); p.className = "panel corr " + cls;
  const url = fileUrl(file);
  if (url) { const im = document.createElement("img"); im.src = url; im.alt = caption; p.appendChild(im); }
  const map = document.createElement("canvas"); map.className = "map"; map.width = 1; map.height = 1;
  const mk = document.createElement("canvas"); mk.className = "marks"; mk.width = 240; mk.height = 240;
  const cap = document.createElement("div"); cap.className = "cap"; cap.textContent = caption;
  p.append(map, mk, cap); d.appendChild(p); return [d, p];
}
function buildCorr() {
  const box = $("corr"); box.innerHTML = ""; S.corr = null;
  const p = S.pairs && S.pairs.find((q) => q.pair === S.pair); if (!p) return;
  const [d1, src] = corrPanel(p.source_file, "src", `first: ${p.source_file}`);
  const [d2] = corrPanel(p.target_file, "tgt", `second: ${p.target_file}`);
  src.addEventListener("click", (ev) => { S.corrToken = tokenAt(ev, src); loadCorr(); });
  box.append(d1, d2); applyOpacity();
  $("corr-info").textContent = `${p.task} pair ${p.pair}: click a token of the first image`;
  if (S.corrToken) loadCorr();
}
async function loadCorr() {
  if (!S.corrToken || !S.pairs) return;
  const req = { model: S.model, run: S.run, layer: S.layer, pair: S.pair, y: S.corrToken.y, x: S.corrToken.x,
                mitigation: S.mitigation };
  try {
    const res = await api("/api/correspondence", req);
    if (res.layer === S.layer && res.pair === S.pair && req.mitigation === S.mitigation) drawCorr(res);
  } catch (e) { status(e.message, true); }
}
function drawCorr(res) {
  S.corr = res;  // (the header's "acts on" describes the shown images; this pair's is in the caption's tooltip)
  const src = document.querySelector(".panel.corr.src"), tgt = document.querySelector(".panel.corr.tgt");
  if (!src || !tgt) return;
  const cw = 240 / res.width, ch = 240 / res.height, [ty, tx] = res.token, [my, mx] = res.match;
  let ctx = src.querySelector("canvas.marks").getContext("2d");
  ctx.clearRect(0, 0, 240, 240); ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.strokeRect(tx * cw, ty * ch, cw, ch);
  paint(tgt.querySelector("canvas.map"), res.width, res.height, decode(res.data), (v) => diverging(v));
  ctx = tgt.querySelector("canvas.marks").getContext("2d");
  ctx.clearRect(0, 0, 240, 240); ctx.lineWidth = 2;
  if (res.truth) { ctx.strokeStyle = "#76ff03"; ctx.strokeRect(res.truth[1] * cw + 1, res.truth[0] * ch + 1, cw - 2, ch - 2); }
  ctx.strokeStyle = "#e53935";
  ctx.beginPath(); ctx.arc((mx + 0.5) * cw, (my + 0.5) * ch, Math.max(4, cw * 0.6), 0, 2 * Math.PI); ctx.stroke();
  const off = res.truth ? Math.max(Math.abs(my - res.truth[0]), Math.abs(mx - res.truth[1])) : null;
  $("corr-info").textContent = `${res.task} pair ${res.pair}, ${res.layer} (${res.height}x${res.width} grid): token (${ty}, ${tx})` +
    ` -> nearest (${my}, ${mx}), cosine ${res.match_cosine === null ? "n/a" : res.match_cosine.toFixed(3)}` +
    (res.truth ? ` · ground truth (${res.truth[0]}, ${res.truth[1]}), ${off} token(s) off` : ` · ${res.truth_note}`) +
    ` · ${res.mitigation.name}`;
  $("corr-info").title = `${res.mitigation.name} on this pair: ` + (res.mitigation.active ? "" : "nothing to act on: ") + res.mitigation.acts_on;
  S.corrSeq++;
}

// ---- the paper figure's curves ----
async function loadCurves() {
  try { S.curves = await api("/api/curves", { model: S.model, run: S.run }); } catch (e) { S.curves = { available: false, message: e.message }; }
  drawCurves();
}
function drawCurves() {
  const box = $("curves"), c = S.curves; box.innerHTML = "";
  if (!c || !c.available) { box.textContent = c ? c.message : ""; return; }
  $("curves-src").textContent = c.source;
  const names = { acc_8x8: "position probe accuracy (8x8)", corner_ratio: "corner / border similarity", rel_norm_mean: "relative norm of anomalies" };
  const W = 320, H = 120, P = 24, NS = "http://www.w3.org/2000/svg";
  const xs = c.layer_index, x0 = Math.min(...xs), x1 = Math.max(...xs) || 1;
  const X = (i) => P + (W - 2 * P) * (xs[i] - x0) / ((x1 - x0) || 1);
  const cur = c.layers.indexOf(S.layer);
  for (const [key, vals] of Object.entries(c.curves)) {
    const fin = vals.filter((v) => v !== null); if (!fin.length) continue;
    const lo = Math.min(...fin), hi = Math.max(...fin), Y = (v) => H - P + (-(H - 2 * P)) * (v - lo) / ((hi - lo) || 1);
    const d = document.createElement("div"); d.className = "curve";
    d.innerHTML = `<div class="name">${names[key] || key}</div>`;
    const svg = document.createElementNS(NS, "svg"); svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.dataset.curve = key;
    let path = "";
    vals.forEach((v, i) => { if (v !== null) path += (path ? "L" : "M") + X(i).toFixed(1) + "," + Y(v).toFixed(1); });
    svg.innerHTML = `<line x1="${P}" x2="${W - P}" y1="${H - P}" y2="${H - P}" stroke="#999"/>` +
      `<text x="2" y="12" font-size="10">${hi.toPrecision(3)}</text><text x="2" y="${H - P}" font-size="10">${lo.toPrecision(3)}</text>` +
      `<text x="${W / 2}" y="${H - 6}" font-size="10" text-anchor="middle">layer index</text>` +
      (cur >= 0 ? `<line x1="${X(cur)}" x2="${X(cur)}" y1="4" y2="${H - P}" stroke="#e53935"/>` : "") +
      `<path d="${path}" fill="none" stroke="#1565c0" stroke-width="1.5"/>` +
      vals.map((v, i) => v === null ? "" : `<circle cx="${X(i)}" cy="${Y(v)}" r="${i === cur ? 4 : 2}" fill="${i === cur ? "#e53935" : "#1565c0"}"><title>${c.layer_index[i]}: ${c.layers[i]} = ${v.toPrecision(4)}</title></circle>`).join("");
    svg.addEventListener("click", (ev) => {
      const r = svg.getBoundingClientRect(), px = ev.clientX - r.left;
      let best = 0, bd = Infinity;
      xs.forEach((_, i) => { const dd = Math.abs(X(i) - px); if (dd < bd) { bd = dd; best = i; } });
      setLayer(c.layers[best]);
    });
    d.appendChild(svg); box.appendChild(d);
  }
}

// ---- the view in the address (shareable, survives a reload) and the keyboard ----
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1)), out = {};
  for (const k of ["model", "run", "layer", "metric", "images", "token", "mitigation", "pair"]) if (p.get(k)) out[k] = p.get(k);
  return out;
}
function writeHash() {
  if (!S.ready) return;
  const p = { model: S.model, run: S.run, layer: S.layer, metric: S.metric, images: S.images.join(","),
              mitigation: S.mitigation };
  if (S.pairs && S.pair !== null) p.pair = S.pair;
  if (S.token && S.pinned) p.token = `${S.token.ref},${S.token.y},${S.token.x}`;
  history.replaceState(null, "", "#" + new URLSearchParams(p).toString());
}
function onKey(ev) {  // arrow keys move the pinned token
  if (!S.token || !S.pinned || ["INPUT", "SELECT"].includes(document.activeElement.tagName)) return;
  const d = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[ev.key];
  if (!d) return;
  ev.preventDefault();
  const lm = layerMeta();
  S.token = { ref: S.token.ref, y: Math.max(0, Math.min(lm.height - 1, S.token.y + d[0])),
              x: Math.max(0, Math.min(lm.width - 1, S.token.x + d[1])) };
  S.tClick = performance.now(); requestMaps(true);
}

// ---- start ----
async function start() {
  try { S.meta = await api("/api/meta"); } catch (e) { status("cannot load: " + e.message, true); return; }
  const models = Object.keys(S.meta.models);
  if (!models.length) { status("no representation stores in this results directory", true); return; }
  fillSelect($("model"), models.map((m) => [m, m]), models[0]);
  fillSelect($("metric"), S.meta.metrics.map((m) => [m, m.replace("_", " ")]), S.metric);
  fillSelect($("mitigation"), S.meta.mitigations.map((m) => [m, m.replace("_", " ")]), S.mitigation);
  $("mitigation").onchange = (e) => setMitigation(e.target.value);
  $("pair").onchange = (e) => { S.pair = +e.target.value; writeHash(); buildCorr(); };
  $("model").onchange = (e) => setModel(e.target.value);
  $("run").onchange = (e) => setRun(e.target.value);
  $("layer").onchange = (e) => setLayer(e.target.value);
  $("metric").onchange = (e) => { S.metric = e.target.value; writeHash(); if (S.token) requestMaps(true); };
  $("images").onchange = () => {  // only when the selection changed (a blur after typing fires change again)
    const imgs = parseImages($("images").value, runMeta().n_images);
    if (imgs.join(",") !== S.images.join(",")) setRun(S.run);
  };
  $("opacity").oninput = applyOpacity;
  $("strip-image").onchange = (e) => { S.stripImage = +e.target.value; loadStrip(); };
  $("to-ref").onclick = () => { if (S.run !== "baseline") { S.run = "baseline"; $("run").value = "baseline"; setRun("baseline"); } setLayer(runMeta().ref_layer || S.meta.ref_layer); };
  document.addEventListener("keydown", onKey);
  const h = readHash();
  if (h.images) $("images").value = h.images;
  if (h.metric && S.meta.metrics.includes(h.metric)) { S.metric = h.metric; $("metric").value = h.metric; }
  if (h.mitigation && S.meta.mitigations.includes(h.mitigation)) { S.mitigation = h.mitigation; $("mitigation").value = h.mitigation; }
  if (h.pair && /^\d+$/.test(h.pair)) S.pair = +h.pair;
  if (h.run) S.run = h.run;
  if (h.layer) S.layer = h.layer;
  const model = models.includes(h.model) ? h.model : models[0];
  $("model").value = model;
  setModel(model);
  const tok = (h.token || "").split(",").map(Number);
  if (tok.length === 3 && tok.every(Number.isInteger) && S.images.includes(tok[0])) {
    const lm = layerMeta();
    if (tok[1] < lm.height && tok[2] < lm.width) {
      S.token = { ref: tok[0], y: tok[1], x: tok[2] }; S.pinned = true; requestMaps(true);
    }
  }
  S.ready = true;
  status(S.meta.problems.length ? "left out: " + S.meta.problems.join("; ") : "ready: hover over an image",
         S.meta.problems.length > 0);
}
start();
