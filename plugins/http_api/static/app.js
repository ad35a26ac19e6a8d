// The piaa gallery: a plain ES module over the JSON API under /api (no build step, no
// framework). The API key comes from the URL fragment `#key=…` that `piaa serve` prints
// (fragments never reach the server) and is kept in sessionStorage for this tab only; images
// are fetched with it and shown from blob URLs, so the key never appears in a URL either.

const KEY_STORE = "piaa-key";
const $ = (sel) => document.querySelector(sel);

// ------------------------------------------------------------------------------ API access

function takeKeyFromFragment() {
  const m = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search + "#/");
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function failure(resp) {
  // Every API error is {"error": {"code", "message"}}; anything else says its status.
  try {
    const body = await resp.json();
    if (body && body.error) {
      return Object.assign(new Error(body.error.message || body.error.code),
        { code: body.error.code, status: resp.status });
    }
  } catch (_) { /* not JSON */ }
  return Object.assign(new Error(`${resp.status} ${resp.statusText}`), { status: resp.status });
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// Blob URLs of fetched images, revoked when the view that showed them is left.
let blobs = [];
async function imageUrl(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const url = URL.createObjectURL(await resp.blob());
  blobs.push(url);
  return url;
}
function releaseImages() {
  blobs.forEach((u) => URL.revokeObjectURL(u));
  blobs = [];
}

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err.message || String(err);
  box.hidden = false;
}

const fmt = (v, digits = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));
// A calibrated confidence (0–1) as a percentage: "4 %", "<1 %", ">99 %".
const pct = (v) => {
  if (v === null || v === undefined || Number.isNaN(Number(v))) return "—";
  const p = Number(v) * 100;
  if (p > 0 && p < 0.5) return "<1 %";
  if (p < 100 && p >= 99.5) return ">99 %";
  return `${Math.round(p)} %`;
};
// A label's matching key, as the server's normalize_label: whitespace collapsed, case folded.
const labelKey = (name) => String(name).trim().split(/\s+/).join(" ").toLowerCase();
const baseName = (p) => String(p).split("/").pop();
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

// ---------------------------------------------------------------------------------- status

let fitting = false;

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    const n = s.images ? s.images.indexed : s.indexed;
    const labels = s.vocabulary ? (s.vocabulary.labels || []).length : 0;
    const parts = [`${n ?? "?"} images`, `${labels} labels`];
    if (s.stale) parts.push("tags stale: fit needed");
    else if (s.labels_changed) parts.push("your labels changed: fit to learn them");
    $("#status").textContent = parts.join(" · ");
    showFitBanner(Boolean(s.stale), Boolean(s.labels_changed));
    return s;
  } catch (err) {
    $("#status").textContent = "";
    showError(err);
    return null;
  }
}

// The Fit button appears when a fit is due: the vocabulary changed (tags are stale), or your
// labels changed since the last fit learnt from them (the tags stand meanwhile).
function showFitBanner(stale, labelsChanged) {
  const banner = $("#fit-banner");
  const due = stale || labelsChanged;
  $("#fit-why").textContent = stale
    ? "The vocabulary changed: tags are stale until a fit."
    : labelsChanged
      ? "Your labels changed since the last fit: a fit learns from them (the tags stand until then)."
      : "";
  $("#fit-button").hidden = !due || fitting;
  if (due || fitting || $("#fit-result").textContent) banner.hidden = false;
  else banner.hidden = true;
}

// A search (or an image's tags) the server refused with 409 needs_fit: a message with a Fit
// button (the banner's fit flow), never the server's CLI advice; the search runs again after.
let retryAfterFit = false;
const NEEDS_FIT = "The vocabulary changed since the last fit: the tags must be refitted before this search can run.";

function showNeedsFit(text = NEEDS_FIT) {
  retryAfterFit = true;
  $("#needs-fit-text").textContent = `${text} Press Fit (a minute or so); the search runs again when it is done.`;
  $("#needs-fit").hidden = false;
  $("#needs-fit-button").hidden = fitting;
  $("#result-count").textContent = "";
  $("#fit-why").textContent = "The vocabulary changed: tags are stale until a fit.";
  $("#fit-button").hidden = fitting;
  $("#fit-banner").hidden = false;
}

function hideNeedsFit() {
  $("#needs-fit").hidden = true;
}

