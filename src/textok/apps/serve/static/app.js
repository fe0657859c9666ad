// textok serve: the page's logic. Plain JavaScript, no libraries, talks only to this server's /api.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, source: null, scenes: [], sceneStart: 0, busy: 0 };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text || "";
  box.className = kind === "note" ? "note" : "";
  box.hidden = !text;
}

// ---- requests, with a progress indicator for anything slower than a blink ------------------------
async function call(path, options = {}, what = "working") {
  state.busy += 1;
  const started = performance.now();
  const timer = setInterval(() => {
    const s = (performance.now() - started) / 1000;
    if (s > 0.15) { $("busy").hidden = false; $("busy-what").textContent = what; $("elapsed").textContent = s.toFixed(1) + " s"; }
  }, 100);
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    let res;
    try { res = await fetch(path, options); } catch (e) { throw new Error("the server did not answer (is `textok serve` still running?)"); }
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) throw new Error((body && body.error) || `the server answered ${res.status}`);
    return body;
  } finally {
    clearInterval(timer);
    state.busy -= 1;
    if (!state.busy) {
      $("busy").hidden = true;
      document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    }
  }
}
const postJSON = (path, data, what) => call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) }, what);

// ---- the image -------------------------------------------------------------------------------------
function showWorking(src, notes) {
  $("working").hidden = false;
  $("working-image").src = src;
  $("working-notes").textContent = notes.join("; ");
}

async function loadScenes(start) {
  const data = await call(`/api/scenes?start=${start}&count=12`, {}, "loading scenes");
  state.scenes = data.scenes;
  const box = $("scenes");
  box.replaceChildren();
  for (const s of data.scenes) {
    const b = el("button", { type: "button", title: s.captions[0], "data-scene": String(s.index) }, el("img", { src: s.image, alt: `scene ${s.index}` }));
    b.addEventListener("click", () => pickScene(s, b));
    box.append(b);
  }
}

function pickScene(scene, button) {
  document.querySelectorAll(".scenes button").forEach((b) => b.classList.remove("on"));
  button.classList.add("on");
  state.source = { scene: scene.index };
  $("upload").value = "";
  showWorking(scene.image, [`held-out scene ${scene.index}`]);
  $("caption").value = scene.captions[0];
  state.sceneCaption = scene.captions[0];
  $("caption").classList.remove("wanted");
  say("");
  run();
}

const readsText = () => state.info && state.info.models.some((m) => m.reads_text);

async function upload(file) {
  say("");
  const limit = state.info ? state.info.max_upload_bytes : Infinity;
  if (file.size > limit) { say(`the file is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${Math.floor(limit / 2 ** 20)} MB`); return; }
  let data;
  try {
    data = await call("/api/upload", { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file }, "reading the image");
  } catch (e) { say(e.message); return; }
  document.querySelectorAll(".scenes button").forEach((b) => b.classList.remove("on"));
  state.source = { image: data.image };
  showWorking(data.image, [`${file.name}, ${data.width}×${data.height}`, ...data.notes]);
  // A scene's caption does not describe the upload: the caption box is cleared and waits for the user.
  if ($("caption").value === state.sceneCaption) $("caption").value = "";
  const notes = [...data.notes];
  if (readsText() && !$("caption").value.trim()) {
    notes.push("now describe the image in the caption box: the text tokenizers read it");
    $("caption").classList.add("wanted");
  }
  if (notes.length) say(notes.join("; "), "note");
  await run({ keepMessage: true });
  if ($("caption").classList.contains("wanted")) $("caption").focus();
}

// ---- reconstructions, one column per tokenizer ----------------------------------------------------------
const fileName = (model, what) => `${model.replace(/[^A-Za-z0-9._-]+/g, "_")}-${what}.png`;

function figure(src, label, cls, download) {
  const fig = el("figure", {}, el("img", { src, alt: label, class: cls || "" }), el("figcaption", { text: label }));
  if (download) fig.append(el("a", { class: "download", href: src, download, title: `download ${download}`, text: "download" }));
  return fig;
}
const db = (v) => (v == null ? "∞ (identical)" : `${v.toFixed(2)} dB`);

function legend(stops, left, middle, right, what) {
  const bar = el("div", { class: "bar" });
  bar.style.backgroundImage = `linear-gradient(to right, ${stops.join(", ")})`;  // CSSOM: allowed by the page's CSP
  return el("div", { class: `legend ${what}` }, bar,
    el("div", { class: "ticks" }, el("span", { text: left }), el("span", { text: middle }), el("span", { text: right })));
}

function modelHeader(r) {
  const bits = r.tokens ? `${r.tokens.what} = ${Math.round(r.tokens.bits).toLocaleString()} bits per image` : "";
  return [el("h3", { text: r.name, title: r.directory }),
    el("div", { class: "meta", text: r.error ? r.directory : `${r.kind} · ${r.text} · ${r.image_size} px · ${bits}` })];
}

