/* fxdiff HTML report: plain JavaScript, no dependencies, works from file://.
 *
 * Reads the JSON in <script id="fxdiff-data"> (written by fxdiff/render/html.py) and wires up
 * the summary, the graph (pan, zoom, click for details), the error-vs-depth chart and the tables.
 */
(function () {
  "use strict";

  const D = JSON.parse(document.getElementById("fxdiff-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------- data
  const num = (x) => (typeof x === "string" ? (x === "inf" ? Infinity : x === "-inf" ? -Infinity : NaN) : x);
  function metrics(a) {
    if (!a) return null;
    return {
      passed: !!a[0], max_abs: num(a[1]), max_rel: num(a[2]), mean_abs: num(a[3]),
      cosine: a[4] === null ? null : num(a[4]), ref_rms: num(a[5]), mismatched: a[6], numel: a[7],
      note: a[8] || "", hist: a[9] || [],
      measures: Object.fromEntries(Object.entries(a[10]).map(([k, v]) => [k, num(v)])),
    };
  }
  const rows = D.rows.map((r, i) => ({
    i, ref: r[0], cand: r[1], refMod: r[2], candMod: r[3], op: r[4], refShape: r[5], candShape: r[6],
    forward: metrics(r[7]), backward: metrics(r[8]), why: r[9], conf: r[10], depth: r[11],
    firstF: !!r[12], firstB: !!r[13], refSlice: r[14], candSlice: r[15],
    isolation: { forward: r[16] || [null, null], backward: r[17] || [null, null] },
  }));
  const items = D.items.map((a, i) => ({
    i, ref: a[0], cand: a[1], side: a[2], module: a[3], op: a[4], refShape: a[5], candShape: a[6],
    rows: a[7], candMod: a[8],
  }));
  const units = D.units.map((a, i) => ({ i, id: a[0], kind: a[1], path: a[2], modules: a[3], items: a[4] }));
  const itemOfRow = new Array(rows.length).fill(-1);
  items.forEach((it) => it.rows.forEach((r) => { itemOfRow[r] = it.i; }));
  const unitOfItem = new Array(items.length).fill(-1);
  units.forEach((u) => u.items.forEach((i) => { unitOfItem[i] = u.i; }));
  const unitById = new Map(units.map((u) => [u.id, u]));
  const PREFIX = { forward: "f", backward: "b" };
  const DIRS = ["forward", "backward"];

  // the measures are computed in Python (fxdiff/render/scale.py METRICS) and read here by name
  function measure(m, key) {
    if (!m) return null;
    const v = m.measures[key];
    return Number.isNaN(v) ? Infinity : v;
  }
  const RANK = { none: 0, clean: 1, diverged: 2, first: 3 };
  function rowStatus(r, d) {
    const m = r[d];
    if (!m) return "none";
    if (m.passed) return "clean";
    return (d === "forward" ? r.firstF : r.firstB) ? "first" : "diverged";
  }
  function itemStatus(it, d) {
    if (it.side !== "pair") return it.side;
    let best = "none";
    for (const k of it.rows) { const s = rowStatus(rows[k], d); if (RANK[s] > RANK[best]) best = s; }
    return best;
  }
  function itemMeasure(it, d, key) {
    let worst = null;
    for (const k of it.rows) {
      const v = measure(rows[k][d], key);
      if (v !== null && (worst === null || v > worst)) worst = v;
    }
    return worst;
  }

  // ---------------------------------------------------------------- formatting
  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, (c) => (
      { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    if (x === Infinity) return "inf";
    if (x === -Infinity) return "-inf";
    if (Number.isNaN(x)) return "nan";
    const a = Math.abs(x);
    if (a >= 1e-3 && a < 1e5) return String(Number(x.toPrecision(3)));
    return x.toExponential(2).replace("e+", "e");
  }
  const shape = (s) => (s === null || s === undefined ? "–" : s.length ? s.join("×") : "scalar");
  const STATUS_TEXT = {
    none: "not compared", clean: "clean", diverged: "differs", first: "introduced here",
    ref_only: "ref only", cand_only: "cand only", unmatched: "unmatched",
  };
  const badge = (s) => `<span class="badge ${esc(s)}">${esc(STATUS_TEXT[s] || s)}</span>`;
  function verdict(m) {
    if (!m) return '<span class="muted">–</span>';
    return m.passed ? '<span class="ok">ok</span>' : '<span class="diff">DIFF</span>';
  }
  const $ = (sel, root) => (root || document).querySelector(sel);
  function el(tag, attrs, html) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (html !== undefined) e.innerHTML = html;
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  // ---------------------------------------------------------------- header and summary
  function renderHeader() {
    const v = $("#verdict");
    v.textContent = D.verdict === "diverged" ? "DIVERGED" : "MATCH";
    v.classList.add(D.verdict);
    const side = (name, m) => {
      const extra = [m.model_class, m.dtype, m.device, m.mode].filter(Boolean).join(", ");
      return `<span>${name} <b class="mono">${esc(m.label || name)}</b>${extra ? ` <span>(${esc(extra)})</span>` : ""}</span>`;
    };
    $("#sides").innerHTML = side("ref", D.ref) + side("cand", D.cand) +
      `<span>tolerance <b>atol ${esc(D.tolerance.atol)}, rtol ${esc(D.tolerance.rtol)}</b></span>`;
    const s = D.summary, n = s.nodes, p = s.param_grads;
    const pct = (x) => `${(100 * x).toFixed(1)}%`;
    const cards = [
      ["forward outputs", s.forward_output_match ? "match" : "differ", s.forward_output_match],
      ["node values", `${n.forward_matches} ok · ${n.forward_mismatches} differ`, n.forward_mismatches === 0, pct(n.forward_match_rate)],
      ["node gradients", `${n.backward_matches} ok · ${n.backward_mismatches} differ`, n.backward_mismatches === 0, pct(n.backward_match_rate)],
      ["parameter gradients", `${p.matched} ok · ${p.mismatched} differ`, p.mismatched === 0, pct(p.match_rate)],
      ["matched pairs", String(n.pairs), true],
      ["unmatched nodes", `${n.unmatched_ref} ref · ${n.unmatched_cand} cand`, null],
    ];
    $("#summary").innerHTML = cards.map(([k, v, good, sub]) =>
      `<div class="card ${good === true ? "good" : good === false ? "bad" : ""}"><div class="k">${esc(k)}</div>` +
      `<div class="v">${esc(v)}</div>${sub ? `<div class="k">${esc(sub)} match</div>` : ""}</div>`).join("");
    const parts = [];
    for (const d of DIRS) {
      const firsts = rows.filter((r) => (d === "forward" ? r.firstF : r.firstB));
      if (d === "backward") firsts.reverse();  // gradients flow from the output: the last op first
      if (!firsts.length) { parts.push(`<li><b>${d}</b>: none</li>`); continue; }
      const shown = firsts.slice(0, 8).map((r) =>
        `<a class="go" data-row="${r.i}" data-dir="${d}">${esc(r.refMod || "<root>")} · ${esc(r.op)} (${esc(r.ref)})</a>` +
        ` <span class="muted">${esc(MEASURES_LABEL("max_abs"))} ${fmt(r[d].max_abs)}</span>`);
      const more = firsts.length > 8 ? ` <span class="muted">and ${firsts.length - 8} more (table filter “introduced here”)</span>` : "";
      parts.push(`<li><b>${d}</b>: ${shown.join("; ")}${more}</li>`);
    }
    $("#first").innerHTML = `<h2>First divergence</h2><ul>${parts.join("")}</ul>`;
    $("#first").addEventListener("click", (e) => {
      const a = e.target.closest("a.go");
      if (a) selectRow(+a.dataset.row, { direction: a.dataset.dir, center: true });
    });
    $("#footer").innerHTML = `fxdiff ${esc(D.fxdiff)} · ${rows.length} matched pairs, ${items.length} nodes in the drawing, ` +
      `${units.length} boxes · colours: ${esc(D.metrics[D.metric])} (log scale)`;
  }
  const MEASURES_LABEL = (k) => ({ max_abs: "max abs", max_rel: "max rel", mean_abs: "mean abs",
    rel_mean: "mean rel", cosine: "1-cos", mismatch: "mismatch" }[k] || k);

  // ---------------------------------------------------------------- pan and zoom
  class PanZoom {
    constructor(viewport) {
      this.vp = viewport;
      this.svg = viewport.querySelector("svg");
      const vb = this.svg.viewBox.baseVal;
      this.w = vb && vb.width ? vb.width : this.svg.getBBox().width;
      this.h = vb && vb.height ? vb.height : this.svg.getBBox().height;
      this.svg.setAttribute("width", this.w);
      this.svg.setAttribute("height", this.h);
      this.k = 1; this.x = 0; this.y = 0; this.fitted = false;
      this.dragged = false;
      viewport.addEventListener("wheel", (e) => {
        e.preventDefault();
        const r = this.vp.getBoundingClientRect();
        this.zoomAt(Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)), e.clientX - r.left, e.clientY - r.top);
      }, { passive: false });
      let start = null;
      viewport.addEventListener("pointerdown", (e) => {
        if (e.button !== 0) return;
        start = { px: e.clientX, py: e.clientY, x: this.x, y: this.y };
        this.dragged = false;
      });
      window.addEventListener("pointermove", (e) => {
        if (!start) return;
        const dx = e.clientX - start.px, dy = e.clientY - start.py;
        if (!this.dragged && Math.hypot(dx, dy) < 4) return;
        this.dragged = true;
        this.vp.classList.add("dragging");
        this.x = start.x + dx; this.y = start.y + dy; this.apply();
      });
      window.addEventListener("pointerup", () => {
        start = null;
        this.vp.classList.remove("dragging");
      });
    }
    apply() { this.svg.style.transform = `translate(${this.x}px, ${this.y}px) scale(${this.k})`; }
    size() { const r = this.vp.getBoundingClientRect(); return [r.width || 800, r.height || 600]; }
    fit() {
      const [W, H] = this.size();
      this.k = Math.min(W / this.w, H / this.h, 1.5) * 0.97;
      this.x = (W - this.w * this.k) / 2; this.y = Math.max(4, (H - this.h * this.k) / 2);
      this.fitted = true; this.apply();
    }
    fitWidth() {
      const [W] = this.size();
      this.k = Math.min(W / this.w, 1) * 0.97;
      this.x = (W - this.w * this.k) / 2; this.y = 8;
      this.fitted = true; this.apply();
    }
    zoomAt(f, cx, cy) {
      const k = Math.min(8, Math.max(0.02, this.k * f));
      this.x = cx - (cx - this.x) * (k / this.k); this.y = cy - (cy - this.y) * (k / this.k);
      this.k = k; this.apply();
    }
    zoom(f) { const [W, H] = this.size(); this.zoomAt(f, W / 2, H / 2); }
    centerOn(node, minScale) {
      if (!node) return;
      if (!this.fitted) this.fit();
      if (minScale && this.k < minScale) this.k = minScale;
      this.apply();
      const s = this.svg.getBoundingClientRect(), r = node.getBoundingClientRect();
      const ux = (r.left + r.width / 2 - s.left) / this.k, uy = (r.top + r.height / 2 - s.top) / this.k;
      const [W, H] = this.size();
      this.x = W / 2 - ux * this.k; this.y = H / 2 - uy * this.k; this.apply();
    }
  }

  // ---------------------------------------------------------------- graph
  const panzoom = {};
  let current = null;
  let selectedUnit = null;
  const viewports = Array.from(document.querySelectorAll(".viewport"));
  const unitEl = (u, d) => document.getElementById(`${PREFIX[d || current]}_${units[u].id}`);

  function setupGraph() {
    const tabs = $("#tabs");
    for (const vp of viewports) {
      const d = vp.dataset.direction;
      panzoom[d] = new PanZoom(vp);
      const b = el("button", { type: "button", role: "tab", "data-direction": d }, d === "forward" ? "forward values" : "backward gradients");
      b.addEventListener("click", () => showDirection(d));
      tabs.appendChild(b);
      vp.addEventListener("click", (e) => {
        if (panzoom[d].dragged) return;
        const g = e.target.closest("g.unit");
        if (!g) return;
        const u = unitById.get(g.id.slice(2));
        if (u) selectUnit(u.i, { center: false });
      });
    }
    document.querySelectorAll("[data-zoom]").forEach((b) => b.addEventListener("click", () => {
      const pz = panzoom[current];
      if (b.dataset.zoom === "in") pz.zoom(1.25); else if (b.dataset.zoom === "out") pz.zoom(0.8); else pz.fit();
    }));
    $("#goto-first").addEventListener("click", () => gotoFirst(false));
    const find = $("#find");
    let found = [], foundAt = 0;
    find.addEventListener("input", () => { found = findUnits(find.value); foundAt = 0; markFound(found); });
    find.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || !found.length) return;
      selectUnit(found[foundAt % found.length], { center: true });
      foundAt += 1;
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.closest("input, select, textarea")) return;
      const pz = panzoom[current];
      if (!pz) return;
      if (e.key === "+" || e.key === "=") pz.zoom(1.25);
      else if (e.key === "-") pz.zoom(0.8);
      else if (e.key === "0") pz.fit();
      else if (e.key === "f") gotoFirst(false);
    });
    if (viewports.length) showDirection(viewports[0].dataset.direction);
  }

  function showDirection(d) {
    if (!panzoom[d]) return;
    current = d;
    viewports.forEach((vp) => { vp.hidden = vp.dataset.direction !== d; });
    document.querySelectorAll("#tabs button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.direction === d)));
    if (!panzoom[d].fitted) {
      panzoom[d].fitWidth();   // the top of the graph, readable; then the divergence if there is one
      gotoFirst(true);
    }
  }

  function findUnits(term) {
    term = term.trim().toLowerCase();
    if (!term) return [];
    const hits = new Set();
    for (const it of items) {
      if ([it.ref, it.cand, it.module, it.candMod, it.op].some((s) => s && s.toLowerCase().includes(term))) hits.add(unitOfItem[it.i]);
    }
    return Array.from(hits).filter((u) => u >= 0).sort((a, b) => a - b);
  }
  function markFound(list) {
    document.querySelectorAll("g.unit.found").forEach((g) => g.classList.remove("found"));
    for (const u of list.slice(0, 2000)) for (const d of D.directions) { const g = unitEl(u, d); if (g) g.classList.add("found"); }
  }

  function gotoFirst(quiet) {
    // centre on the first divergence of the shown direction at a readable zoom
    const d = current || "forward";
    const firsts = rows.filter((r) => (d === "forward" ? r.firstF : r.firstB));
    if (d === "backward") firsts.reverse();
    if (!firsts.length) return;
    if (quiet === true) {
      const u = unitOfItem[itemOfRow[firsts[0].i]];
      if (u >= 0) panzoom[d].centerOn(unitEl(u, d), 0.9);
    } else {
      selectRow(firsts[0].i, { direction: d, center: true });
    }
  }

  function highlight(u) {
    document.querySelectorAll("g.unit.selected").forEach((g) => g.classList.remove("selected"));
    selectedUnit = u;
    if (u === null || u < 0) return;
    for (const d of D.directions) { const g = unitEl(u, d); if (g) g.classList.add("selected"); }
  }

  function selectUnit(u, opts) {
    highlight(u);
    const unit = units[u];
    if (unit.kind === "node") showItem(unit.items[0]); else showUnit(u);
    if (opts && opts.center && panzoom[current]) panzoom[current].centerOn(unitEl(u), 0.9);
  }

  function selectRow(r, opts) {
    opts = opts || {};
    if (opts.direction && panzoom[opts.direction]) showDirection(opts.direction);
    const it = itemOfRow[r];
    if (it < 0) return;
    selectItem(it, r, opts);
  }
  function selectItem(it, r, opts) {
    const u = unitOfItem[it];
    highlight(u);
    showItem(it, r);
    if (opts && opts.center && panzoom[current] && u >= 0) panzoom[current].centerOn(unitEl(u), 0.9);
    if (opts && opts.scroll) $("#graph-area").scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  // ---------------------------------------------------------------- details panel
  const details = $("#details");
  function histSVG(h, title, markAtol) {
    if (!h || !h.length) return "";
    const edges = D.hist_edges;
    const labels = ["0", "<" + expLabel(edges[1])];
    for (let k = 1; k < edges.length; k++) labels.push(expLabel(edges[k]));
    while (labels.length < h.length) labels.push("inf");
    const W = 340, H = 86, top = 14, bottom = 22, bw = W / h.length;
    const max = Math.max(1, ...h);
    const atol = D.tolerance.atol;
    let s = `<svg class="hist" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img"><text x="0" y="10">${esc(title)} (element count, log)</text>`;
    h.forEach((c, k) => {
      const hh = c ? Math.max(1.5, (H - top - bottom) * Math.log10(1 + c) / Math.log10(1 + max)) : 0;
      const fill = k === 0 ? "#7cb36f" : "#6f8fb8";
      s += `<rect x="${(k * bw + 1).toFixed(1)}" y="${(H - bottom - hh).toFixed(1)}" width="${(bw - 2).toFixed(1)}" height="${hh.toFixed(1)}" fill="${fill}"><title>|diff| ${esc(labels[k])}${k > 1 && k < labels.length - 1 ? " .. " + esc(labels[k + 1]) : ""}: ${c} elements</title></rect>`;
      if (k % 2 === 0) s += `<text x="${(k * bw + bw / 2).toFixed(1)}" y="${H - 8}" text-anchor="middle">${esc(labels[k])}</text>`;
    });
    if (markAtol && atol > 0) {   // where |diff| = atol falls: elements right of it fail unless rtol*|ref| covers them
      const k = edges.findIndex((e) => e > atol);
      if (k > 1) {
        const xa = (k + Math.log10(atol / edges[k - 1])) * bw;
        s += `<line x1="${xa.toFixed(1)}" x2="${xa.toFixed(1)}" y1="${top - 2}" y2="${H - bottom}" stroke="#b00020" stroke-dasharray="3 2"/>` +
          `<text x="${(xa + 2).toFixed(1)}" y="${top + 6}" fill="#b00020">atol</text>`;
      }
    }
    return s + `<line x1="0" x2="${W}" y1="${H - bottom}" y2="${H - bottom}" stroke="#bbb"/></svg>`;
  }
  function expLabel(x) { return x === 0 ? "0" : "1e" + Math.round(Math.log10(x)); }

  function metricsTable(r) {
    const f = r.forward, b = r.backward;
    const line = (name, get, fmtf) => `<tr><th>${name}</th><td>${f ? fmtf(get(f)) : "–"}</td><td>${b ? fmtf(get(b)) : "–"}</td></tr>`;
    const n = (x) => fmt(x);
    return `<table><tr><th></th><th>forward</th><th>backward</th></tr>` +
      `<tr><th>status</th><td>${badge(rowStatus(r, "forward"))}</td><td>${badge(rowStatus(r, "backward"))}</td></tr>` +
      line("max abs diff", (m) => m.max_abs, n) + line("max rel diff", (m) => m.max_rel, n) +
      line("mean abs diff", (m) => m.mean_abs, n) +
      line("cosine", (m) => m.cosine, (x) => (x === null ? "–" : x.toFixed(6))) +
      line("ref rms", (m) => m.ref_rms, n) +
      line("outside tol.", (m) => m, (m) => `${m.mismatched} / ${m.numel}`) +
      (f && f.note || b && b.note ? line("note", (m) => m.note, esc) : "") + "</table>";
  }

  // what replaying the candidate's ops alone on the reference's values says of a first divergence
  const ISOLATION = {
    forward: {
      introduced: "<b>introduced here</b>: the candidate's ops, replayed alone on the reference's inputs, already differ",
      amplified: "<b>amplified here</b>: replayed alone on the reference's inputs the candidate agrees; differences within the noise upstream grew here",
    },
    backward: {
      "custom backward": "<b>custom backward</b>: the candidate's ops, differentiated back from the reference's gradients, agree with the reference; its own backward is not their derivative",
      introduced: "<b>introduced here</b>: the candidate's ops, differentiated back from the reference's gradients, already differ",
    },
  };
  function isolationText(r, d) {
    const [cause, why] = r.isolation[d];
    if (cause) return ISOLATION[d][cause] || esc(cause);
    return why ? `<b>not replayed in isolation</b>: ${esc(why)}` : null;
  }

  function showItem(i, focusRow) {
    const it = items[i];
    const u = unitOfItem[i];
    const unit = u >= 0 ? units[u] : null;
    let html = `<h3>${esc(it.op)} <span class="muted mono">${esc(it.ref || it.cand)}</span></h3>`;
    html += D.directions.map((d) => `${badge(itemStatus(it, d))}<span class="muted">${d}</span> `).join(" ");
    const rr = it.rows.length ? rows[it.rows.includes(focusRow) ? focusRow : it.rows[0]] : null;
    html += `<table><tr><th></th><th>ref</th><th>cand</th></tr>` +
      `<tr><th>node</th><td class="mono">${esc(it.ref || "–")}</td><td class="mono">${esc(rr ? rr.cand : it.cand || "–")}</td></tr>` +
      `<tr><th>module</th><td class="mono">${esc(it.side === "cand_only" ? "–" : it.module || "<root>")}</td>` +
      `<td class="mono">${esc(it.side === "ref_only" ? "–" : (rr ? rr.candMod : it.candMod) || "<root>")}</td></tr>` +
      `<tr><th>shape</th><td>${esc(it.side === "cand_only" ? "–" : shape(it.refShape))}</td>` +
      `<td>${esc(it.side === "ref_only" ? "–" : shape(rr ? rr.candShape : it.candShape))}</td></tr>`;
    if (rr && (rr.refSlice || rr.candSlice)) {
      html += `<tr><th>slice</th><td>${esc(rr.refSlice ? "[…, " + rr.refSlice.join(":") + "]" : "all")}</td>` +
        `<td>${esc(rr.candSlice ? "[…, " + rr.candSlice.join(":") + "]" : "all")}</td></tr>`;
    }
    html += "</table>";
    if (it.side !== "pair") {
      html += `<p>This node exists on the <b>${it.side === "ref_only" ? "reference" : "candidate"}</b> side only: ` +
        "the matcher found no counterpart for it.</p>";
    } else if (!it.rows.length) {
      html += "<p class=\"muted\">Matched, but not compared (no value was recorded for it).</p>";
    }
    for (const k of it.rows) {
      const r = rows[k];
      if (it.rows.length > 1) html += `<p><b>pair with</b> <span class="mono">${esc(r.cand)}</span></p>`;
      html += `<div class="metrics">${metricsTable(r)}</div>`;
      for (const d of DIRS) {
        const text = (d === "forward" ? r.firstF : r.firstB) ? isolationText(r, d) : null;
        if (text) html += `<p>${d} first divergence: ${text}</p>`;
      }
      if (r.forward) html += histSVG(r.forward.hist, "forward |cand − ref|", true);
      if (r.backward) html += histSVG(r.backward.hist, "backward |cand − ref|", false);
      html += `<p class="muted">matched by ${esc(r.why)} (confidence ${Number(r.conf).toFixed(2)}) · position ${r.depth} in the reference graph</p>`;
    }
    if (unit && unit.kind !== "node") {
      html += `<p>Drawn inside the ${unit.kind === "fold" ? "folded blocks" : unit.kind === "run" ? "merged run" : "collapsed module"} ` +
        `<a class="link" data-unit="${unit.i}">${esc(unitTitle(unit))}</a>.</p>`;
    }
    details.innerHTML = html;
    details.dataset.item = String(i);
    details.scrollTop = 0;
  }

  function unitTitle(unit) {
    if (unit.kind === "fold") return `${unit.modules[0]} .. ${unit.modules[unit.modules.length - 1]}`;
    if (unit.kind === "run") return `${unit.items.length} consecutive ops in ${unit.path || "<root>"}`;
    return unit.path || "<root>";
  }

  function showUnit(u) {
    const unit = units[u];
    const d = current || "forward";
    const cls = unit.kind === "run" ? "" : D.classes[unit.kind === "fold" ? unit.modules[0] : unit.path];
    let html = `<h3>${esc(unitTitle(unit))}</h3><p class="muted">${esc(cls || "")} · ` +
      (unit.kind === "fold" ? `${unit.modules.length} identical blocks folded into one box`
        : unit.kind === "run" ? "ops merged into one box to keep the drawing small" : "collapsed module") +
      ` · ${unit.items.length} nodes</p>`;
    for (const dd of D.directions) {
      const counts = {};
      unit.items.forEach((i) => { const s = itemStatus(items[i], dd); counts[s] = (counts[s] || 0) + 1; });
      html += `<p><b>${dd}</b>: ` + Object.entries(counts).sort((a, b) => b[1] - a[1])
        .map(([s, c]) => `${c} ${badge(s)}`).join(" ") + "</p>";
    }
    const members = unit.items.slice().sort((a, b) => {
      const sa = RANK[itemStatus(items[a], d)] || 0, sb = RANK[itemStatus(items[b], d)] || 0;
      if (sa !== sb) return sb - sa;
      return (itemMeasure(items[b], d, D.metric) || 0) - (itemMeasure(items[a], d, D.metric) || 0);
    });
    html += `<p class="muted">nodes inside, worst ${d} first (click for details):</p><ul class="members">` +
      members.slice(0, 300).map((i) => {
        const it = items[i], s = itemStatus(it, d), v = itemMeasure(it, d, D.metric);
        return `<li data-item="${i}">${badge(s)} <b>${esc(it.op)}</b> <span class="mono">${esc(it.ref || it.cand)}</span>` +
          ` <span class="muted">${esc(it.module)}</span>${v !== null && s !== "clean" ? " · " + fmt(v) : ""}</li>`;
      }).join("") + (members.length > 300 ? `<li class="muted">… ${members.length - 300} more</li>` : "") + "</ul>";
    details.innerHTML = html;
    details.scrollTop = 0;
  }

  details.addEventListener("click", (e) => {
    const li = e.target.closest("[data-item]");
    if (li) { showItem(+li.dataset.item); return; }
    const a = e.target.closest("[data-unit]");
    if (a) selectUnit(+a.dataset.unit, { center: true });
  });

  // ---------------------------------------------------------------- chart: error vs depth
  let chartMetric = D.metric;
  function renderChart() {
    const box = $("#chart");
    box.innerHTML = "";
    const W = Math.max(420, box.clientWidth || 900), H = 280;
    const L = 58, Rm = 14, T = 20, B = 36;
    const pts = [];
    for (const r of rows) {
      for (const d of D.directions) {
        const v = measure(r[d], chartMetric);
        if (v === null) continue;
        pts.push({ r, d, v, bad: !r[d].passed });
      }
    }
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    box.appendChild(svg);
    if (!pts.length) {
      const t = svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }); t.textContent = "nothing was compared";
      svg.appendChild(t); return;
    }
    const finite = pts.map((p) => p.v).filter((v) => v > 0 && v < Infinity);
    let lo = finite.length ? Math.floor(Math.log10(Math.min(...finite))) : -8;
    let hi = finite.length ? Math.ceil(Math.log10(Math.max(...finite))) : 0;
    if (hi <= lo) hi = lo + 1;
    const maxDepth = Math.max(1, ...rows.map((r) => r.depth));
    const x = (dep) => L + (W - L - Rm) * dep / maxDepth;
    const yInf = T, yZero = H - B, top = T + 14, bot = H - B - 14;
    const y = (v) => (v === 0 ? yZero : v === Infinity ? yInf : bot - (bot - top) * (Math.log10(v) - lo) / (hi - lo));
    const axis = svgEl("g", { class: "axis" });
    svg.appendChild(axis);
    const step = Math.max(1, Math.ceil((hi - lo) / 8));
    for (let k = lo; k <= hi; k += step) {
      axis.appendChild(svgEl("line", { class: "grid", x1: L, x2: W - Rm, y1: y(10 ** k), y2: y(10 ** k) }));
      const t = svgEl("text", { x: L - 6, y: y(10 ** k) + 4, "text-anchor": "end" }); t.textContent = `1e${k}`; axis.appendChild(t);
    }
    for (const [v, label] of [[0, "0"], [Infinity, "inf"]]) {
      const t = svgEl("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }); t.textContent = label; axis.appendChild(t);
    }
    if (D.tolerance.atol > 0 && chartMetric === "max_abs") {
      const ya = y(D.tolerance.atol);
      if (ya > top && ya < bot) {
        axis.appendChild(svgEl("line", { x1: L, x2: W - Rm, y1: ya, y2: ya, stroke: "#2e7d32", "stroke-dasharray": "5 4" }));
        const t = svgEl("text", { x: W - Rm, y: ya - 3, "text-anchor": "end" }); t.textContent = "atol"; axis.appendChild(t);
      }
    }
    const xl = svgEl("text", { x: (L + W - Rm) / 2, y: H - 6, "text-anchor": "middle" });
    xl.textContent = "position in the reference graph (topological order) →"; axis.appendChild(xl);
    for (const r of rows) {
      for (const [d, flag, color, dash] of [["forward", r.firstF, "var(--fwd)", ""], ["backward", r.firstB, "var(--bwd)", "4 3"]]) {
        if (!flag || !D.directions.includes(d)) continue;
        axis.appendChild(svgEl("line", { x1: x(r.depth), x2: x(r.depth), y1: T, y2: H - B, stroke: color, "stroke-dasharray": dash, "stroke-width": 1, opacity: 0.6 }));
      }
    }
    const g = svgEl("g", {});
    svg.appendChild(g);
    const frag = document.createDocumentFragment();
    for (const p of pts) {
      const color = p.d === "forward" ? "#1f6fd1" : "#e07b00";
      const c = svgEl("circle", {
        cx: x(p.r.depth).toFixed(1), cy: y(p.v).toFixed(1), r: p.bad ? 3.2 : 2.4,
        fill: p.bad ? color : "#fff", stroke: color, "stroke-width": 1.1, "data-row": p.r.i, "data-dir": p.d,
      });
      const t = svgEl("title", {});
      t.textContent = `${p.d} · ${p.r.refMod || "<root>"} · ${p.r.op} (${p.r.ref}) · ${fmt(p.v)}${p.bad ? " · outside tolerance" : ""}`;
      c.appendChild(t);
      frag.appendChild(c);
    }
    g.appendChild(frag);
    svg.addEventListener("click", (e) => {
      const c = e.target.closest("circle[data-row]");
      if (c) selectRow(+c.dataset.row, { direction: c.dataset.dir, center: true, scroll: true });
    });
  }
  function setupChart() {
    const sel = $("#chart-metric");
    for (const [k, label] of Object.entries(D.metrics)) {
      const o = el("option", { value: k }, esc(label));
      if (k === chartMetric) o.selected = true;
      sel.appendChild(o);
    }
    sel.addEventListener("change", () => { chartMetric = sel.value; renderChart(); });
    renderChart();
    let timer = null;
    window.addEventListener("resize", () => { clearTimeout(timer); timer = setTimeout(renderChart, 150); });
  }

  // ---------------------------------------------------------------- tables
  const PAGE = 300;
  function makeTable(host, spec) {
    // spec: {columns: [{label, get, html?, num?}], data, filters: [[label, fn]], search: fn(row)->string,
    //        sort: [col, dir], onClick(row), rowClass(row)}
    const bar = el("div", { class: "tablebar" });
    const search = el("input", { type: "search", placeholder: "filter…", "aria-label": "filter rows" });
    bar.appendChild(search);
    let select = null;
    if (spec.filters) {
      select = el("select", { "aria-label": "which rows" });
      spec.filters.forEach(([label], k) => select.appendChild(el("option", { value: k }, esc(label))));
      bar.appendChild(select);
    }
    const count = el("span", { class: "muted" });
    bar.appendChild(count);
    const wrap = el("div", { class: "tablewrap" });
    const table = el("table", { class: "data" });
    const thead = el("thead"), tbody = el("tbody");
    table.append(thead, tbody);
    wrap.appendChild(table);
    const more = el("button", { type: "button", class: "more" }, "show more");
    host.append(bar, wrap, more);
    let [sortCol, sortDir] = spec.sort || [0, 1];
    let limit = PAGE;
    let shown = [];
    const tr = el("tr");
    spec.columns.forEach((c, k) => {
      const th = el("th", { title: c.title || "sort" }, esc(c.label));
      th.addEventListener("click", () => {
        if (sortCol === k) sortDir = -sortDir; else { sortCol = k; sortDir = c.num ? -1 : 1; }
        limit = PAGE; render();
      });
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    const cmp = (a, b) => {
      if (a === b) return 0;
      if (a === null || a === undefined || (typeof a === "number" && Number.isNaN(a))) return 1;
      if (b === null || b === undefined || (typeof b === "number" && Number.isNaN(b))) return -1;
      if (typeof a === "number" && typeof b === "number") return (a - b || 0) * sortDir || (a < b ? -sortDir : sortDir);
      return String(a).localeCompare(String(b), undefined, { numeric: true }) * sortDir;
    };
    function render() {
      const terms = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      const f = select ? spec.filters[+select.value][1] : () => true;
      const get = spec.columns[sortCol].get;
      shown = spec.data.filter((r) => f(r) && (!terms.length || terms.every((t) => spec.search(r).toLowerCase().includes(t))));
      shown.sort((a, b) => cmp(get(a), get(b)));
      thead.querySelectorAll("th").forEach((th, k) => {
        th.className = k === sortCol ? (sortDir > 0 ? "sorted-asc" : "sorted-desc") : "";
      });
      const out = [];
      for (const r of shown.slice(0, limit)) {
        const cls = (spec.rowClass ? spec.rowClass(r) : "") + (spec.onClick ? " clickable" : "");
        out.push(`<tr class="${cls}" data-k="${r.__k}">` + spec.columns.map((c) => {
          const v = c.html ? c.html(r) : esc(c.num ? fmt(c.get(r)) : c.get(r));
          return `<td class="${c.num ? "num" : ""}${c.mono ? " mono" : ""}">${v}</td>`;
        }).join("") + "</tr>");
      }
      tbody.innerHTML = out.join("");
      count.textContent = `${Math.min(limit, shown.length)} of ${shown.length} shown` +
        (shown.length !== spec.data.length ? ` (${spec.data.length} in all)` : "");
      more.hidden = shown.length <= limit;
    }
    spec.data.forEach((r, k) => { r.__k = k; });
    tbody.addEventListener("click", (e) => {
      const row = e.target.closest("tr[data-k]");
      if (row && spec.onClick) spec.onClick(spec.data[+row.dataset.k]);
    });
    search.addEventListener("input", () => { limit = PAGE; render(); });
    if (select) select.addEventListener("change", () => { limit = PAGE; render(); });
    more.addEventListener("click", () => { limit += PAGE; render(); });
    render();
    return { render, setFilter(k) { if (select) { select.value = String(k); limit = PAGE; render(); } } };
  }

  const M = (d, f) => (r) => (r[d] ? f(r[d]) : null);
  const statusCell = (d) => (r) => badge(rowStatus(r, d));
  const statusSort = (d) => (r) => RANK[rowStatus(r, d)];

  function setupTables() {
    const host = $("#tables"), tabs = $("#table-tabs");
    const nodeRows = rows.map((r) => Object.assign({}, r, { __row: r.i }));
    const firstEither = (r) => r.firstF || r.firstB;
    const differ = (r, d) => r[d] && !r[d].passed;
    const specs = [
      ["Nodes", nodeRows.length, (h) => makeTable(h, {
        data: nodeRows,
        columns: [
          { label: "#", get: (r) => r.depth, num: true, title: "position in the reference graph" },
          { label: "ref node", get: (r) => r.ref, mono: true },
          { label: "ref module", get: (r) => r.refMod, mono: true },
          { label: "cand node", get: (r) => r.cand, mono: true },
          { label: "cand module", get: (r) => r.candMod, mono: true },
          { label: "op", get: (r) => r.op },
          { label: "shape", get: (r) => shape(r.refShape) },
          { label: "fwd", get: statusSort("forward"), html: statusCell("forward") },
          { label: "fwd max abs", get: M("forward", (m) => m.max_abs), num: true },
          { label: "fwd max rel", get: M("forward", (m) => m.max_rel), num: true },
          { label: "fwd cos", get: M("forward", (m) => m.cosine), html: (r) => (r.forward && r.forward.cosine !== null ? r.forward.cosine.toFixed(6) : "–") },
          { label: "bwd", get: statusSort("backward"), html: statusCell("backward") },
          { label: "bwd max abs", get: M("backward", (m) => m.max_abs), num: true },
          { label: "bwd max rel", get: M("backward", (m) => m.max_rel), num: true },
          { label: "match basis", get: (r) => r.why },
          { label: "conf.", get: (r) => r.conf, num: true },
        ],
        filters: [
          ["all pairs", () => true],
          ["differ (either direction)", (r) => differ(r, "forward") || differ(r, "backward")],
          ["forward differs", (r) => differ(r, "forward")],
          ["backward differs", (r) => differ(r, "backward")],
          ["introduced here", firstEither],
          ["clean", (r) => !differ(r, "forward") && !differ(r, "backward")],
        ],
        search: (r) => `${r.ref} ${r.cand} ${r.refMod} ${r.candMod} ${r.op}`,
        sort: [0, 1],
        rowClass: (r) => (firstEither(r) ? "first-row" : ""),
        onClick: (r) => selectRow(r.__row, { center: true, scroll: true, direction: r.firstB && !r.firstF && panzoom.backward ? "backward" : undefined }),
      })],
      ["Parameters", D.params.length, (h) => makeTable(h, {
        data: D.params.map((p) => ({ ref: p[0], cand: p[1].join(", "), transform: p[2], grad: metrics(p[3]), value: metrics(p[4]), evidence: p[5] })),
        columns: [
          { label: "ref parameter", get: (r) => r.ref, mono: true },
          { label: "cand parameter", get: (r) => r.cand, mono: true },
          { label: "transform", get: (r) => r.transform },
          { label: "grad", get: (r) => (r.grad ? +r.grad.passed : -1), html: (r) => verdict(r.grad) },
          { label: "grad max abs", get: (r) => (r.grad ? r.grad.max_abs : null), num: true },
          { label: "grad max rel", get: (r) => (r.grad ? r.grad.max_rel : null), num: true },
          { label: "value", get: (r) => (r.value ? +r.value.passed : -1), html: (r) => verdict(r.value) },
          { label: "value max abs", get: (r) => (r.value ? r.value.max_abs : null), num: true },
          { label: "evidence", get: (r) => r.evidence },
        ],
        filters: [["all", () => true], ["gradient differs", (r) => r.grad && !r.grad.passed], ["value differs", (r) => r.value && !r.value.passed]],
        search: (r) => `${r.ref} ${r.cand} ${r.transform}`,
        sort: [0, 1],
      })],
      ["Outputs", D.outputs.length, (h) => makeTable(h, {
        data: D.outputs.map((o) => ({ ref: o[0], cand: o[1], m: metrics(o[2]) })),
        columns: [
          { label: "ref output", get: (r) => r.ref, mono: true },
          { label: "cand output", get: (r) => r.cand || "–", mono: true },
          { label: "match", get: (r) => (r.m ? +r.m.passed : -1), html: (r) => verdict(r.m) },
          { label: "max abs", get: (r) => (r.m ? r.m.max_abs : null), num: true },
          { label: "max rel", get: (r) => (r.m ? r.m.max_rel : null), num: true },
          { label: "cosine", get: (r) => (r.m ? r.m.cosine : null), html: (r) => (r.m && r.m.cosine !== null ? r.m.cosine.toFixed(6) : "–") },
          { label: "note", get: (r) => (r.m ? r.m.note : "") },
        ],
        search: (r) => `${r.ref} ${r.cand}`,
        sort: [0, 1],
      })],
      ["Unmatched", D.unmatched.ref.length + D.unmatched.cand.length, (h) => makeTable(h, {
        data: [...D.unmatched.ref.map((u) => ["ref", ...u]), ...D.unmatched.cand.map((u) => ["cand", ...u])]
          .map((u) => ({ side: u[0], node: u[1], module: u[2], op: u[3], shape: u[4] })),
        columns: [
          { label: "side", get: (r) => r.side },
          { label: "node", get: (r) => r.node, mono: true },
          { label: "module", get: (r) => r.module, mono: true },
          { label: "op", get: (r) => r.op },
          { label: "shape", get: (r) => shape(r.shape) },
        ],
        filters: [["both sides", () => true], ["ref only", (r) => r.side === "ref"], ["cand only", (r) => r.side === "cand"]],
        search: (r) => `${r.node} ${r.module} ${r.op}`,
        sort: [0, 1],
        onClick: (r) => {
          const it = items.find((x) => (r.side === "ref" ? x.ref === r.node && x.side === "ref_only" : x.cand === r.node && x.side === "cand_only"));
          if (it) selectItem(it.i, null, { center: true, scroll: true });
        },
      })],
    ];
    const panes = [];
    specs.forEach(([label, n, build], k) => {
      const pane = el("div", { class: "pane", "data-table": label.toLowerCase() });
      pane.hidden = k !== 0;
      host.appendChild(pane);
      panes.push({ pane, build, built: null });
      const b = el("button", { type: "button", role: "tab", "data-table": label.toLowerCase() }, `${esc(label)} (${n})`);
      b.addEventListener("click", () => show(k));
      tabs.appendChild(b);
    });
    function show(k) {
      panes.forEach((p, j) => { p.pane.hidden = j !== k; });
      tabs.querySelectorAll("button").forEach((b, j) => b.setAttribute("aria-selected", String(j === k)));
      if (!panes[k].built) panes[k].built = panes[k].build(panes[k].pane);
    }
    show(0);
    if (rows.some((r) => (r.forward && !r.forward.passed) || (r.backward && !r.backward.passed))) panes[0].built.setFilter(1);
  }

  // ---------------------------------------------------------------- start
  renderHeader();
  setupGraph();
  setupChart();
  setupTables();
  document.body.dataset.ready = "true";
})();
