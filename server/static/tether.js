/**
 * tether.js: the browser client of Tether's WebSocket API (`/ws`).
 *
 * An ES module with no dependencies and no build step: import it from a Tether server
 * (`/static/tether.js`) or copy it. It connects and authenticates, starts chats, stops
 * them, and hands on every event of every task it follows exactly once, in `seq` order,
 * across dropped connections and server restarts.
 *
 * ```js
 * import { TetherClient } from "/static/tether.js";
 * const client = new TetherClient({ token: "sk-..." });   // no token in single-user mode
 * client.addEventListener("event", (e) => console.log(e.detail.type, e.detail.data));
 * await client.connect();
 * const stopper = new AbortController();
 * const taskId = await client.chat(
 *   { messages: [{ role: "user", content: "What is new in trio?" }],
 *     features: { web_search: true } },
 *   { signal: stopper.signal });
 * stopper.abort();   // or client.stop(taskId): stops it in whatever phase it is
 * await client.skip(taskId, "web_search");   // or skip one step: the task goes on without it
 * ```
 *
 * How nothing is lost or repeated: the client keeps, for each task it has seen, the `seq`
 * of the last event it handed on. When the connection drops it reconnects with backoff,
 * re-attaching to its session (`?session_id=`); the server's first message lists the
 * session's tasks, and the client subscribes to each unfinished one with `after` set to
 * that `seq`. The server replays from there, so nothing is missed; an event whose `seq` is
 * not the next one expected (one already handed on, sent again by a replay that overlaps
 * what was in flight) is dropped, so nothing is repeated.
 *
 * A browser cannot set headers on a WebSocket, so the key goes in the URL as `?token=`,
 * the one place Tether accepts it there. The URL of a WebSocket is not shown in the
 * address bar nor kept in the history, and Tether keeps no access log.
 *
 * @module tether
 */

/** Close code: the server is restarting; reconnect (to another replica, if any). */
export const CLOSE_RESTART = 1012;
/** Close code: the server's task store did not answer; reconnect after a while. */
export const CLOSE_TRY_LATER = 1013;
/** Close code: this client read too slowly; reconnect and resume from the last seq. */
export const CLOSE_TOO_SLOW = 4008;
/** Close code: `session_id` names another user's session; do not reconnect with it. */
export const CLOSE_NOT_FOUND = 4404;
/** Close code this client uses when it gives up on a connection that stopped answering. */
export const CLOSE_NO_ANSWER = 4000;

/** The event types that end a task's log; each task has exactly one, as its last event. */
export const TERMINAL_TYPES = Object.freeze(["task:completed", "task:cancelled", "task:failed"]);

/**
 * Whether an event ends its task's log.
 * @param {{type: string}} event a Tether event
 * @returns {boolean}
 */
export function isTerminal(event) {
  return TERMINAL_TYPES.includes(event.type);
}

/**
 * The `/ws` URL of the server that served the current page (`ws:` or `wss:` to match).
 * @returns {string}
 */
export function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

/** An error the server answered, with its API error code (`not_found`, `too_many_tasks`...). */
export class TetherError extends Error {
  /**
   * @param {string} code the error's `code`, as in API.md's error tables
   * @param {string} message a sentence for people
   * @param {string|null} [param] the request field at fault, if any
   * @param {{task_id: string, step: string, state: string}|null} [step] for a skip's
   *   `step_ended`: the step and how it ended (`completed`, `skipped`, `deadline`...)
   */
  constructor(code, message, param = null, step = null) {
    super(message);
    this.name = "TetherError";
    /** @type {string} */
    this.code = code;
    /** @type {string|null} */
    this.param = param;
    /** @type {{task_id: string, step: string, state: string}|null} */
    this.step = step;
  }
}