// What an index job's result says, for a person: counts, then what failed or was skipped.
function indexSummary(r) {
  if (!r) return ["Indexing done."];
  const n = (v) => Number(v || 0);
  const secs = r.seconds ? ` in ${Number(r.seconds).toFixed(1)} s` : "";
  const lines = [`Indexing done${secs}: ${n(r.indexed)} new or changed, ${n(r.unchanged)} unchanged, ` +
    `${n(r.reused)} reused, ${n(r.removed)} removed.`];
  const failed = Array.isArray(r.failed) ? r.failed : [];
  if (failed.length || n(r.still_failing)) {
    lines.push(`${failed.length} failed${n(r.still_failing) ? `, ${n(r.still_failing)} still failing from earlier runs` : ""}:`);
    lines.push(failed.slice(0, 10).map((f) => `${baseName(f.path || "?")}: ${f.error || f.reason || "failed"}`));
  }
  const count = (v) => (Array.isArray(v) ? v.length : typeof v === "object" && v ? Object.keys(v).length : n(v));
  const skipped = Object.entries(r.skipped || {}).filter(([, v]) => count(v));
  if (skipped.length) lines.push(`Skipped: ${skipped.map(([why, v]) => `${count(v)} ${why.replace(/_/g, " ")}`).join(", ")}.`);
  const kept = Object.entries(r.kept || {}).filter(([, v]) => count(v));
  if (kept.length) lines.push(`Kept (missing, not provably gone): ${kept.map(([why, v]) => `${count(v)} ${why.replace(/_/g, " ")}`).join(", ")}.`);
  if ((r.warnings || []).length) lines.push(`${r.warnings.length} ${r.warnings.length === 1 ? "file" : "files"} decoded with warnings.`);
  return lines;
}

// What a fit job's result says, for a person: what it learnt from your labels, label by label.
function fitSummary(result) {
  if (!result) return "Fit done.";
  const secs = result.seconds ? ` in ${Number(result.seconds).toFixed(1)} s` : "";
  const parts = [`Fit done${secs}: ${result.n_images ?? "?"} images tagged.`];
  const learning = result.learning || {};
  const recs = learning.labels || {};
  const learnt = learning.learnt || [];
  if (Object.keys(recs).length) {
    const n = learning.images ?? 0;
    parts.push(`Learnt from your labels of ${n} ${n === 1 ? "image" : "images"}.`);
    if (learnt.length) {
      parts.push("Uses what it learnt for: " +
        learnt.map((n) => `${n} (${recs[n] && recs[n].why ? recs[n].why : "learnt"})`).join("; ") + ".");
    } else {
      parts.push("No label beat its training-free score on your labels held out.");
    }
    // The labels that keep the training-free score, grouped by why ("too few labels" is
    // often most of them).
    const kept = Object.keys(recs).filter((n) => !learnt.includes(n));
    const byWhy = new Map();
    for (const n of kept) byWhy.set(recs[n].why, [...(byWhy.get(recs[n].why) || []), n]);
    const groups = [...byWhy.entries()].sort((a, b) => b[1].length - a[1].length);
    const said = groups.slice(0, 4).map(([why, names]) => (names.length > 3
      ? `${names.length} labels: ${why}`
      : `${names.join(", ")}: ${why}`));
    const rest = groups.slice(4).reduce((k, g) => k + g[1].length, 0);
    if (said.length) {
      parts.push(`Training-free score kept for ${said.join("; ")}${rest ? `; and ${rest} more` : ""}.`);
    }
  }
  return parts.join(" ");
}

// Start a fit job (`start` answers the job: POST /api/jobs/fit, or POST /api/teach, which
// queues one) and follow it in the banner's bar to the end; the finished job.
async function runFit(start = () => api("/api/jobs/fit", { method: "POST" }), intro = "") {
  if (fitting) return null;
  fitting = true;
  showError(null);
  const bar = $("#fit-progress");
  $("#fit-button").hidden = true;
  $("#fit-run").hidden = false;
  $("#fit-result").textContent = "";
  $("#fit-banner").hidden = false;
  bar.removeAttribute("value");
  $("#fit-label").textContent = "Fitting…";
  try {
    let brief;
    try {
      brief = await start();
    } catch (err) {  // refused (a bad name, an unknown image): no job, no bar
      $("#fit-run").hidden = true;
      throw err;
    }
    for (;;) {
      const job = await api(`/api/jobs/${encodeURIComponent(brief.id)}`);
      const p = job.progress || {};
      const total = p.total || 0;
      if (total) { bar.max = total; bar.value = Math.min(p.done || 0, total); } else { bar.removeAttribute("value"); }
      const count = total ? ` ${Math.round((100 * (p.done || 0)) / total)} %` : "";
      $("#fit-label").textContent = `Fitting: ${job.state}${p.stage ? ` (${p.stage})` : ""}${count}`;
      if (job.state === "done") {
        bar.max = 1; bar.value = 1;
        $("#fit-label").textContent = "Fitting: done";
        $("#fit-result").textContent = intro + fitSummary(job.result);
        return job;
      }
      if (job.state === "failed") {
        $("#fit-label").textContent = "Fitting: failed";
        throw new Error(job.error || "the fit failed");
      }
      await new Promise((r) => setTimeout(r, 400));
    }
  } finally {
    fitting = false;
    await refreshStatus();
    const { path } = parseRoute();
    if (path.startsWith("/image/")) route();  // the image's tags after the fit
    else if (retryAfterFit && path !== "/vocabulary" && path !== "/jobs") route();
    retryAfterFit = false;
  }
}

// ----------------------------------------------------------------------------------- teach

// Images picked on result cards (ids), kept across searches until taught or cleared.
const picked = new Set();

