// The page of srt-serve: search an index by an uploaded or a stored image, look at the neighbours
// and at an image's plain and SRT feature maps. Plain DOM and fetch; everything comes from the service.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;  // image_id shown in the detail panel

function index() { return $("index").value; }
function k() { return Math.max(1, Math.min(1000, parseInt($("k").value, 10) || 12)); }

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function answer(response) {
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function loadIndexes() {
  const indexes = await answer(await fetch("/api/indexes"));
  $("index").replaceChildren(...indexes.map((i) => new Option(`${i.name} (${i.vectors} vectors)`, i.name)));
  await loadSummary();
}

async function loadSummary() {
  const s = await answer(await fetch(`/api/summary?index=${encodeURIComponent(index())}`));
  const errors = Object.entries(s.errors).map(([kind, n]) => `${kind} ${n}`).join(", ") || "none";
  const c = s.config;
  $("summary").textContent = `${s.images} images (${s.ok} ok; errors: ${errors}) · ${c.model} · ${c.shifts.length} views, stride ${c.stride} · ${s.descriptor.kind} descriptors · ${s.factory}`;
}

function show(result) {
  say(`${result.results.length} neighbours of ${result.query}`);
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
  $("pictures").src = `/api/pictures?index=${encodeURIComponent(index())}&image=${encodeURIComponent(imageId)}`;
}

async function searchStored(name) {
  say(`searching from ${name}…`);
  try {
    show(await answer(await fetch(`/api/search?index=${encodeURIComponent(index())}&k=${k()}&image=${encodeURIComponent(name)}`)));
  } catch (error) { say(error.message, true); }
}

async function searchUpload(file) {
  say(`searching from ${file.name} (the model runs on it)…`);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    show(await answer(await fetch(`/api/search?index=${encodeURIComponent(index())}&k=${k()}`, { method: "POST", body: form })));
  } catch (error) { say(error.message, true); }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) searchUpload(e.target.files[0]); });
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