/**
 * @typedef {object} TetherEvent
 * @property {string} task_id
 * @property {string|null} chat_id
 * @property {string|null} message_id
 * @property {number} seq 1, 2, 3... per task, without gaps
 * @property {string} type `task:queued`, `task:started`, `status`, `source`, `delta`,
 *   or a terminal type
 * @property {object} data
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [url] the `/ws` URL; by default that of the page's own server
 * @property {string|null} [token] the API key; none in single-user mode
 * @property {string|null} [sessionId] a session to re-attach to (one of this user's)
 * @property {boolean} [batch] ask for batched messages (`?batch=1`); default true
 * @property {number} [minBackoffMs] first reconnect delay; default 250
 * @property {number} [maxBackoffMs] longest reconnect delay; default 10000
 * @property {number} [pingIntervalMs] how often an idle connection is checked; default 20000
 * @property {number} [pingTimeoutMs] how long past that a silent connection is kept;
 *   default 10000
 */

const ACTIVE = new Set(["queued", "running"]);

/**
 * A connection to Tether's `/ws` that survives disconnects. It is an `EventTarget`;
 * every event is a `CustomEvent` whose `detail` is given below.
 *
 * - `event`: a {@link TetherEvent} of a followed task, each once, in `seq` order per task.
 *   Tasks started in the session by other tabs or over HTTP arrive here too.
 * - `session`: `{sessionId, tasks, resumed}` on every (re)connection; `tasks` is the
 *   server's list of the session's tasks.
 * - `state`: `{state, code, reason, delayMs}` when the connection state changes: `connecting`,
 *   `open`, `reconnecting` (with the close code and the delay before the next try) or
 *   `closed`.
 * - `taskgone`: `{taskId}`: a task this client followed is no longer on the server (its
 *   retention ran out while the client was away); no more of its events will come.
 * - `servererror`: `{code, message, param, ref}`: an error answer not tied to a `chat` or
 *   a `skip` (a `subscribe` or `stop` of an unknown task, say).
 * - `sessionrefused`: `{code, message}`: the server closed with 4404 (the session is
 *   another user's); the client does not reconnect. Make a new client without `sessionId`.
 */
