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
 *
 * Several contents over one connection (one request or one stream for all:
 * GET /comments?feeds=42:17,43:5, /comments/stream?feeds=...), each with
 * its own cursor, applied-once bookkeeping and room; the callbacks get the
 * content id first. Adding or removing a content restarts the request or
 * stream with every other content's cursor; an added content starts with
 * its latest page. The same rules as above, per content; the stream stops
 * only when every content is closed.
 *
 *   var feeds = LiveComments.connectMany({
 *     contentIds: [42, 43],
 *     transport: "sse",
 *     onComment: function (contentId, comment) { ... },
 *     onRemove: function (contentId, commentId) { ... },
 *     onReset: function (contentId) { ... },
 *     onRoom: function (contentId, room) { ... },
 *     onTransport: ..., onStatus: ...          // as above
 *   });
 *   feeds.add(44); feeds.remove(42);
 *   feeds.rooms;                               // {contentId: room} as last received
 *   feeds.post(43, "text", token, callback, parentId);
 *   feeds.close();
 */
(function (root) {
  'use strict';

  var DEFAULTS = {
    url: '',               // the service's base URL; '' is this page's origin
    contentId: null,       // connect: the content
    contentIds: null,      // connectMany: the contents (more with add())
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

  /* A content id as the service writes it (decimal, no leading zeros). */
  function idOf(contentId) {
    var text = String(contentId);
    if (!/^\d+$/.test(text) || !(parseInt(text, 10) > 0)) {
      throw new Error('LiveComments: bad content id ' + text);
    }
    return String(parseInt(text, 10));
  }

  // -- one content: its cursor, what was applied, its room ----------------

  function Feed(contentId, owner) {
    this.contentId = contentId;  // as idOf writes it
    this.owner = owner;
    this.cursor = null;   // every change up to it is applied; null: none yet
    this.applied = {};    // comment id -> seq of its last applied change
    this.room = null;     // the room, as last received
    this.roomText = null; // ... as JSON, to tell a change from a repeat
  }

  Feed.prototype.apply = function (page) {
    if (page.reset) {
      // Too far behind, or the database was replaced: start over.
      this.applied = {};
      this.owner._emit(this, 'onReset', []);
      this.cursor = page.cursor;
    }
    for (var i = 0; i < page.comments.length; i++) {
      this.change(page.comments[i]);
    }
    this.setRoom(page.room);
    this.advance(page.cursor);
  };

  Feed.prototype.advance = function (seq) {
    if (typeof seq === 'number' && !isNaN(seq) && (this.cursor === null || seq > this.cursor)) {
      this.cursor = seq;
    }
  };

  /* The room from a page or an event; onRoom hears of it when it changed. */
  Feed.prototype.setRoom = function (room) {
    if (!room) {
      return;
    }
    var text = JSON.stringify(room);
    if (text !== this.roomText) {
      this.room = room;
      this.roomText = text;
      this.owner._roomChanged(this);
    }
  };

  Feed.prototype.change = function (change) {
    var known = this.applied[change.id];
    if (known !== undefined && known >= change.seq) {
      return;  // applied already (a retry, a reconnection, our own post)
    }
    if (change.deleted) {
      this.applied[change.id] = change.seq;
      if (known !== undefined) {
        this.owner._emit(this, 'onRemove', [change.id, change]);
      }
    } else if (known === undefined) {
      this.applied[change.id] = change.seq;
      this.owner._emit(this, 'onComment', [change]);
    }
  };

  // -- where to ask: one content, or several over one connection ----------

  /* The query a content's feed is asked with: `42:17`, or `42` (its latest page). */
  function feedsParam(connection) {
    var parts = [];
    for (var i = 0; i < connection.ids.length; i++) {
      var feed = connection.feeds[connection.ids[i]];
      parts.push(feed.cursor === null ? feed.contentId : feed.contentId + ':' + feed.cursor);
    }
    return parts.join(',');
  }

  var ONE = {
    pollUrl: function (connection, wait) {
      var feed = connection.feeds[connection.ids[0]];
      var url = ONE.path(connection, feed.contentId) + '?limit=' + connection.options.limit;
      if (feed.cursor !== null) {
        url += '&since=' + feed.cursor + '&wait=' + wait;
      }
      return url;
    },
    streamUrl: function (connection) {
      var feed = connection.feeds[connection.ids[0]];
      return ONE.path(connection, feed.contentId) + '/stream?since=' + feed.cursor;
    },
    pages: function (answer) {
      return answer && answer.comments ? [answer] : null;
    },
    path: function (connection, contentId) {
      return connection.base + '/contents/' + contentId + '/comments';
    }
  };

  var MANY = {
    // Ascending content ids, as the service answers them: the canonical
    // form, which it would otherwise redirect to.
    pollUrl: function (connection, wait) {
      return connection.base + '/comments?feeds=' + feedsParam(connection) +
        '&limit=' + connection.options.limit + '&wait=' + wait;
    },
    streamUrl: function (connection) {
      return connection.base + '/comments/stream?feeds=' + feedsParam(connection);
    },
    pages: function (answer) {
      return answer && answer.feeds ? answer.feeds : null;
    }
  };

  // -- the connection -----------------------------------------------------

  function Connection(options, many) {
    this.options = extend(extend({}, DEFAULTS), options || {});
    this.many = !!many;
    this.route = many ? MANY : ONE;
    this.base = this.options.url.replace(/\/+$/, '');
    this.feeds = {};      // content id -> Feed
    this.ids = [];        // the content ids, ascending
    this.rooms = {};      // content id -> its room, as last received
    this.room = null;     // connect: the content's room, as last received
    var ids = many ? this.options.contentIds || [] : [this.options.contentId];
    if (!many && !this.options.contentId) {
      throw new Error('LiveComments: contentId is required');
    }
    for (var i = 0; i < ids.length; i++) {
      this._addFeed(ids[i]);
    }
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
    this._poll(0);  // the latest pages first, then live changes
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

  /* connectMany: follow one more content, from its latest page. The
     request or stream in flight is restarted with every cursor as it is. */
  Connection.prototype.add = function (contentId) {
    if (this._addFeed(contentId)) {
      this._restart();
    }
    return this;
  };

  /* connectMany: stop following a content; the others go on from their cursors. */
  Connection.prototype.remove = function (contentId) {
    var key = idOf(contentId);
    if (this.feeds[key]) {
      delete this.feeds[key];
      delete this.rooms[key];
      this.ids.splice(this.ids.indexOf(key), 1);
      this._restart();
    }
    return this;
  };

  Connection.prototype._addFeed = function (contentId) {
    var key = idOf(contentId);
    if (this.feeds[key]) {
      return false;
    }
    this.feeds[key] = new Feed(key, this);
    this.ids.push(key);
    this.ids.sort(function (a, b) { return a - b; });
    return true;
  };

  Connection.prototype._restart = function () {
    if (this.closed || (this.timer !== null && this.timerIsBackoff)) {
      return;  // a retry waiting out an error asks with the new set anyway
    }
    this._next(0);
  };

  /* Post a comment (a reply to comment parentId if given); callback(error, comment).
     error: {status, code, title, description} (the service's error document;
     no code when the network failed). connectMany: post(contentId, body, ...). */
  Connection.prototype.post = function (body, token, callback, parentId) {
    var args = Array.prototype.slice.call(arguments);
    var contentId = this.many ? idOf(args.shift()) : this.ids[0];
    this._post(contentId, args[0], args[1], args[2], args[3]);
  };

  Connection.prototype._post = function (contentId, body, token, callback, parentId) {
    var self = this;
    var xhr = new XMLHttpRequest();
    xhr.onreadystatechange = function () {
      if (xhr.readyState !== 4) {
        return;
      }
      var answer = parse(xhr.responseText);
      if (xhr.status === 201 && answer) {
        var feed = self.feeds[contentId];
        if (feed) {
          feed.change(answer);  // shown now; its delivery later is a duplicate
        }
        if (callback) { callback(null, answer); }
      } else if (callback) {
        callback(extend({status: xhr.status, title: 'Network error', description: ''},
                        answer || {}), null);
      }
    };
    xhr.open('POST', ONE.path(this, contentId), true);
    xhr.setRequestHeader('Content-Type', 'application/json');
    xhr.setRequestHeader('Authorization', 'Bearer ' + token);
    var document_ = {body: body};
    if (parentId !== undefined && parentId !== null) {
      document_.parent_id = parentId;
    }
    xhr.send(JSON.stringify(document_));
  };

  // -- applying changes ---------------------------------------------------

  /* A change, a room or a reset: for the content it names (connect: the one). */
  Connection.prototype._feedOf = function (data) {
    return data && (this.many ? this.feeds[data.content_id] : this.feeds[this.ids[0]]);
  };

  /* A stream's event id, or a keep-alive's data: the cursor after it, `17`
     (connect) or `42:17,43:5` (every content's). */
  Connection.prototype._advanceTo = function (cursors) {
    var parts = String(cursors || '').split(',');
    for (var i = 0; i < parts.length; i++) {
      var pair = parts[i].split(':');
      var feed = this.many ? this.feeds[pair[0]] : this.feeds[this.ids[0]];
      if (feed && pair.length === (this.many ? 2 : 1)) {
        feed.advance(parseInt(pair[pair.length - 1], 10));
      }
    }
  };

  /* Calls a handler; connectMany's get the content id first. */
  Connection.prototype._emit = function (feed, name, args) {
    this._call.apply(this, [name].concat(this.many ? [Number(feed.contentId)] : [], args));
  };

  Connection.prototype._roomChanged = function (feed) {
    this.rooms[feed.contentId] = feed.room;
    if (!this.many) {
      this.room = feed.room;
    }
    this._emit(feed, 'onRoom', [feed.room]);
  };

  /* Every content is closed: nothing will be posted, so no stream, no hold. */
  Connection.prototype._isClosed = function () {
    for (var i = 0; i < this.ids.length; i++) {
      var room = this.feeds[this.ids[i]].room;
      if (!(room && room.closed)) {
        return false;
      }
    }
    return this.ids.length > 0;
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
    // A closed content has no stream (204): it is polled, rarely. A content
    // without a cursor gets its latest page first: a stream has no history.
    for (var i = 0; i < this.ids.length; i++) {
      if (this.feeds[this.ids[i]].cursor === null) {
        return false;
      }
    }
    return this.options.transport === 'sse' && typeof root.EventSource !== 'undefined' &&
      !this._hidden() && now() >= this.streamAfter && !this._isClosed();
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
    if (!this.ids.length) {
      this._stop();  // connectMany without contents: nothing to ask until add()
    } else if (this._wantsStream()) {
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
      if (generation === self.generation && self.ids.length) {
        self._get(generation);
      }
    }, delay);
  };

  Connection.prototype._get = function (generation) {
    var self = this;
    // Closed: nothing will be posted, so ask without holding; the answer
    // asks a long pause (poll_after_ms), and a reopening shows after it.
    var url = this.route.pollUrl(this, this._isClosed() ? 0 : this.options.wait);
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
      var answer = status === 200 ? parse(xhr.responseText) : null;
      var pages = self.route.pages(answer);
      if (pages) {
        self.failures = 0;
        self._status('live');
        for (var i = 0; i < pages.length; i++) {
          var feed = self._feedOf(pages[i]);
          if (feed) {
            feed.apply(pages[i]);
          }
        }
        self._next(answer.poll_after_ms || 0);
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
    var source = new root.EventSource(this.route.streamUrl(this));
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

    // Each event's id is the cursor after it (every content's, for many).
    function handler(apply) {
      return function (event) {
        if (current()) {
          var data = parse(event.data);
          var feed = self._feedOf(data);
          if (feed) {
            apply(feed, data);
          }
          self._advanceTo(event.lastEventId);
          alive();
        }
      };
    }

    var onChange = handler(function (feed, change) { feed.change(change); });
    var onRoom = handler(function (feed, data) {
      var room = extend({}, data);
      delete room.content_id;  // many's events name it; the room is as a page has it
      feed.setRoom(room);
    });

    // Comments and tombstones are unnamed events ('message'; the data says
    // which); the room, bans, a reset and the keep-alive are named.
    source.addEventListener('message', onChange, false);
    source.addEventListener('room', onRoom, false);
    source.addEventListener('ban', handler(function () {}), false);
    source.addEventListener('unban', handler(function () {}), false);
    source.addEventListener('closed', function (event) {
      // The content was closed. When every content is, the stream ends:
      // poll them, rarely, from here (a reconnecting EventSource would be
      // answered 204); many others' streams go on.
      if (current()) {
        onRoom(event);
        if (self._isClosed()) {
          self._poll(0);
        }
      }
    }, false);
    source.addEventListener('reset', handler(function (feed, page) { feed.apply(page); }),
                            false);
    source.addEventListener('keepalive', function (event) {
      if (current()) {
        self._advanceTo(event.data);
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
      return new Connection(options, false).start();
    },
    connectMany: function (options) {
      return new Connection(options, true).start();
    },
    Connection: Connection,
    defaults: DEFAULTS
  };
}(this));
