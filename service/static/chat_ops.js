// Chat operations on the page: swipe arrows, regenerate, continue, edit, delete, fork, session
// titles, and sanitised Markdown for replies. Loaded after app.js (uses its $, api, state, status).
"use strict";

// ------------------------------------------------------------------ Markdown, sanitised

// Every character of the text is HTML-escaped first; the only markup that can appear is the
// handful of tags produced below, none with attributes, so no text can inject HTML or script.
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inlineMd(html) {
  return html
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*(?!\*)/g, "$1<em>$2</em>");
}

function markdown(text) {
  const parts = escapeHtml(text).split(/```(?:[a-z0-9_-]*)\n?/);
  // odd parts are inside ``` fences: kept verbatim (already escaped)
  return parts.map((p, i) => (i % 2 ? `<pre><code>${p}</code></pre>` : inlineMd(p))).join("");
}

// ------------------------------------------------------------------ the transcript with actions

const base = () => `/v1/sessions/${state.session.id}/messages`;

async function chatOp(method, path, body, label) {
  if (state.controller) return; // a reply is streaming: one thing at a time
  status(`${label}…`);
  try {
    const out = await api(method, path, body);
    status("");
    return out;
  } catch (e) { status(e.message); }
  finally { await reloadTranscript(); }
}

function button(text, title, onclick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.className = `op ${cls}`;
  b.onclick = onclick;
  return b;
}

function actionsFor(m, isLast) {
  const bar = document.createElement("div");
  bar.className = `actions ${m.role}`;
  const swipes = (m.metadata && m.metadata.swipes) || null;
  if (m.role === "assistant" && swipes && swipes.length > 1) {
    const k = m.metadata.swipe_id || 0;
    bar.append(
      button("‹", "previous alternative", () => chatOp("POST", `${base()}/${m.id}/swipes/${k - 1}`, null, "swipe"), "swipe-prev"),
      Object.assign(document.createElement("span"), { className: "swipe-count", textContent: `${k + 1}/${swipes.length}` }),
      button("›", "next alternative", () => chatOp("POST", `${base()}/${m.id}/swipes/${k + 1}`, null, "swipe"), "swipe-next"),
    );
    bar.querySelector(".swipe-prev").disabled = k === 0;
    bar.querySelector(".swipe-next").disabled = k === swipes.length - 1;
  }
  if (m.role === "assistant" && isLast) {
    bar.append(
      button("↻", "regenerate (keeps this one as a swipe)", () => chatOp("POST", `${base()}/${m.id}/regenerate`, {}, "regenerating"), "regenerate"),
      button("→", "continue this reply", () => chatOp("POST", `${base()}/${m.id}/continue`, {}, "continuing"), "continue"),
    );
  }
  bar.append(
    button("edit", "edit this message", () => startEdit(m), "edit"),
    button("delete", "delete this message", () => chatOp("DELETE", `${base()}/${m.id}`, null, "deleting"), "delete"),
    button("fork", "fork a new session here", () => forkAt(m), "fork"),
  );
  return bar;
}

function startEdit(m) {
  const bubble = document.querySelector(`.msg[data-message-id="${m.id}"]`);
  if (!bubble || bubble.querySelector("textarea")) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = m.content;
  const save = button("save", "save the edit", () =>
    chatOp("PATCH", `${base()}/${m.id}`, { content: box.value }, "saving"), "save-edit");
  bubble.replaceChildren(box, save);
  box.focus();
}

async function forkAt(m) {
  const child = await chatOp("POST", `${base()}/${m.id}/fork`, {}, "forking");
  if (child) await openSession(child.id);
}

function renderMessage(m, isLast) {
  const turn = document.createElement("div");
  turn.className = `turn ${m.role}`;
  const bubble = document.createElement("div");
  bubble.className = `msg ${m.role} done${m.metadata && m.metadata.interrupted ? " interrupted" : ""}`;
  bubble.dataset.messageId = m.id;
  bubble.dataset.raw = m.content;
  if (m.role === "assistant") bubble.innerHTML = markdown(m.content);
  else bubble.textContent = m.content;
  turn.append(bubble, actionsFor(m, isLast));
  return turn;
}

async function reloadTranscript() {
  if (!state.session) return;
  const { data } = await api("GET", `${base()}`);
  const box = $("messages");
  box.replaceChildren(...data.map((m, i) => renderMessage(m, i === data.length - 1)));
  box.dataset.updated = String(Date.now()); // tests wait on this
}

// ------------------------------------------------------------------ session titles

async function renameSession() {
  if (!state.session) return;
  const title = $("title-input").value.trim();
  try {
    state.session = await api("PATCH", `/v1/sessions/${state.session.id}`, {
      metadata: { ...(state.session.metadata || {}), title },
    });
    showSessionTitle();
    await loadSessions();
  } catch (e) { status(e.message); }
}

function sessionLabel(s) {
  return (s.metadata && s.metadata.title) || `${s.persona} · ${s.memory.strategy} · ${s.id.slice(-6)}`;
}
