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
  say("");
  run();
}

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
  if (data.notes.length) say(data.notes.join("; "), "note");
  run();
}

// ---- reconstructions ---------------------------------------------------------------------------------
function figure(src, label, cls) {
  return el("figure", {}, el("img", { src, alt: label, class: cls || "" }), el("figcaption", { text: label }));
}
const db = (v) => (v == null ? "∞ (identical)" : `${v.toFixed(2)} dB`);

function modelHeader(r) {
  const bits = r.tokens ? `${r.tokens.what} = ${Math.round(r.tokens.bits).toLocaleString()} bits per image` : "";
  return [el("h3", { text: r.name }),
    el("div", { class: "meta", text: r.error ? r.directory : `${r.kind} · ${r.text} · ${r.image_size} px · ${bits}` })];
}

function card(r) {
  const c = el("div", { class: "card", "data-model": r.name }, ...modelHeader(r));
  if (r.error || r.message) {
    c.classList.add("failed");
    c.append(el("p", { class: "msg", text: r.error ? `did not load: ${r.error}` : r.message }));
    return c;
  }
  if (!r.recon) { c.append(el("p", { class: "notes", text: "loaded: pick an image" })); return c; }
  const row = el("div", { class: "row" },
    figure(r.original, `original (${r.image_size} px)`),
    figure(r.recon, `reconstruction · PSNR ${db(r.psnr)}`, "recon"),
    figure(r.heat, `|difference| (max ${r.diff_max.toFixed(0)} levels)`, "heat"),
    figure(r.tokens_picture, `tokens ${r.token_shape.join(" × ")}`, "tokens"));
  c.append(row);
  if (r.swap) {
    const s = r.swap;
    const swapRow = s.message ? el("p", { class: "notes swap-msg", text: `swap the caption: ${s.message}` })
      : el("div", { class: "row swap" },
        figure(s.recon, `same tokens, other caption · PSNR ${db(s.psnr)}`, "swap-recon"),
        figure(s.heat, `what changed (mean ${s.change_mean} levels, max ${s.change_max})`, "swap-heat"));
    if (!s.message) c.append(el("p", { class: "notes", text: `swap the caption: the tokens above decoded with “${s.caption}”` }));
    c.append(swapRow);
  }
  const notes = [...(r.notes || []), `${r.model_ms} ms in the model`];
  c.append(el("p", { class: "notes", text: notes.join(" · ") }));
  return c;
}

function showModels(models) {
  $("results").replaceChildren(...models.map((m) => card(m)));
}

async function run() {
  if (!state.source) { say("pick an image first: upload one or choose a scene"); return; }
  try {
    const data = await postJSON("/api/reconstruct", { ...state.source, caption: $("caption").value, swap_caption: $("swap").value }, "tokenizing");
    const failed = state.info.models.filter((m) => m.error);
    showModels([...data.results, ...failed]);
    $("timing").textContent = `${data.ms} ms for ${data.results.length} tokenizer(s)`;
    say("");
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
    await postJSON("/api/models", { directory: $("model-dir").value }, "loading the model");
    await refreshInfo();
    if (state.source) await run();
    say("");
  } catch (e) { say(e.message); }
}

// ---- samples ---------------------------------------------------------------------------------------------
async function sample() {
  const g = state.info.generator;
  const num = (id, whole) => {  // the server takes JSON numbers; an empty box is null (its default)
    const v = $(id).value.trim();
    if (v === "") return null;
    const x = Number(v);
    if (!Number.isFinite(x) || (whole && !Number.isInteger(x))) throw new Error(`${$(id).dataset.what || id}: type a ${whole ? "whole " : ""}number`);
    return x;
  };
  let req;
  try {
    req = { seed: num("gen-seed", true) ?? 0, cfg: num("gen-cfg", false), steps: num("gen-steps", true), n: num("gen-n", true) ?? 4 };
  } catch (e) { say(e.message); return; }
  if (g.text_to_image) req.prompt = $("gen-prompt").value; else if (g.classes.length) req.label = Number($("gen-class").value);
  try {
    const data = await postJSON("/api/generate", req, "sampling");
    $("samples").replaceChildren(...data.images.map((src, i) =>
      figure(src, data.captions ? `decoded with: ${data.captions[i]}` : `sample ${i}`, "sample")));
    $("samples").append(el("p", { class: "hint", text: `${data.ms} ms` }));
    say("");
  } catch (e) { say(e.message); }
}

function showGenerator(info) {
  if (info.generator_error) { $("generator-error").hidden = false; $("generator-error").textContent = `generator ${info.generator_dir} did not load: ${info.generator_error}`; }
  const g = info.generator;
  if (!g) return;
  $("generator").hidden = false;
  $("gen-name").textContent = `${g.name} (${g.kind}, decoded by ${g.tokenizer})`;
  $("gen-cfg").value = g.cfg;
  $("gen-n").max = g.max_samples;
  $("gen-class-box").hidden = g.text_to_image || !g.classes.length;
  $("gen-prompt-box").hidden = !g.text_to_image;
  $("gen-class").replaceChildren(...g.classes.map((name, k) => el("option", { value: String(k), text: `${k}: ${name}` })));
}

async function refreshInfo() {
  state.info = await call("/api/info", {}, "loading");
  if (!$("results").children.length || !state.source) showModels(state.info.models);
  $("add-model-box").hidden = !state.info.allow_model_paths;
}

async function start() {
  $("upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  $("run").addEventListener("click", run);
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
