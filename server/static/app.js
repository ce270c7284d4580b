// The chat page: a conversation over tether.js, with live progress and a Stop button that
// works from the moment a question is sent; while the answer's web search runs, "Skip search"
// ends the search and the answer is made from the sources found so far, and each running
// tool call has a "Skip" of its own (the model is told the call was skipped).
//
// What the page keeps where:
// - the API key in localStorage (it outlives the tab; "Forget key" removes it); it goes
//   to the server in the Authorization header, and in the WebSocket's URL as ?token= only
//   because a browser cannot set headers on a WebSocket;
// - the session id and this tab's questions in sessionStorage, so that a reload re-attaches
//   to the session and continues the answer in progress (the events are replayed from the
//   server, not stored here);
// - nothing of the answers: they come from the server's event logs.
//
// Model output and page titles reach the DOM only as text, or as Markdown turned into HTML
// by marked and then sanitised by DOMPurify (the page's CSP also forbids inline script and
// foreign images, so a slip would still not run).

import { TetherClient, TetherError } from "./tether.js";
import { marked } from "./vendor/marked-18.2.1/marked.esm.js";
import DOMPurify from "./vendor/dompurify-3.4.18/purify.es.mjs";

const TOOLS = [
  { id: "calculator", label: "Calculator" },
  { id: "current_time", label: "Current time" },
  { id: "fetch_url", label: "Fetch URL" },
];
const KEY_STORE = "tether.apiKey";
const SESSION_STORE = "tether.session";
const TURNS_STORE = "tether.turns";
const ACTIVE = new Set(["queued", "running"]);
const RENDER_EVERY_MS = 50;

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"),
  share: $("share"),
  keyForm: $("key-form"),
  key: $("api-key"),
  keyError: $("key-error"),
  keyForget: $("key-forget"),
  conversation: $("conversation"),
  empty: $("empty"),
  announce: $("announce"),
  composer: $("composer"),
  prompt: $("prompt"),
  webSearch: $("web-search"),
  tools: $("tools"),
  model: $("model"),
  send: $("send"),
  stop: $("stop"),
  skipSearch: $("skip-search"),
};

/** @type {TetherClient|null} */
let client = null;
/** The turns on the page, by task id once it is known. */
const turns = new Map();
/** Turns by message_id: the link between a question and the task the server made of it. */
const byMessage = new Map();
/** Questions asked in other tabs of this browser, by message_id (see the channel below). */
const questions = new Map();
/** The turn whose task is running, if any: the one Stop and Escape stop. */
let active = null;
/** The last turn: it carries the data-testid hooks. */
let current = null;
/** Whether the server has let us in (Send works from then on; chats wait for the socket). */
let ready = false;

const channel = "BroadcastChannel" in window ? new BroadcastChannel("tether") : null;

// -- storage ------------------------------------------------------------------------------

function storedKey() {
  return localStorage.getItem(KEY_STORE) || null;
}

function storedTurns() {
  try {
    return JSON.parse(sessionStorage.getItem(TURNS_STORE) || "[]");
  } catch {
    return [];
  }
}

function saveTurns() {
  const kept = [...ui.conversation.querySelectorAll("article.turn")]
    .map((el) => el.turn)
    .filter((turn) => turn.own)
    .map((turn) => ({ messageId: turn.messageId, taskId: turn.taskId, question: turn.question }));
  sessionStorage.setItem(TURNS_STORE, JSON.stringify(kept));
}

// -- a turn: one question and its answer ------------------------------------------------

