// The console's one script (served from the console's own origin; no inline script anywhere).
// It keeps My Devices current and copies codes; every page works without it.
"use strict";

// Copy buttons: <button data-copy="ELEMENT_ID">.
document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-copy]");
  if (!b) return;
  const el = document.getElementById(b.dataset.copy);
  if (!el || !navigator.clipboard) return;
  navigator.clipboard.writeText(el.textContent.trim()).then(() => {
    const was = b.textContent;
    b.textContent = "Copied";
    setTimeout(() => { b.textContent = was; }, 1500);
  });
});

// My Devices: every 3 s ask the API for this page's devices (same filters); when their
// statuses, nodes or last heartbeats differ from what is shown, fetch the page again and
// swap in its rows. The rows are rendered by the server only, so one piece of code draws them.
(function poll() {
  const table = document.getElementById("devices");
  if (!table) return;
  const api = table.dataset.poll;
  const signature = (list) => JSON.stringify([list.total, list.devices.map((d) => [
    d.id, d.name, d.online, d.group, d.comment,
    d.nodes.map((n) => [n.role, n.online, n.ha_state, n.health, n.last_seen, n.firmware]),
  ])]);
  let shown = null;
  const tick = async () => {
    try {
      const r = await fetch(api, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { location.reload(); return; }
      if (!r.ok) return;
      const sig = signature(await r.json());
      if (shown === null) { shown = sig; return; }
      if (sig === shown) return;
      const page = await fetch(location.href, { credentials: "same-origin" });
      if (!page.ok) return;
      const doc = new DOMParser().parseFromString(await page.text(), "text/html");
      const rows = doc.getElementById("device-rows");
      const count = doc.getElementById("device-count");
      if (rows) document.getElementById("device-rows").replaceWith(rows);
      if (count) document.getElementById("device-count").replaceWith(count);
      shown = sig;
    } catch (_) {
      // Offline for a moment: the next tick tries again.
    }
  };
  tick();
  setInterval(tick, 3000);
})();

// Add: Allow Provisioning via Template turns on Verify Serial Number and MAC Address, whose
// two fields then become required (the server checks the same).
(function provisioning() {
  const prov = document.getElementById("allow_provisioning");
  const verify = document.getElementById("verify");
  if (!prov || !verify) return;
  const sync = () => {
    if (prov.checked) verify.checked = true;
    verify.disabled = prov.checked;
    const needed = verify.checked;
    for (const id of ["serial", "mac"]) {
      const el = document.getElementById(id);
      if (el) el.required = needed;
    }
  };
  prov.addEventListener("change", sync);
  verify.addEventListener("change", sync);
  sync();
})();
