// Viewer page of the workshop desktop gateway, built on noVNC's RFB class.
//
// Works with the npm package @novnc/novnc 1.7.0 and with Debian's /usr/share/novnc (1.3.0): both have
// core/rfb.js with RFB as the default export.
//
// Contract (used by tests):
//   window.gatewayViewer = { rfb, state, ... }   rfb: the RFB instance or null; state: the #status data-state
//   #status[data-state] is one of idle, connecting, connected, wrong-password, reconnecting, disconnected.
//
// The password is kept in memory only (never in a URL, never in localStorage) so that reconnects after a
// drop don't ask again. Only display settings (quality, compression, scaling) are stored in localStorage.

const KEYSYM = {
  Escape: 0xff1b,
  Tab: 0xff09,
  Control_L: 0xffe3,
  Alt_L: 0xffe9,
};
const BACKOFF_S = [1, 2, 4, 8, 10];
const STORAGE_KEY = "gateway.viewer.settings.v1";
const DEFAULTS = Object.freeze({ quality: 6, compression: 2, scaling: null });
const STATUS_TEXT = {
  idle: "Enter your password to connect",
  connecting: "Connecting…",
  connected: "Connected",
  "wrong-password": "Wrong password",
  reconnecting: "Connection lost. Reconnecting…",
  disconnected: "Disconnected",
};

// --- configuration ------------------------------------------------------------------------------------
const config = JSON.parse(document.getElementById("viewer-config").textContent);
// Instructors' watch pages (gateway/watch.py): never send input; connect with config.password.
const viewOnly = config.view_only === true;
const root = config.root || "./";
const novncBase = new URL(config.novnc_url, location.href);

function websocketUrl() {
  const url = new URL(root + config.websocket_path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// --- elements -------------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"),
  statusText: $("status-text"),
  reconnectNow: $("reconnect-now"),
  desktopName: $("desktop-name"),
  toolbar: $("toolbar"),
  stage: $("stage"),
  screen: $("screen"),
  form: $("login"),
  password: $("password"),
  connect: $("connect"),
  loginMessage: $("login-message"),
  scaling: $("scaling"),
  fullscreen: $("fullscreen"),
  keyCtrlAltDel: $("key-ctrl-alt-del"),
  keyEsc: $("key-esc"),
  keyTab: $("key-tab"),
  keyCtrl: $("key-ctrl"),
  keyAlt: $("key-alt"),
  disconnect: $("disconnect"),
  quality: $("quality"),
  qualityValue: $("quality-value"),
  compression: $("compression"),
  compressionValue: $("compression-value"),
  settingsReset: $("settings-reset"),
  clipText: $("clipboard-text"),
  clipSend: $("clipboard-send"),
  clipRead: $("clipboard-read"),
  clipReceived: $("clipboard-received"),
  clipCopy: $("clipboard-copy"),
  clipMessage: $("clipboard-message"),
};
const panels = {
  "toggle-clipboard": $("clipboard-panel"),
  "toggle-settings": $("settings-panel"),
  "toggle-help": $("help-panel"),
};

// --- state ------------------------------------------------------------------------------------------------
const viewer = {
  rfb: null,
  state: "idle",
  account: config.account,
  desktopName: "",
  lastClipboard: "",     // last text received from the desktop
  reconnectAttempt: 0,
};
window.gatewayViewer = viewer;

let password = null;          // in memory only
// Requests the gateway must check against the account's password (the desktop's keyboard layout)
// use the password the participant typed, without it leaving this module or going into a URL.
viewer.postAuthenticated = (url, body) => fetch(url, {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ ...body, password }),
});
viewer.hasPassword = () => password !== null;
let userDisconnect = false;   // the participant pressed Disconnect
let securityFailed = false;   // wrong password: never reconnect automatically
let reconnectTimer = null;
let countdownTimer = null;
let reconnectDeadline = 0;
let restartHint = "";         // from api/desktops while reconnecting
let RFB = null;

// --- settings (localStorage: display settings only, never the password) ----------------------------------
function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") || {};
  } catch (e) {
    saved = {};
  }
  const clampLevel = (v, d) => (Number.isInteger(v) && v >= 0 && v <= 9 ? v : d);
  const scaling = ["remote", "scale", "none"].includes(saved.scaling)
    ? saved.scaling
    : (window.innerWidth >= 1024 ? "remote" : "scale");
  return {
    quality: clampLevel(saved.quality, DEFAULTS.quality),
    compression: clampLevel(saved.compression, DEFAULTS.compression),
    scaling,
  };
}

const settings = loadSettings();
viewer.settings = settings;