class Turn {
  constructor(question, messageId, own) {
    this.question = question;
    this.messageId = messageId;
    this.own = own; // asked in this tab (and so kept in sessionStorage)
    this.taskId = null;
    this.state = "";
    this.content = "";
    this.sourceIndexes = new Set();
    this.renderTimer = null;
    this.controller = null;
    // The web search step: "" (none seen), "running" (Skip search may end it), "over".
    this.search = "";
    this.skippingSearch = false;
    /** The Skip buttons of the running tool calls, by tool_call_id (the call's step). */
    this.toolSkips = new Map();

    const el = document.createElement("article");
    el.className = "turn";
    el.turn = this;
    const q = document.createElement("p");
    q.className = "question";
    const box = document.createElement("section");
    box.className = "answer-box";
    box.setAttribute("aria-label", "Answer");
    const head = document.createElement("p");
    head.className = "state-line";
    this.stateEl = document.createElement("span");
    this.stateEl.className = "task-state";
    this.statusEl = document.createElement("span");
    this.statusEl.className = "status";
    head.append(this.stateEl, " ", this.statusEl);
    this.stepsEl = document.createElement("ol");
    this.stepsEl.className = "steps";
    this.stepsEl.setAttribute("aria-label", "Progress");
    this.sourcesEl = document.createElement("ol");
    this.sourcesEl.className = "sources";
    this.sourcesEl.setAttribute("aria-label", "Sources");
    this.answerEl = document.createElement("div");
    this.answerEl.className = "answer";
    this.reasonEl = document.createElement("p");
    this.reasonEl.className = "reason";
    box.append(head, this.stepsEl, this.sourcesEl, this.answerEl, this.reasonEl);
    el.append(q, box);
    this.el = el;
    this.questionEl = q;
    this.setQuestion(question);
  }

  setQuestion(text) {
    this.question = text;
    this.questionEl.textContent = text ?? "(asked in another tab)";
    this.questionEl.classList.toggle("unknown", text == null);
  }

  setTask(taskId) {
    this.taskId = taskId;
    this.el.dataset.taskId = taskId;
    turns.set(taskId, this);
  }

  setState(state) {
    this.state = state;
    this.stateEl.textContent = state;
    this.el.dataset.state = state;
    if (this === active && !ACTIVE.has(state)) setActive(null);
    // A task running when this page came (a reload, another tab's question) can be
    // stopped from here too.
    if (active === null && ACTIVE.has(state)) setActive(this);
  }

  setStatus(text) {
    this.statusEl.textContent = text;
    if (this === current) ui.announce.textContent = text;
  }

  addStep(text, kind) {
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = text;
    this.stepsEl.append(li);
    return li;
  }

  /** One event of this turn's task, in seq order, each once (tether.js sees to that). */
  apply(event) {
    const data = event.data;
    switch (event.type) {
      case "task:queued":
        this.setState("queued");
        this.setStatus("Queued");
        break;
      case "task:started":
        this.setState("running");
        this.setStatus("Started");
        break;
      case "status":
        this.onStatus(data);
        break;
      case "source":
        this.endSearch();
        this.addSource(data);
        break;
      case "delta":
        this.endSearch();
        if (!this.content) this.setStatus("Writing the answer");
        this.content += data.content ?? "";
        this.scheduleRender();
        break;
      default:
        if (event.type.startsWith("task:")) this.finish(data);
    }
  }

  onStatus(data) {
    let text = data.description ?? "";
    let kind = data.error ? "step error" : "step";
    const cut = Boolean(data.skipped || data.deadline);
    if (cut) kind += " skipped";
    if (data.action === "search" && !data.done && Array.isArray(data.queries)) {
      text = "Searching: " + data.queries.join("; ");
    } else if (data.action === "fetch" && data.url && !data.error && !cut) {
      text = "Read " + data.url;
    } else if (data.action === "tool_call" && !data.done) {
      text = `Calling ${data.tool}(${data.arguments ?? ""})`;
      kind += " tool";
    } else if (data.action === "tool_call") {
      if (data.skipped) text = `${data.tool} skipped: no result`;
      else text = `${data.tool} → ${data.result ?? ""}`;
      kind += " tool";
    }
    const li = this.addStep(text, kind);
    this.setStatus(text);
    // The search runs from its first status to its first source or delta, or to the
    // status that says it was cut short (a skip, or its deadline).
    if (data.step === "web_search" && this.search !== "over") {
      if (cut) this.endSearch();
      else this.setSearch("running");
    } else if (data.phase === "tools") {
      this.endSearch();
    }
    const step = data.step ?? data.tool_call_id;
    if (data.action === "tool_call" && step) {
      if (data.done) this.endToolCall(step);
      else if (data.progress === undefined && !this.toolSkips.has(step)) {
        this.addToolSkip(li, step, data.tool);
      }
    }
  }

