// fleet-rollback web console. Plain JavaScript, no dependencies. Every element is built with
// textContent (host output is never parsed as markup); the report's HTML comes from the
// console server, which turns any HTML in the Markdown into text.
"use strict";

const main = () => document.getElementById("main");

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces an element's children, leaving out the null, undefined and false of conditional
// parts (the DOM would show them as text).
function put(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== undefined && k !== null && k !== false));
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch("api/" + path, opts);
  let data = null;
  try { data = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const why = data && data.error ? data.error : `${resp.status} ${resp.statusText}`;
    const err = new Error(why);
    err.status = resp.status;
    err.fromCoordinator = Boolean(data && data.error);
    throw err;
  }
  return data;
}

function errorBox(err) {
  const denied = err.status === 403 && err.fromCoordinator ? "Not allowed for your role: " : "";
  return h("p", { class: "error", role: "alert" }, denied + err.message);
}

function fmtTime(ms) {
  if (!ms) return "";
  return new Date(ms).toLocaleString();
}

function fmtDuration(ms) {
  if (ms === undefined || ms === null || ms < 0) return "";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}

function stateClass(state) {
  if (["succeeded", "online", "healthy", "200"].includes(state)) return "good";
  if (["running", "awaiting_approval", "pending", "disconnected", "skipped"].includes(state)) return "warn";
  return "bad";
}

function badge(text, cls) {
  return h("span", { class: "badge " + (cls || stateClass(text)) }, text);
}

