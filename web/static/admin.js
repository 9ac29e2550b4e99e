// The organiser's cockpit: live desktop table (server-sent events), sort, filter, actions.
const tbody = document.querySelector("#desktops tbody");
const filter = document.getElementById("admin-filter");
const summary = document.getElementById("summary");
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
