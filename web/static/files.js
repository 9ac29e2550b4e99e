// Files in and out of the desktop (gateway/web/transfer.py): Upload (button or drag and drop onto the
// desktop) into ~/Uploads with progress, and the Downloads panel listing ~/Downloads.
// Both need the participant's session; viewer.js signs the browser in when the password is typed there.
import { counted } from "./plural.js";

const config = JSON.parse(document.getElementById("viewer-config").textContent);
const root = config.root || "./";
const base = new URL(`${root}files/${encodeURIComponent(config.account)}/`, location.href);
const $ = (id) => document.getElementById(id);
const input = $("upload-input");
const progress = $("upload-progress");
const message = $("upload-message");
const list = $("download-list");
const quota = $("quota-message");
const stage = $("stage");
const dropHint = $("drop-hint");
const panel = $("files-panel");

function size(bytes) {
  if (bytes < 1000) return counted(bytes, "byte");
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

async function refresh() {
  try {
    const resp = await fetch(base, { cache: "no-store", credentials: "same-origin" });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(body.error || resp.statusText);
    $("upload-dir").textContent = `~/${body.upload_dir}`;
    $("download-dir").textContent = `~/${body.download_dir}`;
    list.replaceChildren(...body.files.map((f) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = new URL(`downloads/${encodeURIComponent(f.name)}`, base).href;
      a.download = f.name;
      a.textContent = f.name;
      const s = document.createElement("span");
      s.className = "size";
      s.textContent = size(f.size);
      li.append(a, s);
      return li;
    }));
    if (body.files.length === 0) {
      const li = document.createElement("li");
      li.className = "empty-note";
      li.textContent = "No files yet.";
      list.append(li);
    }
    quota.textContent = `${counted(body.files.length, "file")} to download. Uploads use ${size(body.used)} of ${size(body.quota)}; at most ${size(body.max_file)} per file.`;
  } catch (err) {
    quota.textContent = `Could not list your files: ${err.message}`;
  }
}

function uploadOne(file, index, total) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", new URL(`uploads/${encodeURIComponent(file.name)}`, base).href);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (ev) => {
      if (!ev.lengthComputable) return;
      progress.max = ev.total;
      progress.value = ev.loaded;
      message.textContent = `Uploading ${file.name} (${index + 1} of ${total}): ${Math.floor(100 * ev.loaded / ev.total)} %`;
    };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = {}; }
      if (xhr.status === 201) resolve({ ok: true, text: `${body.name} is in ~/${body.folder}.` });
      else resolve({ ok: false, text: `${file.name}: ${body.error || `failed (${xhr.status})`}` });
    };
    xhr.onerror = () => resolve({ ok: false, text: `${file.name}: the upload was cut off; try again.` });
    xhr.send(file);
  });
}

async function upload(files) {
  if (!files.length) return;
  if (panel.hidden) $("toggle-files").click();
  progress.hidden = false;
  const results = [];
  for (const [i, file] of [...files].entries()) results.push(await uploadOne(file, i, files.length));
  progress.hidden = true;
  const ok = results.filter((r) => r.ok).length;
  const failed = results.filter((r) => !r.ok).map((r) => r.text);
  message.textContent = (files.length === 1 ? results[0].text
    : `${counted(ok, "file")} uploaded.`) + (failed.length && files.length > 1 ? ` ${failed.join(" ")}` : "");
  message.dataset.result = failed.length ? "error" : "ok";
  input.value = "";
  refresh();
}

input.addEventListener("change", () => upload(input.files));
$("downloads-refresh").addEventListener("click", refresh);
$("toggle-files").addEventListener("click", () => { if (panel.hidden === false) refresh(); });

// Drag and drop onto the desktop: only while signed in (the Files button is then shown).
let dragDepth = 0;
const filesOffered = () => !$("toggle-files").hidden;
stage.addEventListener("dragenter", (ev) => {
  if (!filesOffered() || !ev.dataTransfer || ![...ev.dataTransfer.types].includes("Files")) return;
  ev.preventDefault();
  dragDepth += 1;
  dropHint.hidden = false;
});
stage.addEventListener("dragover", (ev) => {
  if (filesOffered() && ev.dataTransfer && [...ev.dataTransfer.types].includes("Files")) ev.preventDefault();
});
stage.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) dropHint.hidden = true;
});
stage.addEventListener("drop", (ev) => {
  dragDepth = 0;
  dropHint.hidden = true;
  if (!filesOffered() || !ev.dataTransfer || !ev.dataTransfer.files.length) return;
  ev.preventDefault();
  upload(ev.dataTransfer.files);
});

window.addEventListener("gateway:signed-in", refresh);
window.gatewayFiles = { refresh, upload };