function table(headers, rows, attrs) {
  return h("div", { class: "table-wrap" },
    h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
}

function short(sha) { return sha ? sha.slice(0, 12) : ""; }

function labelsText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

function render(title, ...content) {
  document.title = `${title} · fleet-rollback`;
  const m = main();
  put(m, h("h1", {}, title), ...content);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
}

// Each navigation gets a number: a page whose awaited answer arrives after the operator moved
// on draws nothing, and its refresh and event stream stop.
let nav = 0;
const gone = (me) => me !== nav;

// A page's periodic refresh: the next one starts only after the last one answered (no pile-up
// against a slow coordinator); a new page stops it.
let timer = null;
function every(ms, fn) {
  stopTimer();
  const me = nav;
  const tick = async () => {
    if (gone(me)) return;
    try { await fn(); } finally { if (!gone(me)) timer = setTimeout(tick, ms); }
  };
  timer = setTimeout(tick, ms);
}
function stopTimer() {
  if (timer) { clearTimeout(timer); timer = null; }
}

// ---- Fleet -----------------------------------------------------------------------------

async function fleetPage(params) {
  const me = nav;
  const select = params.get("select") || "";
  const form = h("form", { class: "bar", role: "search" },
    h("label", {}, "Selector", h("input", { name: "select", value: select, placeholder: "role=web", size: 30 })),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = "#/fleet" + query({ select: form.select.value.trim() });
  });
  const body = h("div", { id: "fleet-body", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading agents…"));
  render("Fleet", form, body, h("p", { class: "muted" }, "Refreshed every 5 s. Each host's state is as its agent last reported it (when it connects and after each run); a change made outside fleet-rollback shows after the next run. Diagnose reads every host now."));
  async function refresh() {
    let agents;
    try { agents = await api("agents" + query({ select })); } catch (err) {
      return put(body, errorBox(err));
    }
    if (gone(me)) return;
    const rows = agents.map((a) => {
      const st = a.state || {};
      const snap = a.last_snapshot;
      return h("tr", { "data-host": a.host_id },
        h("th", { scope: "row" }, a.host_id),
        h("td", {}, badge(a.status)),
        h("td", {}, labelsText(a.labels), a.label_mismatch && a.label_mismatch.length ? h("div", { class: "warn" }, a.label_mismatch.join("; ")) : null),
        h("td", {}, a.coordinator),
        h("td", {}, a.agent_version),
        h("td", {}, st.unit_active_state ? badge(st.unit_active_state, st.unit_active_state === "active" ? "good" : "bad") : ""),
        h("td", { class: "mono" }, short(st.git_head_sha), h("div", { class: "muted" }, st.git_head_subject || "")),
        h("td", { class: "mono" }, st.alembic_revision || ""),
        h("td", {}, h("span", { class: "mono" }, short(st.env_sha256)), h("div", { class: a.env_vs_snapshot === "differs from snapshot" ? "warn" : "muted" }, a.env_vs_snapshot)),
        h("td", {}, snap ? [h("span", { class: "mono" }, short(snap.snapshot_id)), h("div", { class: "muted" }, snap.taken_at)] : "none"),
        h("td", { class: a.cert_warning ? "warn" : "" }, a.cert_warning || (a.cert_days_left !== null ? `${a.cert_days_left} days` : "")));
    });
    const online = agents.filter((a) => a.status === "online").length;
    put(body,
      h("p", {}, `${agents.length} agent(s), ${online} online`),
      agents.length ? table(["Host", "Status", "Labels", "Coordinator", "Version", "Unit", "Git HEAD", "Alembic", ".env", "Last snapshot", "Certificate"], rows, { id: "fleet" })
        : h("p", {}, select ? `No agents match ${select}.` : "No agent has connected yet."));
  }
  await refresh();
  if (!gone(me)) every(5000, refresh);
}

// ---- Jobs ------------------------------------------------------------------------------

const JOB_STATES = ["", "running", "awaiting_approval", "succeeded", "failed", "halted", "cancelled", "interrupted", "denied", "expired"];

function jobDuration(j) {
  const end = j.finished_at_unix_ms || Date.now();
  return j.created_at_unix_ms ? fmtDuration(end - j.created_at_unix_ms) : "";
}

async function jobsPage(params) {
  const me = nav;
  const f = Object.fromEntries(["state", "procedure", "host", "kind", "since", "limit"].map((k) => [k, params.get(k) || ""]));
  const form = h("form", { class: "bar", role: "search" },
    h("label", {}, "State", h("select", { name: "state" }, JOB_STATES.map((s) => h("option", { value: s, selected: s === f.state }, s || "any")))),
    h("label", {}, "Procedure", h("input", { name: "procedure", value: f.procedure, size: 14 })),
    h("label", {}, "Host", h("input", { name: "host", value: f.host, size: 14 })),
    h("label", {}, "Kind", h("select", { name: "kind" }, ["rollback", "snapshot", "diagnose", "guard", "all"].map((k) => h("option", { value: k, selected: k === (f.kind || "rollback") }, k)))),
    h("label", {}, "Since (30m, 24h, 7d or a time)", h("input", { name: "since", value: f.since, size: 12 })),
    h("label", {}, "Limit", h("input", { name: "limit", value: f.limit || "50", size: 4, inputmode: "numeric" })),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = {};
    for (const k of ["state", "procedure", "host", "kind", "since", "limit"]) q[k] = form[k].value.trim();
    if (q.kind === "rollback") q.kind = "";
    if (q.limit === "50") q.limit = "";
    location.hash = "#/jobs" + query(q);
  });
  const body = h("div", { id: "jobs-body" }, h("p", { class: "muted" }, "Loading jobs…"));
  render("Jobs", form, body);
  async function refresh() {
    let jobs;
    try { jobs = await api("jobs" + query(f)); } catch (err) { return put(body, errorBox(err)); }
    if (gone(me)) return;
    const rows = jobs.map((j) => h("tr", { "data-job": j.job_id },
      h("th", { scope: "row" }, h("a", { href: `#/job/${j.job_id}`, class: "mono" }, j.job_id.slice(0, 12))),
      h("td", {}, j.procedure),
      h("td", {}, badge(j.state)),
      h("td", {}, (j.plan && j.plan.targets ? j.plan.targets.length : j.hosts.length) + " host(s)"),
      h("td", {}, j.requested_by),
      h("td", {}, j.reason),
      h("td", {}, j.created_at),
      h("td", {}, jobDuration(j))));
    put(body, jobs.length ? table(["Job", "Procedure", "State", "Hosts", "Requested by", "Reason", "Started", "Duration"], rows, { id: "jobs" })
      : h("p", {}, "No jobs match."));
  }
  await refresh();
  if (!gone(me)) every(5000, refresh);
}

// ---- One job, live ---------------------------------------------------------------------

let live = null; // the open EventSource of the job page

function closeLive() {
  if (live) { live.close(); live = null; }
}

function stepCell(runs, now) {
  const steps = [];
  for (const r of runs || []) for (const s of r.steps || []) steps.push(s);
  if (!steps.length && !now) return "";
  return h("div", {},
    steps.length ? h("ol", { class: "steps" }, steps.map((s) => h("li", {},
      h("span", { class: "mono" }, s.action), " ", badge(s.status), " ", fmtDuration(s.duration_ms),
      s.error ? h("div", { class: "bad" }, s.error) : null))) : null,
    now ? h("div", { class: "muted now" }, "now: ", now) : null);
}

function actionForm(id, label, name, cls, required, onDone, errors) {
  const input = h("input", { id: `${name}-reason`, name: "reason", placeholder: "reason", size: 24, required, "aria-label": `Reason to ${name}` });
  const button = h("button", { id: `${name}-btn`, type: "submit", class: cls }, label);
  const form = h("form", {}, input, button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    put(errors);
    try {
      await api(`jobs/${id}/${name}`, { reason: input.value });
      onDone();
    } catch (err) {
      put(errors, errorBox(err));
      button.disabled = false;
    }
  });
  return form;
}

