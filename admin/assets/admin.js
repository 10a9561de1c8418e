// dbsync admin pages: the copy button of the token page and the live progress of the history
// page. Everything works without it, only less conveniently.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const input = document.getElementById(button.dataset.copy);
      if (!input) return;
      input.select();
      try {
        await navigator.clipboard.writeText(input.value);
        button.textContent = "Copied";
      } catch (_) {
        // No clipboard permission (plain http): the text is selected for Ctrl+C.
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }

  const live = document.querySelector("[data-live]");
  const table = document.getElementById("live");
  if (!live || !table) return;
  const refresh = async () => {
    let body;
    try {
      const response = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      body = await response.json();
    } catch (_) {
      return;
    }
    const running = new Map(body.items.map((item) => [item.id, item]));
    for (const row of table.querySelectorAll("tbody tr[data-id]")) {
      const item = running.get(row.dataset.id);
      if (!item) {
        row.classList.add("finished");
        const rate = row.querySelector('[data-field="rate"]');
        if (rate) rate.textContent = "finished (reload)";
        continue;
      }
      for (const field of ["rows", "bytes", "rate"]) {
        const cell = row.querySelector(`[data-field="${field}"]`);
        if (cell) cell.textContent = item[field];
      }
      if (item.percent !== null && item.percent !== undefined) {
        const bar = row.querySelector('[data-field="progress"] progress');
        if (bar) bar.value = item.percent;
        const text = row.querySelector('[data-field="percent"]');
        if (text) text.textContent = `${item.percent} %`;
      }
    }
  };
  setInterval(refresh, 2000);
});
