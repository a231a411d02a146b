"use strict";
// The br2k dashboard's page: an overview (#/) and a page per service (#/service/NAME),
// drawn from the view the server pushes (/api/events) whenever it changes.
// Every value goes in with textContent: nothing from a service is ever parsed as HTML.

let current = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text != null) node.textContent = String(text);
  return node;
}
function bytes(n) {
  if (!n) return "-";
  const units = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function number(x, digits) { return x == null ? "-" : x.toFixed(digits); }
function clock(unix) { return unix ? new Date(unix * 1000).toLocaleTimeString() : "-"; }
function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function healthOf(replica) {
  const s = replica.status;
  if (!replica.running) return [false, replica.detail || "not running"];
  if (!s) return [false, replica.detail || "no status answer"];
  // A divergence outranks everything: the replica's state is not the service's.
  if (s.divergence) return [false, "DIVERGED at log entry " + s.divergence.index + " (" + s.divergence.route +
    "): the leader recorded " + s.divergence.recorded + ", this replica answered " + s.divergence.here +
    ". It has stopped; rebuild it (empty its data directory and start it again)."];
  if (!s.etcd_reachable) return [false, "local etcd member not answering"];
  if (s.fault) return [false, "stopped at log entry " + s.fault.index + " since " + ago(s.fault.since) + " (" +
    s.fault.retries + " retries): " + s.fault.reason];
  if (s.last_error) return [false, s.last_error];
  return [true, "healthy"];
}
function replicasOf(service) { return Array.isArray(service.replicas) ? service.replicas : []; }
function leaderOf(service) { return replicasOf(service).find(r => r.status && r.status.role === "leader"); }
function lastPoint(service) { const p = (service.traffic || {}).points || []; return p[p.length - 1]; }
function lastRecovery(service) {
  return (service.timeline || []).find(h => h.kind === "state" && h.text.startsWith("recovery"));
}
// The leader's idempotency table: keys, bytes, and how far back a retry is answered.
// The newest backup (what a restore would use), the one recorded on chain, and the gas
// recording costs a day at the record interval.
function backupOf(service) {
  const b = service.backup;
  if (!b) return "none";
  let text = "index " + b.index + (b.behind != null ? " (" + b.behind + " behind)" : "");
  if (b.recorded) text += ", recorded on chain at " + b.recorded.index;
  if (b.gasPerDay) text += ", ~" + b.gasPerDay.toLocaleString("en-US") + " gas/day";
  return text;
}

function idempotencyOf(service) {
  const t = service.idempotency;
  if (!t) return "-";
  if (!t.records || !t.oldest_at) return "0 keys held";
  return t.records + " keys, " + bytes(t.bytes) + ", window " + ago(t.oldest_at / 1000).replace(" ago", "");
}
function serviceLink(name) { return "#/service/" + encodeURIComponent(name); }

// --- the overview -----------------------------------------------------------------------

function overviewCard(service) {
  const card = el("section", { class: "card", "data-service": service.name || "" });
  const title = el("a", { href: serviceLink(service.name) }, service.name);
  if (service.error) {
    card.append(el("h2", {}, title, el("span", { class: "badge down" }, "unreachable")),
                el("div", { class: "error" }, service.error));
    return card;
  }
  const replicas = replicasOf(service);
  const leader = leaderOf(service);
  const healthy = replicas.filter(r => healthOf(r)[0]).length;
  const point = lastPoint(service);
  const recovery = lastRecovery(service);
  const diverged = replicas.filter(r => r.status && r.status.divergence).map(r => r.name);
  const offChain = openViolations(service);
  card.append(el("h2", {}, title, el("span", { class: "badge " + service.state }, service.state),
    ...(diverged.length ? [el("span", { class: "badge down diverged" }, "diverged: " + diverged.join(", "))] : []),
    ...(offChain.length ? [el("span", { class: "badge down finality" }, offChain.length + " paid transaction(s) off chain")] : [])));
  card.append(el("div", { class: "facts" },
    el("span", {}, "leader ", el("b", { class: "leader-name" }, leader ? leader.name : "none")),
    el("span", {}, "epoch ", el("b", { class: "epoch" }, service.epoch)),
    el("span", {}, "replicas ", el("b", { class: "replica-count" }, healthy + "/" + replicas.length), " healthy"),
    el("span", {}, "requests/s ", el("b", { class: "rate" }, point ? number(point.requests_per_second, 1) : "-")),
    el("span", {}, "p99 ", el("b", {}, point && point.p99_ms != null ? number(point.p99_ms, 1) + " ms" : "-")),
    el("span", {}, "last recovery ", el("b", {}, recovery ? ago(recovery.at) : "none")),
    el("span", {}, "open claims ", el("b", {}, (service.openClaims || []).length))));
  const hearts = el("div", { class: "hearts" });
  for (const r of replicas) {
    const [ok, why] = healthOf(r);
    hearts.append(el("span", { class: "heart " + (ok ? "healthy" : "unhealthy"), title: r.name + ": " + why }, ok ? "♥" : "♡"));
  }
  if (!Array.isArray(service.replicas)) {
    card.append(el("div", { class: "error" }, "replicas unknown: " + ((service.replicas || {}).error || "?")));
  } else {
    card.append(hearts);
  }
  return card;
}

function overview(view) {
  const services = view.services || [];
  const serving = services.filter(leaderOf).length;
  const summary = el("div", { class: "summary", id: "summary" }, services.length + " service(s): " + serving +
    " with a leader serving, " + (services.length - serving) + " without one or unreachable");
  if (!services.length) summary.append(el("div", { class: "note" },
    "No service is registered in this registry yet, or none of those named answers."));
  return [summary, el("div", { class: "cards", id: "services" }, ...services.map(overviewCard))];
}

// --- a service's page ---------------------------------------------------------------------

function replicaTable(service) {
  if (!Array.isArray(service.replicas)) {
    return el("div", { class: "error" }, "replicas unknown: " + ((service.replicas || {}).error || "?"));
  }
  const table = el("table", { id: "replicas" },
    el("tr", {}, ...["", "replica", "role", "LPI", "lag", "SSI", "snapshot", "etcd db", "health"].map(h => el("th", {}, h))));
  for (const r of replicasOf(service)) {
    const s = r.status || {};
    const [ok, why] = healthOf(r);
    // An etcd learner receives the log but does not vote yet (a replica being added).
    const learner = r.learner || s.etcd_learner;
    const role = learner ? "learner" : (s.role || "-");
    table.append(el("tr", { class: "replica" + (s.role === "leader" ? " leader" : ""), "data-role": learner ? "learner" : (s.role || "unknown") },
      el("td", { class: "heart " + (ok ? "healthy" : "unhealthy"), title: why }, ok ? "♥" : "♡"),
      el("td", { class: "name" }, r.name), el("td", { class: "role" }, role),
      el("td", { class: "num" }, s.lpi ?? "-"),
      el("td", { class: "num" }, s.ssi != null && s.lpi != null ? Math.max(0, s.ssi - s.lpi) : "-"),
      el("td", { class: "num" }, s.ssi ?? "-"),
      el("td", { class: "num" }, s.snapshot_index || "-"),
      el("td", { class: "num" }, bytes(s.db_size) + (s.quota ? " of " + bytes(s.quota) : "")),
      el("td", { class: "health" }, why)));
  }
  return table;
}

// The leader's transaction outbox: its RPC endpoints' health, and settled transactions a
// deep reorg took off the chain (finality violations), which the leader broadcasts again.
function openViolations(service) {
  const o = ((leaderOf(service) || {}).status || {}).outbox;
  return o ? (o.finality_violations || []).filter(v => v.back_in_block == null) : [];
}
function outboxCard(service) {
  const o = ((leaderOf(service) || {}).status || {}).outbox;
  if (!o) return null;
  const card = el("section", { class: "card", id: "outbox" }, el("h3", {}, "Transaction outbox (the leader's)"));
  card.append(el("div", { class: "facts" },
    el("span", {}, "finality violations ", el("b", { class: "violations" }, o.finality_violations_total || 0)),
    el("span", {}, "rebroadcasts after shallow reorgs ", el("b", {}, o.reorg_rebroadcasts || 0))));
  const endpoints = el("table", { id: "endpoints" },
    el("tr", {}, ...["", "RPC endpoint", "errors", "down since", "last error"].map(h => el("th", {}, h))));
  for (const e of o.endpoints || []) {
    endpoints.append(el("tr", { class: "endpoint", "data-healthy": String(e.healthy) },
      el("td", { class: "heart " + (e.healthy ? "healthy" : "unhealthy"), title: e.healthy ? "answering" : "failing" }, e.healthy ? "♥" : "♡"),
      el("td", { class: "name" }, e.endpoint), el("td", { class: "num" }, e.errors),
      el("td", {}, e.down_since ? clock(e.down_since) + " (" + ago(e.down_since) + ")" : "-"),
      el("td", { class: "health" }, e.last_error || "-")));
  }
  card.append(endpoints);
  const violations = o.finality_violations || [];
  if (violations.length) {
    card.append(el("h4", {}, "Finality violations (newest last)"), el("table", { id: "violations" },
      el("tr", {}, ...["request", "nonce", "transaction", "was in block", "found", "now"].map(h => el("th", {}, h))),
      ...violations.map(v => el("tr", { class: v.back_in_block == null ? "violation open" : "violation" },
        el("td", { class: "num" }, v.index + (v.seq ? "/" + v.seq : "")), el("td", { class: "num" }, v.nonce),
        el("td", { class: "hash" }, v.hash), el("td", { class: "num" }, v.block), el("td", {}, ago(v.detected_at)),
        el("td", { class: "health" }, v.back_in_block == null ? "OFF CHAIN: being broadcast again" :
          "back in block " + v.back_in_block)))));
  }
  return card;
}

// A line chart of `series` ([{name, color, key}]) over the points' times.
function chart(title, points, series, unit) {
  const W = 600, H = 150, left = 44, bottom = 18, top = 8;
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  const values = points.flatMap(p => series.map(s => p[s.key])).filter(v => v != null);
  const max = Math.max(1e-9, ...values) * 1.15;
  const t0 = points.length ? points[0].at : 0, t1 = points.length ? points[points.length - 1].at : 1;
  const x = t => left + (W - left - 4) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = v => top + (H - top - bottom) * (1 - v / max);
  box.append(svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W, y2: H - bottom }),
             svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: H - bottom }),
             svg("text", { x: 2, y: top + 10 }, number(max, max < 10 ? 1 : 0)),
             svg("text", { x: 2, y: H - bottom }, "0"),
             svg("text", { x: left, y: H - 3 }, points.length ? clock(t0) : "no data yet"),
             svg("text", { x: W - 60, y: H - 3 }, points.length ? clock(t1) : ""));
  // A line breaks where there is no value, and across a gap between points (no leader to
  // scrape, a new leader's first scrape): three times the usual spacing, at least 3 s.
  const spacing = points.slice(1).map((p, i) => p.at - points[i].at).sort((a, b) => a - b);
  const gap = Math.max(3, 3 * (spacing[Math.floor(spacing.length / 2)] || 1));
  for (const s of series) {
    let run = [], last = null;
    const flush = () => { if (run.length) box.append(svg("polyline", { points: run.join(" "), stroke: s.color })); run = []; };
    for (const p of points) {
      if (p[s.key] == null || (last != null && p.at - last > gap)) flush();
      last = p.at;
      if (p[s.key] != null) run.push(x(p.at).toFixed(1) + "," + y(p[s.key]).toFixed(1));
    }
    flush();
  }
  const legend = el("div", { class: "legend" }, title + " (" + unit + ")");
  for (const s of series) {
    // Set through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    const swatch = el("i", {});
    swatch.style.background = s.color;
    legend.append(swatch, s.name);
  }
  return el("div", {}, legend, box);
}