const LIVE_STATES = ["running", "awaiting_approval"];
// Events after which the job's record is read again (the others change only the log).
const RELOAD_ON = ["host.phase_done", "host.finished", "phase.finished", "phase.started", "batch.started"];

async function jobPage(id) {
  const me = nav;
  closeLive();
  render(`Job ${id.slice(0, 12)}`, h("p", { class: "muted" }, "Loading the job…"));
  let job;
  try { job = await api(`jobs/${encodeURIComponent(id)}`); } catch (err) {
    if (!gone(me)) render(`Job ${id.slice(0, 12)}`, errorBox(err));
    return;
  }
  if (gone(me)) return;
  id = job.job_id;
  const warning = notice;
  notice = null;
  const head = h("div", { id: "job-head" });
  const actions = h("div", { class: "actions", id: "actions" });
  const errors = h("div", { id: "action-error", "aria-live": "assertive" });
  const progress = h("div", { id: "progress" });
  const hosts = h("div", { id: "hosts" });
  const outputs = h("div", { id: "outputs" });
  const events = h("ol", { id: "events", class: "events mono", "aria-live": "off" });
  const status = h("p", { id: "live-status", class: "muted", "aria-live": "polite" }, "connecting…");
  const outputOf = new Map();
  const phaseProgress = new Map();
  const stepNow = new Map(); // host -> what its current step is doing, from the events
  let lastSeq = 0;
  let actionsFor = null; // the job state the action forms were built for

  function outputFor(host) {
    let pre = outputOf.get(host);
    if (!pre) {
      pre = h("pre", { class: "output", "data-host": host, tabindex: 0, "aria-label": `Output of ${host}` });
      outputs.append(h("details", { open: true }, h("summary", {}, host), pre));
      outputOf.set(host, pre);
    }
    return pre;
  }

  function drawProgress() {
    const plan = job.plan;
    if (!plan) return put(progress);
    const outcome = new Map(job.hosts.map((x) => [x.host_id, x.outcome]));
    put(progress, ...plan.phases.map((ph, i) => {
      const p = phaseProgress.get(ph.name);
      const total = p ? p.total : ph.batches.reduce((n, b) => n + b.length, 0);
      const done = p ? p.done : 0;
      return h("div", { class: "phase" },
        h("h3", {}, `Phase ${i + 1}: ${ph.name} (${ph.scope})`),
        h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": done, "aria-label": `${ph.name}: ${done} of ${total} hosts done` }, h("span", {})),
        h("p", { class: "muted" }, `${done}/${total} done`),
        h("div", {}, ph.batches.map((b, bi) => h("div", { class: "chips" },
          h("span", { class: "muted" }, ph.scope === "once" ? "host:" : (bi === 0 && ph.batches.length > 1 ? "canary:" : `batch ${bi + 1}:`)),
          b.map((host) => badge(host, stateClass(outcome.get(host) || "pending")))))));
    }));
    // Widths are set from script (the CSP allows no inline style attributes).
    progress.querySelectorAll(".progress").forEach((bar) => {
      const max = Number(bar.getAttribute("aria-valuemax")) || 0;
      const now = Number(bar.getAttribute("aria-valuenow")) || 0;
      bar.firstChild.style.width = max ? `${(now * 100) / max}%` : "0";
    });
  }

  function drawHosts() {
    put(hosts, table(["Host", "Outcome", "Phase", "Stopped at", "Steps", "Duration"], job.hosts.map((x) => h("tr", { "data-host": x.host_id },
      h("th", { scope: "row" }, x.host_id, x.once_only ? h("span", { class: "muted" }, " (once)") : null),
      h("td", {}, badge(x.outcome)),
      h("td", {}, x.phase),
      h("td", {}, x.failed_step, x.detail ? h("div", { class: "muted" }, x.detail) : null),
      h("td", {}, stepCell(x.runs, LIVE_STATES.includes(job.state) ? stepNow.get(x.host_id) : null)),
      h("td", {}, fmtDuration(x.duration_ms))))));
  }

  function drawJob() {
    const a = job.approval;
    put(head,
      warning ? h("p", { class: "error", id: "notice", role: "alert" }, warning) : null,
      h("p", {}, badge(job.state), " ", h("span", { id: "job-state" }, job.state), " · ", job.procedure, " · ",
        `${job.plan ? job.plan.targets.length : job.hosts.length} host(s)`, " · requested by ", job.requested_by, " · ", job.created_at,
        job.finished_at ? ` → ${job.finished_at}` : "", " · ", jobDuration(job)),
      h("p", {}, "Reason: ", job.reason, job.selector ? ` · selector ${job.selector}` : ""),
      job.halt_reason ? h("p", { class: "bad", id: "halt-reason" }, "Halted: ", job.halt_reason) : null,
      a ? h("div", { class: "panel", id: "approval" },
        a.decision ? `Approval (${a.rule}): ${a.decision} by ${a.decided_by} at ${a.decided_at}: ${a.reason}`
          : `Awaiting approval (${a.rule}) by an approver other than ${a.requested_by}; expires ${a.expires_at}.`) : null,
      job.plan && job.plan.pins.length ? pinsView(job.plan.pins) : null,
      h("p", {}, h("a", { href: `#/report/${id}` }, "Incident report")));
    // The forms are rebuilt only when what may be done changes: a half-typed reason and the
    // keyboard focus survive the live updates.
    if (actionsFor !== job.state) {
      actionsFor = job.state;
      const done = () => loadJob();
      const forms = [];
      if (job.state === "awaiting_approval") {
        forms.push(actionForm(id, "Approve", "approve", "primary", true, done, errors));
        forms.push(actionForm(id, "Deny", "deny", "danger", true, done, errors));
      }
      if (LIVE_STATES.includes(job.state)) forms.push(actionForm(id, "Cancel job", "cancel", "danger", false, done, errors));
      if (["halted", "cancelled", "failed", "interrupted"].includes(job.state)) forms.push(actionForm(id, "Resume", "resume", "primary", false, done, errors));
      put(actions, ...forms);
    }
    drawHosts();
    drawProgress();
  }

  // Reads of the record can overlap; only the newest one's answer is drawn.
  let asked = 0;
  let pending = null;
  async function loadJob() {
    const mine = ++asked;
    let fresh;
    try { fresh = await api(`jobs/${id}`); } catch (err) {
      if (!gone(me)) put(errors, errorBox(err));
      return;
    }
    if (gone(me) || mine !== asked) return;
    // An error about what the job was (e.g. a refused approval) is old news once it moved on.
    if (fresh.state !== job.state) put(errors);
    job = fresh;
    drawJob();
    // A resumed or approved job goes on: follow it again.
    if (LIVE_STATES.includes(job.state) && !live) follow();
  }
  function loadSoon() {
    if (!pending) pending = setTimeout(() => { pending = null; loadJob(); }, 250);
  }

  function onEvent(msg) {
    let ev;
    try { ev = JSON.parse(msg.data); } catch (_) { return; }
    if (ev.seq <= lastSeq) return; // already shown (a replay after a reconnect)
    lastSeq = ev.seq;
    const at = Date.now();
    if (ev.kind === "step.output") {
      const pre = outputFor(ev.host_id);
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      for (const line of ev.message.split("\n")) {
        pre.append(h("div", { class: "line", "data-at": at, "data-seq": ev.seq }, line));
      }
      if (stick) pre.scrollTop = pre.scrollHeight;
      return;
    }
    if (ev.total) phaseProgress.set(ev.phase, { done: ev.done, total: ev.total });
    events.append(h("li", { "data-kind": ev.kind }, `${new Date(ev.at_unix_ms).toLocaleTimeString()} ${ev.kind}${ev.host_id ? " " + ev.host_id : ""}: ${ev.message}`));
    events.scrollTop = events.scrollHeight;
    if (ev.kind === "step.started" || ev.kind === "step.finished") {
      stepNow.set(ev.host_id, ev.message);
      drawHosts();
    }
    if (ev.kind.startsWith("job.") || RELOAD_ON.includes(ev.kind)) loadSoon();
    else drawProgress();
  }

  // The job's events, live. The browser reconnects by itself after a cut stream (sending the
  // last id); a refused reconnect (the coordinator restarting) closes it, and it is opened
  // again here after the last event seen, backing off to 5 s.
  let retryIn = 1000;
  function follow() {
    closeLive();
    const es = new EventSource(`api/jobs/${id}/events?after=${lastSeq}`);
    live = es;
    es.addEventListener("open", () => { status.textContent = "live"; retryIn = 1000; });
    es.addEventListener("job", onEvent);
    es.addEventListener("end", (msg) => {
      status.textContent = msg.data || "the job ended";
      es.close();
      if (live === es) live = null;
      loadJob();
    });
    es.addEventListener("fatal", (msg) => {
      status.textContent = msg.data;
      es.close();
      if (live === es) live = null;
    });
    es.addEventListener("error", () => {
      if (live !== es || gone(me)) return;
      status.textContent = "connection lost; reconnecting…";
      if (es.readyState === EventSource.CLOSED) {
        live = null;
        setTimeout(() => { if (!gone(me) && !live) follow(); }, retryIn);
        retryIn = Math.min(retryIn * 2, 5000);
      }
    });
  }

  render(`Job ${id.slice(0, 12)}`, head, actions, errors, h("h2", {}, "Progress"), progress,
    h("h2", {}, "Hosts"), hosts, h("h2", {}, "Output"), outputs, h("h2", {}, "Events"), status, events);
  drawJob();
  follow();
}

