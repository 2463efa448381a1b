/*
 * The demo page: one content's live comments, and a form to post.
 * Bodies are inserted as text (createTextNode), never as HTML.
 * Query parameters: transport=poll|sse (default sse where the browser has
 * EventSource), keepalive_ms (the server's sse_keepalive, in ms).
 */
(function () {
  'use strict';

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

  var path = /^\/demo\/(\d+)/.exec(window.location.pathname);
  var contentId = path ? path[1] : '1';
  var transport = param('transport') || (window.EventSource ? 'sse' : 'poll');
  var list = byId('comments');
  var items = {};  // comment id -> its list item

  setText(byId('content-id'), contentId);

  function add(comment) {
    var item = document.createElement('li');
    item.setAttribute('data-id', String(comment.id));
    var author = document.createElement('span');
    author.className = 'author';
    author.appendChild(document.createTextNode('#' + comment.author_id));
    var body = document.createElement('span');
    body.className = 'body';
    body.appendChild(document.createTextNode(comment.body));
    item.appendChild(author);
    item.appendChild(body);
    list.appendChild(item);
    items[comment.id] = item;
  }

  function remove(commentId) {
    var item = items[commentId];
    if (item) {
      item.parentNode.removeChild(item);
      delete items[commentId];
    }
  }

  function clear() {
    while (list.firstChild) {
      list.removeChild(list.firstChild);
    }
    items = {};
  }

  var keepalive = parseInt(param('keepalive_ms'), 10);
  var options = {
    contentId: contentId,
    transport: transport,
    onComment: add,
    onRemove: remove,
    onReset: clear,
    onTransport: function (name) { setText(byId('transport'), name); },
    onStatus: function (status) { setText(byId('status'), status); }
  };
  if (keepalive > 0) {
    options.keepaliveMs = keepalive;
  }
  var feed = window.LiveComments.connect(options);
  window.demoFeed = feed;  // for the curious, and the browser tests

  var other = transport === 'sse' ? 'poll' : 'sse';
  var link = byId('switch');
  setText(link, 'switch to ' + other);
  link.href = '?transport=' + other;

  var token = byId('token');
  try {
    token.value = window.localStorage.getItem('livecomments-token') || '';
  } catch (e) {
    token.value = '';  // storage refused (private mode): type it each time
  }

  byId('post').onsubmit = function () {
    var body = byId('body');
    var status = byId('post-status');
    try {
      window.localStorage.setItem('livecomments-token', token.value);
    } catch (e) {
      // Storage refused (private mode): the token is simply not kept.
    }
    setText(status, 'posting…');
    feed.post(body.value, token.value, function (error) {
      if (error) {
        setText(status, error.status + ' ' + error.title + ': ' + error.description);
      } else {
        body.value = '';
        setText(status, 'posted');
      }
    });
    return false;
  };
}());