function card(r, heatScale) {
  const c = el("div", { class: "card", "data-model": r.name }, ...modelHeader(r));
  if (r.error || (r.message && !r.needs_caption)) {
    c.classList.add("failed");
    c.append(el("p", { class: "msg", text: r.error ? `did not load: ${r.error}` : r.message }));
    return c;
  }
  if (r.needs_caption) {
    c.classList.add("waiting");
    c.append(el("p", { class: "wait", text: "reads text: type a caption and press “Tokenize and reconstruct”" }));
    return c;
  }
  if (!r.recon) { c.append(el("p", { class: "notes", text: "loaded: pick an image" })); return c; }
  const legends = state.info.legends;
  const scale = Math.max(heatScale || 0, 8);
  c.append(el("div", { class: "grid" },
    figure(r.original, `original (${r.image_size} px)`, "original", fileName(r.name, "original")),
    figure(r.recon, `reconstruction · ${db(r.psnr)}`, "recon", fileName(r.name, "reconstruction")),
    el("div", {}, figure(r.heat, `|difference| (max ${r.diff_max.toFixed(0)} levels)`, "heat", fileName(r.name, "difference")),
      legend(legends.heat, "0", "", `${scale.toFixed(0)} levels`, "heat-legend")),
    el("div", {}, figure(r.tokens_picture, `tokens ${r.token_shape.join(" × ")}`, "tokens", fileName(r.name, "tokens")),
      legend(legends.tokens, `−${r.tokens_peak.toPrecision(2)}`, "0", `+${r.tokens_peak.toPrecision(2)}`, "tokens-legend"))));
  if (r.swap) {
    const s = r.swap;
    if (s.message) c.append(el("p", { class: "notes swap-msg", text: `swap the caption: ${s.message}` }));
    else {
      c.append(el("p", { class: "notes", text: `swap the caption: the same tokens decoded with “${s.caption}”` }));
      c.append(el("div", { class: "grid swap" },
        figure(s.recon, `other caption · ${db(s.psnr)}`, "swap-recon", fileName(r.name, "swapped-caption")),
        el("div", {}, figure(s.heat, `what changed (mean ${s.change_mean}, max ${s.change_max} levels)`, "swap-heat", fileName(r.name, "what-changed")),
          legend(legends.heat, "0", "", `${Math.max(s.change_max, 8).toFixed(0)} levels`, "heat-legend"))));
    }
  }
  const notes = [...(r.notes || []), `${r.model_ms} ms in the model`];
  c.append(el("p", { class: "notes", text: notes.join(" · ") }));
  return c;
}

function summary(results) {
  const ran = results.filter((r) => r.recon);
  const table = $("summary");
  table.hidden = !ran.length;
  if (!ran.length) { table.replaceChildren(); return; }
  const best = Math.max(...ran.map((r) => (r.psnr == null ? Infinity : r.psnr)));
  const row = (label, cells) => el("tr", {}, el("th", { text: label }), ...cells);
  const rows = [
    row("", results.map((r) => el("th", { text: r.name, scope: "col" }))),
    row("PSNR", results.map((r) => el("td", { class: r.recon && (r.psnr == null ? Infinity : r.psnr) === best && ran.length > 1 ? "best" : "",
      "data-model": r.name, text: r.recon ? db(r.psnr) : (r.needs_caption ? "needs a caption" : "—") }))),
    row("bits per image", results.map((r) => el("td", { text: r.tokens ? Math.round(r.tokens.bits).toLocaleString() : "—" }))),
  ];
  if (ran.some((r) => r.swap && !r.swap.message)) {
    rows.push(row("PSNR, other caption", results.map((r) => el("td", { text: r.swap && !r.swap.message ? db(r.swap.psnr) : "—" }))));
  }
  table.replaceChildren(el("tbody", {}, ...rows));
}

function showModels(models, heatScale) {
  $("results").replaceChildren(...models.map((m) => card(m, heatScale)));
  summary(models);
}

async function run({ keepMessage = false } = {}) {
  if (!state.source) { say("pick an image first: upload one or choose a scene"); return; }
  try {
    const data = await postJSON("/api/reconstruct", { ...state.source, caption: $("caption").value, swap_caption: $("swap").value }, "tokenizing");
    const failed = state.info.models.filter((m) => m.error);
    showModels([...data.results, ...failed], data.heat_scale);
    $("timing").textContent = `${data.ms} ms for ${data.results.length} tokenizer(s)`;
    if ($("caption").value.trim()) $("caption").classList.remove("wanted");
    if (!keepMessage) say("");
  } catch (e) { say(e.message); }
}

