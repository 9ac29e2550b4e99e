// Wall of live thumbnails: every ready desktop's picture, reloaded every few seconds while the page is open.
import { counted } from "./plural.js";

const wall = document.getElementById("wall");
const summary = document.getElementById("summary");
const intervalMs = Math.max(500, 1000 * Number(wall.dataset.intervalS || 5));
const figures = new Map();

function figureFor(account) {
  let figure = figures.get(account);
  if (!figure) {
    figure = document.createElement("figure");
    figure.dataset.account = account;
    const link = document.createElement("a");
    link.href = `watch/${encodeURIComponent(account)}`;
    link.title = `Watch ${account} (view only)`;
    const img = document.createElement("img");
    img.alt = `Screen of ${account}`;
    img.width = 320;
    link.append(img);
    const caption = document.createElement("figcaption");
    figure.append(link, caption);
    figures.set(account, figure);
  }
  return figure;
}

async function refresh() {
  try {
    const response = await fetch("api/desktops", { cache: "no-store" });
    if (!response.ok) throw new Error(response.statusText);
    const rows = (await response.json()).desktops;
    const shown = [];
    for (const row of rows) {
      const figure = figureFor(row.account);
      const caption = figure.querySelector("figcaption");
      caption.replaceChildren();
      const name = document.createElement("span");
      name.textContent = row.account;
      const state = document.createElement("span");
      state.textContent = `${row.state}${row.viewers ? ` · ${counted(row.viewers, "viewer")}` : ""}`;
      state.className = `state-${row.state}`;
      caption.append(name, state);
      const img = figure.querySelector("img");
      if (row.state === "ready") img.src = `api/thumbnail/${encodeURIComponent(row.account)}.png?t=${Date.now()}`;
      else img.removeAttribute("src");
      shown.push(figure);
    }
    wall.replaceChildren(...shown);
    summary.textContent = `${rows.filter((r) => r.state === "ready").length} of ${counted(rows.length, "desktop")} ready`;
  } catch (err) {
    summary.textContent = "Connection to the gateway lost; retrying…";
  }
}

refresh();
setInterval(refresh, intervalMs);