function timeline(service) {
  const rows = (service.timeline || []).map(h => el("tr", { class: "happening", "data-kind": h.kind },
    el("td", { class: "when", title: h.block != null ? "block " + h.block : "seen by the dashboard" }, clock(h.at)),
    el("td", {}, el("span", { class: "kind " + h.kind }, h.kind)),
    el("td", {}, h.text)));
  if (!rows.length) return el("p", { class: "note" }, "Nothing has happened yet.");
  return el("table", { id: "timeline" }, ...rows);
}

function actions(view, service) {
  const box = el("div", { class: "actions" });
  if (!view.actions) {
    box.append(el("span", { class: "note" }, "Actions (claim, backup) are off: start the dashboard with --allow-actions."));
    return box;
  }
  box.append(
    el("button", { id: "claim" }, "File a claim…"),
    el("button", { id: "backup" }, "Back up now…"),
    el("span", { id: "action-result", class: "note" }, actionResult[service.name] || ""));
  box.querySelector("#claim").onclick = () => confirmAction(service.name, "claim",
    "File a claim against " + service.name + "?",
    "A claim is a transaction, signed with this dashboard's key, saying the service does not serve. " +
    "Its manager then checks it and, if the service is dead, redeploys it from its recovery info.");
  box.querySelector("#backup").onclick = () => confirmAction(service.name, "backup",
    "Back up " + service.name + " now?",
    "Its leader snapshots its state, pushes it to the service's container registry and records it on chain.");
  return box;
}