// ---- Report ----------------------------------------------------------------------------

async function reportPage(id) {
  const me = nav;
  render(`Report ${id.slice(0, 12)}`, h("p", { class: "muted" }, "Loading the report…"));
  let r;
  try { r = await api(`jobs/${encodeURIComponent(id)}/report`); } catch (err) {
    return render(`Report ${id.slice(0, 12)}`, errorBox(err));
  }
  const body = h("article", { id: "report", class: "report" });
  if (gone(me)) return;
  // Safe: the server renders the Markdown with every HTML tag of the text escaped and only
  // http(s) links kept; they open in a new tab, never over the console.
  body.innerHTML = r.html;
  body.querySelectorAll("a[href]").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; });
  render(`Report ${r.job_id.slice(0, 12)}`,
    h("p", {}, h("a", { id: "download", href: `api/jobs/${r.job_id}/report.md`, download: `rollback-report-${r.job_id}.md` }, "Download (Markdown)"),
      " · ", h("a", { href: `#/job/${r.job_id}` }, "Back to the job")),
    body);
}

// ---- New rollback ----------------------------------------------------------------------

// What the job page says first (set by the New rollback page when the started job differs
// from the plan that was confirmed).
let notice = null;

function pinKey(p) {
  return JSON.stringify({
    targets: [...p.targets].sort(),
    pins: p.pins.map((x) => [x.param, x.to, Object.entries(x.from_by_host).sort()]).sort(),
  });
}