function saveSettings() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify({
      quality: settings.quality, compression: settings.compression, scaling: settings.scaling,
    }));
  } catch (e) {
    // Storage disabled (private mode): settings last for this page only.
  }
}

function applySettings(rfb = viewer.rfb) {
  el.quality.value = String(settings.quality);
  el.qualityValue.value = String(settings.quality);
  el.qualityValue.textContent = String(settings.quality);
  el.compression.value = String(settings.compression);
  el.compressionValue.value = String(settings.compression);
  el.compressionValue.textContent = String(settings.compression);
  el.scaling.value = settings.scaling;
  document.body.dataset.scaling = settings.scaling;
  if (!rfb) return;
  rfb.qualityLevel = settings.quality;
  rfb.compressionLevel = settings.compression;
  rfb.clipViewport = false;
  rfb.scaleViewport = settings.scaling === "scale";
  rfb.resizeSession = settings.scaling === "remote" && !viewOnly;
}

// --- status -----------------------------------------------------------------------------------------------
function setState(state, text) {
  viewer.state = state;
  el.status.dataset.state = state;
  document.body.dataset.viewerState = state;
  el.statusText.textContent = text || STATUS_TEXT[state];
  const showForm = state === "idle" || state === "wrong-password" || state === "disconnected";
  el.form.hidden = !showForm;
  el.connect.disabled = false;
  el.toolbar.hidden = state !== "connected";
  el.reconnectNow.hidden = state !== "reconnecting";
  if (state !== "connected") releaseModifiers();
  if (showForm) {
    el.password.required = password === null;
    el.password.placeholder = password === null ? "" : "Remembered in this tab: just press Connect";
  }
}

function loginMessage(text) {
  el.loginMessage.textContent = text || "";
}

// --- noVNC ------------------------------------------------------------------------------------------------
async function loadRFB() {
  if (!RFB) {
    const module = await import(new URL("core/rfb.js", novncBase).href);
    RFB = module.default;
  }
  return RFB;
}

function detach(rfb) {
  if (!rfb) return;
  rfb._gatewayDetached = true;
  try {
    rfb.disconnect();
  } catch (e) {
    // already disconnected
  }
}

async function connect() {
  clearReconnect();
  if (password === null) {
    setState("idle");
    el.password.focus();
    return;
  }
  userDisconnect = false;
  securityFailed = false;
  const attempt = viewer.reconnectAttempt;
  setState("connecting", attempt > 0 ? `Reconnecting… (attempt ${attempt + 1})` : STATUS_TEXT.connecting);

  let RFBClass;
  try {
    RFBClass = await loadRFB();
  } catch (err) {
    console.error("gateway: cannot load noVNC from", novncBase.href, err);
    setState("disconnected", "The viewer could not be loaded. Reload the page or ask the organiser.");
    return;
  }
  if (viewer.state !== "connecting") return;  // cancelled meanwhile

  detach(viewer.rfb);
  el.screen.replaceChildren();

  let rfb;
  try {
    rfb = new RFBClass(el.screen, websocketUrl(), {
      credentials: { password },
      shared: true,
    });
  } catch (err) {
    console.error("gateway: cannot connect", err);
    scheduleReconnect();
    return;
  }
  viewer.rfb = rfb;
  rfb.viewOnly = viewOnly;
  rfb.focusOnClick = true;
  rfb.background = "transparent";
  applySettings(rfb);

  const current = (handler) => (ev) => {
    if (rfb._gatewayDetached || viewer.rfb !== rfb) return;
    handler(ev);
  };
  rfb.addEventListener("connect", current(onConnect));
  rfb.addEventListener("disconnect", current(onDisconnect));
  rfb.addEventListener("credentialsrequired", current(onCredentialsRequired));
  rfb.addEventListener("securityfailure", current(onSecurityFailure));
  rfb.addEventListener("desktopname", current(onDesktopName));
  rfb.addEventListener("clipboard", current(onClipboard));
}

function onConnect() {
  viewer.reconnectAttempt = 0;
  restartHint = "";
  loginMessage("");
  setState("connected", viewer.desktopName ? `Connected to ${viewer.desktopName}` : STATUS_TEXT.connected);
  applySettings();
  window.dispatchEvent(new Event("resize"));
  viewer.rfb.focus();
}

function onDisconnect(ev) {
  const clean = !!(ev.detail && ev.detail.clean);
  const wasConnected = viewer.state === "connected";
  viewer.rfb = null;
  if (securityFailed) {
    // Already shown by onSecurityFailure; never retry a wrong password.
    return;
  }
  if (userDisconnect) {
    setState("disconnected", "Disconnected. Press Connect to continue.");
    loginMessage("");
    el.connect.focus();
    return;
  }
  // A drop: the network, the proxy, or the desktop being restarted. Reconnect with backoff.
  console.info("gateway: connection dropped", { clean, wasConnected });
  scheduleReconnect();
}