function suggest() {
  const mine = state.source && state.source.scene;
  const current = $("caption").value.trim();
  // another scene's caption that differs from the one being decoded (two scenes can share a caption)
  const others = state.scenes.filter((s) => s.index !== mine && s.captions[0] !== current);
  if (!others.length) return;
  const s = others[Math.floor(Math.random() * others.length)];
  $("swap").value = s.captions[0];
}

async function addModel() {
  try {
    const out = await postJSON("/api/models", { directory: $("model-dir").value }, "loading the model");
    await refreshInfo();
    if (state.source) await run();
    say(out.already_loaded ? `${out.name} is already loaded` : "", "note");
  } catch (e) { say(e.message); }
}

// ---- samples: one column per generator, named by the tokenizer it decodes with ----------------------------
async function sample() {
  const num = (id, whole) => {  // the server takes JSON numbers; an empty box is null (its default)
    const v = $(id).value.trim();
    if (v === "") return null;
    const x = Number(v);
    if (!Number.isFinite(x) || (whole && !Number.isInteger(x))) throw new Error(`${$(id).dataset.what || id}: type a ${whole ? "whole " : ""}number`);
    return x;
  };
  let base;
  try {
    base = { seed: num("gen-seed", true) ?? 0, cfg: num("gen-cfg", false), steps: num("gen-steps", true), n: num("gen-n", true) ?? 4 };
  } catch (e) { say(e.message); return; }
  const columns = [];
  let failure = "";
  for (const g of state.info.generators.filter((x) => !x.error)) {
    const req = { ...base, generator: g.index };
    if (g.text_to_image) req.prompt = $("gen-prompt").value; else if (g.classes.length) req.label = Number($("gen-class").value);
    const col = el("div", { class: "card", "data-generator": String(g.index) },
      el("h3", { text: g.tokenizer }), el("div", { class: "meta", text: `${g.kind} ${g.name}` }));
    try {
      const data = await postJSON("/api/generate", req, `sampling (${g.tokenizer})`);
      col.append(el("div", { class: "samples" }, ...data.images.map((src, i) =>
        figure(src, data.captions ? `decoded with: ${data.captions[i]}` : `sample ${i}`, "sample", fileName(g.tokenizer, `sample-${base.seed}-${i}`)))));
      col.append(el("p", { class: "notes", text: `${data.ms} ms` }));
    } catch (e) {
      col.classList.add("failed");
      col.append(el("p", { class: "msg", text: e.message }));
      failure = failure || e.message;
    }
    columns.push(col);
  }
  const withGen = new Set(state.info.generators.filter((g) => !g.error && g.tokenizer_loaded).map((g) => g.tokenizer));
  for (const m of state.info.models.filter((x) => !x.error && !withGen.has(x.name))) {
    columns.push(el("div", { class: "card none", "data-model": m.name }, el("h3", { text: m.name }),
      el("p", { class: "notes", text: "no generator for this tokenizer: pass one with --generator (train it with `textok extract-latents` and `textok train-generator`)" })));
  }
  $("samples").replaceChildren(...columns);
  say(failure);
}

function showGenerator(info) {
  const broken = info.generators.filter((g) => g.error);
  if (broken.length) {
    $("generator-error").hidden = false;
    $("generator-error").textContent = broken.map((g) => `generator ${g.directory} did not load: ${g.error}`).join("; ");
  }
  const gens = info.generators.filter((g) => !g.error);
  if (!gens.length) return;
  $("generator").hidden = false;
  const first = gens.find((g) => !g.text_to_image && g.classes.length) || gens[0];
  $("gen-cfg").placeholder = `default (${gens.map((g) => g.cfg).join(" / ")})`;
  $("gen-n").max = info.max_samples;
  $("gen-class-box").hidden = !gens.some((g) => !g.text_to_image && g.classes.length);
  $("gen-prompt-box").hidden = !gens.some((g) => g.text_to_image);
  $("gen-class").replaceChildren(...(first.classes || []).map((name, k) => el("option", { value: String(k), text: `${k}: ${name}` })));
}

async function refreshInfo() {
  state.info = await call("/api/info", {}, "loading");
  if (!$("results").children.length || !state.source) showModels(state.info.models, 0);
  $("add-model-box").hidden = !state.info.allow_model_paths;
}

async function start() {
  $("upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  $("run").addEventListener("click", () => run());
  $("suggest").addEventListener("click", suggest);
  $("add-model").addEventListener("click", addModel);
  $("sample").addEventListener("click", sample);
  $("more-scenes").addEventListener("click", () => {
    state.sceneStart = (state.sceneStart + 12) % (state.info ? state.info.scene_count : 500);
    loadScenes(state.sceneStart).catch((e) => say(e.message));
  });
  for (const id of ["caption", "swap"]) {
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } });
  }
  try {
    await refreshInfo();
    showGenerator(state.info);
    await loadScenes(0);
    document.body.dataset.ready = "1";
  } catch (e) { say(e.message); }
}

start();
