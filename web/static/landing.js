// Landing page: client-side account search and live desktop states.
// Polls root + "api/desktops" every 3 s; on failure keeps the last state and shows an "offline" hint.
import { noun } from "./plural.js";

const POLL_MS = 3000;
const STATES = new Set(["queued", "starting", "ready", "failed", "stopped"]);

const root = document.body.dataset.root || "./";
const apiUrl = new URL(root + "api/desktops", location.href);
const list = document.getElementById("accounts");
const search = document.getElementById("search");
const noMatch = document.getElementById("no-match");
const offline = document.getElementById("offline");
const summaryReady = document.getElementById("summary-ready");
const summaryTotal = document.getElementById("summary-total");
const summaryNoun = document.getElementById("summary-noun");

function items() {
  return list ? Array.from(list.querySelectorAll("li.account-item")) : [];
}

// --- search ---------------------------------------------------------------
function normalise(s) {
  return (s || "").toLowerCase().replace(/\s+/g, "");
}

function applyFilter() {
  const q = normalise(search ? search.value : "");
  let shown = 0;
  for (const li of items()) {
    const match = q === "" || normalise(li.dataset.account).includes(q);
    li.hidden = !match;
    if (match) shown += 1;
  }
  if (noMatch) noMatch.hidden = shown !== 0 || items().length === 0;
  if (list) list.classList.toggle("filtered", q !== "");
  return shown;
}

if (search) {
  search.addEventListener("input", applyFilter);
  search.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      // Enter opens the account when exactly one matches.
      const visible = items().filter((li) => !li.hidden);
      if (visible.length === 1) {
        ev.preventDefault();
        visible[0].querySelector("a.account").click();
      }
    } else if (ev.key === "Escape") {
      search.value = "";
      applyFilter();
    }
  });
  // Keep a filter typed before the page finished loading (and after "back").
  applyFilter();
}

// Typing anywhere on the page goes to the search box (handy on a projector/laptop).
document.addEventListener("keydown", (ev) => {
  if (!search || ev.defaultPrevented || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
  if (ev.key.length === 1 && /[A-Za-z0-9._-]/.test(ev.key)) {
    search.focus();
  }
});

// --- live states ------------------------------------------------------------
function setState(li, state, reason) {
  if (!STATES.has(state)) return;
  const a = li.querySelector("a.account");
  const badge = li.querySelector(".state");
  const reasonEl = li.querySelector(".reason");
  if (a) a.dataset.state = state;
  if (badge && badge.dataset.state !== state) {
    badge.dataset.state = state;
    badge.textContent = state;
  }
  if (reasonEl) {
    // Failed: why; queued: why it waits and when it should start (Slurm's estimate).
    const text = (state === "failed" || state === "queued") && reason ? String(reason) : "";
    if (reasonEl.textContent !== text) reasonEl.textContent = text;
    reasonEl.hidden = text === "";
  }
}

function updateSummary() {
  if (!summaryReady) return;
  const all = items();
  summaryReady.textContent = String(all.filter((li) => li.querySelector(".state")?.dataset.state === "ready").length);
  if (summaryTotal) summaryTotal.textContent = String(all.length);
  if (summaryNoun) summaryNoun.textContent = noun(all.length, "desktop");
}

function applyDesktops(data) {
  if (!data || !Array.isArray(data.desktops)) throw new Error("unexpected answer");
  const byAccount = new Map(items().map((li) => [li.dataset.account, li]));
  for (const d of data.desktops) {
    const li = byAccount.get(d && d.account);
    if (li) setState(li, d.state, d.reason);
  }
  updateSummary();
}

let timer = null;
async function poll() {
  timer = null;
  if (document.visibilityState === "hidden") { schedule(); return; }
  try {
    const resp = await fetch(apiUrl, { cache: "no-store", credentials: "same-origin",
                                       headers: { "Accept": "application/json" } });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    applyDesktops(await resp.json());
    if (offline) offline.hidden = true;
  } catch (err) {
    if (offline) offline.hidden = false;
  } finally {
    schedule();
  }
}

function schedule() {
  if (timer === null && list) timer = setTimeout(poll, POLL_MS);
}

// Poll faster when the tab comes back into view; don't poll while hidden.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    poll();
  }
});

window.gatewayLanding = { poll, applyFilter };
schedule();
