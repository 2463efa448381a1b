/*
 * The demo page's several-contents view (?contents=1,2,3): each content's
 * comments under its own heading, all followed over one connection with
 * LiveComments.connectMany; a form follows one more, "unfollow" stops one.
 * Loaded after demo.js, whose helpers it takes (window.LiveCommentsDemo);
 * without contents= it does nothing. Everything shown is text, as there.
 */
(function () {
  'use strict';

  var demo = window.LiveCommentsDemo;
  var byId = demo.byId, param = demo.param, element = demo.element, show = demo.show;
  var setText = demo.setText, emptyOut = demo.emptyOut, action = demo.action;
  var keepaliveOption = demo.keepaliveOption, switchLink = demo.switchLink;
  var commentParts = demo.commentParts;

  /* Each content's comments under its own heading, in ascending content
     order, all followed by one LiveComments.connectMany: one request or
     stream for all. The form follows one more; "unfollow" stops one. */
  function followMany(ids) {
    var transport = param('transport') || (window.EventSource ? 'sse' : 'poll');
    var shown = {};  // content id -> {node, list, state, items: {comment id -> li}}
    var container = byId('feeds');
    show(byId('one'), false);
    show(byId('title-one'), false);
    show(byId('title-many'), true);
    show(byId('many'), true);

    function following() {
      var keys = Object.keys(shown);
      keys.sort(function (a, b) { return a - b; });
      return keys;
    }

    function follow(contentId) {
      var key = String(contentId);
      if (shown[key]) {
        return;
      }
      var node = element('section', 'feed');
      node.id = 'content-' + key;
      var heading = element('h2', null, 'Content ' + key);
      var state = element('span', 'room-state');
      var open = element('a', 'open', 'open');
      open.href = '/demo/' + key + '?transport=' + transport;
      var unfollow = action('unfollow', 'unfollow');
      unfollow.setAttribute('data-content', key);
      heading.appendChild(state);
      heading.appendChild(open);
      heading.appendChild(unfollow);
      node.appendChild(heading);
      var list = element('ol', 'comments');
      node.appendChild(list);
      shown[key] = {node: node, list: list, state: state, items: {}};
      var keys = following();
      var next = keys[keys.indexOf(key) + 1];
      container.insertBefore(node, next ? shown[next].node : null);
      switchLink(transport, 'contents=' + keys.join(',') + '&');
    }

    function unfollow(key) {
      if (shown[key]) {
        container.removeChild(shown[key].node);
        delete shown[key];
        switchLink(transport, 'contents=' + following().join(',') + '&');
      }
    }

    function onComment(contentId, comment) {
      var feed = shown[contentId];
      if (feed && !feed.items[comment.id]) {
        var item = element('li');
        item.setAttribute('data-id', String(comment.id));
        commentParts(item, comment);
        feed.list.appendChild(item);
        feed.items[comment.id] = item;
      }
    }

    function onRemove(contentId, commentId) {
      var feed = shown[contentId];
      if (feed && feed.items[commentId]) {
        feed.list.removeChild(feed.items[commentId]);
        delete feed.items[commentId];
      }
    }

    function onReset(contentId) {
      var feed = shown[contentId];
      if (feed) {
        emptyOut(feed.list);
        feed.items = {};
      }
    }

    function onRoom(contentId, room) {
      var feed = shown[contentId];
      if (feed) {
        var slow = room.slow_mode_seconds || 0;
        setText(feed.state, room.closed ? 'ended' : slow ? 'slow mode ' + slow + ' s' : '');
      }
    }

    var keys = [];
    for (var i = 0; i < ids.length; i++) {
      if (/^\d+$/.test(ids[i]) && parseInt(ids[i], 10) > 0) {
        follow(parseInt(ids[i], 10));
        keys.push(parseInt(ids[i], 10));
      }
    }
    var feeds = window.LiveComments.connectMany(keepaliveOption({
      contentIds: keys,
      transport: transport,
      onComment: onComment,
      onRemove: onRemove,
      onReset: onReset,
      onRoom: onRoom,
      onTransport: function (name) { setText(byId('transport'), name); },
      onStatus: function (status) { setText(byId('status'), status); }
    }));
    window.demoFeeds = feeds;  // for the curious, and the browser tests

    byId('follow').onsubmit = function () {
      var id = parseInt(byId('follow-id').value, 10);
      if (id > 0) {
        follow(id);
        feeds.add(id);
        byId('follow-id').value = '';
      }
      return false;
    };
    container.onclick = function (event) {
      event = event || window.event;
      var target = event.target || event.srcElement;
      if (target.getAttribute && target.getAttribute('data-action') === 'unfollow') {
        var key = target.getAttribute('data-content');
        feeds.remove(key);
        unfollow(key);
      }
    };
  }

  var many = param('contents');
  if (many !== null) {
    followMany(many.split(','));
  }
}());
