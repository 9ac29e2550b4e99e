// Copy buttons: <button data-copy="ID"> copies the text (or an input's value) of element #ID.
// The Clipboard API needs a secure context; on plain http the text is selected and copied with
// execCommand, and failing that the participant is told to press Ctrl+C.
const message = document.getElementById("copy-message");

function say(text) {
  if (message) message.textContent = text;
}

function selectText(target) {
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) {
    target.focus();
    target.select();
    return;
  }
  const range = document.createRange();
  range.selectNodeContents(target);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

export async function copyFrom(target) {
  const text = "value" in target ? target.value : target.textContent;
  try {
    if (!(navigator.clipboard && window.isSecureContext)) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(text);
    return true;
  } catch (err) {
    selectText(target);
    try { return document.execCommand("copy"); } catch (e) { return false; }
  }
}

for (const button of document.querySelectorAll("button[data-copy]")) {
  button.addEventListener("click", async () => {
    const target = document.getElementById(button.dataset.copy);
    if (!target) return;
    const ok = await copyFrom(target);
    say(ok ? "Copied." : "Selected: press Ctrl+C (or long-press and Copy) to copy it.");
    if (ok) {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 2000);
    }
  });
}