  setSearch(search) {
    if (this.search === search) return;
    this.search = search;
    if (search !== "running") this.skippingSearch = false;
    if (this === active) showSkipSearch();
  }

  endSearch() {
    if (this.search) this.setSearch("over");
  }

  /** A Skip button on a running tool call's step: it asks the server to skip the call. */
  addToolSkip(li, step, tool) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "skip-tool";
    button.textContent = "Skip";
    button.title = `Skip this call of ${tool}: the model goes on without its result`;
    button.dataset.step = step;
    if (this === current) button.dataset.testid = "skip-tool";
    button.addEventListener("click", () => this.skipToolCall(button, step, tool));
    li.append(" ", button);
    this.toolSkips.set(step, button);
  }

  endToolCall(step) {
    this.toolSkips.get(step)?.remove();
    this.toolSkips.delete(step);
  }

  async skipToolCall(button, step, tool) {
    if (!client || !this.taskId || button.disabled) return;
    button.disabled = true;
    this.setStatus(`Skipping ${tool}…`);
    try {
      await client.skip(this.taskId, step);
      // The call's closing status follows (or came first): it ends the button.
    } catch (error) {
      this.skipRefused(`Could not skip ${tool}`, error);
      if (error instanceof TetherError && error.code === "disconnected") button.disabled = false;
      else this.endToolCall(step);
    }
  }

  async skipSearch() {
    if (!client || !this.taskId || this.search !== "running" || this.skippingSearch) return;
    this.skippingSearch = true;
    showSkipSearch();
    this.setStatus("Skipping the web search…");
    try {
      await client.skip(this.taskId, "web_search");
      // The search's closing status ("Web search skipped: ...") follows (or came first).
    } catch (error) {
      this.skipRefused("Could not skip the web search", error);
      this.skippingSearch = false;
      showSkipSearch();
    }
  }

  /** A skip the server did not take: say why among the steps and on the status line. */
  skipRefused(what, error) {
    const why = error instanceof TetherError && error.code === "step_ended"
      ? `it had ended (${error.step?.state ?? "ended"})` : error.message;
    const text = `${what}: ${why}`;
    this.addStep(text, "step error");
    if (ACTIVE.has(this.state)) this.setStatus(text);
  }

  /** The task has ended, or is gone: nothing of it can be skipped any more. */
  endSteps() {
    this.endSearch();
    for (const step of [...this.toolSkips.keys()]) this.endToolCall(step);
  }

  addSource(data) {
    const li = document.createElement("li");
    li.value = data.index;
    li.id = this.sourceId(data.index);
    const title = data.title || data.url || `Source ${data.index}`;
    const url = safeUrl(data.url);
    if (url) {
      const a = document.createElement("a");
      a.href = url;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = title;
      li.append(a);
    } else {
      li.textContent = title;
    }
    this.sourcesEl.append(li);
    this.sourceIndexes.add(data.index);
  }

  sourceId(index) {
    return `src-${this.taskId}-${index}`;
  }

  finish(task) {
    // The terminal event carries the whole task: its content is the answer as the server
    // has it, partial when stopped or failed.
    if (typeof task.content === "string") this.content = task.content;
    for (const source of task.sources ?? []) {
      if (!this.sourceIndexes.has(source.index)) this.addSource(source);
    }
    this.render();
    this.endSteps();
    this.sayWhy(explain(task), task.status !== "completed");
    this.setState(task.status);
    if (this.own) saveTurns();
  }

  /** The answer could not even start (refused, or the connection dropped meanwhile). */
  refuse(message, state = "failed") {
    this.sayWhy(message, true);
    this.setState(state);
  }

  gone() {
    if (ACTIVE.has(this.state) || !this.state) {
      this.endSteps();
      this.sayWhy("Disconnected: the server no longer has this answer.", true);
      if (this === active) setActive(null);
    }
  }

  /** How the answer ended, on the status line; and under a partial answer, so that the
   * reader of a long answer sees there why it stops short. */
  sayWhy(text, shortOfTheEnd) {
    this.setStatus(text);
    this.reasonEl.textContent = shortOfTheEnd && this.content ? text : "";
  }

  scheduleRender() {
    if (this.renderTimer === null) {
      this.renderTimer = setTimeout(() => this.render(), RENDER_EVERY_MS);
    }
  }

  render() {
    clearTimeout(this.renderTimer);
    this.renderTimer = null;
    const html = marked.parse(this.content, { async: false, gfm: true });
    const fragment = DOMPurify.sanitize(html, { RETURN_DOM_FRAGMENT: true });
    linkCitations(fragment, this);
    for (const a of fragment.querySelectorAll("a[href]")) {
      if (!a.getAttribute("href").startsWith("#")) {
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      }
    }
    this.answerEl.replaceChildren(fragment);
  }
}

