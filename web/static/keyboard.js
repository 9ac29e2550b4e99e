// Lets the participant pick the desktop's keyboard layout (the gateway applies it with setxkbmap).
// The request carries the account's password, checked by the gateway: only the participant (who
// typed it into the viewer) can change their own desktop's layout.
const select = document.getElementById("keyboard-layout");
const message = document.getElementById("keyboard-message");
const config = JSON.parse(document.getElementById("viewer-config").textContent);

select.addEventListener("change", async () => {
  const viewer = window.gatewayViewer;
  const layout = select.value;
  if (!viewer || !viewer.hasPassword()) {
    message.textContent = "Connect first, then choose the layout.";
    select.value = select.dataset.current;
    return;
  }
  message.textContent = `Switching the desktop to ${layout}…`;
  const url = new URL(`${config.root}api/desktops/${encodeURIComponent(config.account)}/keyboard`, location.href);
  try {
    const response = await viewer.postAuthenticated(url, { layout });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    select.dataset.current = layout;
    message.textContent = `The desktop now uses the ${layout} layout.`;
  } catch (error) {
    select.value = select.dataset.current;
    message.textContent = `Could not change the layout: ${error.message}`;
  }
});