function onSecurityFailure(ev) {
  securityFailed = true;
  password = null;
  clearReconnect();
  viewer.reconnectAttempt = 0;
  const reason = ev.detail && ev.detail.reason;
  if (reason) console.info("gateway: security failure:", reason);
  setState("wrong-password", "Wrong password");
  loginMessage("Wrong password. Please try again.");
  el.password.value = "";
  el.password.focus();
}

function onCredentialsRequired(ev) {
  const types = (ev.detail && ev.detail.types) || ["password"];
  if (password !== null && types.every((t) => t === "password")) {
    viewer.rfb.sendCredentials({ password });
    return;
  }
  awaitingCredentials = true;
  setState("idle", "The desktop asks for your password");
  el.password.focus();
}
let awaitingCredentials = false;

function onDesktopName(ev) {
  viewer.desktopName = (ev.detail && ev.detail.name) || "";
  el.desktopName.textContent = viewer.desktopName;
  el.desktopName.title = viewer.desktopName;
  if (viewer.state === "connected") {
    el.statusText.textContent = viewer.desktopName ? `Connected to ${viewer.desktopName}` : STATUS_TEXT.connected;
  }
}

// --- reconnect with backoff and a visible countdown ----------------------------------------------------
function clearReconnect() {
  if (reconnectTimer !== null) clearTimeout(reconnectTimer);
  if (countdownTimer !== null) clearInterval(countdownTimer);
  reconnectTimer = null;
  countdownTimer = null;
}

function scheduleReconnect() {
  clearReconnect();
  const delay = BACKOFF_S[Math.min(viewer.reconnectAttempt, BACKOFF_S.length - 1)];
  viewer.reconnectAttempt += 1;
  reconnectDeadline = Date.now() + delay * 1000;
  const tick = () => {
    const left = Math.max(0, Math.ceil((reconnectDeadline - Date.now()) / 1000));
    const base = restartHint || "Connection lost.";
    setState("reconnecting", `${base} Reconnecting in ${left} s…`);
  };
  tick();
  countdownTimer = setInterval(tick, 250);
  reconnectTimer = setTimeout(() => {
    clearReconnect();
    connect();
  }, delay * 1000);
  checkDesktopState();
}

// While reconnecting, ask the gateway whether the organiser is restarting this desktop.
async function checkDesktopState() {
  try {
    const resp = await fetch(new URL(root + "api/desktops", location.href),
                             { cache: "no-store", headers: { "Accept": "application/json" } });
    if (!resp.ok) return;
    const data = await resp.json();
    const mine = (data.desktops || []).find((d) => d && d.account === config.account);
    if (!mine) return;
    if (mine.state === "starting" || mine.state === "queued") {
      restartHint = "Your desktop is being restarted.";
    } else if (mine.state === "failed") {
      restartHint = "Your desktop failed" + (mine.reason ? `: ${mine.reason}.` : ".") + " Ask the organiser.";
    } else if (mine.state === "stopped") {
      restartHint = "Your desktop is stopped. Ask the organiser.";
    } else {
      restartHint = "";
    }
  } catch (e) {
    restartHint = "";
  }
}

el.reconnectNow.addEventListener("click", () => {
  if (viewer.state === "reconnecting") connect();
});
window.addEventListener("online", () => {
  if (viewer.state === "reconnecting") connect();
});

// --- password form -----------------------------------------------------------------------------------------
el.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const typed = el.password.value;
  if (typed === "" && password === null) {
    loginMessage("Please type your password.");
    el.password.focus();
    return;
  }
  if (typed !== "") password = typed;
  el.password.value = "";
  loginMessage("");
  if (awaitingCredentials && viewer.rfb) {
    awaitingCredentials = false;
    setState("connecting");
    viewer.rfb.sendCredentials({ password });
    return;
  }
  awaitingCredentials = false;
  viewer.reconnectAttempt = 0;
  connect();
});

el.disconnect.addEventListener("click", () => {
  userDisconnect = true;
  clearReconnect();
  if (viewer.rfb) {
    viewer.rfb.disconnect();
  } else {
    setState("disconnected", "Disconnected. Press Connect to continue.");
  }
});

// --- keys ----------------------------------------------------------------------------------------------------
function refocusAfterPointer(ev) {
  // Give the keyboard back to the desktop after a mouse/touch click, not after keyboard activation.
  if (ev.detail > 0 && viewer.rfb) viewer.rfb.focus();
}

