/*
 * livecomments.js: live comments in any browser, no build step.
 *
 * Plain ES5 and XMLHttpRequest, so it runs in old browsers and WebViews.
 * It long-polls the feed with its cursor or, where EventSource exists and
 * the page asks for it (transport: "sse"), streams, falling back to
 * long-polling when the stream fails or goes quiet (a buffering proxy).
 * Every change is applied once: a comment is shown once, by id, and a
 * change older than what was applied for its comment is ignored, so gaps,
 * retries and transport switches never duplicate or lose a comment.
 * The content's room (closed, slow mode, pinned comment) comes with every
 * page and stream: onRoom gets it whenever it changes. While the content is
 * closed the client asks without holding, once per poll_after_ms (minutes),
 * and never streams; a stream that closes it ends and long-polling takes over.
 *
 *   var feed = LiveComments.connect({
 *     contentId: 42,
 *     transport: "sse",                        // or "poll" (the default)
 *     onComment: function (comment) { ... },   // insert comment.body as text
 *     onRemove: function (commentId) { ... },  // a tombstone
 *     onReset: function () { ... },            // clear; comments follow
 *     onRoom: function (room) { ... },         // {closed, slow_mode_seconds, pinned}
 *     onTransport: function (name) { ... },    // "poll" or "sse"
 *     onStatus: function (status) { ... }      // "live", "retrying", "closed"
 *   });
 *   feed.room;                                 // the room as last received, or null
 *   feed.post("text", token, function (error, comment) { ... });
 *   feed.post("a reply", token, callback, parentId);  // a reply to comment parentId
 *   feed.close();
 */