function differences(planned, started) {
  if (!planned || !started || pinKey(planned) === pinKey(started)) return null;
  return `The job differs from the plan you confirmed (a host changed in between): planned targets ${planned.targets.join(", ")}; pins ${planned.pins.map((x) => `${x.param}=${x.to}`).join(", ") || "none"}. ` +
    `Started with targets ${started.targets.join(", ")}; pins ${started.pins.map((x) => `${x.param}=${x.to}`).join(", ") || "none"}. Check them below; cancel it if they are wrong.`;
}

function newRequestId() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return "ui-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function pinsView(pins) {
  return h("div", { id: "pins" }, h("h3", {}, "Pinned targets"), h("ul", {}, pins.map((pin) =>
    h("li", {}, h("span", { class: "mono" }, `${pin.param} = ${pin.to}`), ` (asked ${pin.requested}; resolved on ${pin.resolved_on}) `, pin.note))));
}

function planView(p) {
  return h("div", { id: "plan", class: "panel" },
    h("h2", {}, `Plan: ${p.procedure}`),
    h("p", {}, p.description),
    h("p", {}, `Targets (${p.targets.length}): ${p.targets.join(", ")}`),
    p.once_host ? h("p", {}, `Once-host: ${p.once_host}`) : null,
    h("p", {}, `Strategy: ${p.strategy}`),
    p.pins.length ? pinsView(p.pins) : h("p", { class: "muted" }, "Relative targets (steps=1, HEAD~1) are pinned to absolute ones when the job starts, once for every host; the job page shows them."),
    p.offline.length ? h("p", { class: "bad" }, `Offline: ${p.offline.join(", ")} (the rollback refuses to start unless "leave offline hosts out" is ticked)`) : null,
    p.phases.map((ph, i) => h("div", { class: "phase" },
      h("h3", {}, `Phase ${i + 1}: ${ph.name} (${ph.scope})`),
      ph.steps.length ? h("ol", {}, ph.steps.map((s) => h("li", { class: "mono" }, s.action + " " + Object.entries(s.params).sort().map(([k, v]) => `${k}=${v}`).join(" ")))) : null,
      Object.entries(ph.host_steps || {}).map(([host, steps]) => h("div", {}, h("p", {}, `on ${host}:`),
        h("ol", {}, steps.map((s) => h("li", { class: "mono" }, s.action + " " + Object.entries(s.params).sort().map(([k, v]) => `${k}=${v}`).join(" ")))))),
      h("p", {}, ph.batches.map((b, bi) => h("span", { class: "chips" },
        h("span", { class: "muted" }, ph.scope === "once" ? "host:" : (bi === 0 && ph.batches.length > 1 ? "canary:" : `batch ${bi + 1}:`)), b.join(", ")))))));
}

