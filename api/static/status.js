// reclaimd status page: what changes, read from the REST API every 5 s. The rows themselves are
// rendered by the daemon, so the page works without this script; text from VMs is set with
// textContent only, never as HTML.
"use strict";

const MiB = 1 << 20;
const history = [];

async function get(path) {
  const reply = await fetch(path, { credentials: "same-origin" });
  if (!reply.ok) throw new Error(`${path}: ${reply.status}`);
  return reply.json();
}

function vmPath(name) {
  return `/api/v1/vms/${encodeURIComponent(name)}`;
}

function describe(event) {
  const when = new Date(event.recorded_at * 1000).toLocaleTimeString();
  return `${when} ${event.name}`;
}

async function fleet() {
  // The first 100 rows: a page for a person, not a scrape of the fleet.
  for (const row of [...document.querySelectorAll("tr.vm")].slice(0, 100)) {
    const page = await get(`${vmPath(row.dataset.vm)}/events?limit=3`);
    const cell = row.querySelector(".events");
    cell.textContent = page.events.map(describe).join(", ") || "none";
  }
}

function polyline(svg, points, cls, top) {
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  const span = Math.max(1, points.length - 1);
  line.setAttribute("class", cls);
  line.setAttribute(
    "points",
    points.map((v, i) => `${(600 * i) / span},${115 - (110 * v) / top}`).join(" "),
  );
  svg.appendChild(line);
}

async function vm() {
  const name = document.body.dataset.vm;
  const [page, events, ranges] = await Promise.all([
    get(`${vmPath(name)}/estimate`),
    get(`${vmPath(name)}/events?limit=10`),
    get(`${vmPath(name)}/reported-ranges?since=${Date.now() / 1000 - 600}`),
  ]);
  const parts = (page.estimate && page.estimate.components) || {};
  const bytes = (key) => (parts[key] && parts[key].bytes) || 0;
  history.push({ reclaimable: bytes("reclaimable"), returned: bytes("ballooned") + bytes("reported") });
  if (history.length > 120) history.shift(); // ten minutes
  const svg = document.getElementById("history");
  svg.replaceChildren();
  const top = Math.max(1, ...history.map((h) => Math.max(h.reclaimable, h.returned)));
  polyline(svg, history.map((h) => h.reclaimable), "reclaimable", top);
  polyline(svg, history.map((h) => h.returned), "returned", top);

  const list = document.getElementById("events");
  list.replaceChildren(
    ...(events.events.length ? events.events : [{ recorded_at: Date.now() / 1000, name: "none" }]).map(
      (e) => Object.assign(document.createElement("li"), { textContent: describe(e) }),
    ),
  );
  const perMinute = new Map();
  for (const r of ranges.ranges) {
    const minute = new Date(Math.floor(r.at / 60) * 60000).toLocaleTimeString();
    perMinute.set(minute, (perMinute.get(minute) || 0) + r.length);
  }
  document.querySelector("#reported tbody").replaceChildren(
    ...[...perMinute].map(([minute, length]) => {
      const row = document.createElement("tr");
      for (const text of [minute, (length / MiB).toFixed(0)]) {
        row.appendChild(Object.assign(document.createElement("td"), { textContent: text }));
      }
      return row;
    }),
  );
}

async function refresh() {
  try {
    await (document.body.dataset.page === "vm" ? vm() : fleet());
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("updated").textContent = `not updated: ${error.message}`;
  }
}

refresh();
setInterval(refresh, 5000);
