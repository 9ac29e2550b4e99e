// The organiser's cockpit: live desktop table (server-sent events), sort, filter, actions.
const tbody = document.querySelector("#desktops tbody");
const filter = document.getElementById("admin-filter");
const summary = document.getElementById("summary");
const shareOutput = document.getElementById("share-link");
let rows = [];
let sortKey = "account";
let sortDir = 1;

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function uptime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function cell(content, label) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.textContent = content;
  return td;
}

function actionButton(row, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tool";
  button.textContent = action;
  button.setAttribute("aria-label", `${action} ${row.account}`);
  button.addEventListener("click", async () => {
    if ((action === "stop" || action === "restart") && !confirm(`${action} the desktop of ${row.account}?`)) return;
    button.disabled = true;
    try {
      const response = await fetch(`api/desktops/${encodeURIComponent(row.account)}/${action}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      const body = await response.json().catch(() => ({}));
      summary.textContent = response.ok ? `${row.account}: ${body.result}` : `${row.account}: ${action} failed`;
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

// Instructors' view-only tools: watch here, or hand out an expiring link (gateway/watch.py).
function watchLink(row) {
  const link = document.createElement("a");
  link.className = "tool";
  link.href = `watch/${encodeURIComponent(row.account)}`;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.textContent = "watch";
  link.setAttribute("aria-label", `watch ${row.account} (view only)`);
  return link;
}

function shareButton(row) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tool";
  button.textContent = "share view-only link";
  button.setAttribute("aria-label", `share a view-only link to ${row.account}`);
  button.addEventListener("click", async () => {
    const answer = prompt(`Minutes the view-only link to ${row.account} stays valid`, "60");
    if (answer === null) return;
    const minutes = Number(answer);
    button.disabled = true;
    try {
      const response = await fetch(`api/desktops/${encodeURIComponent(row.account)}/share`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ minutes }),
      });
      if (!response.ok) throw new Error(await response.text());
      const body = await response.json();
      const url = new URL(`../${body.path}`, location.href).href;
      const until = new Date(body.expires_at * 1000).toLocaleTimeString();
      shareOutput.value = url;
      shareOutput.hidden = false;
      summary.textContent = `View-only link to ${row.account}, valid until ${until}`;
      if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(url).catch(() => {});
    } catch (err) {
      summary.textContent = `${row.account}: no link (${err.message})`;
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

function render() {
  const needle = filter.value.trim().toLowerCase();
  const shown = rows
    .filter((r) => !needle || [r.account, r.state, r.host, r.reason].some((v) => text(v).toLowerCase().includes(needle)))
    .sort((a, b) => (text(a[sortKey]) > text(b[sortKey]) ? sortDir : text(a[sortKey]) < text(b[sortKey]) ? -sortDir : 0));
  tbody.replaceChildren(...shown.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.account = r.account;
    tr.dataset.state = r.state;
    tr.append(cell(r.account, "Account"));
    const state = cell(r.state + (r.reason ? ` (${r.reason})` : ""), "State");
    state.className = `state-cell state-${r.state}`;
    tr.append(state, cell(text(r.viewers), "Viewers"), cell(uptime(r.uptime_s), "Up"),
      cell(text(r.restarts), "Restarts"),
      cell(r.host ? `${r.host}:${r.port}${r.job_id ? ` job ${r.job_id}` : ""}` : "", "Where"));
    const actions = document.createElement("td");
    actions.dataset.label = "Actions";
    for (const a of ["restart", "disconnect", r.state === "stopped" ? "start" : "stop"]) actions.append(actionButton(r, a));
    if (r.protocol === "vnc" && r.state === "ready") actions.append(watchLink(r), shareButton(r));
    tr.append(actions);
    return tr;
  }));
  const ready = rows.filter((r) => r.state === "ready").length;
  const viewers = rows.reduce((n, r) => n + (r.viewers || 0), 0);
  summary.textContent = `${ready} of ${rows.length} ready, ${viewers} viewers connected`;
}

for (const button of document.querySelectorAll("th button[data-sort]")) {
  button.addEventListener("click", () => {
    sortDir = sortKey === button.dataset.sort ? -sortDir : 1;
    sortKey = button.dataset.sort;
    render();
  });
}
filter.addEventListener("input", render);

const events = new EventSource("events");
events.onmessage = (ev) => {
  rows = JSON.parse(ev.data).desktops;
  render();
};
events.onerror = () => { summary.textContent = "Connection to the gateway lost; retrying…"; };
window.gatewayAdmin = { get rows() { return rows; } };
