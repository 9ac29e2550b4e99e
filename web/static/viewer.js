// Viewer page of the workshop desktop gateway, built on noVNC's RFB class.
//
// Works with the npm package @novnc/novnc 1.7.0 and with Debian's /usr/share/novnc (1.3.0): both have
// core/rfb.js with RFB as the default export.
//
// Contract (used by tests):
//   window.gatewayViewer = { rfb, state, ... }   rfb: the RFB instance or null; state: the #status data-state
//   #status[data-state] is one of idle, connecting, connected, wrong-password, reconnecting, disconnected,
//   unavailable (the desktop is queued, starting, stopped or failed: a message in the page body says what
//   to do, and the page connects by itself once it is ready; no countdown), refused (too many viewers of
//   this desktop are open: the page body says so, and Reconnect tries again; nothing automatic).
//
// The password is kept in memory only (never in a URL, never in localStorage) so that reconnects after a
// drop don't ask again. Only display settings (quality, compression, scaling) are stored in localStorage.

const KEYSYM = {
  Escape: 0xff1b,
  Tab: 0xff09,
  Control_L: 0xffe3,
  Alt_L: 0xffe9,
};
// Short backoff: after a Wi-Fi drop the viewer must be back within seconds of the network.
const BACKOFF_S = [0.5, 1, 2, 3];
// A websocket that is neither open nor failed after this long is abandoned (a blackholed network
// never answers; waiting for TCP's own timeout would take minutes).
const CONNECT_TIMEOUT_MS = 6000;
// While connected, a tiny request checks the network; this long without an answer means it is gone.
const PROBE_INTERVAL_MS = 2000;
const PROBE_TIMEOUT_MS = 2500;
const NETWORK_LOST_MS = 5000;
const STATE_POLL_MS = 3000;
const STORAGE_KEY = "gateway.viewer.settings.v1";
const STATUS_TEXT = {
  idle: "Enter your password to connect",
  connecting: "Connecting…",
  connected: "Connected",
  "wrong-password": "Wrong password",
  reconnecting: "Connection lost. Reconnecting…",
  disconnected: "Disconnected",
  unavailable: "Desktop not running",
  refused: "Too many viewers",
};
// What the page body says about a desktop that cannot be reached, and what to do.
const DESKTOP_MESSAGES = {
  queued: ["Your desktop is waiting for its turn", "It starts as soon as there is room.", "Desktop queued"],
  starting: ["Your desktop is starting", "This takes a few seconds.", "Desktop starting"],
  stopped: ["Your desktop is stopped", "The organisers stopped it. Ask them to start it again.", "Desktop stopped"],
  failed: ["Your desktop could not start", "Please ask the organisers for help.", "Desktop failed"],
};

// A websocket that never opened this many times in a row, while the gateway says the desktop is ready:
// in the websockify modes that is most likely Apache refusing a viewer over the account's cap (429),
// which the browser cannot see (a proxy being restarted is back well within these attempts).
const REFUSED_AFTER_FAILED_OPENS = 3;

// --- configuration ------------------------------------------------------------------------------------
const config = JSON.parse(document.getElementById("viewer-config").textContent);
// Instructors' watch pages (gateway/web/watch.py): never send input; connect with config.password.
const viewOnly = config.view_only === true;
const root = config.root || "./";
const novncBase = new URL(config.novnc_url, location.href);
// The event's defaults (viewer: in the config); what the participant chose in this browser wins.
const DEFAULTS = Object.freeze({
  quality: clampLevel((config.defaults || {}).quality, 6),
  compression: clampLevel((config.defaults || {}).compression, 2),
});
function clampLevel(v, d) {
  return Number.isInteger(v) && v >= 0 && v <= 9 ? v : d;
}

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
  toolbar: $("toolbar"),
  menuToggle: $("menu-toggle"),
  toolMenu: $("tool-menu"),
  handle: $("controls-handle"),
  keyKeyboard: $("key-keyboard"),
  touchInput: $("touch-input"),
  keyCtrlAltDelMenu: $("key-ctrl-alt-del-menu"),
  message: $("desktop-message"),
  messageTitle: $("desktop-message-title"),
  messageText: $("desktop-message-text"),
  messageNext: $("desktop-message-next"),
  messageRetry: $("desktop-message-retry"),
  toggleFiles: $("toggle-files"),
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
  "toggle-files": $("files-panel"),
};

