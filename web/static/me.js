// The personal page: "Show password" fetches the signed-in participant's own password (never in the
// page's HTML or a URL) and reveals it with a copy button; the desktop's state and reason stay fresh.
const root = document.body.dataset.root || "./";
const show = document.getElementById("show-password");
const value = document.getElementById("password");
const copy = document.getElementById("copy-password");
const message = document.getElementById("copy-message");

show?.addEventListener("click", async () => {
  if (!value.hidden) {
    value.hidden = true;
    copy.hidden = true;
    value.textContent = "";
    show.textContent = "Show password";
    return;
  }
  try {
    const response = await fetch(new URL(root + "me/password", location.href),
                                 { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(response.status === 401 ? "you are signed out; reload the page" : response.statusText);
    const body = await response.json();
    value.textContent = body.password;
    value.hidden = false;
    copy.hidden = false;
    show.textContent = "Hide password";
  } catch (err) {
    message.textContent = `Could not show the password: ${err.message}`;
  }
});

// The desktop's state and why (a queued Slurm desktop: why it waits and when it should start), kept
// fresh as the landing page keeps its list: from the public api/desktops, every 10 s while the page is
// seen, and at once when it is seen again.
const STATE_POLL_MS = 10000;
const account = document.getElementById("account")?.textContent.trim();
const stateBadge = document.getElementById("desktop-state");
const reasonText = document.getElementById("desktop-reason");

async function refreshState() {
  if (!stateBadge || document.visibilityState === "hidden") return;
  try {
    const response = await fetch(new URL(root + "api/desktops", location.href),
                                 { cache: "no-store", credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const mine = ((await response.json()).desktops || []).find((d) => d && d.account === account);
    if (!mine) return;
    if (stateBadge.dataset.state !== mine.state) {
      stateBadge.dataset.state = mine.state;
      stateBadge.textContent = mine.state;
    }
    const reason = mine.reason ? String(mine.reason) : "";
    if (reasonText.textContent !== reason) reasonText.textContent = reason;
    reasonText.hidden = reason === "";
  } catch (err) {
    // No answer (the network): the last known state stays.
  }
}

setInterval(refreshState, STATE_POLL_MS);
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") refreshState(); });
window.gatewayMe = { refreshState };
