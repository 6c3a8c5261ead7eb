// The persona editor: form fields and the raw persona file side by side, validation as you type
// (line and field), a lorebook entry editor, card import by drag-and-drop (PNG or JSON) and export,
// the exact pinned prompt with token costs in the model's tokens, register flags on the greeting
// and examples, and "try it" in a scratch session. Uses app.js's $, api, headers, status, openSession.
"use strict";

const ed = { persona: null, timer: null };
const FORM_FIELDS = ["display_name", "language", "register", "register_mode", "user_name", "greeting", "description"];

async function draftCall(path, text) {
  const r = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "text/plain" }), body: text });
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

function openEditor(persona) {
  $("editor").hidden = false;
  if (persona) {
    $("ed-name").value = persona.name;
    fillForm(persona);
    formChanged();
  }
}

function fillForm(p) {
  ed.persona = p;
  for (const f of FORM_FIELDS) $(`ed-${f}`).value = p[f] || "";
  const list = $("ed-lore");
  list.replaceChildren();
  for (const e of (p.lorebook && p.lorebook.entries) || []) list.appendChild(loreRow(e));
}

function loreRow(e = {}) {
  const row = document.createElement("div");
  row.className = "lore-entry";
  row.innerHTML = `<input class="lore-keys" placeholder="keys, comma-separated">
    <select class="lore-position"><option>before_char</option><option>after_char</option><option>at_depth</option></select>
    <input class="lore-depth" type="number" min="0" value="4" title="depth (at_depth)">
    <textarea class="lore-content" rows="2" placeholder="content inserted when a key appears"></textarea>
    <button type="button" class="lore-remove">remove</button>`;
  row.querySelector(".lore-keys").value = (e.keys || []).join(", ");
  row.querySelector(".lore-position").value = e.position || "before_char";
  row.querySelector(".lore-depth").value = e.depth ?? 4;
  row.querySelector(".lore-content").value = e.content || "";
  row.querySelector(".lore-remove").onclick = () => { row.remove(); formChanged(); };
  row.oninput = formChanged;
  return row;
}

function formFields() {
  const fields = { ...(ed.persona || {}), name: $("ed-name").value.trim() };
  for (const f of FORM_FIELDS) fields[f] = $(`ed-${f}`).value;
  const entries = [...document.querySelectorAll("#ed-lore .lore-entry")].map((row, i) => ({
    ...((ed.persona && ed.persona.lorebook && ed.persona.lorebook.entries[i]) || {}),
    keys: row.querySelector(".lore-keys").value.split(",").map((k) => k.trim()).filter(Boolean),
    position: row.querySelector(".lore-position").value,
    depth: Number(row.querySelector(".lore-depth").value || 4),
    content: row.querySelector(".lore-content").value,
  })).filter((e) => e.content.trim());
  fields.lorebook = entries.length ? { ...((ed.persona && ed.persona.lorebook) || {}), entries } : null;
  return fields;
}

// form -> file text (the server writes the file, so both sides always agree)
function formChanged() {
  clearTimeout(ed.timer);
  ed.timer = setTimeout(async () => {
    try {
      const { text } = await api("POST", "/v1/persona-drafts/render", { fields: formFields() });
      $("ed-raw").value = text;
      await checkRaw(false);
    } catch (e) { showError(e.message); }
  }, 250);
}

// file text -> validation, form and preview
function rawChanged() {
  clearTimeout(ed.timer);
  ed.timer = setTimeout(() => checkRaw(true), 250);
}

async function checkRaw(updateForm) {
  const name = $("ed-name").value.trim() || "draft";
  const out = await draftCall(`/v1/persona-drafts/check?name=${encodeURIComponent(name)}`, $("ed-raw").value);
  if (!out.ok) {
    const e = out.error;
    showError(`line ${e.line ?? "?"}${e.field ? `, field ${e.field}` : ""}: ${e.message}${e.fix ? ` (fix: ${e.fix})` : ""}`);
    return;
  }
  showError("");
  if (updateForm) fillForm(out.persona);
  else ed.persona = out.persona;
  if (!$("ed-name").value) $("ed-name").value = out.persona.name;
  await showPreview();
}

function showError(text) {
  $("ed-error").textContent = text;
  $("editor").dataset.valid = text ? "0" : "1";
}

async function showPreview() {
  try {
    const out = await draftCall("/v1/persona-drafts/preview", $("ed-raw").value);
    const c = out.costs;
    $("ed-costs").textContent =
      `system ${c.system} + examples ${c.examples} + post-history ${c.post_history} = ${c.total} tokens`;
    $("ed-preview").replaceChildren(...out.messages.map((m) => {
      const div = document.createElement("div");
      div.className = `preview-msg ${m.role}`;
      div.textContent = `${m.role}: ${m.content}`;
      return div;
    }));
    $("ed-flags").replaceChildren(...out.register_flags.map((f) => {
      const li = document.createElement("li");
      li.textContent = `${f.field}: "${f.text}" is ${f.label}, the persona speaks ${f.expected}`;
      return li;
    }));
    $("editor").dataset.updated = String(Date.now()); // tests wait on this
  } catch (e) { showError(e.message); }
}

async function importCard(file) {
  const r = await fetch(`/v1/persona-drafts/card?filename=${encodeURIComponent(file.name)}`, {
    method: "POST", headers: headers(), body: await file.arrayBuffer(),
  });
  if (!r.ok) return showError(await errorText(r));
  $("ed-raw").value = (await r.json()).text;
  $("ed-name").value = "";
  await checkRaw(true);
}

async function savePersona() {
  const name = $("ed-name").value.trim();
  if (!name) return showError("give the persona a name (the file name)");
  const r = await fetch(`/v1/personas/${encodeURIComponent(name)}`, {
    method: "PUT", headers: headers({ "Content-Type": "text/plain" }), body: $("ed-raw").value,
  });
  if (!r.ok) { showError(await errorText(r)); return null; }
  await loadPersonas();
  status(`saved persona ${name}`);
  return name;
}

async function tryIt() {
  const name = await savePersona();
  if (!name) return;
  const s = await api("POST", "/v1/sessions", { persona: name, metadata: { title: `try ${name}`, scratch: true } });
  $("editor").hidden = true;
  await openSession(s.id);
}

function exportCard(format) {
  const name = $("ed-name").value.trim();
  if (name) window.open(`/v1/personas/${encodeURIComponent(name)}/card?format=${format}`, "_blank");
}

function initEditor() {
  $("open-editor").onclick = async () => {
    const name = $("persona-select").value;
    openEditor(name ? await api("GET", `/v1/personas/${encodeURIComponent(name)}`) : null);
  };
  $("close-editor").onclick = () => { $("editor").hidden = true; };
  $("ed-form").onsubmit = (e) => e.preventDefault();  // not an inline handler: the CSP blocks those
  for (const f of FORM_FIELDS) $(`ed-${f}`).oninput = formChanged;
  $("ed-name").oninput = formChanged;
  $("ed-raw").oninput = rawChanged;
  $("ed-add-lore").onclick = () => { $("ed-lore").appendChild(loreRow()); };
  $("ed-save").onclick = savePersona;
  $("ed-try").onclick = tryIt;
  $("ed-export-json").onclick = () => exportCard("json");
  $("ed-export-png").onclick = () => exportCard("png");
  $("ed-file").onchange = () => $("ed-file").files[0] && importCard($("ed-file").files[0]);
  const drop = $("ed-drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) importCard(e.dataTransfer.files[0]);
  };
}