export class TetherClient extends EventTarget {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    super();
    this._url = options.url ?? defaultUrl();
    this._token = options.token ?? null;
    this._sessionId = options.sessionId ?? null;
    this._batch = options.batch ?? true;
    this._minBackoffMs = options.minBackoffMs ?? 250;
    this._maxBackoffMs = options.maxBackoffMs ?? 10000;
    this._pingIntervalMs = options.pingIntervalMs ?? 20000;
    this._pingTimeoutMs = options.pingTimeoutMs ?? 10000;
    /** @type {WebSocket|null} */
    this._ws = null;
    this._state = "idle";
    this._attempt = 0;
    this._everOpen = false;
    this._closedByUser = false;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._lastHeard = 0;
    /** @type {Map<string, {seq: number, ended: boolean, resyncing: boolean}>} */
    this._tasks = new Map();
    // Chats waiting for their `task` answer, oldest first: the server answers the
    // commands of one connection in order, so an error about a chat is the oldest one's.
    this._pending = [];
    // Skips waiting for their answer, oldest first (answered in order, as chats are).
    this._skips = [];
    // Stops asked for while disconnected; sent once the session is back.
    this._outbox = [];
    this._waiters = [];
  }

  /** The session's id, once the server has sent it (or the one given to re-attach to). */
  get sessionId() {
    return this._sessionId;
  }

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this._state;
  }

  /**
   * The `seq` of the last event handed on for a task (0 if none).
   * @param {string} taskId
   * @returns {number}
   */
  lastSeq(taskId) {
    return this._tasks.get(taskId)?.seq ?? 0;
  }

  /**
   * Open the connection, and keep it open until {@link TetherClient#close}.
   * @returns {Promise<string>} the session id, once the server has sent it; rejects if the
   *   session is refused (4404) or the client is closed first
   */
  connect() {
    const ready = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this._state === "open") {
      this._settleWaiters(null);
    } else if (this._state === "idle" || this._state === "closed") {
      this._closedByUser = false;
      this._open();
    }
    return ready;
  }

  /**
   * Close the connection for good: no reconnect. Tasks bound to the session go on for the
   * server's grace period (`TETHER_WS_RECONNECT_GRACE_S`), then are cancelled.
   */
  close() {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    const ws = this._ws;
    this._detach();
    if (ws) ws.close(1000, "client closed");
    this._fail(new TetherError("closed", "The client was closed."));
    this._setState("closed", {});
  }

  /**
   * Start a chat: a task bound to this session. Its events follow as `event`s, from seq 1.
   * @param {object} request a chat-completions body (`messages`, `model`, `features`,
   *   `tool_ids`...); a `message_id` is added when it has none
   * @param {{signal?: AbortSignal}} [options] aborting `signal` stops the task, whether
   *   its id has come yet or not
   * @returns {Promise<string>} the task id; rejects with a {@link TetherError} when the server
   *   refuses the chat, or if the connection drops before the answer and the task is not
   *   in the session when the client is back
   */
  chat(request, options = {}) {
    const signal = options.signal;
    const messageId = request.message_id ?? randomId();
    const message = { type: "chat", request: { ...request, message_id: messageId } };
    return new Promise((resolve, reject) => {
      if (signal?.aborted) {
        reject(new TetherError("aborted", "The chat was stopped before it was sent."));
        return;
      }
      const pending = { messageId, message, resolve, reject, signal, sent: false };
      this._pending.push(pending);
      signal?.addEventListener("abort", () => {
        if (!pending.sent && this._pending.includes(pending)) {
          this._pending.splice(this._pending.indexOf(pending), 1);
          reject(new TetherError("aborted", "The chat was stopped before it was sent."));
        }
        // Sent but not answered: the `task` answer sends the stop (see _answered).
      }, { once: true });
      if (this._state === "open") this._sendChat(pending);
    });
  }

  /**
   * Stop a task. Its `task:cancelled` (with the partial answer) follows as an `event`.
   * Asked while disconnected, the stop is sent once the connection is back.
   * @param {string} taskId
   */
  stop(taskId) {
    const message = { type: "stop", task_id: taskId };
    if (this._state === "open") this._send(message);
    else this._outbox.push(message);
  }

  /**
   * Skip one step of a running task; the task goes on without it. `step` is `web_search`
   * (the whole search phase: the answer is made from the sources found so far),
   * `page:<url>` (one page read of the search) or a tool call's id (the model is told the
   * call was skipped). The step's closing `status` event, with `skipped: true`, follows as
   * an `event`. Asked while disconnected, the skip is sent once the connection is back.
   * @param {string} taskId
   * @param {string} step
   * @returns {Promise<{task_id: string, step: string, state: string}>} the server's answer
   *   (`state` is `skipped`); rejects with a {@link TetherError}: `step_ended` when the step
   *   had ended already (its `step` says how), `not_found` for a step the task never began
   *   or an unknown task, `disconnected` when the connection dropped before the answer
   *   (whether it was skipped then shows in the step's `status` event)
   */
  skip(taskId, step) {
    const message = { type: "skip", task_id: taskId, step };
    return new Promise((resolve, reject) => {
      const pending = { message, resolve, reject, sent: false };
      this._skips.push(pending);
      if (this._state === "open") this._sendSkip(pending);
    });
  }

  /**
   * Follow a task (of this user) from `after`: its events past that seq are replayed, then
   * come live. Tasks of the session are followed without asking; this is for others.
   * @param {string} taskId
   * @param {number} [after] default: the last seq this client handed on for it
   */
  subscribe(taskId, after) {
    const known = this._task(taskId);
    if (after !== undefined && after < known.seq) known.seq = after;
    if (this._state === "open") {
      this._send({ type: "subscribe", task_id: taskId, after: known.seq });
    }
  }

  // -- the connection -----------------------------------------------------------------

  _open() {
    const params = new URLSearchParams();
    if (this._batch) params.set("batch", "1");
    if (this._sessionId) params.set("session_id", this._sessionId);
    if (this._token) params.set("token", this._token);
    this._setState(this._everOpen ? "reconnecting" : "connecting", {});
    const ws = new WebSocket(`${this._url}?${params}`);
    this._ws = ws;
    ws.onmessage = (e) => {
      if (ws === this._ws) this._onMessage(e.data);
    };
    ws.onclose = (e) => {
      if (ws === this._ws) this._onClose(e.code, e.reason);
    };
  }

  /** Forget the current socket: its late messages and close are ignored from now on. */
  _detach() {
    clearInterval(this._pingTimer);
    if (this._ws) {
      this._ws.onmessage = null;
      this._ws.onclose = null;
    }
    this._ws = null;
  }

  _onClose(code, reason) {
    this._detach();
    if (this._closedByUser) return;
    if (code === CLOSE_NOT_FOUND) {
      const error = new TetherError("not_found", reason || "The session is another user's.");
      this._fail(error);
      this._setState("closed", { code, reason });
      this._dispatch("sessionrefused", { code: error.code, message: error.message });
      return;
    }
    // A restarting server has handed its tasks' ends over already; another replica may be
    // ready at once. Everything else (a network drop, 4008, 1013, a refused upgrade) backs
    // off: doubling from minBackoffMs to maxBackoffMs, with jitter so that the clients of a
    // restarted server do not all come back in the same millisecond.
    const base = code === CLOSE_RESTART ? this._minBackoffMs
      : Math.min(this._maxBackoffMs, this._minBackoffMs * 2 ** this._attempt);
    const delayMs = Math.round(base * (0.5 + Math.random() / 2));
    this._attempt += 1;
    this._setState("reconnecting", { code, reason, delayMs });
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
  }

  _onMessage(raw) {
    this._lastHeard = Date.now();
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return; // not from a Tether server; nothing to do with it
    }
    switch (message.type) {
      case "session":
        this._onSession(message);
        break;
      case "task":
        this._answered(message);
        break;
      case "skip":
        this._skipAnswered(message);
        break;
      case "event":
        this._onEvents([message.event]);
        break;
      case "events":
        this._onEvents(message.events);
        break;
      case "error":
        this._onError(message);
        break;
      default: // pong, and message types a newer server may add
    }
  }

  _onSession(message) {
    const resumed = this._everOpen || Boolean(this._sessionId);
    this._sessionId = message.session_id;
    this._everOpen = true;
    this._attempt = 0;
    this._setState("open", {});
    const listed = new Map(message.tasks.map((t) => [t.task_id, t]));
    // Chats sent on the connection that dropped, whose answer never came: the task is in
    // the list if the server admitted it.
    for (const pending of this._pending.filter((p) => p.sent)) {
      const task = message.tasks.find((t) => t.message_id === pending.messageId);
      if (task) {
        this._answered({ task_id: task.task_id, message_id: pending.messageId });
      } else {
        this._pending.splice(this._pending.indexOf(pending), 1);
        pending.reject(new TetherError(
          "disconnected", "The connection dropped before the server answered the chat."));
      }
    }
    // A re-attached connection follows none of the session's running tasks on its own:
    // subscribe to each from where this client is (0 for a task it has never seen).
    for (const task of message.tasks) {
      const known = this._task(task.task_id);
      if (!known.ended && (task.last_seq > known.seq || ACTIVE.has(task.status))) {
        this._send({ type: "subscribe", task_id: task.task_id, after: known.seq });
      }
    }
    for (const [taskId, known] of this._tasks) {
      if (!known.ended && !listed.has(taskId)) {
        known.ended = true;
        this._dispatch("taskgone", { taskId });
      }
    }
    // Skips sent on the connection that dropped, whose answer never came: whether they
    // landed shows in the steps' status events; the promise cannot say.
    for (const pending of this._skips.filter((p) => p.sent)) {
      this._skips.splice(this._skips.indexOf(pending), 1);
      pending.reject(new TetherError(
        "disconnected", "The connection dropped before the server answered the skip."));
    }
    for (const pending of this._pending.filter((p) => !p.sent)) this._sendChat(pending);
    for (const pending of this._skips) this._sendSkip(pending);
    for (const queued of this._outbox.splice(0)) this._send(queued);
    this._startPings();
    this._dispatch("session", { sessionId: this._sessionId, tasks: message.tasks, resumed });
    this._settleWaiters(null);
  }

  _answered(message) {
    let index = this._pending.findIndex((p) => p.sent && p.messageId === message.message_id);
    if (index === -1) index = this._pending.findIndex((p) => p.sent);
    const pending = index === -1 ? undefined : this._pending.splice(index, 1)[0];
    this._task(message.task_id);
    if (!pending) return;
    pending.resolve(message.task_id);
    if (pending.signal?.aborted) {
      this.stop(message.task_id);
    } else {
      pending.signal?.addEventListener("abort", () => this.stop(message.task_id), { once: true });
    }
  }

  _skipAnswered(message) {
    // The server answers in order, so the answer is the oldest sent skip's; the match on
    // task and step is only a guard.
    const { task_id: taskId, step, state } = message;
    let index = this._skips.findIndex(
      (p) => p.sent && p.message.task_id === taskId && p.message.step === step);
    if (index === -1) index = this._skips.findIndex((p) => p.sent);
    if (index === -1) return;
    this._skips.splice(index, 1)[0].resolve({ task_id: taskId, step, state });
  }

  _onError(message) {
    const { code, message: text, param = null } = message.error ?? {};
    if (message.ref === "chat") {
      const index = this._pending.findIndex((p) => p.sent);
      if (index !== -1) {
        this._pending.splice(index, 1)[0].reject(new TetherError(code, text, param));
        return;
      }
    }
    if (message.ref === "skip") {
      const index = this._skips.findIndex((p) => p.sent);
      if (index !== -1) {
        this._skips.splice(index, 1)[0].reject(
          new TetherError(code, text, param, message.step ?? null));
        return;
      }
    }
    if (message.ref === "session") return; // the 4404 close that follows says it all
    this._dispatch("servererror", { code, message: text, param, ref: message.ref ?? null });
  }

  _onEvents(events) {
    for (const event of events) {
      const known = this._task(event.task_id);
      if (event.seq <= known.seq) continue; // handed on already: a replay's overlap
      if (event.seq !== known.seq + 1) {
        // A gap (the server started this connection past what the client has, as after
        // a stop of a task it did not follow): ask for the log from what it has.
        if (!known.resyncing && this._state === "open") {
          known.resyncing = true;
          this._send({ type: "subscribe", task_id: event.task_id, after: known.seq });
        }
        continue;
      }
      known.resyncing = false;
      known.seq = event.seq;
      if (isTerminal(event)) known.ended = true;
      this._dispatch("event", event);
    }
  }

  // -- helpers -----------------------------------------------------------------------

  _task(taskId) {
    let known = this._tasks.get(taskId);
    if (!known) {
      known = { seq: 0, ended: false, resyncing: false };
      this._tasks.set(taskId, known);
    }
    return known;
  }

  _sendChat(pending) {
    pending.sent = true;
    this._send(pending.message);
  }

  _sendSkip(pending) {
    pending.sent = true;
    this._send(pending.message);
  }

  _send(message) {
    this._ws?.send(JSON.stringify(message));
  }

  /**
   * The server pings every 20 s, but a page cannot see those pings. A connection through
   * a laptop's sleep or a dropped Wi-Fi can stay "open" for minutes: ping the server
   * now and then, and give up on a connection that has said nothing for too long.
   */
  _startPings() {
    clearInterval(this._pingTimer);
    this._lastHeard = Date.now();
    this._pingTimer = setInterval(() => {
      const ws = this._ws;
      if (!ws) return;
      if (Date.now() - this._lastHeard > this._pingIntervalMs + this._pingTimeoutMs) {
        this._detach();
        ws.close(CLOSE_NO_ANSWER, "no answer");
        this._onClose(CLOSE_NO_ANSWER, "no answer");
      } else {
        this._send({ type: "ping" });
      }
    }, this._pingIntervalMs);
  }

  _setState(state, detail) {
    if (state === this._state && state !== "reconnecting") return;
    this._state = state;
    this._dispatch("state", { state, code: null, reason: "", delayMs: 0, ...detail });
  }

  _settleWaiters(error) {
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve(this._sessionId);
    }
  }

  _fail(error) {
    for (const pending of this._pending.splice(0)) pending.reject(error);
    for (const pending of this._skips.splice(0)) pending.reject(error);
    this._outbox = [];
    this._settleWaiters(error);
  }

  _dispatch(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** A random id for a chat's `message_id` (crypto.randomUUID needs a secure context). */
function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "msg_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
