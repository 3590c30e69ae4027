// The review page: upload one image, show what the service answered. Plain JS, no build step, no library.
// API calls carry the API key from sessionStorage (entered once per browser tab); with AEGIS_AUTH_DISABLED=true
// the service accepts them without one.
"use strict";

const KEY_STORAGE = "aegis-api-key";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let manifest = null; // the served bundle's manifest (GET /v1/model)

class NeedsKey extends Error {}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = { ...(options.headers || {}), ...(key ? { "X-API-Key": key } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askForKey(key ? "This API key was not accepted. Enter a valid key." : "This service needs an API key.");
    throw new NeedsKey();
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.detail || response.statusText;
  } catch {
    return response.statusText || `HTTP ${response.status}`;
  }
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("api-key").focus();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function el(tag, attributes = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------------------ the model
async function loadModel() {
  let response;
  try {
    response = await api("/v1/model");
  } catch (error) {
    if (error instanceof NeedsKey) return;
    throw error;
  }
  if (response.status === 503) { // still loading or warming up
    $("model-name").textContent = "Model: starting…";
    setTimeout(loadModel, 2000);
    return;
  }
  if (!response.ok) {
    showError(`The model description could not be loaded: ${await errorText(response)}`);
    return;
  }
  manifest = (await response.json()).manifest;
  $("model-name").textContent = `Model: ${manifest.name} ${manifest.version}`;
  $("key-form").hidden = true;
  $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
  $("report-link").hidden = !(manifest.reports && manifest.reports.security_report_md);
}

async function showDocument(event, path) {
  event.preventDefault();
  try {
    const response = await api(`${path}?format=html`);
    if (!response.ok) {
      showError(`The document could not be loaded: ${await errorText(response)}`);
      return;
    }
    $("document-body").innerHTML = await response.text(); // escaped by the service (Markdown, raw HTML off)
    $("document").showModal();
  } catch (error) {
    if (!(error instanceof NeedsKey)) throw error;
  }
}

// ------------------------------------------------------------------------------------------------ diagnose
async function diagnose(file) {
  $("error").hidden = true;
  // the previous answer must never be read as this file's
  $("result").hidden = true;
  $("images").hidden = true;
  $("placeholder").hidden = false;
  $("drop").classList.add("busy");
  try {
    const form = new FormData();
    form.append("file", file);
    const response = await api("/v1/diagnose?images=true", { method: "POST", body: form });
    if (!response.ok) {
      showError(`This file could not be diagnosed: ${await errorText(response)}`);
      return;
    }
    if (!manifest) await loadModel();
    show(await response.json());
  } catch (error) {
    if (error instanceof NeedsKey) showError("Enter the API key above, then choose the file again.");
    else showError(`The service could not be reached: ${error.message}`);
  } finally {
    $("drop").classList.remove("busy");
    $("file").value = "";
  }
}

function percent(p) {
  return p >= 0.995 && p < 1 ? ">99%" : p > 0 && p < 0.005 ? "<1%" : `${Math.round(p * 100)}%`;
}

function show(answer) {
  const input = manifest ? manifest.input : null;
  $("uploaded").src = answer.images.uploaded;
  $("uploaded-caption").textContent =
    `Uploaded ${answer.input.format.toUpperCase()}, ${answer.input.width} × ${answer.input.height} px, as the service read it`;
  $("model-input").src = answer.images.model_input;
  $("model-input-caption").textContent = input
    ? `What the model saw: ${input.width} × ${input.height} px after the ${cushionName()} Cushion`
    : "What the model saw, after the Cushion";
  $("images").hidden = false;

  $("diagnosis").textContent = answer.diagnosis;
  const bars = $("probabilities");
  bars.replaceChildren();
  const ranked = Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of ranked) {
    const row = el("div", { class: "bar-row" });
    row.append(el("span", { class: "bar-name" }, name));
    const track = el("span", { class: "bar-track" });
    const fill = el("span", { class: name === answer.diagnosis ? "bar-fill top" : "bar-fill" });
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    track.append(fill);
    row.append(track, el("span", { class: "bar-value" }, percent(p)));
    bars.append(row);
  }

  const accepted = answer.decision === "accept";
  const decision = $("decision");
  decision.className = `decision ${accepted ? "accept" : "reject"}`;
  decision.replaceChildren(
    el("strong", {}, accepted ? "Passed the safety check" : "Not checked as trustworthy — review manually"),
    el("p", {}, accepted
      ? `The image looks like the clean X-rays the model was validated on for ${answer.diagnosis}. ` +
        "The diagnosis is still only a research model's suggestion."
      : "The safety check flagged this image: it may have been manipulated, be of poor quality or differ from " +
        `the X-rays the model was validated on. Do not rely on the diagnosis "${answer.diagnosis}".`));

  plot(answer);
  $("meta").textContent = `${manifest ? `${manifest.name} ${manifest.version} · ` : ""}` +
    `request ${answer.request_id}`;
  $("placeholder").hidden = true;
  $("result").hidden = false;
}

function cushionName() {
  const c = manifest.cushion;
  if (c.kind === "jpeg") return `JPEG-${c.quality}`;
  return c.kind;
}

// ------------------------------------------------------------------------------------------------ the plot
// The predicted class's Shield logit ("safety score") against the histogram of the clean validation images that
// its threshold was calibrated on (bundle schema 1.1), with the threshold marked.
function plot(answer) {
  const distribution = manifest && manifest.calibration.clean_logits
    ? manifest.calibration.clean_logits[answer.diagnosis] : undefined;
  const { shield_logit: score, threshold } = answer;
  const W = 640, H = 200, left = 16, right = 16, top = 34, bottom = 44;
  const values = [score, threshold];
  if (distribution) values.push(distribution.edges[0], distribution.edges[distribution.edges.length - 1]);
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = Math.max((hi - lo) * 0.06, 0.5);
  lo -= pad; hi += pad;
  const x = (v) => left + ((v - lo) / (hi - lo)) * (W - left - right);
  const baseline = H - bottom;
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label":
    `Safety score ${score.toFixed(2)}, threshold ${threshold.toFixed(2)}` });

  svg.append(el("svg:rect", { x: left, y: top, width: Math.max(0, x(threshold) - left), height: baseline - top,
    class: "reject-zone" }));
  svg.append(el("svg:text", { x: left + 4, y: top + 14, class: "zone-label" }, "rejected zone"));
  if (distribution) {
    const most = Math.max(...distribution.counts);
    distribution.counts.forEach((count, i) => {
      const x0 = x(distribution.edges[i]), x1 = x(distribution.edges[i + 1]);
      const h = (count / most) * (baseline - top - 18);
      svg.append(el("svg:rect", { x: x0 + 0.5, y: baseline - h, width: Math.max(0, x1 - x0 - 1), height: h,
        class: "histogram" }));
    });
  }
  svg.append(el("svg:line", { x1: left, x2: W - right, y1: baseline, y2: baseline, class: "axis" }));
  for (const tick of ticks(lo, hi)) {
    svg.append(el("svg:line", { x1: x(tick), x2: x(tick), y1: baseline, y2: baseline + 5, class: "axis" }));
    svg.append(el("svg:text", { x: x(tick), y: baseline + 18, class: "tick" }, String(tick)));
  }
  const accepted = answer.decision === "accept";
  svg.append(el("svg:line", { x1: x(threshold), x2: x(threshold), y1: top - 6, y2: baseline, class: "threshold" }));
  svg.append(el("svg:line", { x1: x(score), x2: x(score), y1: top - 6, y2: baseline,
    class: accepted ? "score accept" : "score reject" }));
  svg.append(el("svg:path", { d: `M ${x(score) - 7} ${baseline + 12} L ${x(score) + 7} ${baseline + 12} ` +
    `L ${x(score)} ${baseline + 1} Z`, class: accepted ? "marker accept" : "marker reject" }));
  const labels = [
    el("svg:text", { y: top - 12, class: "threshold-label" }, "threshold"),
    el("svg:text", { y: top - 12, class: `score-label ${accepted ? "accept" : "reject"}` },
      `this image: ${score.toFixed(2)}`),
  ];
  svg.append(...labels);
  svg.append(el("svg:text", { x: (left + W - right) / 2, y: H - 4, class: "axis-title" },
    "safety score (Shield logit): higher = more like clean X-rays of this diagnosis"));
  $("plot").replaceChildren(svg);
  placeLabels(labels, [x(threshold), x(score)], W, top);

  const rate = manifest ? percent(manifest.calibration.clean_rejection_rate) : "a small share";
  let caption;
  if (distribution) {
    caption = `Bars: the ${distribution.n} clean validation X-rays the model diagnosed as ${answer.diagnosis}. ` +
      `About ${percent(shareBelow(distribution, score))} of them score lower than this image. ` +
      `Scores left of the threshold are rejected; ${rate} of those clean X-rays are.`;
  } else {
    caption = "The distribution of clean validation scores is unavailable for this model (its bundle predates " +
      `schema 1.1). Scores left of the threshold (${threshold.toFixed(2)}) are rejected.`;
  }
  $("plot-caption").textContent = caption;
}

