// The B4M web UI: plain JavaScript over the public REST API (no build step).
// Images and live events are fetched with the API key header, so the page works with auth on.
"use strict";

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("b4m-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("b4m-key", keyInput.value.trim()); refresh(); });

const TERMINAL = ["succeeded", "failed", "canceled"];
const state = { contents: [], styles: [], fusions: [], samples: new Map(), jobs: [] };
const watching = new Map();      // job id -> true while its event stream is open
const sampleWhenFused = new Set(); // fusion ids whose samples the UI draws once they are fused

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body, form = false) {
  const opts = { method, headers: authHeaders(body && !form ? { "Content-Type": "application/json" } : {}) };
  if (body) opts.body = form ? body : JSON.stringify(body);
  const r = await fetch(path, opts);
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return r.status === 204 ? null : r.json();
}

// <img> cannot send headers: fetch the bytes, show them as an object URL (cached per path)
const blobs = new Map();
function image(path, alt = "") {
  const el = document.createElement("img");
  el.alt = alt;
  if (!blobs.has(path)) {
    const p = fetch(path, { headers: authHeaders() })
      .then((r) => { if (!r.ok) throw new Error(r.status); return r.blob(); })
      .then((b) => URL.createObjectURL(b));
    p.catch(() => blobs.delete(path));
    blobs.set(path, p);
  }
  blobs.get(path).then((url) => { el.src = url; }).catch(() => {});
  return el;
}

function showError(err) { $("#form-error").textContent = err ? String(err.message || err) : ""; }

// A small link-styled button that runs `onclick` and shows its error.
function action(label, onclick, cls = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `link ${cls}`;
  b.textContent = label;
  b.addEventListener("click", async (e) => {
    e.stopPropagation();
    showError(null);
    try { await onclick(); } catch (err) { showError(err); }
  });
  return b;
}

// Downloads carry the key header too: fetch the file, hand it to the browser as a blob.
async function download(path, fallbackName) {
  const r = await fetch(path, { headers: authHeaders() });
  if (!r.ok) throw new Error(`${r.status}: download failed`);
  const m = /filename="([^"]+)"/.exec(r.headers.get("Content-Disposition") || "");
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = m ? m[1] : fallbackName;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

// b4m (ours, reloadable), diffusers (load_lora_weights) and kohya (A1111, ComfyUI) files
function downloadLinks(adapterId) {
  const span = document.createElement("span");
  span.className = "downloads";
  span.append("download ");
  for (const fmt of ["b4m", "diffusers", "kohya"]) {
    span.append(action(fmt, () => download(`/adapters/${adapterId}/download?format=${fmt}`,
                                           `${adapterId}_${fmt}.safetensors`), `download-${fmt}`));
  }
  return span;
}

// ------------------------------------------------------------------ data
async function all(path) {
  const out = [];
  for (let offset = 0; ; ) {
    const page = await api("GET", `${path}${path.includes("?") ? "&" : "?"}limit=500&offset=${offset}`);
    out.push(...page.items);
    offset += page.items.length;
    if (!page.items.length || offset >= page.total) return out;
  }
}

async function refresh() {
  try {
    const [contents, styles, fusions, gens, jobs] = await Promise.all([
      all("/contents"), all("/styles"), all("/fusions"), all("/generations?status=succeeded"),
      api("GET", "/jobs?limit=30")]);
    Object.assign(state, { contents, styles, fusions, jobs: jobs.items });
    state.samples = new Map();
    for (const g of gens) {  // newest first: the first generation of a fusion is its thumbnail
      if (g.fusion_id && g.images.length && !state.samples.has(g.fusion_id)) state.samples.set(g.fusion_id, g);
    }
    $("#server-status").textContent = "";
    render();
  } catch (err) {
    $("#server-status").textContent = `server: ${err.message}`;
  }
}

function render() { renderJobs(); renderMatrix(); renderGenerateChoices(); }

// ------------------------------------------------------------------ jobs
function targetLabel(job) {
  const asset = [...state.contents, ...state.styles].find((a) => a.id === job.target_id);
  if (asset) return `${asset.kind} "${asset.name}"`;
  const f = state.fusions.find((x) => x.id === job.target_id);
  if (f) return `fusion ${pairLabel(f)}`;
  return job.type === "generate" ? "images" : job.target_id.slice(0, 8);
}

function pairLabel(f) {
  const c = state.contents.find((a) => a.id === f.content_id), s = state.styles.find((a) => a.id === f.style_id);
  return `${c ? c.name : "?"} × ${s ? s.name : "?"}`;
}