(function (root) {
  'use strict';

  var DEFAULTS = {
    url: '',               // the service's base URL; '' is this page's origin
    contentId: null,
    transport: 'poll',     // 'poll' or 'sse'
    limit: 50,             // comments on the first page
    wait: 20,              // seconds a long-poll may be held
    keepaliveMs: 15000,    // the server's keep-alive interval on streams
    hiddenPauseMs: 10000,  // pause between polls while the page is hidden
    backoffMinMs: 1000,    // first pause after an error; doubles with jitter
    backoffMaxMs: 30000,
    streamRetryMs: 300000, // after a failed stream, poll this long first
    onComment: null,
    onRemove: null,
    onReset: null,
    onRoom: null,
    onTransport: null,
    onStatus: null
  };
  var CLOSED = 2;  // EventSource.CLOSED

  function extend(target, source) {
    for (var key in source) {
      if (Object.prototype.hasOwnProperty.call(source, key)) {
        target[key] = source[key];
      }
    }
    return target;
  }

  function listen(target, name, handler) {
    if (target.addEventListener) {
      target.addEventListener(name, handler, false);
    } else if (target.attachEvent) {
      target.attachEvent('on' + name, handler);
    }
  }

  function unlisten(target, name, handler) {
    if (target.removeEventListener) {
      target.removeEventListener(name, handler, false);
    } else if (target.detachEvent) {
      target.detachEvent('on' + name, handler);
    }
  }

  function now() {
    return new Date().getTime();
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return null;
    }
  }

  function Connection(options) {
    this.options = extend(extend({}, DEFAULTS), options || {});
    if (!this.options.contentId) {
      throw new Error('LiveComments: contentId is required');
    }
    this.base = this.options.url.replace(/\/+$/, '') +
      '/contents/' + encodeURIComponent(this.options.contentId) + '/comments';
    this.cursor = null;   // the feed's cursor: every change up to it is applied
    this.applied = {};    // comment id -> seq of its last applied change
    this.room = null;     // the content's room, as last received
    this.roomText = null; // ... as JSON, to tell a change from a repeat
    this.transport = null;
    this.generation = 0;  // bumped on every switch: late callbacks are ignored
    this.failures = 0;
    this.timer = null;
    this.timerIsBackoff = false;
    this.xhr = null;
    this.source = null;
    this.watchdog = null;
    this.streamAfter = 0; // no stream before this time (ms)
    this.closed = false;
    var self = this;
    this._onVisibility = function () { self._visibilityChanged(); };
    this._onOnline = function () { self._online(); };
  }

  Connection.prototype.start = function () {
    if (typeof document !== 'undefined') {
      listen(document, 'visibilitychange', this._onVisibility);
    }
    listen(root, 'online', this._onOnline);
    this._poll(0);  // the latest page first, then live changes
    return this;
  };

  Connection.prototype.close = function () {
    this.closed = true;
    this._stop();
    if (typeof document !== 'undefined') {
      unlisten(document, 'visibilitychange', this._onVisibility);
    }
    unlisten(root, 'online', this._onOnline);
    this._status('closed');
  };

  /* Post a comment (a reply to comment parentId if given); callback(error, comment).
     error: {status, code, title, description} (the service's error document;
     no code when the network failed). */
  Connection.prototype.post = function (body, token, callback, parentId) {
    var self = this;
    var xhr = new XMLHttpRequest();
    xhr.onreadystatechange = function () {
      if (xhr.readyState !== 4) {
        return;
      }
      var answer = parse(xhr.responseText);
      if (xhr.status === 201 && answer) {
        self._change(answer);  // shown now; its delivery later is a duplicate
        if (callback) { callback(null, answer); }
      } else if (callback) {
        callback(extend({status: xhr.status, title: 'Network error', description: ''},
                        answer || {}), null);
      }
    };
    xhr.open('POST', this.base, true);
    xhr.setRequestHeader('Content-Type', 'application/json');
    xhr.setRequestHeader('Authorization', 'Bearer ' + token);
    var document_ = {body: body};
    if (parentId !== undefined && parentId !== null) {
      document_.parent_id = parentId;
    }
    xhr.send(JSON.stringify(document_));
  };

  // -- applying changes ---------------------------------------------------

  Connection.prototype._apply = function (page) {
    if (page.reset) {
      // Too far behind, or the database was replaced: start over.
      this.applied = {};
      this._call('onReset');
      this.cursor = page.cursor;
    }
    for (var i = 0; i < page.comments.length; i++) {
      this._change(page.comments[i]);
    }
    this._setRoom(page.room);
    this._advance(page.cursor);
  };

  Connection.prototype._advance = function (seq) {
    if (typeof seq === 'number' && (this.cursor === null || seq > this.cursor)) {
      this.cursor = seq;
    }
  };

  /* The room from a page or an event; onRoom hears of it when it changed. */
  Connection.prototype._setRoom = function (room) {
    if (!room) {
      return;
    }
    var text = JSON.stringify(room);
    if (text !== this.roomText) {
      this.room = room;
      this.roomText = text;
      this._call('onRoom', room);
    }
  };

  Connection.prototype._isClosed = function () {
    return !!(this.room && this.room.closed);
  };

  Connection.prototype._change = function (change) {
    var known = this.applied[change.id];
    if (known !== undefined && known >= change.seq) {
      return;  // applied already (a retry, a reconnection, our own post)
    }
    if (change.deleted) {
      this.applied[change.id] = change.seq;
      if (known !== undefined) {
        this._call('onRemove', change.id, change);
      }
    } else if (known === undefined) {
      this.applied[change.id] = change.seq;
      this._call('onComment', change);
    }
  };

  Connection.prototype._call = function (name) {
    var handler = this.options[name];
    if (handler) {
      handler.apply(null, Array.prototype.slice.call(arguments, 1));
    }
  };

  Connection.prototype._status = function (status) {
    this._call('onStatus', status);
  };

  Connection.prototype._setTransport = function (name) {
    if (this.transport !== name) {
      this.transport = name;
      this._call('onTransport', name);
    }
  };

  // -- scheduling ---------------------------------------------------------

  Connection.prototype._hidden = function () {
    return typeof document !== 'undefined' && document.visibilityState === 'hidden';
  };

  Connection.prototype._wantsStream = function () {
    // A closed content has no stream (204): it is polled, rarely.
    return this.options.transport === 'sse' && typeof root.EventSource !== 'undefined' &&
      this.cursor !== null && !this._hidden() && now() >= this.streamAfter &&
      !this._isClosed();
  };

  /* Stop whatever runs now: its late callbacks are ignored. */
  Connection.prototype._stop = function () {
    this.generation++;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.xhr !== null) {
      var xhr = this.xhr;
      this.xhr = null;
      xhr.abort();
    }
    this._closeStream();
  };

  Connection.prototype._next = function (delay) {
    if (this.closed) {
      return;
    }
    if (this._wantsStream()) {
      this._stream();
    } else {
      this._poll(this._hidden() ? Math.max(delay, this.options.hiddenPauseMs) : delay);
    }
  };

  Connection.prototype._visibilityChanged = function () {
    if (this.closed) {
      return;
    }
    if (this._hidden()) {
      if (this.transport === 'sse') {
        this._poll(this.options.hiddenPauseMs);  // a hidden page needs no stream
      }
    } else if (this._wantsStream()) {
      this._stream();
    } else if (this.timer !== null && !this.timerIsBackoff && !this._isClosed()) {
      this._poll(0);  // cut a hidden-page pause short (not a closed content's)
    }
  };

  Connection.prototype._online = function () {
    if (!this.closed && this.timer !== null && this.timerIsBackoff) {
      this._poll(0);  // back on the network: retry now
    }
  };

  Connection.prototype._failed = function (retryAfterSeconds) {
    this.failures++;
    var ceiling = Math.min(this.options.backoffMaxMs,
                           this.options.backoffMinMs * Math.pow(2, this.failures - 1));
    // Jitter: a thousand clients cut off together must not return together.
    var delay = ceiling / 2 + Math.random() * ceiling / 2;
    if (retryAfterSeconds > 0) {
      delay = Math.max(delay, retryAfterSeconds * 1000);
    }
    this._status('retrying');
    this._poll(delay, true);
  };

  // -- long-polling -------------------------------------------------------

  Connection.prototype._poll = function (delay, isBackoff) {
    var self = this;
    this._stop();
    var generation = this.generation;
    this._setTransport('poll');
    this.timerIsBackoff = !!isBackoff;
    this.timer = setTimeout(function () {
      self.timer = null;
      if (generation === self.generation) {
        self._get(generation);
      }
    }, delay);
  };

  Connection.prototype._get = function (generation) {
    var self = this;
    var url = this.base + '?limit=' + this.options.limit;
    if (this.cursor !== null) {
      // Closed: nothing will be posted, so ask without holding; the answer
      // asks a long pause (poll_after_ms), and a reopening shows after it.
      url += '&since=' + this.cursor + '&wait=' + (this._isClosed() ? 0 : this.options.wait);
    }
    var xhr = new XMLHttpRequest();
    var finished = false;
    // A held request answers within `wait`; past that the network is gone.
    var deadline = setTimeout(function () {
      finish(0);
      xhr.abort();
    }, (this.options.wait + 15) * 1000);

    function finish(status) {
      if (finished) {
        return;
      }
      finished = true;
      clearTimeout(deadline);
      if (generation !== self.generation) {
        return;
      }
      self.xhr = null;
      var page = status === 200 ? parse(xhr.responseText) : null;
      if (page && page.comments) {
        self.failures = 0;
        self._status('live');
        self._apply(page);
        self._next(page.poll_after_ms || 0);
      } else {
        var retryAfter = status ? parseInt(xhr.getResponseHeader('Retry-After'), 10) : 0;
        self._failed(retryAfter || 0);
      }
    }

    xhr.onreadystatechange = function () {
      if (xhr.readyState === 4) {
        finish(xhr.status);
      }
    };
    this.xhr = xhr;
    xhr.open('GET', url, true);
    xhr.send(null);
  };

  // -- streaming ----------------------------------------------------------

  Connection.prototype._stream = function () {
    var self = this;
    this._stop();
    var generation = this.generation;
    var source = new root.EventSource(this.base + '/stream?since=' + this.cursor);
    var flowed = false;
    this.source = source;
    this._setTransport('sse');

    function current() {
      return generation === self.generation;
    }

    function alive() {
      flowed = true;
      self.failures = 0;
      self._status('live');
      self._watch(generation, source, 2 * self.options.keepaliveMs);
    }

    function onChange(event) {
      if (!current()) {
        return;
      }
      var change = parse(event.data);
      if (change) {
        self._change(change);
        self._advance(change.seq);
      }
      alive();
    }

    function onRoom(event) {
      var room = parse(event.data);
      if (current() && room) {
        self._setRoom(room);
        self._advance(parseInt(event.lastEventId, 10));
        alive();
      }
    }

    function onModeration(event) {
      var change = parse(event.data);
      if (current() && change) {
        self._advance(change.seq);
        alive();
      }
    }

    // Comments and tombstones are unnamed events ('message'; the data says
    // which); the room, bans, a reset and the keep-alive are named.
    source.addEventListener('message', onChange, false);
    source.addEventListener('room', onRoom, false);
    source.addEventListener('ban', onModeration, false);
    source.addEventListener('unban', onModeration, false);
    source.addEventListener('closed', function (event) {
      // The content was closed and the stream ends: poll it, rarely, from
      // here (a reconnecting EventSource would be answered 204).
      if (current()) {
        onRoom(event);
        self._poll(0);
      }
    }, false);
    source.addEventListener('reset', function (event) {
      var page = parse(event.data);
      if (current() && page) {
        self._apply(page);
        alive();
      }
    }, false);
    source.addEventListener('keepalive', function () {
      if (current()) {
        alive();
      }
    }, false);
    source.addEventListener('error', function () {
      // CONNECTING: the browser reconnects itself with Last-Event-ID, and
      // the watchdog catches a reconnection that never flows. CLOSED: the
      // server refused (too many streams, or an error page): long-poll.
      if (current() && source.readyState === CLOSED) {
        self._streamFailed(flowed);
      }
    }, false);
    // The server's first chunk carries a keep-alive: a stream silent for a
    // keep-alive window from its start is being buffered on the way.
    this._watch(generation, source, this.options.keepaliveMs);
  };

  Connection.prototype._watch = function (generation, source, timeout) {
    var self = this;
    if (this.watchdog !== null) {
      clearTimeout(this.watchdog);
    }
    this.watchdog = setTimeout(function () {
      self.watchdog = null;
      if (generation === self.generation) {
        self._streamFailed(false);
      }
    }, timeout);
  };

  Connection.prototype._streamFailed = function (flowed) {
    // Nothing is lost: long-polling resumes from the cursor. A stream that
    // had flowed (a server restart, say) may stream again soon; one that
    // never did (a buffering proxy, a refusal) waits streamRetryMs.
    this.streamAfter = now() + (flowed ? this.options.backoffMaxMs : this.options.streamRetryMs);
    this._poll(0);
  };

  Connection.prototype._closeStream = function () {
    if (this.watchdog !== null) {
      clearTimeout(this.watchdog);
      this.watchdog = null;
    }
    if (this.source !== null) {
      this.source.close();
      this.source = null;
    }
  };

  root.LiveComments = {
    connect: function (options) {
      return new Connection(options).start();
    },
    Connection: Connection,
    defaults: DEFAULTS
  };
}(this));
