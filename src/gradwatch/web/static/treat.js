// The diagnosis panel's Treat button: the server's doctor ranks the remedies on the net on screen, and
// the state each poll brings carries its table; it is redrawn only when it changed.
"use strict";

const TREAT_COLUMNS = ["#", "treatment", "final loss (min-max)", "vs untreated", "clears", "still"];

function renderTreat(t) {
  const key = JSON.stringify(t || null);
  if (key === renderTreat.shown) return;
  renderTreat.shown = key;
  const table = document.getElementById("treatment");
  const status = document.getElementById("treat-status");
  table.replaceChildren();
  document.getElementById("treat").disabled = Boolean(t && t.status === "running");
  if (!t || t.status === "idle") { status.textContent = ""; return; }
  if (t.status === "running") { status.textContent = "treating: a short run per remedy…"; return; }
  if (t.status === "error") { status.textContent = `treatment failed: ${t.error}`; return; }
  status.textContent = t.rows.length
    ? `${t.seeds} seeds x ${t.steps} steps each, ${t.seconds.toFixed(1)} s; best first`
    : "nothing to treat: no finding in most seeds";
  if (!t.rows.length) return;
  const head = table.createTHead().insertRow();
  for (const c of TREAT_COLUMNS) head.appendChild(Object.assign(document.createElement("th"), { textContent: c }));
  const body = table.createTBody();
  for (const row of t.rows) {
    const tr = body.insertRow();
    if (row["#"] === "-") tr.className = "untreated";
    for (const c of TREAT_COLUMNS) tr.insertCell().textContent = row[c];
  }
}
