// The page of srt-serve: search an index by an uploaded or a stored image, look at the neighbours
// and at an image's plain and SRT feature maps. Plain DOM and fetch; everything comes from the service.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;  // image_id shown in the detail panel
const pictures = {};  // index name -> whether its store has dense maps to picture

function index() { return $("index").value; }
function k() { return Math.max(1, Math.min(1000, parseInt($("k").value, 10) || 12)); }

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// The service answers JSON; what answers before it (the HTTP server refusing a request line of
// 100 KB, a proxy) may not: say its status and the start of its text.
async function answer(response) {
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = null; }
  if (response.ok && body !== null) return body;
  const reason = body && body.detail ? body.detail : `${response.status} ${response.statusText || ""}: ${text.trim().slice(0, 200) || "no reason given"}`;
  throw new Error(response.ok ? `an answer that is not JSON: ${reason}` : reason);
}

async function loadIndexes() {
  const indexes = await answer(await fetch("/api/indexes"));
  indexes.forEach((i) => { pictures[i.name] = i.pictures; });
  $("index").replaceChildren(...indexes.map((i) => new Option(`${i.name} (${i.vectors} vectors)`, i.name)));
  await loadSummary();
}

async function loadSummary() {
  const s = await answer(await fetch(`/api/summary?index=${encodeURIComponent(index())}`));
  const errors = Object.entries(s.errors).map(([kind, n]) => `${kind} ${n}`).join(", ") || "none";
  const c = s.config;
  $("summary").textContent = `${s.images} images (${s.ok} ok; errors: ${errors}) · ${c.model} · ${c.shifts.length} views, stride ${c.stride} · ${s.descriptor.kind} descriptors · ${s.factory}`;
}

// The query above its neighbours: a stored image's thumbnail and the name typed, or the upload itself.
function showQuery(name, src) {
  $("query-name").textContent = name;
  $("query-image").src = src;
  $("query-shown").hidden = false;
}

function show(result, name) {
  say(`${result.results.length} neighbours of ${name}`);
  $("results").replaceChildren(...result.results.map((r) => {
    const figure = document.createElement("figure");
    figure.className = "neighbour";
    figure.tabIndex = 0;
    figure.dataset.imageId = r.image_id;
    const img = document.createElement("img");
    img.src = `/api/thumbnail?index=${encodeURIComponent(index())}&image=${encodeURIComponent(r.image_id)}&size=256`;
    img.alt = r.uri;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.textContent = `#${r.rank + 1} · ${r.score.toFixed(3)} · ${r.uri.split("/").pop()}`;
    figure.append(img, caption);
    figure.addEventListener("click", () => open(r.image_id, r.uri));
    figure.addEventListener("keydown", (e) => { if (e.key === "Enter") open(r.image_id, r.uri); });
    return figure;
  }));
}

function open(imageId, uri = imageId) {
  current = imageId;
  $("detail").hidden = false;
  $("detail-title").textContent = `${uri.split("/").pop()} · ${imageId}`;
  $("pictures-panel").hidden = !pictures[index()];  // a store without dense maps has no pictures
  if (pictures[index()]) $("pictures").src = `/api/pictures?index=${encodeURIComponent(index())}&image=${encodeURIComponent(imageId)}`;
}

async function searchStored(name) {
  say(`searching from ${name}…`);
  try {
    const result = await answer(await fetch(`/api/search?index=${encodeURIComponent(index())}&k=${k()}&image=${encodeURIComponent(name)}`));
    showQuery(name, `/api/thumbnail?index=${encodeURIComponent(index())}&image=${encodeURIComponent(result.query)}&size=256`);
    show(result, name);
  } catch (error) { say(error.message, true); }
}

async function searchUpload(file) {
  say(`searching from ${file.name} (the model runs on it)…`);
  $("name").value = "";
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const result = await answer(await fetch(`/api/search?index=${encodeURIComponent(index())}&k=${k()}`, { method: "POST", body: form }));
    showQuery(`${file.name} (uploaded)`, URL.createObjectURL(file));
    show(result, file.name);
  } catch (error) { say(error.message, true); }
}

$("file").addEventListener("change", (e) => {
  if (e.target.files.length) searchUpload(e.target.files[0]);
  e.target.value = "";  // the same file picked again is a new search
});
$("by-name").addEventListener("submit", (e) => { e.preventDefault(); if ($("name").value.trim()) searchStored($("name").value.trim()); });
$("search-from").addEventListener("click", () => { if (current) searchStored(current); });
$("index").addEventListener("change", () => loadSummary().catch((e) => say(e.message, true)));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchUpload(e.dataTransfer.files[0]);
});
loadIndexes().catch((e) => say(e.message, true));