function renderPicked() {
  const n = picked.size;
  $("#teach-bar").hidden = n === 0;
  $("#teach-open").textContent = `Teach a concept from ${n} selected…`;
  $("#teach-count").textContent = `${n} ${n === 1 ? "image" : "images"} selected`;
  if (n === 0) $("#teach-form").hidden = true;
  document.querySelectorAll("#results li, #tag-rows li").forEach((li) => {
    const on = picked.has(Number(li.dataset.id));
    li.classList.toggle("picked", on);
    const box = li.querySelector("input.pick");
    if (box) box.checked = on;
  });
}

// A result card: the link to the image page, and a checkbox that picks it for teaching.
// Shift+click picks (or unpicks) every card between the last one clicked and this one, in the
// same grid, as file managers do.
let lastPick = null;
function card(id, path, link) {
  const box = el("input", { type: "checkbox", className: "pick", checked: picked.has(id) });
  box.setAttribute("aria-label", `Select ${baseName(path)}`);
  box.addEventListener("click", (e) => {
    const li = box.closest("li");
    const grid = li.parentElement;
    let span = [li];
    if (e.shiftKey && lastPick && lastPick.parentElement === grid && lastPick !== li) {
      const cards = [...grid.children];
      const [a, b] = [cards.indexOf(lastPick), cards.indexOf(li)].sort((x, y) => x - y);
      span = cards.slice(a, b + 1);
    }
    for (const c of span) {
      const n = Number(c.dataset.id);
      if (box.checked) picked.add(n); else picked.delete(n);
    }
    lastPick = li;
    renderPicked();
  });
  const li = el("li", {}, link, box);
  li.dataset.id = id;
  li.classList.toggle("picked", picked.has(id));
  return li;
}

function openTeach() {
  $("#teach-form").hidden = false;
  $("#teach-examples").textContent =
    `From the ${picked.size} selected ${picked.size === 1 ? "image" : "images"}: what they share and other photos lack.`;
  $("#teach-name").focus();
}