async function newPage() {
  const me = nav;
  render("New rollback", h("p", { class: "muted" }, "Loading the runbook…"));
  let rb;
  try { rb = await api("runbook"); } catch (err) { return render("New rollback", errorBox(err)); }
  if (gone(me)) return;
  const procs = rb.procedures;
  // A runbook this rollbackctl cannot read (a newer coordinator): the procedure by name.
  const procSelect = procs.length ? h("select", { id: "procedure", name: "procedure" },
    procs.map((p) => h("option", { value: p.name }, `${p.name}: ${p.description}`)),
    h("option", { value: "@snapshot" }, "back to a snapshot (each host to its own last-known-good state)"))
    : h("input", { id: "procedure", name: "procedure", required: true });
  const values = h("div", { class: "grid", id: "values" });
  const form = h("form", { id: "new-form" },
    h("div", { class: "grid" },
      h("label", {}, "Procedure", procSelect),
      h("label", {}, "Selector (which hosts)", h("input", { id: "select", name: "select", required: true, placeholder: "role=web" })),
      h("label", {}, "Reason (audit trail and report)", h("input", { id: "reason", name: "reason", required: true })),
      h("label", {}, "Canary hosts (default 1)", h("input", { id: "canary", name: "canary", inputmode: "numeric" })),
      h("label", {}, "Batch size (count or %)", h("input", { id: "batch_size", name: "batch_size", placeholder: "25%" })),
      h("label", {}, "Max failures (count or %)", h("input", { id: "max_failures", name: "max_failures" })),
      h("label", {}, "Once-host selector (optional)", h("input", { id: "once_on", name: "once_on" })),
      h("label", { class: "inline" }, h("input", { type: "checkbox", id: "skip_offline", name: "skip_offline" }), " leave offline hosts out")),
    values,
    h("p", {}, h("button", { id: "plan-btn", type: "submit", class: "primary" }, "Plan (dry run)")));
  const result = h("div", { id: "plan-result", "aria-live": "polite" });
  let requestId = null;

  function drawValues() {
    if (!procs.length) {
      // Values cannot be known without the runbook: both, optional.
      return put(values, ["revision", "backup"].map((need) => h("label", {}, `${need} (if the procedure needs it)`, h("input", { id: `value-${need}`, "data-value": need }))));
    }
    const name = procSelect.value;
    if (name === "@snapshot") {
      put(values, h("label", {}, "Snapshot (id or latest)", h("input", { id: "to-snapshot", name: "to_snapshot", value: "latest" })));
      return;
    }
    const p = procs.find((x) => x.name === name);
    put(values, ...(p ? p.needs : []).map((need) => h("label", {}, need === "revision" ? "Revision (alembic revision, or git commit / HEAD~1)" : need,
      h("input", { id: `value-${need}`, "data-value": need, required: true }))));
  }
  function request() {
    const proc = procSelect.value.trim();
    const req = {
      procedure: proc === "@snapshot" ? "" : proc,
      to_snapshot: proc === "@snapshot" ? form.querySelector("#to-snapshot").value : "",
      values: {},
      select: form.querySelector("#select").value,
      reason: form.querySelector("#reason").value,
      batch_size: form.querySelector("#batch_size").value,
      max_failures: form.querySelector("#max_failures").value,
      once_on: form.querySelector("#once_on").value,
      skip_offline: form.querySelector("#skip_offline").checked,
    };
    const canary = form.querySelector("#canary").value.trim();
    if (canary) req.canary = Number(canary);
    form.querySelectorAll("[data-value]").forEach((i) => { req.values[i.getAttribute("data-value")] = i.value; });
    return req;
  }
  procSelect.addEventListener("change", drawValues);
  // Any change after planning hides the confirm button: what is confirmed is what was planned.
  form.addEventListener("input", () => { if (requestId) { requestId = null; put(result, h("p", { class: "muted" }, "Changed: plan again.")); } });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const req = request();
    if (req.canary !== undefined && !(Number.isInteger(req.canary) && req.canary >= 0)) {
      return put(result, errorBox(new Error("canary: a whole number of hosts (0 or more)")));
    }
    put(result, h("p", { class: "muted" }, "Planning…"));
    let planned;
    try { planned = await api("plan", req); } catch (err) { return put(result, errorBox(err)); }
    if (gone(me)) return;
    requestId = newRequestId();
    const mine = requestId;
    const confirm = h("button", { id: "confirm-btn", type: "button", class: "primary" }, `Confirm: ${planned.confirm}`);
    const errs = h("div", { "aria-live": "assertive" });
    confirm.addEventListener("click", async () => {
      if (requestId !== mine) return;
      confirm.disabled = true;
      try {
        const started = await api("rollback", Object.assign(req, { request_id: mine }));
        // The start resolves the selector and pins again: if a host changed since the plan,
        // the job page says so first thing.
        notice = differences(planned.plan, started.plan);
        location.hash = `#/job/${started.job_id}`;
      } catch (err) { put(errs, errorBox(err)); confirm.disabled = false; }
    });
    put(result, planView(planned.plan), h("p", {}, confirm), errs);
    confirm.focus();
  });
  drawValues();
  render("New rollback", rb.note ? h("p", { class: "warn" }, rb.note) : null, form, result);
}

