// The personal page: "Show password" fetches the signed-in participant's own password (never in the
// page's HTML or a URL) and reveals it with a copy button.
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