// Teach: POST /api/teach stores the concept and queues a fit job; its bar is the Fit
// banner's; when done, search for the new label so its results show.
async function teach(event) {
  event.preventDefault();
  const name = $("#teach-name").value.trim().split(/\s+/).join(" ");
  if (!name) { $("#teach-name").focus(); return; }
  showError(null);
  const examples = [...picked];
  let taught = null;
  $("#teach-submit").disabled = true;
  try {
    const job = await runFit(async () => {
      taught = await api("/api/teach", { method: "POST", body: { name, examples } });
      return taught;
    }, `Taught “${name}” from ${examples.length} ${examples.length === 1 ? "image" : "images"}. `);
    if (!job) return;
    picked.clear();
    $("#teach-name").value = "";
    $("#teach-form").hidden = true;
    renderPicked();
    const label = taught.label;
    const q = /[\s()"]|^(and|or|not)$/i.test(label) ? `"${label}"` : label;
    const p = new URLSearchParams({ q, limit: $("#limit").value });
    location.hash = `#/?${p}`;
  } finally {
    $("#teach-submit").disabled = false;
  }
}

// ---------------------------------------------------------------------------------- search

// The label being typed: the text after the last operator (AND OR NOT, any case, & | !) or
// parenthesis, so a bare multi-word label completes too; an open quote keeps what follows.
function currentToken(text) {
  const quotes = (text.match(/"/g) || []).length;
  if (quotes % 2 === 1) {
    const quote = text.lastIndexOf('"');
    return { start: quote, token: text.slice(quote + 1) };
  }
  let start = 0;
  for (const m of text.matchAll(/\b(?:and|or|not)\b|[()&|!"]/gi)) start = m.index + m[0].length;
  while (text[start] === " ") start += 1;
  return { start, token: text.slice(start) };
}

let suggestTimer = null;
let suggestSeq = 0;  // bumped on close: a completion answer that comes later is dropped
let active = -1;

function closeSuggestions() {
  clearTimeout(suggestTimer);
  suggestSeq += 1;
  const list = $("#suggestions");
  list.hidden = true;
  list.replaceChildren();
  $("#q").setAttribute("aria-expanded", "false");
  $("#q").removeAttribute("aria-activedescendant");
  active = -1;
}

// A label as a query term: quoted where it has spaces, brackets or is an operator's name.
const asTerm = (label) => (/[\s()"]|^(and|or|not)$/i.test(label) ? `"${label}"` : label);

function acceptSuggestion(label) {
  const input = $("#q");
  const { start } = currentToken(input.value);
  const quoted = asTerm(label);
  input.value = input.value.slice(0, start) + quoted + " ";
  closeSuggestions();
  input.focus();
}

async function suggest() {
  const input = $("#q");
  if ($("#text-mode").checked) return closeSuggestions();
  const { token } = currentToken(input.value);
  if (!token.trim()) return closeSuggestions();
  const seq = suggestSeq;
  try {
    const { labels } = await api(`/api/labels?prefix=${encodeURIComponent(token)}&limit=8`);
    // Closed meanwhile (submitted, Escape, left the box): stay closed.
    if (seq !== suggestSeq || document.activeElement !== input) return;
    const list = $("#suggestions");
    list.replaceChildren(...labels.map((item, i) => {
      const li = el("li", { id: `sugg-${i}`, role: "option", textContent: item.label });
      li.setAttribute("aria-selected", "false");
      li.append(el("span", { className: "n", textContent: ` ${item.count}` }));
      li.addEventListener("mousedown", (e) => { e.preventDefault(); acceptSuggestion(item.label); });
      li.dataset.label = item.label;
      return li;
    }));
    list.hidden = labels.length === 0;
    input.setAttribute("aria-expanded", String(labels.length > 0));
    active = -1;
  } catch (err) {
    closeSuggestions();
  }
}

function moveActive(step) {
  const items = [...$("#suggestions").children];
  if (!items.length) return;
  active = (active + step + items.length) % items.length;
  items.forEach((li, i) => li.setAttribute("aria-selected", String(i === active)));
  $("#q").setAttribute("aria-activedescendant", items[active].id);
}

function searchUrl(q, text, limit) {
  const p = new URLSearchParams({ limit: String(limit) });
  p.set(text ? "text" : "expression", q);
  return `/api/queries/search?${p}`;
}

// Each search or landing page has a number; an answer for an older one is dropped (a fast
// second search must not mix its results with the first's).
let gridSeq = 0;

async function runSearch(q, text, limit) {
  const seq = ++gridSeq;
  closeSuggestions();
  hideNeedsFit();
  $("#q").value = q;
  $("#text-mode").checked = text;
  $("#limit").value = String(limit);
  const grid = $("#results");
  releaseImages();
  grid.replaceChildren();
  $("#by-tag").hidden = true;
  $("#result-count").textContent = "";
  if (!q) return Promise.all([showLibrary(limit, seq), showByTag(seq)]);
  $("#result-count").textContent = "Searching…";
  const { results } = await api(searchUrl(q, text, limit));
  if (seq !== gridSeq) return;
  remember(results.map((r) => r.id));
  const noun = results.length === 1 ? "image" : "images";
  $("#result-count").textContent = `${results.length} ${noun} for ${text ? "the phrase " : ""}${q}`;
  for (const row of results) {
    const img = el("img", { alt: baseName(row.path), loading: "lazy", width: 256, height: 256 });
    const why = row.labels
      ? Object.entries(row.labels).map(([n, v]) => `${n}: ${pct(v.score)} confident`).join(", ")
      : "";
    // A label search ranks by calibrated confidence (AND: the weakest label's); a phrase by
    // its text score, which is no probability.
    const shown = text ? `text score ${fmt(row.score)}` : `${pct(row.score)}`;
    const link = el("a", { href: `#/image/${row.id}${text ? "" : `?label=${encodeURIComponent(firstLabel(row))}`}` },
      img,
      el("span", { className: "score", textContent: shown }),
      el("span", { className: "name", textContent: baseName(row.path) }));
    if (why) link.title = why;
    grid.append(card(row.id, row.path, link));
    imageUrl(`/api/images/${row.id}/thumbnail?size=256`)
      .then((url) => { img.src = url; })
      .catch(() => { img.alt = `${baseName(row.path)} (thumbnail unavailable)`; });
  }
}

// The landing page: the library itself, the latest indexed images first.
async function showLibrary(limit, seq) {
  const grid = $("#results");
  const { images } = await api(`/api/images?order=newest&limit=${limit}`);
  if (seq !== gridSeq) return;
  remember(images.map((im) => im.id));
  $("#result-count").textContent = images.length
    ? `The ${images.length === 1 ? "latest image" : `latest ${images.length} images`} of your library (search above)`
    : "No images yet: index a folder (Index & fit).";
  for (const im of images) {
    const img = el("img", { alt: baseName(im.path), loading: "lazy", width: 256, height: 256 });
    const link = el("a", { href: `#/image/${im.id}` }, img,
      el("span", { className: "name", textContent: baseName(im.path) }));
    grid.append(card(im.id, im.path, link));
    imageUrl(`/api/images/${im.id}/thumbnail?size=256`)
      .then((url) => { img.src = url; })
      .catch(() => { img.alt = `${baseName(im.path)} (thumbnail unavailable)`; });
  }
}

// The landing page's "By tag": every label with the number of images it tags (a chip that
// searches it), then a row of the best few images for each of the most-tagged labels.
const TAG_ROWS = 4;
const ROW_IMAGES = 8;

async function showByTag(seq) {
  const { labels } = await api("/api/labels?limit=1000");
  if (seq !== gridSeq) return;
  const seen = labels.filter((l) => l.count > 0).sort((a, b) => b.count - a.count);
  const unseen = labels.filter((l) => l.count === 0).map((l) => l.label);
  if (!labels.length) return;
  const link = (label) => `#/?${new URLSearchParams({ q: asTerm(label) })}`;
  $("#tag-chips").replaceChildren(...seen.map((l) => el("li", {},
    el("a", { href: link(l.label) }, `${l.label} `, el("span", { className: "n", textContent: String(l.count) })))));
  $("#tag-unseen").textContent = unseen.length
    ? `Not seen in any image (yet): ${unseen.join(", ")}.` : "";
  $("#tag-rows").replaceChildren();
  $("#by-tag").hidden = false;
  for (const l of seen.slice(0, TAG_ROWS)) {
    let results;
    try {
      ({ results } = await api(searchUrl(asTerm(l.label), false, ROW_IMAGES)));
    } catch (err) {
      // Left (another page or search): a vocabulary edited meanwhile may have dropped the
      // label, and the answer is nobody's. Being refitted: chips only.
      if (seq !== gridSeq || err.code === "needs_fit") return;
      throw err;
    }
    if (seq !== gridSeq) return;
    const grid = el("ul", { className: "grid" });
    grid.setAttribute("aria-label", `Images tagged ${l.label}`);
    const noun = l.count === 1 ? "image" : "images";
    $("#tag-rows").append(el("section", { className: "tag-row" },
      el("h3", {}, el("a", { href: link(l.label) }, `${l.label}`),
        el("span", { className: "n", textContent: ` · ${l.count} ${noun} · see all →` })),
      grid));
    for (const row of results) {
      const img = el("img", { alt: baseName(row.path), loading: "lazy", width: 256, height: 256 });
      const a = el("a", { href: `#/image/${row.id}?label=${encodeURIComponent(l.label)}` }, img,
        el("span", { className: "score", textContent: pct(row.score) }),
        el("span", { className: "name", textContent: baseName(row.path) }));
      grid.append(card(row.id, row.path, a));
      imageUrl(`/api/images/${row.id}/thumbnail?size=256`)
        .then((url) => { img.src = url; })
        .catch(() => { img.alt = `${baseName(row.path)} (thumbnail unavailable)`; });
    }
  }
}

function firstLabel(row) {
  const names = Object.keys(row.labels || {});
  return names.length ? names[0] : "";
}

// ----------------------------------------------------------------------------------- image

async function showEvidence(id, label) {
  const img = $("#evidence-img");
  const on = $("#evidence-on").checked;
  const caption = $("#evidence-caption");
  if (!on || !label) {
    img.dataset.zoom = `/api/images/${id}/thumbnail?size=2048`;
    img.src = await imageUrl(`/api/images/${id}/thumbnail?size=512`);
    img.alt = "The photo";
    caption.textContent = "";
    return;
  }
  const q = `label=${encodeURIComponent(label)}`;
  img.dataset.zoom = `/api/images/${id}/evidence?${q}&format=png&size=1024`;
  const [ev, url] = await Promise.all([
    api(`/api/images/${id}/evidence?${q}&format=json`),
    imageUrl(`/api/images/${id}/evidence?${q}&format=png`),
  ]);
  img.src = url;
  img.dataset.label = ev.label;
  img.alt = `Where the classifier sees “${ev.label}”: a heatmap over the photo, brightest where the patch evidence is highest`;
  caption.textContent =
    `“${ev.label}”: ${ev.present ? "tagged" : "not tagged"} — ${ev.why}. ` +
    `Best patch ${fmt(ev.max)} (threshold ${fmt(ev.threshold)}), ` +
    `${ev.grid_shape[0]}×${ev.grid_shape[1]} patches.`;
}

// The ids of the last results, for ← and → on the image page (kept for this tab).
function remember(ids) {
  sessionStorage.setItem("piaa-results", JSON.stringify(ids));
}
function neighbour(id, step) {
  let ids = [];
  try { ids = JSON.parse(sessionStorage.getItem("piaa-results") || "[]"); } catch (_) { ids = []; }
  const i = ids.indexOf(id);
  return i < 0 ? null : ids[i + step] ?? null;
}

// Your labels of the image shown, by label key: {label, present, source, updated_at}.
let mine = new Map();

function renderMine(row, t) {
  const cell = row.querySelector("td.mine");
  const given = mine.get(labelKey(t.label));
  row.classList.toggle("mine-yes", Boolean(given && given.present));
  row.classList.toggle("mine-no", Boolean(given && !given.present));
  const [yes, no] = cell.querySelectorAll("button");
  yes.setAttribute("aria-pressed", String(Boolean(given && given.present)));
  no.setAttribute("aria-pressed", String(Boolean(given && !given.present)));
  cell.querySelector(".said").textContent = given
    ? (given.present ? "you: yes" : "you: no")
    : "";
  cell.title = given ? `${given.present ? "Confirmed" : "Rejected"} (${given.source}, ${given.updated_at})` : "";
}

function setMine(labels) {
  mine = new Map(labels.map((l) => [labelKey(l.label), l]));
}

async function sayLabel(id, t, present, row, all) {
  const given = mine.get(labelKey(t.label));
  const path = `/api/images/${id}/labels/${encodeURIComponent(t.label)}`;
  const answer = given && given.present === present
    ? await api(path, { method: "DELETE" })  // the same click again takes it back
    : await api(path, { method: "PUT", body: { present, source: "gallery" } });
  setMine(answer.labels);
  renderMine(row, t);
  renderOthers(all);
  refreshStatus();
}

function renderOthers(tags) {
  const known = new Set(tags.map((t) => labelKey(t.label)));
  const others = [...mine.values()].filter((l) => !known.has(labelKey(l.label)));
  const p = $("#other-labels");
  p.hidden = others.length === 0;
  p.textContent = others.length
    ? "Your labels outside the vocabulary: " +
      others.map((l) => `${l.label} (${l.present ? "yes" : "no"})`).join(", ")
    : "";
}

// The photo's facts under the picture: camera, lens, date taken, exposure, size.
function bytes(n) {
  if (n === null || n === undefined) return null;
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

async function showExif(id) {
  const dl = $("#exif");
  dl.replaceChildren();
  const x = await api(`/api/images/${id}/exif`);
  const exposure = [x.exposure, x.aperture, x.iso ? `ISO ${x.iso}` : null, x.focal_length]
    .filter(Boolean).join(" · ");
  const size = [x.width && x.height ? `${x.width} × ${x.height} px` : null, bytes(x.size)]
    .filter(Boolean).join(", ");
  const taken = x.taken ? x.taken.replace("T", " ") : null;
  const rows = [["Camera", x.camera], ["Lens", x.lens], ["Taken", taken], ["Exposure", exposure],
    ["Size", size]];
  for (const [name, value] of rows) {
    const dd = el("dd", { textContent: value || "—" });
    dd.dataset.field = name.toLowerCase();
    dl.append(el("dt", { textContent: name }), dd);
  }
  if (!x.camera && !x.taken && !exposure) {
    dl.append(el("dt", { textContent: "EXIF" }),
      el("dd", { textContent: x.readable ? "none in this file" : "not readable from this file" }));
  }
}

// Zoom: the picture over the whole window, fitted; a click on it shows its actual pixels. It
// opens at once with the page's 512-pixel picture, then swaps in the larger one (the photo at
// up to 2048 pixels, or the evidence map at up to 1024) when it has arrived.
let zoomSeq = 0;
function openZoom() {
  const shown = $("#evidence-img");
  if (!shown.src) return;
  const zoom = $("#zoom");
  const seq = ++zoomSeq;
  $("#zoom-img").src = shown.src;
  $("#zoom-img").alt = shown.alt;
  zoom.classList.remove("actual");
  zoom.hidden = false;
  $("#zoom-close").focus();
  if (!shown.dataset.zoom) return;
  imageUrl(shown.dataset.zoom)
    .then((url) => { if (seq === zoomSeq && !zoom.hidden) $("#zoom-img").src = url; })
    .catch(() => {});  // the 512-pixel picture stays
}
function closeZoom() {
  zoomSeq += 1;
  if ($("#zoom").hidden) return;
  $("#zoom").hidden = true;
  $("#zoom-img").removeAttribute("src");
}

// The numbers behind a tag, for its row's details: patch evidence against its threshold.
function numbersOf(t) {
  const parts = [`Confidence ${fmt(t.score)}`, `best patch ${fmt(t.patch_score)}`,
    `threshold ${fmt(t.threshold)}`];
  if (t.label_status && t.label_status !== "present") parts.push(`label ${t.label_status}`);
  if (t.why) parts.push(t.why);
  return parts.join(" · ");
}

// The row's "why", only where it says something of this label (absent from the collection, a
// weak label, confidence halved...), not the generic "confidence below one half" on every row.
const GENERIC_WHY = new Set([
  "confidence at or above one half", "confidence below one half",
  "patch evidence at or above the threshold", "patch evidence below the threshold",
]);
function specificWhy(t) {
  const why = String(t.why || "").trim();
  return why && !GENERIC_WHY.has(why) ? why : "";
}

async function showImage(id, label) {
  releaseImages();
  closeZoom();
  showExif(id).catch(() => { $("#exif").replaceChildren(); });
  const [info, labels] = await Promise.all([
    api(`/api/images/${id}`),
    api(`/api/images/${id}/labels`),
  ]);
  setMine(labels.labels);
  $("#image-title").textContent = info.path;
  if (info.tags_error) {
    const s = await refreshStatus();
    if (s && s.stale) {
      showError(new Error("No tags to show: the vocabulary changed since the last fit. Press Fit above."));
    } else showError(new Error(info.tags_error));
  }
  const tags = info.tags || [];
  const select = $("#evidence-label");
  select.replaceChildren(...tags.map((t) => el("option", { value: t.label, textContent: t.label })));
  const chosen = label && tags.some((t) => t.label === label) ? label : (tags[0] || {}).label;
  if (chosen) select.value = chosen;
  // What is in the photo first (best first, as the API ranks them); the other labels folded
  // under a <details>, most likely first, with the same ✓/✗ (to confirm a missed label).
  const present = tags.filter((t) => t.present);
  const absent = tags.filter((t) => !t.present)
    .sort((a, b) => (Number(b.score) || 0) - (Number(a.score) || 0));
  const tagRow = (t) => {
    const btn = el("button", { type: "button", className: "link", textContent: t.label });
    btn.setAttribute("aria-label", `Show where the classifier sees ${t.label}`);
    btn.addEventListener("click", () => {
      select.value = t.label;
      $("#evidence-on").checked = true;
      showEvidence(id, t.label).catch(showError);
      $("#evidence-img").scrollIntoView({ block: "nearest" });
    });
    const head = el("th", { scope: "row" }, btn);
    if (t.learnt) {
      head.append(" ", el("span", {
        className: "learnt", textContent: "learnt",
        title: "Scored by what the fit learnt from your labels (else training-free)",
      }));
    }
    const why = specificWhy(t);
    if (why) head.append(el("span", { className: "why", textContent: why }));
    const yes = el("button", { type: "button", className: "say yes", textContent: "✓" });
    yes.setAttribute("aria-label", `Confirm ${t.label}: it is in the photo`);
    const no = el("button", { type: "button", className: "say no", textContent: "✗" });
    no.setAttribute("aria-label", `Reject ${t.label}: it is not in the photo`);
    const numbers = numbersOf(t);
    const more = el("details", { className: "row-more" },
      el("summary", { textContent: "details", title: numbers }),
      el("span", { className: "numbers", textContent: numbers }));
    more.querySelector("summary").setAttribute("aria-label", `Details of ${t.label}`);
    const row = el("tr", { className: t.present ? "present" : "" },
      head,
      el("td", { className: "conf", textContent: pct(t.score), title: `confidence ${fmt(t.score)}` }),
      el("td", { className: "mine" }, yes, no, el("span", { className: "said" })),
      el("td", { className: "more" }, more));
    row.dataset.label = t.label;
    yes.addEventListener("click", () => sayLabel(id, t, true, row, tags).catch(showError));
    no.addEventListener("click", () => sayLabel(id, t, false, row, tags).catch(showError));
    renderMine(row, t);
    return row;
  };
  $("#present-tags tbody").replaceChildren(...present.map(tagRow));
  $("#present-tags").hidden = present.length === 0;
  $("#no-present").hidden = present.length > 0 || tags.length === 0;
  $("#other-tags tbody").replaceChildren(...absent.map(tagRow));
  $("#other-tags").hidden = absent.length === 0;
  $("#other-tags-summary").textContent =
    `${absent.length} other ${absent.length === 1 ? "label" : "labels"}, not in this photo`;
  renderOthers(tags);
  const prev = neighbour(id, -1);
  const next = neighbour(id, 1);
  $("#view-image").dataset.prev = prev ?? "";
  $("#view-image").dataset.next = next ?? "";
  select.onchange = () => showEvidence(id, select.value).catch(showError);
  $("#evidence-on").onchange = select.onchange;
  await showEvidence(id, chosen);
}

// ------------------------------------------------------------------------------ vocabulary

async function showVocabulary() {
  const v = await api("/api/vocabulary");
  $("#vocab-labels").value = (v.labels || []).join("\n");
  $("#vocab-state").textContent = v.stale ? "Tags are stale: run a fit." : "";
}

async function saveVocabulary(event) {
  event.preventDefault();
  const labels = $("#vocab-labels").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const v = await api("/api/vocabulary", { method: "PUT", body: { labels } });
  $("#vocab-state").textContent =
    `Saved ${v.labels.length} labels.` + (v.stale ? " Tags are stale: run a fit (Index & fit)." : "");
  refreshStatus();
}

// ------------------------------------------------------------------------------------ jobs

async function follow(jobId, what) {
  const box = $("#job");
  const bar = $("#job-progress");
  box.hidden = false;
  $("#job-result").replaceChildren();
  for (;;) {
    const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
    const p = job.progress || {};
    const total = p.total || 0;
    if (total) { bar.max = total; bar.value = p.done || 0; } else { bar.removeAttribute("value"); }
    $("#job-label").textContent =
      `${what}: ${job.state}${p.stage ? ` (${p.stage})` : ""}${total ? ` ${p.done}/${total}` : ""}`;
    if (!["queued", "running"].includes(job.state)) {
      if (job.state === "failed" || job.error) showError(new Error(job.error && job.error.message ? job.error.message : job.error || `${what} failed`));
      else { bar.max = 1; bar.value = 1; }
      renderJobResult(what, job.result);
      refreshStatus();
      return job;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

// A finished job's result as sentences (and a short list of failures), not JSON.
function renderJobResult(what, result) {
  const box = $("#job-result");
  box.replaceChildren();
  if (!result) return;
  const lines = what === "Fitting" ? [fitSummary(result)] : indexSummary(result);
  for (const line of lines) {
    box.append(Array.isArray(line)
      ? el("ul", {}, ...line.map((t) => el("li", { textContent: t })))
      : el("p", { textContent: line }));
  }
}

async function startJob(event, kind) {
  event.preventDefault();
  showError(null);
  const body = kind === "index"
    ? { paths: [$("#index-path").value.trim()], prune: $("#index-prune").checked }
    : {};
  const job = await api(`/api/jobs/${kind}`, { method: "POST", body });
  await follow(job.id, kind === "index" ? "Indexing" : "Fitting");
}

// ---------------------------------------------------------------------------------- router

function parseRoute() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  return { path: path || "/", params: new URLSearchParams(query) };
}

function show(view) {
  document.querySelectorAll(".view").forEach((s) => { s.hidden = s.id !== `view-${view}`; });
}

// Each page shown has a number: a page left while it was still loading fails silently (its
// requests may fail because of what was done since, e.g. a label removed from the vocabulary).
let routeSeq = 0;

async function route() {
  showError(null);
  const turn = ++routeSeq;
  gridSeq += 1;  // what the grid was still loading for the last page is nobody's now
  const { path, params } = parseRoute();
  try {
    const image = path.match(/^\/image\/(\d+)$/);
    if (image) {
      show("image");
      await showImage(Number(image[1]), params.get("label") || "");
    } else if (path === "/vocabulary") {
      show("vocabulary");
      await showVocabulary();
    } else if (path === "/jobs") {
      show("jobs");
    } else {
      show("search");
      await runSearch(params.get("q") || "", params.get("text") === "1", Number(params.get("limit")) || 48);
    }
  } catch (err) {
    if (turn !== routeSeq) return;  // another page is showing now
    if (err.code === "needs_fit" && !path.startsWith("/image/")) showNeedsFit();
    else showError(err);
  }
}

function wire() {
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    closeSuggestions();
    const p = new URLSearchParams({ q: $("#q").value.trim(), limit: $("#limit").value });
    if ($("#text-mode").checked) p.set("text", "1");
    const target = `#/?${p}`;
    if (location.hash === target) route(); else location.hash = target;
  });
  $("#q").addEventListener("input", () => {
    clearTimeout(suggestTimer);
    suggestTimer = setTimeout(suggest, 120);
  });
  $("#q").addEventListener("keydown", (e) => {
    const open = !$("#suggestions").hidden;
    if (e.key === "ArrowDown" && open) { e.preventDefault(); moveActive(1); }
    else if (e.key === "ArrowUp" && open) { e.preventDefault(); moveActive(-1); }
    else if ((e.key === "Enter" || e.key === "Tab") && open && active >= 0) {
      e.preventDefault();
      acceptSuggestion($("#suggestions").children[active].dataset.label);
    } else if (e.key === "Escape") closeSuggestions();
  });
  $("#q").addEventListener("blur", () => setTimeout(closeSuggestions, 150));
  $("#text-mode").addEventListener("change", closeSuggestions);
  $("#back").addEventListener("click", (e) => { e.preventDefault(); history.back(); });
  $("#vocab-form").addEventListener("submit", (e) => saveVocabulary(e).catch(showError));
  $("#index-form").addEventListener("submit", (e) => startJob(e, "index").catch(showError));
  $("#fit-form").addEventListener("submit", (e) => startJob(e, "fit").catch(showError));
  $("#fit-button").addEventListener("click", () => runFit().catch(showError));
  $("#needs-fit-button").addEventListener("click", () => {
    $("#needs-fit-button").hidden = true;
    runFit().catch(showError);
  });
  $("#evidence-img").addEventListener("click", openZoom);
  $("#zoom-img").addEventListener("click", () => $("#zoom").classList.toggle("actual"));
  $("#zoom-close").addEventListener("click", closeZoom);
  $("#zoom").addEventListener("click", (e) => { if (e.target === $("#zoom")) closeZoom(); });
  $("#teach-open").addEventListener("click", openTeach);
  $("#teach-clear").addEventListener("click", () => { picked.clear(); renderPicked(); });
  $("#teach-cancel").addEventListener("click", () => { $("#teach-form").hidden = true; });
  $("#teach-form").addEventListener("submit", (e) => teach(e).catch(showError));
  document.addEventListener("keydown", (e) => {
    if (!$("#zoom").hidden) {  // zoomed: Esc closes; nothing else moves underneath
      if (e.key === "Escape") { e.preventDefault(); closeZoom(); }
      return;
    }
    // ← and → on the image page: the previous and next result (not while typing).
    if ($("#view-image").hidden || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.target.closest && e.target.closest("input, select, textarea")) return;
    const step = e.key === "ArrowLeft" ? "prev" : e.key === "ArrowRight" ? "next" : null;
    const target = step && $("#view-image").dataset[step];
    if (!target) return;
    e.preventDefault();
    const label = parseRoute().params.get("label");
    // Replace, not push: Back still leads to the results.
    location.replace(`#/image/${target}${label ? `?label=${encodeURIComponent(label)}` : ""}`);
  });
  window.addEventListener("hashchange", () => { closeZoom(); route(); });
}

takeKeyFromFragment();
wire();
refreshStatus();
route();