// ---- Diagnose and snapshots ------------------------------------------------------------

async function diagnosePage(params) {
  const me = nav;
  const select = params.get("select") || "";
  const form = h("form", { class: "bar" },
    h("label", {}, "Selector", h("input", { id: "diag-select", name: "select", value: select, required: true, placeholder: "role=web" })),
    h("button", { id: "diag-btn", type: "submit", class: "primary" }, "Diagnose"));
  const out = h("div", { id: "diagnosis", "aria-live": "polite" });
  const snaps = h("div", { id: "snapshots" });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const sel = form.select.value.trim();
    history.replaceState(null, "", "#/diagnose" + query({ select: sel }));
    put(out, h("p", { class: "muted" }, "Diagnosing (each host reads its state)…"));
    try {
      const d = await api("diagnose", { select: sel });
      if (gone(me)) return;
      put(out, ...d.hosts.map((x) => h("section", { class: "panel", "data-host": x.host_id },
        h("h3", {}, x.host_id, ": ", x.procedures.length ? x.procedures.join(" + ") : (x.snapshot_id ? "no rollback needed" : "no snapshot to compare with")),
        h("p", {}, `Snapshot ${x.snapshot_id || "none"} · /readyz `, badge(x.readyz_status || "none")),
        x.changes.length ? table(["What", "Snapshot", "Now"], x.changes.map((c) => h("tr", {}, h("td", {}, c.what), h("td", { class: "mono" }, c.old || "(base)"), h("td", { class: "mono" }, c.new || "(base)"))))
          : (x.snapshot_id ? h("p", {}, "No change since the snapshot.") : null),
        x.note ? h("p", {}, x.note) : null,
        x.readyz_body && x.readyz_status !== "200" ? h("p", {}, "/readyz says: ", h("code", {}, x.readyz_body)) : null,
        x.command ? h("p", {}, "Run: ", h("code", {}, x.command)) : null)),
        d.command ? h("p", {}, "For every host above: ", h("code", {}, d.command), " ", h("a", { href: "#/new" }, "New rollback")) : null);
    } catch (err) { put(out, errorBox(err)); }
    loadSnapshots(sel);
  });
  async function loadSnapshots(sel) {
    try {
      const list = await api("snapshots" + query({ select: sel }));
      if (gone(me)) return;
      put(snaps, list.length ? table(["Host", "Snapshot", "Label", "Taken", "Git", "Alembic", ".env", "Unit", "Baseline"], list.map((s) => h("tr", {},
        h("th", { scope: "row" }, s.host_id), h("td", { class: "mono" }, short(s.snapshot_id)), h("td", {}, s.label), h("td", {}, s.taken_at),
        h("td", { class: "mono" }, short(s.git_sha), h("div", { class: "muted" }, s.git_subject)), h("td", { class: "mono" }, s.alembic_revision),
        h("td", { class: "mono" }, short(s.env_sha256)), h("td", {}, s.unit_state),
        h("td", {}, (s.baseline.smoke || []).map((b) => `${b.check} p95 ${Math.round(b.p95_ms)} ms${b.ok ? "" : " FAILING"}`).join(", "))))) : h("p", {}, "No snapshots."));
    } catch (err) { put(snaps, errorBox(err)); }
  }
  render("Diagnose & snapshots", h("p", {}, "Compares each host with its newest snapshot and walks the runbook's decision tree."), form, out, h("h2", {}, "Snapshots"), snaps);
  loadSnapshots(select);
}

