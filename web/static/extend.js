// The admin page's Extend form: the same as `gateway extend MINUTES` (recorded in the audit log).
const form = document.getElementById("extend-form");
const result = document.getElementById("extend-result");
if (form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const minutes = Number(form.elements.minutes.value);
    if (!window.confirm(`Extend every running desktop and the event by ${minutes} min?`)) return;
    result.textContent = "Extending…";
    try {
      const response = await fetch("api/extend", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ minutes }),
      });
      const answer = await response.json();
      result.textContent = response.ok ? answer.lines.join("; ") : `Not extended: ${answer.error}`;
    } catch (error) {
      result.textContent = `Not extended: ${error}`;
    }
  });
}
