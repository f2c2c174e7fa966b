"use strict";
const POLL_MS = __POLL_MS__, HIDDEN_POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const rows = new Map();  // trial number -> {row, image_written}
const decoded = new Map();  // trial number -> image_written of every version shown (a folder can be restarted)
let etag = null, lastMessages = "", state = null, lost = false;

function el(tag, props, children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children || []) e.append(c);
  return e;
}
const fmtSeconds = (s) => (typeof s === "number" && isFinite(s)) ? s.toFixed(2) + " s" : "\u2013";
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});

function figure(src, alt, caption) {
  const img = el("img", {src: src, alt: alt, decoding: "async"});
  return el("figure", {}, [el("a", {href: src, target: "_blank", rel: "noopener"}, [img]),
                           el("figcaption", {textContent: caption})]);
}

function trialRow(t) {
  const number = "trial " + t.name;
  // A new version of a trial already shown (a session restarted on a cleared folder): a new URL, or the
  // browser would show the image it holds.
  const again = decoded.has(t.trial) && decoded.get(t.trial) !== t.image_written;
  const v = again ? "?v=" + encodeURIComponent(t.image_written) : "";
  const named = t.stimulus !== null && t.stimulus !== undefined;  // an events.tsv's trial: its image's name
  const seen = named ? " (" + t.stimulus + ")"
    : t.nsd_id === null || t.nsd_id === undefined ? "" : " (NSD image " + t.nsd_id + ")";
  const truth = t.truth ? figure(t.truth + v, "Image shown at " + number + seen, "Ground truth")
    : el("figure", {}, [el("div", {className: "missing", textContent: "Ground truth unknown"}),
                        el("figcaption", {textContent: "Ground truth"})]);
  const meta = el("dl", {}, []);
  const add = (k, v, cls) => { meta.append(el("dt", {textContent: k}),
                                           el("dd", {textContent: v, className: cls || ""})); };
  if (named) add("Image", t.stimulus, "stimulus");
  else add("NSD image", t.nsd_id === null || t.nsd_id === undefined ? "unknown" : String(t.nsd_id), "nsd-id");
  add("Latency", fmtSeconds(t.latency_s), "latency");
  if (typeof t.onset_s === "number") add("Onset, last vol.", fmtSeconds(t.onset_s) + ", " + t.last_volume);
  else add("Onset, last vol.", t.onset_volume + ", " + t.last_volume);
  if (t.image_written) add("Decoded at", fmtTime(t.image_written));
  const row = el("li", {className: "trial new", id: "trial-" + t.name}, [
    figure(t.image + v, "Reconstruction of " + number + " decoded from fMRI", "Reconstruction"), truth,
    el("div", {}, [el("div", {className: "name", textContent: "Trial " + t.name}), meta])]);
  row.dataset.trial = String(t.trial);
  row.addEventListener("animationend", () => row.classList.remove("new"));
  return row;
}

function renderTrials(trials) {
  const list = $("trials"), present = new Set();
  for (const t of trials) {
    present.add(t.trial);
    const known = rows.get(t.trial);
    if (known && known.image_written === t.image_written) continue;  // shown: its images are not fetched again
    const row = trialRow(t);
    if (known) known.row.replaceWith(row);
    else {  // newest (highest trial number) first
      let before = null;
      for (const r of list.children) if (Number(r.dataset.trial) < t.trial) { before = r; break; }
      list.insertBefore(row, before);
    }
    rows.set(t.trial, {row: row, image_written: t.image_written});
    decoded.set(t.trial, t.image_written);
  }
  for (const [trial, known] of rows) if (!present.has(trial)) { known.row.remove(); rows.delete(trial); }
  $("empty").hidden = rows.size > 0;
}

function renderMessages(messages) {
  const key = JSON.stringify(messages);
  if (key === lastMessages) return;
  lastMessages = key;
  const list = $("messages");
  list.replaceChildren(...messages.slice().reverse().map((m) => el("li", {className: "message " + m.level}, [
    el("time", {textContent: fmtTime(m.time)}), el("span", {className: "level " + m.level, textContent: m.level}),
    el("span", {className: "text", textContent: m.text})])));
  list.hidden = messages.length === 0;
  $("no-messages").hidden = messages.length > 0;
}

function renderStatus() {
  const s = $("status"), n = rows.size, trials = n + (n === 1 ? " trial" : " trials");
  let text, cls;
  if (lost) { text = "Lost contact with the server: retrying\u2026"; cls = "lost"; }
  else if (!state) { text = "Connecting\u2026"; cls = "waiting"; }
  else if (state.status === "done") { text = "Done: " + trials + " decoded"; cls = "done"; }
  else if (n === 0) { text = "Waiting for the first trial\u2026"; cls = "waiting"; }
  else if (state.status === "running") { text = "Running: " + trials + " decoded"; cls = "running"; }
  else { text = "Waiting for volumes: " + trials + " so far"; cls = "waiting"; }
  if (s.textContent !== text) s.textContent = text;
  s.className = cls;
  document.title = (n ? "(" + n + ") " : "") + "Dynadiff live";
}

function renderSummary(trials) {
  const lat = trials.map((t) => t.latency_s).filter((x) => typeof x === "number").sort((a, b) => a - b);
  if (!lat.length) { $("summary").textContent = ""; return; }
  const mid = lat.length >> 1, median = lat.length % 2 ? lat[mid] : (lat[mid - 1] + lat[mid]) / 2;
  const last = trials.reduce((a, b) => (b.trial > a.trial ? b : a));
  $("summary").textContent = "latency: last " + fmtSeconds(last.latency_s) + ", median " + fmtSeconds(median)
    + ", max " + fmtSeconds(lat[lat.length - 1]);
}

async function poll() {
  try {
    const response = await fetch("trials.json", {cache: "no-store", headers: etag ? {"If-None-Match": etag} : {}});
    if (response.status === 200) {
      const next = await response.json();
      etag = response.headers.get("ETag");
      state = next;
      renderTrials(state.trials || []);
      renderMessages(state.messages || []);
      renderSummary(state.trials || []);
    } else if (response.status !== 304) {
      throw new Error("HTTP " + response.status);
    }
    lost = false;
  } catch (e) {
    lost = true;
  }
  renderStatus();
  setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}
poll();
