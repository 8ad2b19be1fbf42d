/*
 * IWRelaySocket: a drop-in for the browser's WebSocket, for iw-relay rooms.
 *
 *   const socket = new IWRelaySocket("wss://relay.example.org/room/my-room");
 *   // or, before the application's own scripts run:
 *   window.WebSocket = IWRelaySocket;
 *
 * Against a relay started with --recovery-window, a dropped connection is invisible to
 * the application: this class reconnects (backoff with jitter), resumes the session
 * (?resume=TOKEN&since=SEQ&epoch=E, from the resumeToken and epoch of the relay's
 * "connected" message and the last seq it delivered), delivers what was missed once and
 * in order (duplicates dropped by seq), then sends what the application sent meanwhile,
 * each once, paced under the relay's rate limit. The application sees no close and no
 * open. When the relay cannot recover the session (the window passed, the relay lost
 * its history), the application sees a normal "close" (1006) then "open" and the new
 * "connected" message, and resyncs as it does after any reconnect.
 *
 * Against a relay without recovery it is a plain WebSocket, except that after an
 * unexpected drop it reconnects by itself (a "close" then, later, an "open").
 *
 * Plain ES2020, no build step, no dependency. Served by the relay at /client.js.
 */
(function (global) {
  "use strict";

  const NativeWebSocket = global.WebSocket;
  const CONNECTING = 0;
  const OPEN = 1;
  const CLOSING = 2;
  const CLOSED = 3;
  // Closes after which reconnecting could help: a drop, the server going away or
  // restarting, an internal error, "try again later". Not 1000 (a room expired or a
  // normal close), 1008 (refused: room id, token, room full, flood), 1002/1007/1009.
  const RETRYABLE = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);
  const DEFAULTS = {
    reconnect: true, // reconnect after a drop (even without recovery on the relay)
    minDelay: 250, // ms, first reconnect delay (before jitter)
    maxDelay: 10000, // ms, backoff cap
    rateLimit: 100, // the relay's --rate-limit ...
    rateWindow: 1000, // ... per --rate-window, in ms
    rateShare: 0.8, // the share of it that a flush after a resume may use
  };
  // Sockets that told their application they closed and then reopened by themselves:
  // when the application opens a new socket to the same URL (its own reconnect loop),
  // the old one steps aside, so no ghost member stays behind.
  const reopened = new Map();
  const encoder = new TextEncoder();

  function byteLength(data) {
    if (typeof data === "string") return encoder.encode(data).length;
    if (data instanceof Blob) return data.size;
    return data.byteLength || 0;
  }

  function resolveUrl(url) {
    const base = global.location ? global.location.href : undefined;
    const parsed = new URL(String(url), base);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new DOMException(`The URL's scheme must be either 'ws' or 'wss'. '${parsed.protocol}' is not allowed.`, "SyntaxError");
    }
    if (parsed.hash) {
      throw new DOMException("The URL contains a fragment identifier.", "SyntaxError");
    }
    return parsed;
  }

  // What this object is doing underneath; the application sees only readyState.
  //   first:      the first connection (CONNECTING)
  //   live:       connected, and in the session when the relay offers one (OPEN)
  //   recovering: dropped, reconnecting to resume; the application sees OPEN
  //   reopening:  the application was told CLOSED; reconnecting to open again
  //   done:       closed for good
  class IWRelaySocket extends EventTarget {
    constructor(url, protocols, options) {
      super();
      this._url = resolveUrl(url);
      this._protocols = protocols;
      this._options = Object.assign({}, DEFAULTS, options || {});
      this._state = CONNECTING;
      this._phase = "first";
      this._binaryType = "blob";
      this._protocol = ""; // as negotiated by the connection that opened last
      this._extensions = "";
      this._ws = null;
      this._session = null; // {token, epoch} once the relay offers recovery
      this._lastSeq = 0;
      this._resuming = false; // this connection asked to resume; "connected" will say
      this._queue = []; // what the application sent while down
      this._queuedBytes = 0;
      this._sentAt = []; // times of recent sends, for pacing
      this._pumpTimer = null;
      this._retryTimer = null;
      this._attempt = 0;
      this._handlers = {}; // on* handlers, each a listener from its first assignment
      for (const other of reopened.get(this.url) || []) other._stepAside();
      reopened.delete(this.url);
      this._connect();
    }

    // -- the WebSocket interface ---------------------------------------------------

    get url() { return this._url.href; }
    get readyState() { return this._state; }
    get protocol() { return this._protocol; }
    get extensions() { return this._extensions; }
    get binaryType() { return this._binaryType; }
    set binaryType(value) {
      if (value !== "blob" && value !== "arraybuffer") return;
      this._binaryType = value;
      if (this._ws) this._ws.binaryType = value;
    }
    get bufferedAmount() {
      return (this._ws ? this._ws.bufferedAmount : 0) + this._queuedBytes;
    }

    send(data) {
      if (this._state === CONNECTING) {
        throw new DOMException("Failed to execute 'send' on 'WebSocket': Still in CONNECTING state.", "InvalidStateError");
      }
      if (this._state !== OPEN) return; // as WebSocket: discarded once closing
      if (this._phase === "live" && this._queue.length === 0 && !this._goingDown()) {
        this._sendNow(data);
        return;
      }
      this._queue.push(data);
      this._queuedBytes += byteLength(data);
      this._pump();
    }

    close(code, reason) {
      if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
        throw new DOMException(`Failed to execute 'close' on 'WebSocket': The close code must be either 1000, or between 3000 and 4999. ${code} is neither.`, "InvalidAccessError");
      }
      if (reason !== undefined && encoder.encode(String(reason)).length > 123) {
        throw new DOMException("Failed to execute 'close' on 'WebSocket': The close reason must not be greater than 123 UTF-8 bytes.", "SyntaxError");
      }
      if (this._phase === "reopening") return this._stepAside(); // it looked closed already
      if (this._state === CLOSING || this._state === CLOSED) return;
      this._state = CLOSING;
      this._stopTimers();
      this._queue = [];
      this._queuedBytes = 0;
      if (this._phase === "first" || this._phase === "live") {
        this._ws.close(code, reason); // its events are passed on
        return;
      }
      // Recovering: for the application, an open socket whose connection was lost.
      this._stepAside();
      this._state = CLOSING;
      setTimeout(() => this._surfaceClose(1006, "", false), 0);
    }

    // -- connecting and resuming ---------------------------------------------------

    _connect() {
      const url = new URL(this._url.href);
      this._resuming = this._phase === "recovering";
      if (this._resuming) {
        url.searchParams.set("resume", this._session.token);
        url.searchParams.set("since", String(this._lastSeq));
        url.searchParams.set("epoch", this._session.epoch);
      }
      const ws = this._protocols === undefined
        ? new NativeWebSocket(url.href) : new NativeWebSocket(url.href, this._protocols);
      ws.binaryType = this._binaryType;
      this._ws = ws;
      this._awaitingConnected = true;
      ws.onopen = () => { if (ws === this._ws) this._opened(); };
      ws.onmessage = (event) => { if (ws === this._ws) this._received(event); };
      ws.onerror = () => { if (ws === this._ws) this._errored(); };
      ws.onclose = (event) => { if (ws === this._ws) this._closed(event); };
    }

    _opened() {
      this._protocol = this._ws.protocol;
      this._extensions = this._ws.extensions;
      if (this._phase === "recovering") return; // "connected" will say if it recovered
      this._surfaceOpen();
    }

    _surfaceOpen() {
      this._attempt = 0;
      this._phase = "live";
      this._state = OPEN;
      this.dispatchEvent(new Event("open"));
      this._pump();
    }

    _received(event) {
      // The relay's own "connected" is the first message on a connection: a peer's
      // message of type "connected" later is just a message.
      const first = this._awaitingConnected;
      this._awaitingConnected = false;
      let message = null;
      if ((first || this._session !== null) && typeof event.data === "string"
          && event.data.charCodeAt(0) === 123 /* { */) {
        try { message = JSON.parse(event.data); } catch (_) { message = null; }
      }
      if (first && message !== null && message.type === "connected") {
        if (!this._connected(message)) return;
      } else if (message !== null && this._session !== null) {
        if (typeof message.seq === "number") {
          if (message.seq <= this._lastSeq) return; // already delivered
          this._lastSeq = message.seq;
        } else if (message.type === "server-shutdown") {
          this._leave(); // the relay is going away: this socket resumes on another node
          return;
        }
      }
      if (this._phase !== "live") return;
      this.dispatchEvent(new MessageEvent("message", { data: event.data, origin: event.origin }));
    }

    // The relay's "connected"; returns whether the application is to see it.
    _connected(message) {
      const offered = typeof message.resumeToken === "string" && typeof message.epoch === "string";
      if (!this._resuming) {
        this._adopt(message, offered);
        return true;
      }
      this._resuming = false;
      if (message.recovered === true && offered) {
        this._session = { token: message.resumeToken, epoch: message.epoch };
        this._attempt = 0; // only once back in the session: a relay that accepts and
        this._phase = "live"; // closes at once keeps the backoff growing
        this.dispatchEvent(new CustomEvent("recovery", { detail: { recovered: true } }));
        this._pump();
        return false;
      }
      // Not recovered: a normal close then open, so the application resyncs. What it
      // sent meanwhile belonged to the session that was lost, and is dropped.
      this._queue = [];
      this._queuedBytes = 0;
      this._adopt(message, offered);
      this.dispatchEvent(new CustomEvent("recovery", { detail: { recovered: false } }));
      this._phase = "reopening";
      this._surfaceClose(1006, "", false, true);
      if (this._phase !== "reopening") return false; // closed or replaced meanwhile
      this._surfaceOpen();
      return true;
    }

    _adopt(message, offered) {
      this._session = offered ? { token: message.resumeToken, epoch: message.epoch } : null;
      this._lastSeq = typeof message.seq === "number" ? message.seq : 0;
    }

    _errored() {
      // Reported as a plain WebSocket reports it, just before the close it leads to
      // (_closed); not at all when the drop is being recovered.
      this._errorPending = true;
    }

    _closed(event) {
      this._ws = null;
      this._resuming = false;
      const errored = this._errorPending === true;
      this._errorPending = false;
      const phase = this._phase;
      const retry = this._options.reconnect && phase !== "first" && this._state !== CLOSING
        && RETRYABLE.has(event.code);
      if (!retry) {
        if (phase === "reopening") return this._stepAside(); // it looked closed already
        this._phase = "done";
        this._stopTimers();
        if (errored) this.dispatchEvent(new Event("error"));
        this._surfaceClose(event.code, event.reason, event.wasClean);
        return;
      }
      if (phase === "live") {
        if (this._session !== null) {
          this._phase = "recovering"; // invisible to the application
        } else {
          // Nothing to resume: the application learns of the drop now, as with a
          // plain WebSocket; this object opens again by itself later.
          this._phase = "reopening";
          if (errored) this.dispatchEvent(new Event("error"));
          this._surfaceClose(event.code, event.reason, event.wasClean, true);
          if (this._phase !== "reopening") return;
        }
      }
      this._scheduleRetry();
    }

    _scheduleRetry() {
      const o = this._options;
      const ceiling = Math.min(o.maxDelay, o.minDelay * 2 ** Math.min(this._attempt, 16));
      const delay = ceiling / 2 + Math.random() * ceiling / 2; // jitter
      this._attempt += 1;
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        if (this._phase !== "recovering" && this._phase !== "reopening") return;
        try {
          this._connect();
        } catch (error) { // cannot happen with a URL that worked once; never loop on it
          const wasOpen = this._state === OPEN;
          this._stepAside();
          if (wasOpen) this._surfaceClose(1006, "", false);
        }
      }, delay);
    }

    // The relay is stopping. What was sent on this connection reaches it before this
    // close (TCP keeps order) and is relayed while it drains (--drain-timeout); what the
    // application sends from now on waits for the resume, on another node.
    _leave() {
      if (this._phase !== "live") return;
      const ws = this._ws;
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      ws.close(4000, "resuming"); // not 1000/1001, which would end the session
      this._ws = null;
      this._phase = "recovering";
      this._scheduleRetry();
    }

    // Tells the application the socket closed. `reopening`: this object opens again
    // by itself unless the application closes it or opens another to the same URL.
    _surfaceClose(code, reason, wasClean, reopening) {
      this._state = CLOSED;
      if (reopening) {
        const list = reopened.get(this.url) || new Set();
        list.add(this);
        reopened.set(this.url, list);
      } else {
        this._forget();
      }
      this.dispatchEvent(new CloseEvent("close", { code, reason, wasClean }));
    }

    // Closed for good, without another event: the application has moved on.
    _stepAside() {
      this._stopTimers();
      this._phase = "done";
      this._state = CLOSED;
      this._queue = [];
      this._queuedBytes = 0;
      this._forget();
      const ws = this._ws;
      this._ws = null;
      if (ws !== null) {
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        if (ws.readyState <= OPEN) ws.close(1000);
      }
    }

    _forget() {
      const list = reopened.get(this.url);
      if (list) {
        list.delete(this);
        if (list.size === 0) reopened.delete(this.url);
      }
    }

    _stopTimers() {
      if (this._retryTimer !== null) clearTimeout(this._retryTimer);
      if (this._pumpTimer !== null) clearTimeout(this._pumpTimer);
      this._retryTimer = this._pumpTimer = null;
    }

    // -- sending, paced ------------------------------------------------------------

    // The relay closed this connection (its close frame is in: the socket is CLOSING),
    // and it will be resumed: what is sent now would be discarded, so it waits.
    _goingDown() {
      return this._session !== null && (this._ws === null || this._ws.readyState !== OPEN);
    }

    _sendNow(data) {
      this._ws.send(data);
      this._sentAt.push(performance.now());
      if (this._sentAt.length > 4 * this._options.rateLimit) this._sentAt.shift();
    }

    // Sends the queue, at most rateShare of the relay's limit per window (the relay
    // drops the excess): a flush after a resume never trips it.
    _pump() {
      if (this._pumpTimer !== null || this._phase !== "live" || this._goingDown()) return;
      const o = this._options;
      const budget = Math.max(1, Math.floor(o.rateLimit * o.rateShare));
      while (this._queue.length) {
        const now = performance.now();
        while (this._sentAt.length && this._sentAt[0] <= now - o.rateWindow) this._sentAt.shift();
        const recent = this._sentAt.length;
        if (recent >= budget) {
          const wait = this._sentAt[recent - budget] + o.rateWindow - now + 1;
          this._pumpTimer = setTimeout(() => { this._pumpTimer = null; this._pump(); }, wait);
          return;
        }
        const data = this._queue.shift();
        this._queuedBytes -= byteLength(data);
        this._sendNow(data);
      }
    }
  }

  for (const [name, value] of [["CONNECTING", CONNECTING], ["OPEN", OPEN], ["CLOSING", CLOSING], ["CLOSED", CLOSED]]) {
    Object.defineProperty(IWRelaySocket, name, { value, enumerable: true });
    Object.defineProperty(IWRelaySocket.prototype, name, { value, enumerable: true });
  }
  for (const type of ["open", "message", "close", "error"]) {
    Object.defineProperty(IWRelaySocket.prototype, "on" + type, {
      get() { return this._handlers[type] || null; },
      set(handler) {
        if (!(type in this._handlers)) {
          // As in the DOM: the handler runs where it was first assigned among listeners.
          this.addEventListener(type, (event) => {
            const current = this._handlers[type];
            if (typeof current === "function") current.call(this, event);
          });
        }
        this._handlers[type] = typeof handler === "function" ? handler : null;
      },
      enumerable: true,
    });
  }

  global.IWRelaySocket = IWRelaySocket;
})(typeof globalThis !== "undefined" ? globalThis : window);