function jobRow(job) {
  let li = document.querySelector(`#jobs li[data-job-id="${job.id}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.jobId = job.id;
    li.innerHTML = `<span class="what"></span><span class="status"></span><progress max="1" value="0"></progress>
                    <span class="previews"></span><span class="job-actions"></span>`;
    li.querySelector(".job-actions").append(action("cancel", async () => {
      updateJob(await api("POST", `/jobs/${job.id}/cancel`));
    }, "cancel"));
    $("#jobs").prepend(li);
  }
  return li;
}

function updateJob(job) {
  const li = jobRow(job);
  li.dataset.status = job.status;
  li.querySelector(".what").textContent = `${job.type.replace("_", " ")}: ${targetLabel(job)}`;
  const st = li.querySelector(".status");
  st.className = `status status-${job.status}`;
  let text = job.status;
  if (job.progress_total) text += ` ${job.progress_step}/${job.progress_total}`;
  if (job.loss != null && job.status === "running") text += ` loss ${job.loss.toFixed(3)}`;
  if (job.eta_seconds) text += ` eta ${Math.round(job.eta_seconds)}s`;
  if (job.error) text += ` (${job.error.slice(0, 80)})`;
  st.textContent = text;
  const bar = li.querySelector("progress");
  bar.max = job.progress_total || 1;
  bar.value = job.status === "succeeded" ? bar.max : job.progress_step;
  li.querySelector(".job-actions").hidden = TERMINAL.includes(job.status);
  const previews = li.querySelector(".previews");
  const shown = previews.querySelectorAll("img").length;
  for (const url of job.previews.slice(shown)) previews.append(image(url, "preview"));
  if (job.outputs && job.outputs.loss_curve && !previews.querySelector("a")) {
    const a = document.createElement("a");
    a.textContent = "loss curve";
    a.href = "#";
    a.onclick = (e) => { e.preventDefault(); image(job.outputs.loss_curve); blobs.get(job.outputs.loss_curve)
      .then((u) => window.open(u)); };
    previews.append(" ", a);
  }
}

function renderJobs() {
  for (const job of [...state.jobs].reverse()) {
    updateJob(job);
    if (!TERMINAL.includes(job.status)) watch(job.id);
  }
}

// Live progress: the job's Server-Sent Events, read with fetch so the key header goes along.
async function watch(jobId, onEnd) {
  if (watching.has(jobId)) return;
  watching.set(jobId, true);
  try {
    const r = await fetch(`/jobs/${jobId}/events`, { headers: authHeaders() });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (!data) continue;
        const job = JSON.parse(data);
        updateJob(job);
        if (TERMINAL.includes(job.status)) await jobEnded(job, onEnd);
      }
    }
  } catch (err) {
    showError(err);
  } finally {
    watching.delete(jobId);
  }
}

async function jobEnded(job, onEnd) {
  if (job.type === "fuse" && job.status === "succeeded" && sampleWhenFused.has(job.target_id)) {
    sampleWhenFused.delete(job.target_id);
    await drawSamples(job.target_id);
  }
  await refresh();
  if (onEnd) onEnd(job);
}

// ------------------------------------------------------------------ uploads
for (const form of [$("#content-form"), $("#style-form")]) {
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(null);
    const kind = form.dataset.kind;
    const data = new FormData();
    for (const f of form.images.files) data.append("images", f);
    data.append(kind === "content" ? "class_word" : "style_word", form.word.value.trim());
    data.append("name", form.name.value.trim());
    if (form.steps.value) data.append("steps", form.steps.value);
    if (form.token.value.trim()) data.append("token", form.token.value.trim());
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const r = await api("POST", `/${kind}s`, data, true);
      form.reset();
      await refresh();
      watch(r.job_id);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------ library matrix
function assetHeader(a) {
  const th = document.createElement("th");
  th.dataset.assetId = a.id;
  th.append(image(`/${a.kind}s/${a.id}/images/0`, a.name));
  const name = document.createElement("div");
  name.textContent = a.name;
  const st = document.createElement("div");
  st.className = `state status-${a.status}`;
  st.textContent = a.status === "succeeded" ? "" : a.status || "";
  th.append(name, st);
  const acts = document.createElement("div");
  acts.className = "actions";
  if (a.adapter_id) acts.append(downloadLinks(a.adapter_id), " ");
  acts.append(action("delete", () => deleteAsset(a), "delete"));
  th.append(acts);
  return th;
}

function fusionFor(contentId, styleId) {
  return state.fusions.find((f) => f.content_id === contentId && f.style_id === styleId && f.method === "b4m");
}

function renderMatrix() {
  const table = $("#matrix");
  table.replaceChildren();
  if (!state.contents.length || !state.styles.length) {
    table.innerHTML = `<tr><td class="muted">Add at least one content and one style.</td></tr>`;
    return;
  }
  const head = document.createElement("tr");
  const corner = document.createElement("th");
  corner.innerHTML = `content ↓<br>style →`;
  head.append(corner, ...state.styles.map(assetHeader));
  table.append(head);
  for (const c of state.contents) {
    const tr = document.createElement("tr");
    tr.append(assetHeader(c));
    for (const s of state.styles) {
      const td = document.createElement("td");
      td.className = "cell";
      td.dataset.content = c.name;
      td.dataset.style = s.name;
      const f = fusionFor(c.id, s.id);
      const sample = f && state.samples.get(f.id);
      if (!f) {
        td.classList.add("empty");
        td.textContent = "+";
        td.title = `fuse ${c.name} × ${s.name}`;
      } else if (sample) {
        td.classList.add("filled");
        td.append(image(sample.images[0], `${c.name} in ${s.name}`));
      } else {
        td.classList.add("pending");
        const st = document.createElement("div");
        st.className = `state status-${f.status}`;
        st.textContent = f.status === "succeeded" ? "fused: click to draw" : `fusion ${f.status}`;
        td.append(st);
      }
      td.addEventListener("click", () => cellClicked(c, s, f, sample));
      tr.append(td);
    }
    table.append(tr);
  }
}

async function deleteAsset(a) {
  const used = state.fusions.filter((f) => f[`${a.kind}_id`] === a.id).length;
  const also = used ? ` and its ${used} fusion(s)` : "";
  if (!confirm(`Delete ${a.kind} "${a.name}"${also}? Its pictures and adapters go too.`)) return;
  await api("DELETE", `/${a.kind}s/${a.id}${used ? "?force=true" : ""}`);
  await refresh();
}

async function fuse(content, style) {
  const steps = parseInt($("#fusion-steps").value || "50", 10);
  const r = await api("POST", "/fusions", { content_id: content.id, style_id: style.id, steps });
  sampleWhenFused.add(r.id);
  await refresh();
  watch(r.job_id);
}

async function cellClicked(content, style, fusion, sample) {
  showError(null);
  try {
    if (!fusion) {
      await fuse(content, style);
    } else if (sample) {
      await showSamples(fusion);
    } else if (fusion.status === "succeeded") {
      await drawSamples(fusion.id);
    } else if (fusion.status === "failed" || fusion.status === "canceled") {
      if (confirm(`Fusion ${pairLabel(fusion)} ${fusion.status}. Delete it and fuse the pair again?`)) {
        await api("DELETE", `/fusions/${fusion.id}`);
        await fuse(content, style);
      }
    }
  } catch (err) {
    showError(err);
  }
}

async function drawSamples(fusionId) {
  const r = await api("POST", "/generate", { fusion_id: fusionId, prompt: $("#sample-prompt").value, seed: 0,
                                             steps: 20, num_images: 4 });
  await new Promise((resolve) => watch(r.job_id, resolve));
  const f = state.fusions.find((x) => x.id === fusionId);
  if (f) await showSamples(f);
}

async function showSamples(fusion) {
  const gens = await all(`/generations?fusion_id=${fusion.id}&status=succeeded`);
  $("#samples").hidden = false;
  $("#samples-title").textContent = pairLabel(fusion);
  const acts = $("#fusion-actions");
  acts.replaceChildren();
  if (fusion.adapter_id) acts.append(downloadLinks(fusion.adapter_id), " ");
  acts.append(action("delete fusion", async () => {
    if (!confirm(`Delete fusion ${pairLabel(fusion)}? Its adapter goes; its pictures stay.`)) return;
    await api("DELETE", `/fusions/${fusion.id}`);
    $("#samples").hidden = true;
    await refresh();
  }, "delete"));
  const box = $("#sample-images");
  box.replaceChildren();
  for (const g of gens) for (const url of g.images) box.append(image(url, g.prompt));
}

// ------------------------------------------------------------------ generate form
function renderGenerateChoices() {
  const select = $("#generate-fusion");
  const current = select.value;
  select.replaceChildren(new Option("the base model alone", ""));
  for (const f of state.fusions.filter((x) => x.status === "succeeded")) {
    select.append(new Option(pairLabel(f), f.id));
  }
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

$("#generate-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError(null);
  const form = e.target;
  const body = { prompt: form.prompt.value, seed: parseInt(form.seed.value, 10), steps: parseInt(form.steps.value, 10),
                 guidance: parseFloat(form.guidance.value), strength: parseFloat(form.strength.value),
                 content_scale: parseFloat(form.content_scale.value), style_scale: parseFloat(form.style_scale.value),
                 scheduler: form.scheduler.value,
                 num_images: parseInt(form.num_images.value, 10), wait: 60 };
  if (form.negative_prompt.value.trim()) body.negative_prompt = form.negative_prompt.value.trim();
  if (form.fusion.value) body.fusion_id = form.fusion.value;
  const out = $("#generated");
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    let r = await api("POST", "/generate", body);
    if (!r.images) {
      await new Promise((resolve) => watch(r.job_id, resolve));
      r = await api("GET", `/generations/${r.id}`);
    }
    out.replaceChildren(...r.images.map((url) => image(url, body.prompt)));
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
});

refresh();
setInterval(refresh, 5000);