el.keyCtrlAltDel.addEventListener("click", (ev) => {
  if (viewer.rfb) viewer.rfb.sendCtrlAltDel();
  refocusAfterPointer(ev);
});
el.keyEsc.addEventListener("click", (ev) => {
  if (viewer.rfb) viewer.rfb.sendKey(KEYSYM.Escape, "Escape");
  refocusAfterPointer(ev);
});
el.keyTab.addEventListener("click", (ev) => {
  if (viewer.rfb) viewer.rfb.sendKey(KEYSYM.Tab, "Tab");
  refocusAfterPointer(ev);
});

const sticky = [
  { button: el.keyCtrl, keysym: KEYSYM.Control_L, code: "ControlLeft" },
  { button: el.keyAlt, keysym: KEYSYM.Alt_L, code: "AltLeft" },
];
for (const mod of sticky) {
  mod.button.addEventListener("click", (ev) => {
    const down = mod.button.getAttribute("aria-pressed") !== "true";
    mod.button.setAttribute("aria-pressed", String(down));
    if (viewer.rfb) viewer.rfb.sendKey(mod.keysym, mod.code, down);
    refocusAfterPointer(ev);
  });
}

function releaseModifiers() {
  for (const mod of sticky) {
    if (mod.button.getAttribute("aria-pressed") === "true") {
      mod.button.setAttribute("aria-pressed", "false");
      if (viewer.rfb && viewer.state === "connected") {
        try { viewer.rfb.sendKey(mod.keysym, mod.code, false); } catch (e) { /* gone */ }
      }
    }
  }
}

// --- display --------------------------------------------------------------------------------------------------
el.scaling.addEventListener("change", () => {
  settings.scaling = el.scaling.value;
  saveSettings();
  applySettings();
});

function isFullscreen() {
  return !!(document.fullscreenElement || document.webkitFullscreenElement);
}

if (!(document.fullscreenEnabled || document.webkitFullscreenEnabled)) {
  el.fullscreen.hidden = true;
}
el.fullscreen.addEventListener("click", async (ev) => {
  try {
    if (isFullscreen()) {
      await (document.exitFullscreen || document.webkitExitFullscreen).call(document);
    } else {
      const target = document.documentElement;
      await (target.requestFullscreen || target.webkitRequestFullscreen).call(target);
      // Chromium: in full screen, pass Ctrl+W, Ctrl+T, Alt+Tab ... to the desktop. Hold Esc to leave.
      if (navigator.keyboard && navigator.keyboard.lock) {
        navigator.keyboard.lock().catch(() => {});
      }
    }
  } catch (err) {
    console.info("gateway: full screen not possible", err);
  }
  refocusAfterPointer(ev);
});
function onFullscreenChange() {
  const fs = isFullscreen();
  el.fullscreen.setAttribute("aria-pressed", String(fs));
  el.fullscreen.textContent = fs ? "Exit full screen" : "Full screen";
  if (!fs && navigator.keyboard && navigator.keyboard.unlock) navigator.keyboard.unlock();
}
document.addEventListener("fullscreenchange", onFullscreenChange);
document.addEventListener("webkitfullscreenchange", onFullscreenChange);

// --- quality ---------------------------------------------------------------------------------------------------
function onLevelInput(which) {
  const input = which === "quality" ? el.quality : el.compression;
  const value = Math.max(0, Math.min(9, parseInt(input.value, 10) || 0));
  settings[which] = value;
  saveSettings();
  applySettings();
}
el.quality.addEventListener("input", () => onLevelInput("quality"));
el.quality.addEventListener("change", () => onLevelInput("quality"));
el.compression.addEventListener("input", () => onLevelInput("compression"));
el.compression.addEventListener("change", () => onLevelInput("compression"));
el.settingsReset.addEventListener("click", () => {
  settings.quality = DEFAULTS.quality;
  settings.compression = DEFAULTS.compression;
  saveSettings();
  applySettings();
});

// --- panels ----------------------------------------------------------------------------------------------------
for (const [buttonId, panel] of Object.entries(panels)) {
  const button = $(buttonId);
  button.addEventListener("click", () => {
    const open = panel.hidden;
    for (const [otherId, other] of Object.entries(panels)) {
      other.hidden = true;
      $(otherId).setAttribute("aria-expanded", "false");
    }
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) {
      const first = panel.querySelector("textarea, input, button");
      if (first && buttonId === "toggle-clipboard") first.focus();
    }
    // noVNC 1.3 only follows window resizes: tell it the screen area changed.
    window.dispatchEvent(new Event("resize"));
  });
}
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return;
  for (const [buttonId, panel] of Object.entries(panels)) {
    if (!panel.hidden && panel.contains(document.activeElement)) {
      panel.hidden = true;
      $(buttonId).setAttribute("aria-expanded", "false");
      $(buttonId).focus();
      window.dispatchEvent(new Event("resize"));
    }
  }
});