// ---- Routing ---------------------------------------------------------------------------

function decoded(part) {
  try { return decodeURIComponent(part); } catch (_) { return part; }
}

async function route() {
  nav += 1;
  const hash = location.hash || "#/fleet";
  const [path, q] = hash.slice(1).split("?");
  const params = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => {
    const on = a.getAttribute("href").split("/")[1] === (parts[0] === "job" || parts[0] === "report" ? "jobs" : parts[0]);
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  if (parts[0] !== "job") closeLive();
  stopTimer();
  switch (parts[0]) {
    case "jobs": return jobsPage(params);
    case "job": return jobPage(decoded(parts[1] || "latest"));
    case "report": return reportPage(decoded(parts[1] || "latest"));
    case "new": return newPage();
    case "diagnose": return diagnosePage(params);
    default: return fleetPage(params);
  }
}

async function start() {
  try {
    const me = await api("whoami");
    document.getElementById("target").textContent = `acting on ${me.target}`;
  } catch (err) {
    document.getElementById("target").textContent = "coordinator unreachable: " + err.message;
  }
  // The skip link moves the focus; it is not a page of the router.
  document.querySelector(".skip").addEventListener("click", (e) => { e.preventDefault(); main().focus(); });
  window.addEventListener("hashchange", () => { route().then(() => main().focus()); });
  route();
}

start();