function servicePage(view, name) {
  const service = (view.services || []).find(s => s.name === name);
  const back = el("a", { href: "#/" }, "← all services");
  if (!service) return [back, el("div", { class: "card error" }, "No service named " + name + " on this dashboard.")];
  if (service.error) return [back, el("section", { class: "card", id: "service" },
    el("h2", {}, name, el("span", { class: "badge down" }, "unreachable")), el("div", { class: "error" }, service.error))];
  const leader = leaderOf(service);
  const info = service.recoveryInfo || {};
  const points = (service.traffic || {}).points || [];
  const facts = el("div", { class: "facts" },
    el("span", {}, "leader ", el("b", { class: "leader-name" }, leader ? leader.name : "none")),
    el("span", {}, "epoch ", el("b", { class: "epoch" }, service.epoch)),
    el("span", {}, "location ", el("b", {}, service.location || "-")),
    el("span", {}, "manager ", el("b", {}, service.manager)),
    el("span", {}, "recovery info ", el("b", {}, (info.replicas || "?") + " replicas on " + (info.context || "-") +
      (info.image ? " from " + info.image : ""))),
    el("span", {}, "in doubt ", el("b", {}, (service.inDoubt || []).length ? service.inDoubt.join(", ") : "none")),
    el("span", {}, "backup ", el("b", { class: "backup" }, backupOf(service))),
    el("span", { title: "A retry with an Idempotency-Key logged within this window gets its stored answer" },
      "idempotency ", el("b", { class: "idempotency" }, idempotencyOf(service))));
  const card = el("section", { class: "card", id: "service", "data-service": name },
    el("h2", {}, name, el("span", { class: "badge " + service.state }, service.state)), facts, replicaTable(service));
  if (service.membershipChangeText) {
    card.append(el("div", { class: "membership-change" }, "membership change in progress: " + service.membershipChangeText));
  }
  if (service.backupAlert) card.append(el("div", { class: "error alert" }, "backups need an operator: " + service.backupAlert));
  else if (service.backupError) card.append(el("div", { class: "error" }, "last backup failed: " + service.backupError));
  const claims = service.openClaims || [];
  if (claims.length) card.append(el("h3", {}, "Open claims"),
    el("table", {}, ...claims.map(c => el("tr", {}, el("td", { class: "num" }, "block " + c.block), el("td", {}, c.claimant), el("td", {}, c.reason)))));
  const traffic = el("section", { class: "card" }, el("h3", {}, "Traffic (from the leader's /metrics)"),
    el("div", { class: "charts" },
      chart("requests per second", points, [{ name: "requests/s", color: "#0969da", key: "requests_per_second" }], "1/s"),
      chart("latency", points, [{ name: "mean", color: "#1a7f37", key: "mean_ms" }, { name: "p99", color: "#cf222e", key: "p99_ms" }], "ms")));
  if ((service.traffic || {}).error) traffic.append(el("div", { class: "error" }, "metrics: " + service.traffic.error));
  const outbox = outboxCard(service);
  return [back, card, traffic, ...(outbox ? [outbox] : []),
    el("section", { class: "card" }, el("h3", {}, "Actions"), actions(view, service)),
    el("section", { class: "card" }, el("h3", {}, "Timeline (newest first)"), timeline(service))];
}

