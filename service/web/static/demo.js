/*
 * The demo page: one content's live comments, replies under their parent,
 * the room (slow mode, closed, the pinned comment), a form to post and, for
 * a moderator's token, the moderation actions.
 *
 * Everything shown is text (createTextNode / textContent), never HTML:
 * bodies and excerpts may contain markup, and it must stay inert.
 * Query parameters: transport=poll|sse (default sse where the browser has
 * EventSource), keepalive_ms (the server's sse_keepalive, in ms), and
 * contents=1,2,3: instead of one content's panel, several contents' comments
 * (demo-many.js, which takes its helpers from this file).
 * In development mode (the server has POST /dev/tokens) a "who am I" panel
 * mints a token for any author id and role.
 */
(function () {
  'use strict';

  var MAX_INDENT = 4;           // deeper replies are indented as the fourth level
  var BAN_MINUTES = 10;         // the "ban 10 min" action
  var TOKEN_KEY = 'livecomments-token';

  // -- small helpers ------------------------------------------------------

  function byId(id) {
    return document.getElementById(id);
  }

  function param(name) {
    var match = new RegExp('[?&]' + name + '=([^&#]*)').exec(window.location.search);
    return match ? decodeURIComponent(match[1]) : null;
  }

  function setText(element, text) {
    while (element.firstChild) {
      element.removeChild(element.firstChild);
    }
    element.appendChild(document.createTextNode(text));
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.appendChild(document.createTextNode(String(text)));
    }
    return node;
  }

  function show(node, visible) {
    if (visible) {
      node.removeAttribute('hidden');
    } else {
      node.setAttribute('hidden', '');
    }
  }

  function emptyOut(node) {
    while (node.firstChild) {
      node.removeChild(node.firstChild);
    }
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return null;
    }
  }

  function stored(storage) {
    try {
      return window[storage].getItem(TOKEN_KEY) || '';
    } catch (e) {
      return '';  // storage refused (private mode)
    }
  }

  function store(value) {
    var names = ['sessionStorage', 'localStorage'];
    for (var i = 0; i < names.length; i++) {
      try {
        window[names[i]].setItem(TOKEN_KEY, value);
      } catch (e) {
        // Storage refused (private mode): the token is simply not kept.
      }
    }
  }

  /* An HTTP request with a JSON body (or none); callback(error, answer, xhr).
     error: the service's error document plus its status (no code when the
     network failed), or null for a 2xx. */
  function request(method, url, document_, token, callback) {
    var xhr = new XMLHttpRequest();
    xhr.onreadystatechange = function () {
      if (xhr.readyState !== 4) {
        return;
      }
      var answer = xhr.responseText ? parse(xhr.responseText) : null;
      if (xhr.status >= 200 && xhr.status < 300) {
        callback(null, answer, xhr);
      } else {
        var error = {status: xhr.status, title: 'Network error', description: ''};
        if (answer && typeof answer === 'object') {
          for (var key in answer) {
            if (Object.prototype.hasOwnProperty.call(answer, key)) {
              error[key] = answer[key];
            }
          }
        }
        callback(error, null, xhr);
      }
    };
    xhr.open(method, url, true);
    if (token) {
      xhr.setRequestHeader('Authorization', 'Bearer ' + token);
    }
    if (document_ !== null) {
      xhr.setRequestHeader('Content-Type', 'application/json');
      xhr.send(JSON.stringify(document_));
    } else {
      xhr.send(null);
    }
    return xhr;
  }

  function keepaliveOption(options) {
    var keepalive = parseInt(param('keepalive_ms'), 10);
    if (keepalive > 0) {
      options.keepaliveMs = keepalive;
    }
    return options;
  }

  /* The "switch to" link: this page over the other transport. */
  function switchLink(transport, query) {
    var other = transport === 'sse' ? 'poll' : 'sse';
    var link = byId('switch');
    setText(link, 'switch to ' + other);
    link.href = '?' + query + 'transport=' + other;
  }

  function describe(error) {
    var title = String(error.title);
    var text = title.indexOf(String(error.status)) === 0 ? title : error.status + ' ' + title;
    if (error.description && error.description !== error.title) {
      text += ': ' + error.description;
    }
    if (error.code === 'banned') {
      text += error.until ? ' (until ' + error.until + ')' : ' (for good)';
    }
    return text;
  }

  // What the several-contents view (demo-many.js, loaded next) shares.
  window.LiveCommentsDemo = {
    byId: byId, param: param, element: element, show: show, setText: setText,
    emptyOut: emptyOut, keepaliveOption: keepaliveOption, switchLink: switchLink,
    action: action, commentParts: commentParts
  };
  if (param('contents') !== null) {
    return;  // demo-many.js shows them; the one-content panel stays hidden and idle
  }

  // -- the page's state ---------------------------------------------------

  var path = /^\/demo\/(\d+)/.exec(window.location.pathname);
  var contentId = path ? path[1] : '1';
  var transport = param('transport') || (window.EventSource ? 'sse' : 'poll');
  var base = '/contents/' + contentId;
  var list = byId('comments');
  var items = {};       // comment id -> {item, comment}
  var me = null;        // the token's {author_id, role}, as it claims (not verified here)
  var replyTo = null;   // the comment the next post replies to
  var room = {closed: false, slow_mode_seconds: 0, pinned: null};
  var tokenInput = byId('token');

  setText(byId('content-id'), contentId);

  function token() {
    return tokenInput.value.replace(/^\s+|\s+$/g, '').replace(/^Bearer\s+/i, '');
  }

  /* What a token says of itself: {author_id, role}, or null. Only the page's
     looks depend on it: the service checks the signature on every request. */
  function claimsOf(text) {
    var payload = text.split('.')[0].replace(/-/g, '+').replace(/_/g, '/');
    while (payload.length % 4) {
      payload += '=';
    }
    try {
      var claims = JSON.parse(window.atob(payload));
      if (claims && typeof claims.sub === 'number' && typeof claims.role === 'string') {
        return {author_id: claims.sub, role: claims.role};
      }
    } catch (e) {
      // not a token of ours
    }
    return null;
  }

  function isModerator() {
    return me !== null && me.role === 'moderator';
  }

  // -- comments -----------------------------------------------------------

  function depthOf(item) {
    return parseInt(item.getAttribute('data-depth'), 10) || 0;
  }

  function contextText(parent) {
    if (parent.deleted) {
      return '↳ reply to #' + parent.id + ' (deleted)';
    }
    return '↳ reply to #' + parent.id + ' (author ' + parent.author_id + ': ' +
      (parent.excerpt || '') + ')';
  }

  function action(name, label, className) {
    var button = element('button', 'action' + (className ? ' ' + className : ''), label);
    button.type = 'button';
    button.setAttribute('data-action', name);
    return button;
  }

  /* The parts every shown comment has: who, which, the reply context, the body. */
  function commentParts(node, comment) {
    var head = element('div', 'head');
    head.appendChild(element('span', 'author', 'author ' + comment.author_id));
    head.appendChild(element('span', 'cid', '#' + comment.id));
    node.appendChild(head);
    if (comment.parent) {
      node.appendChild(element('div', 'context', contextText(comment.parent)));
    }
    node.appendChild(element('div', 'body', comment.body));
  }

  function render(comment) {
    var item = element('li');
    item.setAttribute('data-id', String(comment.id));
    item.setAttribute('data-author', String(comment.author_id));
    commentParts(item, comment);
    var actions = element('div', 'actions');
    actions.appendChild(action('reply', 'reply'));
    actions.appendChild(action('delete', 'delete', 'own-or-mod'));
    actions.appendChild(action('ban-retract', 'ban & retract', 'mod-only not-own'));
    actions.appendChild(action('ban-timed', 'ban ' + BAN_MINUTES + ' min', 'mod-only not-own'));
    actions.appendChild(action('pin', 'pin', 'mod-only'));
    item.appendChild(actions);
    markOwn(item);
    return item;
  }

  function markOwn(item) {
    var classes = [];
    if (me !== null && item.getAttribute('data-author') === String(me.author_id)) {
      classes.push('own');
    }
    var depth = depthOf(item);
    if (depth > 0) {
      classes.push('reply', 'depth-' + Math.min(depth, MAX_INDENT));
    }
    item.className = classes.join(' ');
  }

  /* A comment in its place: a reply right after its parent's last
     descendant, one step deeper; anything else at the end. */
  function add(comment) {
    if (items[comment.id]) {
      return;  // shown already
    }
    var item = render(comment);
    var parent = comment.parent_id ? items[comment.parent_id] : null;
    var after = null;
    if (parent) {
      var parentDepth = depthOf(parent.item);
      item.setAttribute('data-depth', String(parentDepth + 1));
      after = parent.item;
      while (after.nextSibling && depthOf(after.nextSibling) > parentDepth) {
        after = after.nextSibling;
      }
    } else {
      item.setAttribute('data-depth', '0');
    }
    markOwn(item);
    list.insertBefore(item, after ? after.nextSibling : null);
    items[comment.id] = {item: item, comment: comment};
  }

  function remove(commentId) {
    var shown = items[commentId];
    if (!shown) {
      return;
    }
    shown.item.parentNode.removeChild(shown.item);
    delete items[commentId];
    // Its replies stay, and say that what they answered is gone.
    for (var id in items) {
      if (Object.prototype.hasOwnProperty.call(items, id) &&
          items[id].comment.parent_id === commentId) {
        var context = items[id].item.querySelector('.context');
        if (context) {
          setText(context, contextText({id: commentId, deleted: true}));
        }
      }
    }
    if (replyTo !== null && replyTo.id === commentId) {
      setReplyTo(null);
    }
  }

  function clear() {
    emptyOut(list);
    items = {};
  }

  // -- the room -----------------------------------------------------------

  function showRoom(newRoom) {
    if (!newRoom) {
      return;
    }
    room = newRoom;
    show(byId('banner-closed'), room.closed);
    var slow = room.slow_mode_seconds || 0;
    show(byId('banner-slow'), slow > 0 && !room.closed);
    setText(byId('banner-slow'), 'slow mode: one comment every ' + slow + ' s');
    var pinned = byId('pinned-comment');
    emptyOut(pinned);
    if (room.pinned && !room.pinned.deleted) {
      pinned.setAttribute('data-id', String(room.pinned.id));
      commentParts(pinned, room.pinned);
    } else {
      pinned.removeAttribute('data-id');
    }
    show(byId('pinned'), !!(room.pinned && !room.pinned.deleted));
    // The form: a closed chat takes no comments.
    byId('body').disabled = room.closed;
    byId('post').querySelector('button[type=submit]').disabled = room.closed;
    // The moderator's controls follow the room.
    var seconds = byId('slow-seconds');
    if (document.activeElement !== seconds) {
      seconds.value = String(slow);
    }
    setText(byId('room-close'), room.closed ? 'Reopen chat' : 'Close chat');
    byId('room-unpin').disabled = !room.pinned;
  }

  // -- who am I -----------------------------------------------------------

  function identityChanged() {
    var text = token();
    me = text ? claimsOf(text) : null;
    var identity = byId('identity');
    if (!text) {
      setText(identity, 'no token: paste one' +
        (byId('whoami').hasAttribute('hidden') ? '' : ' or pick an identity above'));
    } else if (me === null) {
      setText(identity, 'this token does not say who it is');
    } else {
      setText(identity, 'posting as author ' + me.author_id + ' (' + me.role + ')');
    }
    document.body.className = isModerator() ? 'moderator' : '';
    show(byId('moderation'), isModerator());
    for (var id in items) {
      if (Object.prototype.hasOwnProperty.call(items, id)) {
        markOwn(items[id].item);
      }
    }
    if (isModerator()) {
      loadBans();
    }
  }

  function mint() {
    var author = parseInt(byId('whoami-author').value, 10);
    var role = byId('whoami-role').value;
    var status = byId('whoami-status');
    setText(status, 'minting…');
    request('POST', '/dev/tokens', {author_id: author, role: role}, null,
      function (error, answer) {
        if (error) {
          setText(status, describe(error));
          return;
        }
        tokenInput.value = answer.token;
        store(answer.token);
        setText(status, 'you are author ' + answer.author_id + ' (' + answer.role + ')');
        identityChanged();
      });
  }

  /* Development mode shows the panel: the token route exists (405 to a GET)
     only there; elsewhere it is a 404 and the panel stays hidden. */
  function probeDevelopmentMode() {
    request('GET', '/dev/tokens', null, null, function (error) {
      window.demoDevMode = !!(error && error.status === 405);  // for the browser tests
      if (window.demoDevMode) {
        show(byId('whoami'), true);
        if (me !== null) {
          byId('whoami-author').value = String(me.author_id);
          byId('whoami-role').value = me.role;
        }
        identityChanged();
      }
    });
  }

  // -- replying and posting -----------------------------------------------

  function setReplyTo(comment) {
    replyTo = comment;
    show(byId('replying'), comment !== null);
    if (comment !== null) {
      setText(byId('replying-to'), 'replying to #' + comment.id + ' (author ' +
        comment.author_id + ': ' + comment.body.slice(0, 60) + ')');
      byId('body').focus();
    }
  }

  function posted(error) {
    var status = byId('post-status');
    if (error) {
      setText(status, describe(error));
    } else {
      byId('body').value = '';
      setReplyTo(null);
      setText(status, 'posted');
    }
  }

  // -- moderation ---------------------------------------------------------

  function moderated(what) {
    return function (error, answer) {
      setText(byId('moderation-status'), error ? describe(error) : what(answer));
      if (!error) {
        loadBans();
      }
    };
  }

  function ban(authorId, seconds, retract) {
    request('POST', base + '/bans', {author_id: authorId, seconds: seconds, retract: retract},
      token(), moderated(function (answer) {
        var text = 'banned author ' + answer.author_id +
          (answer.until ? ' until ' + answer.until : ' for good');
        return retract ? text + '; ' + answer.retracted + ' comment(s) retracted' : text;
      }));
  }

  function changeRoom(change, what) {
    request('PATCH', base + '/room', change, token(), moderated(function () {
      if (feed.room && feed.room.closed) {
        // The feed of a closed chat asks again only every few minutes: the
        // moderator sees their change now.
        restartFeed();
      }
      return what;
    }));
  }

  function loadBans() {
    if (!isModerator()) {
      return;
    }
    request('GET', base + '/bans', null, token(), function (error, answer) {
      var bans = byId('bans');
      emptyOut(bans);
      if (error) {
        bans.appendChild(element('li', 'meta', describe(error)));
        return;
      }
      if (!answer.bans.length) {
        bans.appendChild(element('li', 'meta', 'none'));
      }
      for (var i = 0; i < answer.bans.length; i++) {
        var entry = answer.bans[i];
        var line = element('li', null, 'author ' + entry.author_id + ' — ' +
          (entry.until ? 'until ' + entry.until : 'for good') +
          (entry.reason ? ' — ' + entry.reason : ''));
        var lift = action('lift', 'lift');
        lift.setAttribute('data-author', String(entry.author_id));
        line.appendChild(lift);
        bans.appendChild(line);
      }
    });
  }

  function commentAction(name, comment) {
    if (name === 'reply') {
      setReplyTo(comment);
    } else if (name === 'delete') {
      request('DELETE', base + '/comments/' + comment.id, null, token(),
        moderated(function () { return 'deleted #' + comment.id; }));
    } else if (name === 'ban-retract') {
      ban(comment.author_id, null, true);
    } else if (name === 'ban-timed') {
      ban(comment.author_id, BAN_MINUTES * 60, false);
    } else if (name === 'pin') {
      changeRoom({pinned_comment_id: comment.id}, 'pinned #' + comment.id);
    }
  }

  // -- wiring -------------------------------------------------------------

  list.onclick = function (event) {
    event = event || window.event;
    var target = event.target || event.srcElement;
    var name = target.getAttribute && target.getAttribute('data-action');
    if (!name) {
      return;
    }
    var item = target;
    while (item && item.nodeName !== 'LI') {
      item = item.parentNode;
    }
    var shown = item && items[item.getAttribute('data-id')];
    if (shown) {
      commentAction(name, shown.comment);
    }
  };

  byId('bans').onclick = function (event) {
    event = event || window.event;
    var target = event.target || event.srcElement;
    if (target.getAttribute && target.getAttribute('data-action') === 'lift') {
      var author = target.getAttribute('data-author');
      request('DELETE', base + '/bans/' + author, null, token(),
        moderated(function () { return 'lifted the ban on author ' + author; }));
    }
  };

  byId('bans-refresh').onclick = loadBans;
  byId('slow-set').onclick = function () {
    var seconds = parseInt(byId('slow-seconds').value, 10) || 0;
    changeRoom({slow_mode_seconds: seconds},
               seconds ? 'slow mode: ' + seconds + ' s' : 'slow mode off');
  };
  byId('room-close').onclick = function () {
    changeRoom({closed: !room.closed}, room.closed ? 'reopened' : 'closed');
  };
  byId('room-unpin').onclick = function () {
    changeRoom({pinned_comment_id: null}, 'unpinned');
  };
  byId('whoami-mint').onclick = mint;
  byId('replying-cancel').onclick = function () {
    setReplyTo(null);
    return false;
  };

  var options = {
    contentId: contentId,
    transport: transport,
    onComment: add,
    onRemove: remove,
    onReset: clear,
    onRoom: showRoom,
    onTransport: function (name) { setText(byId('transport'), name); },
    onStatus: function (status) { setText(byId('status'), status); }
  };
  keepaliveOption(options);
  var feed = window.LiveComments.connect(options);
  window.demoFeed = feed;  // for the curious, and the browser tests

  function restartFeed() {
    feed.close();
    clear();
    feed = window.LiveComments.connect(options);
    window.demoFeed = feed;
  }

  switchLink(transport, '');

  tokenInput.value = stored('sessionStorage') || stored('localStorage');
  tokenInput.oninput = identityChanged;
  tokenInput.onchange = identityChanged;
  showRoom(room);  // until the feed's first page says otherwise
  identityChanged();
  probeDevelopmentMode();

  byId('post').onsubmit = function () {
    var body = byId('body');
    store(token());
    setText(byId('post-status'), 'posting…');
    feed.post(body.value, token(), posted, replyTo === null ? null : replyTo.id);
    return false;
  };
}());