// --- state ------------------------------------------------------------------------------------------------
const viewer = {
  rfb: null,
  state: "idle",
  account: config.account,
  desktopName: "",
  lastClipboard: "",     // last text received from the desktop
  reconnectAttempt: 0,
  desktopState: config.desktop_state || "ready",
  signedIn: config.signed_in === config.account,
  failedOpens: 0,        // websockets in a row that closed before they opened
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
// Only what the participant changed is stored, so the event's defaults still apply to the rest.
function loadSaved() {
  try {
    return JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") || {};
  } catch (e) {
    return {};
  }
}
const saved = loadSaved();

function loadSettings() {
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
viewer.defaults = DEFAULTS;

function saveSettings(...keys) {
  for (const key of keys) {
    if (settings[key] === null) delete saved[key];
    else saved[key] = settings[key];
  }
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
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
  el.message.hidden = state !== "unavailable" && state !== "refused";
  el.connect.disabled = false;
  el.toolbar.hidden = state !== "connected";
  el.reconnectNow.hidden = state !== "reconnecting";
  if (state !== "connected") releaseModifiers();
  if (showForm) {
    el.password.required = password === null;
    el.password.placeholder = password === null ? "" : "Remembered in this tab: just press Connect";
  }
  updateHandle();
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
  stopStatePolling();
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

  // The page opens the websocket itself and hands it to noVNC (both 1.3 and 1.7 take a WebSocket as
  // their channel), so that it sees how it closed: the builtin relay refuses a viewer over the
  // account's cap with code 1008 and a reason; a websocket that never opened tells something too.
  const socket = { opened: false, code: 0, reason: "" };
  let rfb;
  let channel = null;
  try {
    channel = new WebSocket(websocketUrl());
    channel.addEventListener("open", () => { socket.opened = true; });
    channel.addEventListener("close", (ev) => { socket.code = ev.code; socket.reason = ev.reason || ""; });
    rfb = new RFBClass(el.screen, channel, {
      credentials: { password },
      shared: true,
    });
  } catch (err) {
    console.error("gateway: cannot connect", err);
    if (channel) channel.close();
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
  rfb.addEventListener("disconnect", current((ev) => onDisconnect(ev, socket)));
  rfb.addEventListener("credentialsrequired", current(onCredentialsRequired));
  rfb.addEventListener("securityfailure", current(onSecurityFailure));
  rfb.addEventListener("desktopname", current(onDesktopName));
  rfb.addEventListener("clipboard", current(onClipboard));
  // A network that swallows packets never fails the websocket: give up on it and try afresh.
  connectTimer = setTimeout(() => {
    if (viewer.rfb === rfb && viewer.state === "connecting") {
      console.info("gateway: no answer within", CONNECT_TIMEOUT_MS, "ms; trying again");
      detach(rfb);
      viewer.rfb = null;
      scheduleReconnect();
    }
  }, CONNECT_TIMEOUT_MS);
}
let connectTimer = null;

function onConnect() {
  viewer.reconnectAttempt = 0;
  viewer.failedOpens = 0;
  viewer.connects = (viewer.connects || 0) + 1;
  viewer.desktopState = "ready";
  restartHint = "";
  loginMessage("");
  setState("connected", STATUS_TEXT.connected);
  applySettings();
  window.dispatchEvent(new Event("resize"));
  viewer.rfb.focus();
  startProbing();
  signInForFiles();
}

function onDisconnect(ev, socket) {
  const clean = !!(ev.detail && ev.detail.clean);
  const wasConnected = viewer.state === "connected";
  viewer.rfb = null;
  stopProbing();
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
  // The builtin relay's refusal: too many viewers of this desktop are open. Retrying would only be
  // refused again until one of them closes: say so and wait for the participant.
  if (socket.code === 1008 && socket.reason.startsWith("too many viewers")) {
    console.info("gateway: refused:", socket.reason);
    showRefused(true);
    return;
  }
  viewer.failedOpens = socket.opened ? 0 : viewer.failedOpens + 1;
  // A drop: the network, the proxy, or the desktop being restarted or stopped. Reconnect with backoff
  // unless the gateway says the desktop is not running (then say so, and wait for it).
  console.info("gateway: connection dropped", { clean, wasConnected, code: socket.code, opened: socket.opened });
  scheduleReconnect();
}

// Too many viewers of this desktop: a message in the page body and a Reconnect button, no countdown.
// ``certain``: the relay said so (builtin mode); else the gateway answers and says the desktop is ready,
// yet the websocket was refused again and again (websockify modes, where Apache's 429 is invisible here).
function showRefused(certain) {
  clearReconnect();
  stopStatePolling();
  stopProbing();
  detach(viewer.rfb);
  viewer.rfb = null;
  const most = Number.isInteger(config.max_viewers) ? ` (at most ${config.max_viewers} at once)` : "";
  el.messageTitle.textContent = certain ? "Too many viewers" : "This connection was refused";
  el.messageText.textContent = certain
    ? `Too many viewers are open for this desktop${most}; close another tab or window, then press Reconnect.`
    : `Your desktop is running, but it did not accept this connection. Probably too many viewers are open for this desktop${most}; close another tab or window, then press Reconnect.`;
  el.messageNext.hidden = true;
  el.messageRetry.textContent = "Reconnect";
  el.message.dataset.desktopState = "too-many-viewers";
  setState("refused", certain ? STATUS_TEXT.refused : "Connection refused");
}

function onSecurityFailure(ev) {
  securityFailed = true;
  password = null;
  clearReconnect();
  stopProbing();
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
  // Shown as a tooltip only: the chip already names the account, and the desktop's name is usually
  // the same word ("ws01 ws01").
  viewer.desktopName = (ev.detail && ev.detail.name) || "";
  $("account-label").title = viewer.desktopName ? `Account ${config.account}: ${viewer.desktopName}` : `Account ${config.account}`;
}

// --- reconnect with backoff and a visible countdown ----------------------------------------------------
function clearReconnect() {
  if (reconnectTimer !== null) clearTimeout(reconnectTimer);
  if (countdownTimer !== null) clearInterval(countdownTimer);
  if (connectTimer !== null) clearTimeout(connectTimer);
  reconnectTimer = null;
  countdownTimer = null;
  connectTimer = null;
}

async function scheduleReconnect() {
  clearReconnect();
  const delay = BACKOFF_S[Math.min(viewer.reconnectAttempt, BACKOFF_S.length - 1)];
  viewer.reconnectAttempt += 1;
  reconnectDeadline = Date.now() + delay * 1000;
  const tick = () => {
    const left = Math.max(0, Math.ceil((reconnectDeadline - Date.now()) / 1000));
    const base = restartHint || "Connection lost.";
    setState("reconnecting", left > 0 ? `${base} Reconnecting in ${left} s…` : `${base} Reconnecting…`);
  };
  tick();
  countdownTimer = setInterval(tick, 250);
  reconnectTimer = setTimeout(() => {
    clearReconnect();
    connect();
  }, delay * 1000);
  const state = await desktopState();
  if (state !== null && state !== "ready" && viewer.state === "reconnecting") showUnavailable(state);
  else if (state === "ready" && viewer.state === "reconnecting" && config.proxy_mode !== "builtin"
           && viewer.failedOpens >= REFUSED_AFTER_FAILED_OPENS) showRefused(false);
}

// The desktop's state from the gateway (null: the gateway cannot be reached, e.g. no network).
async function desktopState() {
  try {
    const resp = await fetchWithTimeout(new URL(root + "api/desktops", location.href), PROBE_TIMEOUT_MS,
                                        { headers: { "Accept": "application/json" } });
    if (!resp.ok) return null;
    const data = await resp.json();
    const mine = (data.desktops || []).find((d) => d && d.account === config.account);
    if (!mine) return null;
    viewer.desktopState = mine.state;
    viewer.desktopReason = mine.reason || "";
    restartHint = mine.state === "ready" ? "" : restartHint;
    return mine.state;
  } catch (e) {
    return null;
  }
}

// A stopped, failed or queued desktop: a message in the page body, no countdown; the page looks
// every few seconds and connects as soon as the desktop is ready.
function showUnavailable(state) {
  clearReconnect();
  stopProbing();
  detach(viewer.rfb);
  viewer.rfb = null;
  const [title, text, status] = DESKTOP_MESSAGES[state] || DESKTOP_MESSAGES.starting;
  el.messageTitle.textContent = title;
  el.messageNext.hidden = false;
  el.messageRetry.textContent = "Check again";
  const reason = state === "failed" && viewer.desktopReason ? ` (${viewer.desktopReason})` : "";
  el.messageText.textContent = text.replace(/\.$/, "") + reason + ".";
  setState("unavailable", status);
  el.message.dataset.desktopState = state;
  if (stateTimer === null) stateTimer = setInterval(pollUntilReady, STATE_POLL_MS);
}
let stateTimer = null;

function stopStatePolling() {
  if (stateTimer !== null) clearInterval(stateTimer);
  stateTimer = null;
}

async function pollUntilReady() {
  const state = await desktopState();
  if (state === null || viewer.state !== "unavailable") return;
  if (state === "ready") {
    stopStatePolling();
    viewer.reconnectAttempt = 0;
    if (password !== null) connect();
    else setState("idle");
  } else {
    showUnavailable(state);
  }
}
el.messageRetry.addEventListener("click", () => {
  if (viewer.state !== "refused") {
    pollUntilReady();
    return;
  }
  viewer.reconnectAttempt = 0;
  viewer.failedOpens = 0;
  connect();
});

el.reconnectNow.addEventListener("click", () => {
  if (viewer.state === "reconnecting") connect();
});
window.addEventListener("online", () => {
  if (viewer.state === "reconnecting") connect();
});

// --- is the network still there? --------------------------------------------------------------------------
// A Wi-Fi cut leaves the websocket open but silent for minutes (TCP only gives up much later), and
// noVNC cannot tell a silent desktop from a dead link. A tiny request every few seconds can: when
// none has answered for NETWORK_LOST_MS, the viewer drops the old connection and reconnects as soon
// as the network answers again.
function fetchWithTimeout(url, ms, options = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  return fetch(url, { cache: "no-store", credentials: "same-origin", ...options, signal: controller.signal })
    .finally(() => clearTimeout(timer));
}

let probeTimer = null;
let lastAnswer = 0;

function startProbing() {
  stopProbing();
  lastAnswer = Date.now();
  probeTimer = setInterval(probe, PROBE_INTERVAL_MS);
}

function stopProbing() {
  if (probeTimer !== null) clearInterval(probeTimer);
  probeTimer = null;
}

async function probe() {
  if (viewer.state !== "connected") return;
  try {
    const resp = await fetchWithTimeout(new URL(root + "healthz", location.href), PROBE_TIMEOUT_MS);
    if (resp.ok) lastAnswer = Date.now();
  } catch (e) {
    // no answer: counted below
  }
  if (viewer.state === "connected" && Date.now() - lastAnswer > NETWORK_LOST_MS) {
    console.info("gateway: the network stopped answering; reconnecting when it is back");
    stopProbing();
    detach(viewer.rfb);
    viewer.rfb = null;
    waitForNetwork();
  }
}

function waitForNetwork() {
  clearReconnect();
  setState("reconnecting", "Connection lost. Waiting for the network…");
  viewer.reconnectAttempt = 1;
  const retry = async () => {
    if (viewer.state !== "reconnecting") return;
    try {
      const resp = await fetchWithTimeout(new URL(root + "healthz", location.href), 1500);
      if (resp.ok) { connect(); return; }
    } catch (e) {
      // still down
    }
    reconnectTimer = setTimeout(retry, 1000);
  };
  retry();
}

// --- sign-in for files ---------------------------------------------------------------------------------------
// Upload and Downloads need the participant's session; a password typed here signs this browser in
// (a JSON POST: a cross-site page cannot send one), just as the sign-in form would.
async function signInForFiles() {
  if (!config.files || viewOnly || viewer.signedIn || password === null) return;
  try {
    const resp = await fetch(new URL(root + "api/session", location.href), {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ account: config.account, password }),
    });
    if (!resp.ok) return;
    viewer.signedIn = true;
    el.toggleFiles.hidden = false;
    window.dispatchEvent(new Event("gateway:signed-in"));
  } catch (e) {
    // Files stay hidden; the desktop itself works.
  }
}

// A participant signed in (sign-up, sign-in) connects without typing the password again: it comes
// from their session (me/password), never from the page's address.
async function autoConnect() {
  try {
    const resp = await fetch(new URL(root + "me/password", location.href), { cache: "no-store", credentials: "same-origin" });
    if (resp.ok) {
      const body = await resp.json();
      if (body.account === config.account && typeof body.password === "string") {
        password = body.password;
        viewer.reconnectAttempt = 0;
        return startWhenReady();
      }
    }
  } catch (e) {
    // fall back to the form
  }
  setState("idle");
  el.password.focus();
}

// The desktop must be ready before connecting; otherwise say why and wait.
async function startWhenReady() {
  const known = viewer.desktopState;
  if (known !== "ready") {
    showUnavailable(known);
    return;
  }
  connect();
}

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
  stopProbing();
  closeMenu();
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

for (const button of [el.keyCtrlAltDel, el.keyCtrlAltDelMenu]) {
  button.addEventListener("click", (ev) => {
    if (viewer.rfb) viewer.rfb.sendCtrlAltDel();
    closeMenu();
    refocusAfterPointer(ev);
  });
}

// --- the on-screen keyboard (phones, tablets) -----------------------------------------------------------------
// Touch screens show their keyboard only for a focused text field: #touch-input is one, and what is
// typed into it goes to the desktop key by key (keysyms from noVNC's own table).
const touchScreen = window.matchMedia("(pointer: coarse)").matches || navigator.maxTouchPoints > 0;
el.keyKeyboard.hidden = !touchScreen || viewOnly;
let keysymdef = null;
import(new URL("core/input/keysymdef.js", novncBase).href).then((m) => { keysymdef = m.default; }).catch(() => {});
const SPECIAL_KEYS = { Backspace: 0xff08, Enter: 0xff0d, Tab: 0xff09, Escape: 0xff1b,
  ArrowLeft: 0xff51, ArrowUp: 0xff52, ArrowRight: 0xff53, ArrowDown: 0xff54, Delete: 0xffff };

function sendText(text) {
  if (!viewer.rfb || !keysymdef) return;
  for (const ch of text) {
    if (ch === "\n") { viewer.rfb.sendKey(SPECIAL_KEYS.Enter, "Enter"); continue; }
    viewer.rfb.sendKey(keysymdef.lookup(ch.codePointAt(0)));
  }
}

el.keyKeyboard.addEventListener("click", () => {
  const open = el.keyKeyboard.getAttribute("aria-pressed") !== "true";
  el.keyKeyboard.setAttribute("aria-pressed", String(open));
  if (open) {
    el.touchInput.value = "";
    el.touchInput.focus();
  } else {
    el.touchInput.blur();
  }
});
el.touchInput.addEventListener("blur", () => el.keyKeyboard.setAttribute("aria-pressed", "false"));
el.touchInput.addEventListener("keydown", (ev) => {
  // Keys without text (Backspace, Enter, arrows) come as keydown; text comes as input events.
  const keysym = SPECIAL_KEYS[ev.key];
  if (keysym && viewer.rfb) {
    ev.preventDefault();
    viewer.rfb.sendKey(keysym, ev.key);
  }
});
el.touchInput.addEventListener("input", (ev) => {
  if (ev.inputType === "deleteContentBackward" && viewer.rfb) viewer.rfb.sendKey(SPECIAL_KEYS.Backspace, "Backspace");
  else if (ev.data) sendText(ev.data);
  else if (ev.inputType === "insertLineBreak" && viewer.rfb) viewer.rfb.sendKey(SPECIAL_KEYS.Enter, "Enter");
  el.touchInput.value = "";
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
  saveSettings("scaling");
  applySettings();
});

// --- the compact menu (narrow screens) and the handle (full screen) ------------------------------------------
function closeMenu() {
  el.toolbar.classList.remove("menu-open");
  el.menuToggle.setAttribute("aria-expanded", "false");
}
el.menuToggle.addEventListener("click", () => {
  const open = !el.toolbar.classList.contains("menu-open");
  el.toolbar.classList.toggle("menu-open", open);
  el.menuToggle.setAttribute("aria-expanded", String(open));
});
document.addEventListener("pointerdown", (ev) => {
  if (el.toolbar.classList.contains("menu-open") && !el.toolbar.contains(ev.target)) closeMenu();
});

// In full screen only the desktop shows; a small handle brings the controls back over it.
function updateHandle() {
  const fs = document.body.classList.contains("is-fullscreen");
  el.handle.hidden = !fs || viewer.state !== "connected";
  if (!fs) document.body.classList.remove("controls-shown");
  el.handle.setAttribute("aria-expanded", String(document.body.classList.contains("controls-shown")));
}
el.handle.addEventListener("click", () => {
  document.body.classList.toggle("controls-shown");
  updateHandle();
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
  document.body.classList.toggle("is-fullscreen", fs);
  closeMenu();
  updateHandle();
  window.dispatchEvent(new Event("resize"));
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
  saveSettings(which);
  applySettings();
}
el.quality.addEventListener("input", () => onLevelInput("quality"));
el.quality.addEventListener("change", () => onLevelInput("quality"));
el.compression.addEventListener("input", () => onLevelInput("compression"));
el.compression.addEventListener("change", () => onLevelInput("compression"));
el.settingsReset.addEventListener("click", () => {
  settings.quality = DEFAULTS.quality;
  settings.compression = DEFAULTS.compression;
  delete saved.quality;
  delete saved.compression;
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
    closeMenu();
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
if (!viewOnly && config.auto_connect) {
  autoConnect();
} else if (!viewOnly && viewer.desktopState !== "ready") {
  showUnavailable(viewer.desktopState);   // no password asked for a desktop that is not there
} else {
  el.password.focus();
}

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
  const inputControls = [el.keyCtrlAltDel.closest(".tool-group"), $("toggle-clipboard"), $("layout-group"),
    $("toggle-files"), el.keyCtrlAltDelMenu, el.keyKeyboard];
  STATUS_TEXT.connected = "Connected · view only";
  for (const node of inputControls) if (node) node.hidden = true;
  el.scaling.querySelector('option[value="remote"]').disabled = true;  // never resize their desktop
  if (settings.scaling === "remote") settings.scaling = "scale";
  applySettings();
  if (typeof config.password === "string" && config.password !== "") viewer.connect(config.password);
}