// --- actions ------------------------------------------------------------------------------

const actionResult = {};
function confirmAction(name, action, title, text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-reason-label").hidden = action !== "claim";
  // The action token: carried by the page when the dashboard serves on loopback, typed in
  // by the person otherwise (--action-token-file).
  const carried = document.querySelector('meta[name="br2k-action-token"]').content;
  document.getElementById("confirm-token-label").hidden = carried !== "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    const body = action === "claim" ? JSON.stringify({ reason: document.getElementById("confirm-reason").value }) : "";
    actionResult[name] = "sending…"; draw();
    try {
      const answer = await fetch("/api/services/" + encodeURIComponent(name) + "/" + action, {
        method: "POST", body, headers: { "x-br2k-confirm": name, "content-type": "application/json",
          "x-br2k-action-token": carried || document.getElementById("confirm-token").value } });
      const result = await answer.json();
      actionResult[name] = result.message || result.error || ("answered " + answer.status);
    } catch (e) {
      actionResult[name] = "the dashboard did not answer: " + e;
    }
    draw();
  };
  dialog.showModal();
}

// --- drawing and the live stream ------------------------------------------------------------

function draw() {
  if (!current) return;
  const registry = current.registry || {};
  document.getElementById("registry").textContent = "registry " + (registry.address || "?") + " on " + (registry.endpoint || "?");
  const banner = document.getElementById("banner");
  banner.hidden = !registry.error;
  banner.textContent = registry.error ? "The registry cannot be read: " + registry.error : "";
  if (current.updated) document.getElementById("updated").textContent = "changed " + clock(current.updated);
  const route = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const page = route.startsWith("service/") ? servicePage(current, route.slice("service/".length)) : overview(current);
  document.getElementById("main").replaceChildren(...page);
}
function show(view) { current = view; draw(); }

window.addEventListener("hashchange", draw);
const live = document.getElementById("live");
// What there is now at once; then every change as it happens. The stream starts after the
// page has loaded, so that the page counts as loaded (the stream stays open for ever).
fetch("/api/services").then(r => r.json()).then(show).catch(() => {});
window.addEventListener("load", () => {
  const events = new EventSource("/api/events");
  events.addEventListener("services", e => { live.textContent = "live"; live.className = ""; show(JSON.parse(e.data)); });
  events.onerror = () => { live.textContent = "reconnecting… (is br2k dashboard still running?)"; live.className = "down"; };
});
