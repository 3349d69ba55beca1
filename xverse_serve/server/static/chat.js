// The chat page: sends the whole conversation to /v1/chat/completions and streams the answer in.
// Text from the model or the user only ever reaches the page as text nodes, never as HTML.
"use strict";

const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"];
const SAVED_SETTINGS = ["system", ...SAMPLING_FIELDS];  // kept across visits; the API key is not
const STORAGE_KEY = "xverse-chat-settings";
const FENCE = /^ {0,3}```\s*([^\s`]*)/;
const CLOSING_FENCE = /^ {0,3}```\s*$/;
const INLINE_CODE = /`([^`\n]+)`/g;

let history = [];           // finished turns, {role, content}, sent with each new question
let controller = null;      // aborts the answer being streamed
let conversation = 0;       // bumped by "New conversation": an answer still arriving for an old one is dropped

const $ = (id) => document.getElementById(id);

// --- rendering ---------------------------------------------------------------------------------------------

// A message as DOM nodes: ``` fenced blocks become <pre><code>, `spans` become <code>, the rest is text.
// A block still open at the end (an answer being streamed) is shown as code up to there.
function renderMessage(text) {
  const fragment = document.createDocumentFragment();
  let prose = [];
  let code = null;
  const flushProse = () => {
    const joined = prose.join("\n").replace(/^\n+|\n+$/g, "");
    if (joined) fragment.append(renderProse(joined));
    prose = [];
  };
  for (const line of text.split("\n")) {
    if (code === null && FENCE.test(line)) {
      flushProse();
      code = { language: line.match(FENCE)[1], lines: [] };
    } else if (code !== null && CLOSING_FENCE.test(line)) {
      fragment.append(codeBlock(code));
      code = null;
    } else {
      (code === null ? prose : code.lines).push(line);
    }
  }
  if (code !== null) fragment.append(codeBlock(code));
  flushProse();
  return fragment;
}

function renderProse(text) {
  const paragraph = document.createElement("p");
  let last = 0;
  for (const match of text.matchAll(INLINE_CODE)) {
    paragraph.append(text.slice(last, match.index));
    const code = document.createElement("code");
    code.textContent = match[1];
    paragraph.append(code);
    last = match.index + match[0].length;
  }
  paragraph.append(text.slice(last));
  return paragraph;
}

function codeBlock({ language, lines }) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (language) code.className = `language-${language}`;
  code.textContent = lines.join("\n");
  pre.append(code);
  return pre;
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  body.append(renderMessage(text));
  message.append(body);
  $("messages").append(message);
  scrollToEnd();
  return message;
}

function setNote(message, text) {
  let note = message.querySelector(".note");
  if (!note) {
    note = document.createElement("div");
    note.className = "note";
    message.append(note);
  }
  note.textContent = text;
}

function scrollToEnd() {
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

// --- talking to the server -----------------------------------------------------------------------------

function requestBody(messages) {
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  for (const field of SAMPLING_FIELDS) {
    const value = $(field).value.trim();
    if (value !== "") body[field] = Number(value);
  }
  return body;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error?.message;
    if (message) return `${response.status}: ${message}`;
  } catch {
    // not JSON: fall through to the raw text
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

// The parsed `data:` payloads of the server-sent events, up to `data: [DONE]`.
async function* streamEvents(body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server closed the connection before the answer was complete");
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function ask(question) {
  const turns = [...history, { role: "user", content: question }];
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...turns] : turns;
  const asked = addMessage("user", question);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const body = answer.querySelector(".body");
  const ownConversation = conversation;
  const started = performance.now();
  let text = "";
  let usage = null;
  let failure = null;
  hideError();
  setBusy(true);
  controller = new AbortController();
  try {
    for await (const event of streamEvents(requestBody(messages), controller.signal)) {
      if (event.error) throw new Error(`${event.error.code ?? "error"}: ${event.error.message}`);
      usage = event.usage ?? usage;
      const delta = event.choices?.[0]?.delta?.content;
      if (delta && ownConversation === conversation) {
        text += delta;
        body.replaceChildren(renderMessage(text));
        scrollToEnd();
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") failure = error.message;
  }
  const stopped = controller.signal.aborted;
  controller = null;
  setBusy(false);
  if (ownConversation !== conversation) return;
  answer.classList.remove("streaming");
  if (text) {
    history = [...turns, { role: "assistant", content: text }];
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (stopped) setNote(answer, "stopped");
    else if (failure) setNote(answer, "cut short by an error");
    else if (usage) setNote(answer, `${usage.completion_tokens} tokens in ${seconds} s`);
  } else {
    // Nothing came back: take the question off the page and give it back to the input, to send again.
    asked.remove();
    answer.remove();
    if (!$("input").value) $("input").value = question;
  }
  if (failure) showError(failure);
}

function newConversation() {
  controller?.abort();
  conversation += 1;
  history = [];
  $("messages").replaceChildren();
  hideError();
  $("input").focus();
}

// --- settings kept across visits -----------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}");
  } catch {
    // unreadable: start from empty fields
  }
  for (const id of SAVED_SETTINGS) {
    if (typeof saved[id] === "string") $(id).value = saved[id];
  }
}

function saveSettings() {
  const settings = Object.fromEntries(SAVED_SETTINGS.map((id) => [id, $(id).value]));
  localStorage.setItem(STORAGE_KEY, JSON.stringify(settings));
}

// --- wiring ----------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  for (const id of SAVED_SETTINGS) $(id).addEventListener("input", saveSettings);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("input").value.trim();
    if (!question || controller) return;
    $("input").value = "";
    ask(question);
  });
  $("input").addEventListener("keydown", (event) => {
    // While an input method composes (Chinese, Japanese, ...), Enter picks the candidate: it must not send.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new_conversation").addEventListener("click", newConversation);
});
