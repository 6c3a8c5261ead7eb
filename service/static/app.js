// Memento web chat: sessions, persona + memory pickers, streamed replies, context inspector.
// No build step: plain DOM and fetch. Replies stream from POST /v1/sessions/{id}/messages (SSE),
// read with fetch + ReadableStream (EventSource cannot POST or send an Authorization header).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { session: null, controller: null };

// ------------------------------------------------------------------ HTTP

function headers(extra = {}) {
  const key = localStorage.getItem("memento.apiKey");
  return { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...extra };
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (!r.ok) throw new Error(await errorText(r));
  return r.status === 204 ? null : r.json();
}

async function errorText(r) {
  try { return `${r.status}: ${(await r.json()).error.message}`; } catch { return `HTTP ${r.status}`; }
}

function status(text) { $("status").textContent = text || ""; }

// SSE over fetch: yields each `data:` payload parsed as JSON, stops at [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue; // ": keep-alive" comments
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------------ sessions and pickers

async function loadPersonas() {
  const { data } = await api("GET", "/v1/personas");
  const select = $("persona-select");
  select.innerHTML = "";
  for (const p of data) {
    const opt = document.createElement("option");
    opt.value = p.name;
    opt.textContent = p.display_name ? `${p.display_name} (${p.name})` : p.name;
    select.appendChild(opt);
  }
}

function memoryConfig() {
  const config = { strategy: $("memory-select").value };
  const params = $("memory-params").value.trim();
  if (params) Object.assign(config, JSON.parse(params));
  return config;
}

async function loadSessions() {
  const { data } = await api("GET", "/v1/sessions");
  const list = $("session-list");
  list.innerHTML = "";
  for (const s of data.slice().reverse()) {
    const li = document.createElement("li");
    li.textContent = sessionLabel(s); // chat_ops.js: the title, else persona · strategy · id
    li.dataset.id = s.id;
    li.className = state.session && state.session.id === s.id ? "active" : "";
    li.onclick = () => openSession(s.id);
    list.appendChild(li);
  }
}

async function newSession() {
  try {
    const s = await api("POST", "/v1/sessions", { persona: $("persona-select").value || undefined, memory: memoryConfig() });
    // the persona's greeting opens the chat; its alternate greetings are swipes (422: it has none)
    await api("POST", `/v1/sessions/${s.id}/greeting`).catch(() => null);
    await openSession(s.id);
  } catch (e) { status(e.message); }
}

async function applySettings() {
  if (!state.session) return newSession();
  try {
    state.session = await api("PATCH", `/v1/sessions/${state.session.id}`, {
      persona: $("persona-select").value, memory: memoryConfig(),
    });
    showSessionTitle();
    await Promise.all([loadSessions(), refreshContext("")]);
  } catch (e) { status(e.message); }
}

async function openSession(id) {
  status("");
  state.session = await api("GET", `/v1/sessions/${id}`);
  $("persona-select").value = state.session.persona;
  $("memory-select").value = state.session.memory.strategy;
  showSessionTitle();
  $("title-input").value = (state.session.metadata && state.session.metadata.title) || "";
  await reloadTranscript(); // chat_ops.js: messages with swipe/regenerate/continue/edit/delete/fork
  await Promise.all([loadSessions(), refreshContext("")]);
}

function showSessionTitle() {
  const s = state.session;
  const title = s.metadata && s.metadata.title ? `${s.metadata.title} · ` : "";
  $("session-title").textContent = `${title}session ${s.id} · persona ${s.persona} · memory ${JSON.stringify(s.memory)}`;
}

function addMessage(role, text, interrupted) {
  const div = document.createElement("div");
  div.className = `msg ${role}${interrupted ? " interrupted" : ""}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// ------------------------------------------------------------------ a turn

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  if (!state.session) await newSession();
  if (!state.session) return;
  $("input").value = "";
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  status("");
  const contextShown = refreshContext(text); // what the model sees for exactly this turn
  try {
    const r = await fetch(`/v1/sessions/${state.session.id}/messages`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ content: text, stream: true }),
      signal: state.controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const ev of sse(r)) {
      if (ev.delta !== undefined) {
        bubble.textContent += ev.delta;
        bubble.scrollIntoView({ block: "end" });
      } else if (ev.error) {
        throw new Error(ev.error.message);
      } else if (ev.message) {
        bubble.textContent = ev.message.content; // the stored text (register repair may differ)
        bubble.dataset.messageId = ev.message.id;
        showUsage(ev.usage);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") bubble.classList.add("interrupted");
    else status(e.message);
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    await contextShown;
    await reloadTranscript(); // the stored turn, with its actions
  }
}

function showUsage(u) {
  $("usage").textContent =
    `${u.completion_tokens} tokens generated · prompt ${u.prompt_tokens} (${u.cached_tokens} from the KV cache)`;
}

// ------------------------------------------------------------------ the inspector

async function refreshContext(message) {
  if (!state.session) return;
  try {
    const q = new URLSearchParams({ message });
    showContext(await api("GET", `/v1/sessions/${state.session.id}/context?${q}`));
  } catch (e) { status(e.message); }
}

function showContext(ctx) {
  const b = ctx.budget;
  const width = (n) => `${(100 * n) / b.context_window}%`;
  const parts = { ...b.parts, reply: b.reserved_for_reply };
  for (const [name, n] of Object.entries(parts)) {
    const bar = $(`bar-${name}`);
    if (!bar) continue; // a part this page does not draw yet
    bar.style.width = width(n);
    $(`tok-${name}`).textContent = n;
  }
  $("inspector-tokens").textContent =
    `${b.used} of ${b.context_window} tokens used, ${b.reserved_for_reply} kept for the reply`;
  const mem = ctx.memory;
  $("memory-strategy").textContent = `strategy: ${mem.strategy}`;
  $("memory-summary").textContent = mem.summary ? `summary: ${mem.summary}` : "";
  $("memory-summary").style.display = mem.summary ? "" : "none";
  const retrieved = $("memory-retrieved");
  retrieved.innerHTML = "";
  for (const ex of mem.retrieved || []) {
    const div = document.createElement("div");
    div.className = "exchange";
    div.textContent = ex.map((m) => `${m.role}: ${m.content}`).join("\n");
    retrieved.appendChild(div);
  }
  const lore = $("memory-lore");
  lore.innerHTML = "";
  for (const e of mem.lore || []) { // lorebook entries inserted this turn, with their token cost
    const li = document.createElement("li");
    li.textContent = `lore: ${e.name} (${e.position}, ${e.tokens} tokens)`;
    lore.appendChild(li);
  }
  $("memory-warnings").textContent = (ctx.warnings || []).join("\n");
  $("inspector").dataset.updated = String(Date.now()); // tests wait on this
}

// ------------------------------------------------------------------ wiring

async function init() {
  $("api-key").value = localStorage.getItem("memento.apiKey") || "";
  $("api-key").onchange = () => { localStorage.setItem("memento.apiKey", $("api-key").value.trim()); init(); };
  $("new-session").onclick = newSession;
  $("apply-settings").onclick = applySettings;
  $("rename").onclick = renameSession;
  initEditor(); // editor.js
  $("composer").onsubmit = send;
  $("stop").onclick = () => state.controller && state.controller.abort();
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  };
  try {
    await loadPersonas();
    await loadSessions();
    document.body.dataset.ready = "1";
  } catch (e) { status(e.message); }
}

init();