/** Why a task ended as it did, in words. */
function explain(task) {
  const where = { web_search: " during the web search", tools: " while tools ran",
                  generating: " while writing the answer", queued: " before it started" };
  const phase = where[task.phase] ?? "";
  if (task.status === "completed") return "Completed";
  if (task.status === "cancelled") {
    switch (task.cancel_reason) {
      case "stop": return `Stopped${phase}.`;
      case "disconnect": return `Cancelled${phase}: the connection was lost.`;
      case "shutdown": return `Cancelled${phase}: the server shut down.`;
      case "timeout": return `Cancelled${phase}: it took too long.`;
      default: return `Cancelled${phase}.`;
    }
  }
  const error = task.error ?? {};
  const type = (error.type ?? "error").replaceAll("_", " ");
  return `Failed${phase} (${type}): ${error.message ?? "no reason given"}`;
}

/** Turn the answer's `[n]` markers into links to source n, outside code and links. */
function linkCitations(fragment, turn) {
  const walker = document.createTreeWalker(fragment, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.parentElement?.closest("a, code, pre") && /\[\d+\]/.test(node.data)) {
      nodes.push(node);
    }
  }
  for (const node of nodes) {
    const parts = node.data.split(/(\[\d+\])/);
    const replacement = parts.map((part) => {
      const n = /^\[(\d+)\]$/.exec(part);
      if (!n || !turn.sourceIndexes.has(Number(n[1]))) return document.createTextNode(part);
      const a = document.createElement("a");
      a.className = "cite";
      a.href = "#" + turn.sourceId(Number(n[1]));
      a.textContent = part;
      return a;
    });
    node.replaceWith(...replacement);
  }
}

/** The URL if it is http(s), else null: a source must not become a javascript: link. A
 * relative URL is Tether's own (the local search's documents, /api/local-docs/...). */