// Labels above their lines, kept inside the plot; measured once rendered, so that they never overlap: when they
// would, each goes to the outer side of its line, or the second one down one row.
function placeLabels(nodes, at, width, top) {
  const items = nodes.map((node, i) => ({ node, at: at[i], w: node.getComputedTextLength(), y: top - 12 }));
  const clamp = (item, x0) => Math.min(Math.max(x0, 2), width - 2 - item.w);
  for (const item of items) item.x0 = clamp(item, item.at - item.w / 2);
  const [a, b] = [...items].sort((p, q) => p.at - q.at);
  if (a.x0 + a.w + 8 > b.x0) {
    if (a.at - 5 - a.w >= 2 && b.at + 5 + b.w <= width - 2) {
      a.x0 = a.at - 5 - a.w;
      b.x0 = b.at + 5;
    } else {
      items[1].y = top + 6; // the image's label one row down, inside the plot
      items[1].node.classList.add("halo");
    }
  }
  for (const item of items) {
    item.node.setAttribute("x", item.x0.toFixed(1));
    item.node.setAttribute("y", item.y);
  }
}

function shareBelow(d, value) { // linear interpolation between the stored quantiles
  const q = d.quantiles, p = d.levels;
  if (value <= q[0]) return 0;
  if (value >= q[q.length - 1]) return 1;
  let i = 1;
  while (q[i] < value) i += 1;
  const span = q[i] - q[i - 1];
  return span > 0 ? p[i - 1] + ((value - q[i - 1]) / span) * (p[i] - p[i - 1]) : p[i];
}

function ticks(lo, hi) {
  const raw = (hi - lo) / 6;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) out.push(Number(t.toFixed(6)));
  return out;
}

// ------------------------------------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("error").hidden = true;
    loadModel();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    window.location.reload();
  });
  $("card-link").addEventListener("click", (event) => showDocument(event, "/v1/model/card"));
  $("report-link").addEventListener("click", (event) => showDocument(event, "/v1/model/security-report"));
  $("file").addEventListener("change", () => { if ($("file").files.length) diagnose($("file").files[0]); });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    if (event.dataTransfer.files.length) diagnose(event.dataTransfer.files[0]);
  });
  loadModel();
});
