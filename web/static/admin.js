// The organiser's cockpit: live desktop table (server-sent events), sort, filter, actions.
//
// Rows are updated in place (cells change their text, buttons stay the same elements), so keyboard
// focus and the messages of actions survive the updates every two seconds. While the organiser types
// in the filter, updates wait until they pause.
import { counted } from "./plural.js";

const tbody = document.querySelector("#desktops tbody");
const filter = document.getElementById("admin-filter");
const summary = document.getElementById("summary");
const message = document.getElementById("admin-message");
const liveNote = document.getElementById("live-note");
const shareBox = document.getElementById("share-box");
const TYPING_PAUSE_MS = 1500;
let rows = [];
let sortKey = "account";
let sortDir = 1;
let lastTyped = 0;
let pending = null;
const rendered = new Map();   // account -> {tr, cells, actionsKey}
// For tests and curious organisers: updates received, and updates applied to the table.
const live = { get rows() { return rows; }, updates: 0, applied: 0 };
window.gatewayAdmin = live;

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function uptime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function participant(r) {
  if (!r.participant) return "";
  return r.participant.name ? `${r.participant.name} <${r.participant.email}>` : r.participant.email;
}

function say(text) {
  message.textContent = text;
}

function actionButton(account, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tool";
  button.textContent = action;
  button.dataset.action = action;
  button.setAttribute("aria-label", `${action} ${account}`);
  button.addEventListener("click", async () => {
    if ((action === "stop" || action === "restart") && !confirm(`${action} the desktop of ${account}?`)) return;
    button.disabled = true;
    try {
      const response = await fetch(`api/desktops/${encodeURIComponent(account)}/${action}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      const body = await response.json().catch(() => ({}));
      say(response.ok ? `${account}: ${body.result}` : `${account}: ${action} failed`);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

// Instructors' view-only tools: watch here, or hand out an expiring link (gateway/web/watch.py).
function watchLink(account) {
  const link = document.createElement("a");
  link.className = "tool";
  link.href = `watch/${encodeURIComponent(account)}`;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.textContent = "watch";
  link.setAttribute("aria-label", `watch ${account} (view only)`);
  return link;
}

function shareButton(account) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tool";
  button.textContent = "share view-only link";
  button.dataset.action = "share";
  button.setAttribute("aria-label", `share a view-only link to ${account}`);
  button.addEventListener("click", async () => {
    const answer = prompt(`Minutes the view-only link to ${account} stays valid`, "60");
    if (answer === null) return;
    const minutes = Number(answer);
    button.disabled = true;
    try {
      const response = await fetch(`api/desktops/${encodeURIComponent(account)}/share`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ minutes }),
      });
      if (!response.ok) throw new Error(await response.text());
      const body = await response.json();
      const url = new URL(`../${body.path}`, location.href).href;
      const until = new Date(body.expires_at * 1000).toLocaleString();
      document.getElementById("share-account").textContent = account;
      document.getElementById("share-expiry").textContent = until;
      document.getElementById("share-link").value = url;
      shareBox.hidden = false;
      say(`View-only link to ${account} made, valid until ${until}.`);
      document.getElementById("share-link").focus();
      document.getElementById("share-link").select();
    } catch (err) {
      say(`${account}: no link (${err.message})`);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

const COLUMNS = [
  ["account", "Account", (r) => r.account],
  ["participant", "Participant", participant],
  ["state", "State", (r) => r.state + (r.reason ? ` (${r.reason})` : "")],
  ["viewers", "Viewers", (r) => text(r.viewers)],
  ["uptime_s", "Up", (r) => uptime(r.uptime_s)],
  ["restarts", "Restarts", (r) => text(r.restarts)],
  ["host", "Where", (r) => (r.host ? `${r.host}:${r.port}${r.job_id ? ` job ${r.job_id}` : ""}` : "")],
];

function actionsFor(r) {
  const names = ["restart", "disconnect", r.state === "stopped" ? "start" : "stop"];
  if (r.protocol === "vnc" && r.state === "ready") names.push("watch", "share");
  return names;
}

function makeRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.account = r.account;
  const cells = {};
  for (const [key, label] of COLUMNS) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.dataset.column = key;
    cells[key] = td;
    tr.append(td);
  }
  const actions = document.createElement("td");
  actions.dataset.label = "Actions";
  actions.className = "actions-cell";
  cells.actions = actions;
  tr.append(actions);
  return { tr, cells, actionsKey: "" };
}

// Change only what changed: an element that stays keeps its focus.
function updateRow(entry, r) {
  entry.tr.dataset.state = r.state;
  for (const [key, , value] of COLUMNS) {
    const content = value(r);
    if (entry.cells[key].textContent !== content) entry.cells[key].textContent = content;
  }
  entry.cells.state.className = `state-cell state-${r.state}`;
  const names = actionsFor(r);
  const key = names.join(" ");
  if (entry.actionsKey !== key) {
    const byName = new Map([...entry.cells.actions.children].map((el) => [el.dataset.action || "watch", el]));
    const fresh = names.map((name) => byName.get(name)
      || (name === "watch" ? watchLink(r.account) : name === "share" ? shareButton(r.account) : actionButton(r.account, name)));
    // Remove what is gone, append what is new, in order; elements that stay are never detached.
    for (const el of [...entry.cells.actions.children]) if (!fresh.includes(el)) el.remove();
    fresh.forEach((el, i) => {
      if (entry.cells.actions.children[i] !== el) entry.cells.actions.insertBefore(el, entry.cells.actions.children[i] || null);
    });
    entry.actionsKey = key;
  }
}

function compare(a, b) {
  const va = sortKey === "participant" ? participant(a) : a[sortKey];
  const vb = sortKey === "participant" ? participant(b) : b[sortKey];
  const numeric = typeof va === "number" || typeof vb === "number";
  const x = numeric ? (va ?? -1) : text(va).toLowerCase();
  const y = numeric ? (vb ?? -1) : text(vb).toLowerCase();
  return x > y ? sortDir : x < y ? -sortDir : 0;
}

function render() {
  const needle = filter.value.trim().toLowerCase();
  const shown = rows
    .filter((r) => !needle || [r.account, participant(r), r.state, r.host, r.reason]
      .some((v) => text(v).toLowerCase().includes(needle)))
    .sort(compare);
  const wanted = new Set(shown.map((r) => r.account));
  for (const [account, entry] of rendered) {
    if (!rows.some((r) => r.account === account)) { entry.tr.remove(); rendered.delete(account); }
    else entry.tr.hidden = !wanted.has(account);
  }
  let previous = null;
  for (const r of shown) {
    let entry = rendered.get(r.account);
    if (!entry) { entry = makeRow(r); rendered.set(r.account, entry); }
    updateRow(entry, r);
    // Move a row only when it is out of order (moving a row would take the focus from its buttons).
    const expected = previous ? previous.nextElementSibling : tbody.firstElementChild;
    if (expected !== entry.tr) tbody.insertBefore(entry.tr, expected);
    previous = entry.tr;
  }
  const ready = rows.filter((r) => r.state === "ready").length;
  const viewers = rows.reduce((n, r) => n + (r.viewers || 0), 0);
  summary.textContent = `${ready} of ${counted(rows.length, "desktop")} ready, ${counted(viewers, "viewer")} connected`;
}

function showSort() {
  for (const button of document.querySelectorAll("th button[data-sort]")) {
    const th = button.closest("th");
    const active = button.dataset.sort === sortKey;
    if (active) th.setAttribute("aria-sort", sortDir === 1 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
    button.dataset.arrow = active ? (sortDir === 1 ? "▲" : "▼") : "";
  }
}

for (const button of document.querySelectorAll("th button[data-sort]")) {
  button.addEventListener("click", () => {
    sortDir = sortKey === button.dataset.sort ? -sortDir : 1;
    sortKey = button.dataset.sort;
    showSort();
    render();
  });
}
showSort();

// Typing in the filter: the table follows what is typed, and live updates wait for a pause.
filter.addEventListener("input", () => {
  lastTyped = Date.now();
  render();
});

function typing() {
  return document.activeElement === filter && Date.now() - lastTyped < TYPING_PAUSE_MS;
}

function apply(data) {
  if (typing()) {
    pending = data;
    liveNote.textContent = "Live updates paused while you type";
    return;
  }
  pending = null;
  liveNote.textContent = "Live";
  rows = data.desktops;
  live.applied += 1;
  render();
}
setInterval(() => { if (pending && !typing()) apply(pending); }, 500);

const events = new EventSource("events");
events.onmessage = (ev) => apply(JSON.parse(ev.data));
events.onerror = () => { liveNote.textContent = "Connection to the gateway lost; retrying…"; };
events.addEventListener("message", () => { live.updates += 1; });