function safeUrl(raw) {
  try {
    const url = new URL(raw, document.baseURI);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

// -- the conversation ---------------------------------------------------------------------

function addTurn(turn) {
  ui.empty.hidden = true;
  ui.conversation.append(turn.el);
  if (turn.messageId) byMessage.set(turn.messageId, turn);
  // The hooks follow the last turn: one element per data-testid on the page.
  if (current) {
    for (const el of current.el.querySelectorAll("[data-testid]")) el.removeAttribute("data-testid");
  }
  current = turn;
  turn.stateEl.dataset.testid = "task-state";
  turn.statusEl.dataset.testid = "status";
  turn.sourcesEl.dataset.testid = "sources";
  turn.answerEl.dataset.testid = "answer";
  turn.el.scrollIntoView({ block: "end" });
}

function setActive(turn) {
  active = turn;
  ui.stop.disabled = turn === null;
  ui.send.disabled = turn !== null || !ready;
  showSkipSearch();
}

/** "Skip search" is there while the running answer's web search is, and usable until
 * the skip is asked for. */
function showSkipSearch() {
  const searching = active !== null && active.search === "running" && active.taskId !== null;
  ui.skipSearch.hidden = !searching;
  ui.skipSearch.disabled = !searching || active.skippingSearch || !client;
}

/** The turn of an event's task: known, or asked here before a reload, or from elsewhere. */
function turnFor(event) {
  let turn = turns.get(event.task_id);
  if (turn) return turn;
  turn = event.message_id ? byMessage.get(event.message_id) : undefined;
  if (!turn) {
    turn = new Turn(questions.get(event.message_id) ?? null, event.message_id, false);
    addTurn(turn);
  }
  turn.setTask(event.task_id);
  return turn;
}

function conversationMessages() {
  // Earlier completed answers go with a new question, so the model sees the conversation.
  const messages = [];
  for (const el of ui.conversation.querySelectorAll("article.turn")) {
    const turn = el.turn;
    if (turn.state === "completed" && turn.question != null) {
      messages.push({ role: "user", content: turn.question },
                    { role: "assistant", content: turn.content });
    }
  }
  return messages;
}

async function send() {
  const question = ui.prompt.value.trim();
  if (!question || active || !client) return;
  const request = {
    messages: [...conversationMessages(), { role: "user", content: question }],
    features: { web_search: ui.webSearch.checked },
  };
  if (ui.model.value) request.model = ui.model.value;
  const tools = [...ui.tools.querySelectorAll("input:checked")].map((input) => input.value);
  if (tools.length) request.tool_ids = tools;

  const turn = new Turn(question, randomMessageId(), true);
  request.message_id = turn.messageId;
  turn.controller = new AbortController();
  addTurn(turn);
  turn.setState("queued");
  turn.setStatus("Sending");
  setActive(turn); // Stop works from here on: before the task id, in every phase
  ui.prompt.value = "";
  channel?.postMessage({ type: "question", messageId: turn.messageId, question });
  saveTurns();
  try {
    const taskId = await client.chat(request, { signal: turn.controller.signal });
    if (!turn.taskId) turn.setTask(taskId);
    saveTurns();
  } catch (error) {
    if (error instanceof TetherError && error.code === "aborted") {
      turn.refuse("Stopped before it was sent.", "cancelled");
    } else {
      turn.refuse(`Refused: ${error.message}`);
    }
  }
}

function stop() {
  if (!active) return;
  active.setStatus("Stopping…");
  if (active.controller) active.controller.abort();
  else if (active.taskId) client?.stop(active.taskId);
}

function randomMessageId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "msg_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- connecting ---------------------------------------------------------------------------

function showConnection(state, text) {
  ui.connection.dataset.state = state;
  ui.connection.textContent = text;
}

/** Ask the server whether it needs a key (and whether ours is good) by listing models. */
async function checkAccess() {
  const key = storedKey();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let response;
  try {
    response = await fetch("/v1/models", { headers, cache: "no-store" });
  } catch {
    showConnection("error", "Cannot reach the server.");
    return null;
  }
  if (response.status === 401) {
    let message = "";
    try {
      message = (await response.json()).error?.message ?? "";
    } catch { /* not JSON: the status says it */ }
    ui.keyForm.hidden = false;
    ui.keyError.textContent = key
      ? `The server refused this API key: ${message || "401 unauthorized"}`
      : "This server needs an API key.";
    ui.key.focus();
    showConnection("error", key ? "API key refused" : "API key needed");
    return null;
  }
  if (!response.ok) {
    showConnection("error", `The server answered ${response.status}.`);
    return null;
  }
  ui.keyForm.hidden = key === null;
  ui.keyError.textContent = "";
  return (await response.json()).data ?? [];
}

function fillModels(models) {
  const chosen = ui.model.value;
  ui.model.replaceChildren(new Option("Server default", ""));
  for (const model of models) ui.model.append(new Option(model.id, model.id));
  ui.model.value = chosen;
}

async function fillTools() {
  // The server will list its tools (MCP ones too) at /api/tools; until it does, the three
  // built-in ones.
  let tools = TOOLS;
  try {
    const key = storedKey();
    const response = await fetch("/api/tools", {
      headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (response.ok) {
      const listed = (await response.json()).tools ?? [];
      const known = new Set(TOOLS.map((t) => t.id));
      tools = [...TOOLS, ...listed.filter((t) => !known.has(t.id))
        .map((t) => ({ id: t.id, label: t.id }))];
    }
  } catch { /* keep the built-in three */ }
  for (const tool of tools) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = tool.id;
    input.name = "tool";
    label.append(input, " " + tool.label);
    ui.tools.append(label);
  }
}

async function start() {
  const models = await checkAccess();
  if (models === null) return;
  fillModels(models);
  if (client) client.close();
  client = new TetherClient({ token: storedKey(), sessionId: startingSession() });
  client.addEventListener("state", (e) => onState(e.detail));
  client.addEventListener("session", (e) => onSession(e.detail));
  client.addEventListener("event", (e) => turnFor(e.detail).apply(e.detail));
  client.addEventListener("taskgone", (e) => turns.get(e.detail.taskId)?.gone());
  client.addEventListener("sessionrefused", () => {
    // Another user's session (the key changed): start a session of our own.
    sessionStorage.removeItem(SESSION_STORE);
    sessionStorage.removeItem(TURNS_STORE);
    start();
  });
  ready = true;
  setActive(active);
  client.connect().catch(() => {});
}

/** The session to re-attach to: one named in the URL (#session=...), or this tab's. */
function startingSession() {
  const match = /^#session=([\w-]+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(SESSION_STORE, match[1]);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem(SESSION_STORE);
}

function onSession({ sessionId, tasks }) {
  sessionStorage.setItem(SESSION_STORE, sessionId);
  ui.share.href = `/#session=${encodeURIComponent(sessionId)}`;
  ui.share.hidden = false;
  document.body.dataset.session = sessionId;
  const listed = new Set(tasks.map((t) => t.task_id));
  for (const turn of turns.values()) {
    if (!listed.has(turn.taskId)) turn.gone();
  }
}

function onState({ state, code, delayMs }) {
  if (state === "open") {
    showConnection("open", "Connected");
  } else if (state === "reconnecting" && code !== null) {
    const seconds = (delayMs / 1000).toFixed(1);
    showConnection("reconnecting", `Disconnected (${code}); reconnecting in ${seconds} s`);
    // A refused upgrade looks like any dropped connection from here: ask over HTTP
    // whether it was the key.
    if (code === 1006) checkKeyAfterDrop();
  } else if (state === "connecting" || state === "reconnecting") {
    showConnection("connecting", "Connecting…");
  } else if (state === "closed") {
    showConnection("closed", "Disconnected");
  }
}

let checkingKey = false;
async function checkKeyAfterDrop() {
  if (checkingKey) return;
  checkingKey = true;
  try {
    if ((await checkAccess()) === null) client?.close();
  } finally {
    checkingKey = false;
  }
}

/** Rebuild this tab's turns after a reload: their answers come back from the server. */
function restoreTurns() {
  for (const saved of storedTurns()) {
    const turn = new Turn(saved.question, saved.messageId, true);
    addTurn(turn);
    if (saved.taskId) turn.setTask(saved.taskId);
  }
}

// -- wiring -------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") stop();
});
ui.stop.addEventListener("click", stop);
ui.skipSearch.addEventListener("click", () => active?.skipSearch());
ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = ui.key.value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  ui.key.value = "";
  start();
});
ui.keyForget.addEventListener("click", () => {
  localStorage.removeItem(KEY_STORE);
  client?.close();
  client = null;
  ready = false;
  setActive(active);
  start();
});
channel?.addEventListener("message", (e) => {
  if (e.data?.type !== "question") return;
  questions.set(e.data.messageId, e.data.question);
  const turn = byMessage.get(e.data.messageId);
  if (turn && turn.question == null) turn.setQuestion(e.data.question);
});

restoreTurns();
fillTools();
start();