// --- clipboard -------------------------------------------------------------------------------------------------
function clipMessage(text) {
  el.clipMessage.textContent = text;
}

function sendToDesktop(text) {
  if (!viewer.rfb || viewer.state !== "connected") {
    clipMessage("Not connected: connect first, then send.");
    return false;
  }
  viewer.rfb.clipboardPasteFrom(text);
  lastSent = text;
  const n = [...text].length;
  clipMessage(`Sent ${n} character${n === 1 ? "" : "s"} to the desktop clipboard.`);
  return true;
}
let lastSent = null;

el.clipSend.addEventListener("click", () => {
  sendToDesktop(el.clipText.value);
});
el.clipText.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    sendToDesktop(el.clipText.value);
  }
});

const canRead = !!(navigator.clipboard && navigator.clipboard.readText);
const canWrite = !!(navigator.clipboard && navigator.clipboard.writeText);
if (!canRead) {
  el.clipRead.hidden = true;
}
el.clipRead.addEventListener("click", async () => {
  try {
    const text = await navigator.clipboard.readText();
    el.clipText.value = text;
    sendToDesktop(text);
  } catch (err) {
    clipMessage("Your browser does not allow reading the clipboard here: paste into the box above instead.");
    el.clipText.focus();
  }
});

function onClipboard(ev) {
  const text = (ev.detail && ev.detail.text) || "";
  viewer.lastClipboard = text;
  el.clipReceived.value = text;
  if (canWrite && document.hasFocus()) {
    navigator.clipboard.writeText(text).then(
      () => clipMessage("Copied from the desktop to your clipboard."),
      () => clipMessage("Copied in the desktop: see the box below, or press “Copy to my computer”."),
    );
  } else {
    clipMessage("Copied in the desktop: see the box below.");
  }
}

el.clipCopy.addEventListener("click", async () => {
  const text = el.clipReceived.value;
  try {
    if (!canWrite) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(text);
    clipMessage("Copied to your clipboard.");
  } catch (err) {
    el.clipReceived.focus();
    el.clipReceived.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    clipMessage(ok ? "Copied to your clipboard." : "Select the text and press Ctrl+C.");
  }
});

// One-step paste where the browser already allows clipboard reads (https, permission granted):
// whenever the participant comes back to the desktop, the laptop's clipboard is offered to it.
async function syncLocalClipboard() {
  if (!canRead || viewer.state !== "connected" || !navigator.permissions) return;
  try {
    const perm = await navigator.permissions.query({ name: "clipboard-read" });
    if (perm.state !== "granted") return;
    const text = await navigator.clipboard.readText();
    if (text && text !== lastSent && text !== viewer.lastClipboard) {
      viewer.rfb.clipboardPasteFrom(text);
      lastSent = text;
    }
  } catch (e) {
    // Not allowed here (plain http, Firefox ...): the paste box is the way.
  }
}
window.addEventListener("focus", syncLocalClipboard);
el.screen.addEventListener("pointerdown", syncLocalClipboard, { capture: true });

// --- start -------------------------------------------------------------------------------------------------
applySettings();
setState("idle");
// Load noVNC early so that connecting is quick; errors are reported on connect.
loadRFB().catch(() => {});
el.password.focus();

Object.assign(viewer, {
  connect: (pw) => {
    if (typeof pw === "string" && pw !== "") password = pw;
    viewer.reconnectAttempt = 0;
    return connect();
  },
  disconnect: () => el.disconnect.click(),
  reconnectNow: () => { if (viewer.state === "reconnecting") connect(); },
  websocketUrl,
  novncBase: novncBase.href,
});

// --- view only (instructors) ---------------------------------------------------------------------------
if (viewOnly) {
  viewer.viewOnly = true;
  const inputControls = [el.keyCtrlAltDel.closest(".tool-group"), $("toggle-clipboard"), $("keyboard-layout"),
    document.querySelector('label[for="keyboard-layout"]'), $("keyboard-message")];
  for (const node of inputControls) if (node) node.hidden = true;
  el.scaling.querySelector('option[value="remote"]').disabled = true;  // never resize their desktop
  if (settings.scaling === "remote") settings.scaling = "scale";
  applySettings();
  if (typeof config.password === "string" && config.password !== "") viewer.connect(config.password);
}
