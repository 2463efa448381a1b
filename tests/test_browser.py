"""The demo page and livecomments.js in a real browser, and a bare
``EventSource`` as a new user writes it: headless Chromium driven by
selenium, against a real waitress server.

Uses the system's chromium and chromedriver only (selenium never downloads
a browser). Without them the tests are skipped with the reason shown,
except under ``CI=true``, where that fails them.
"""

from __future__ import annotations

import threading
import time

import pytest
from components import BUFFERING, nginx, require_program
from conftest import make_settings
from test_hold import AUTHOR, CONTENT, post_comment, request

from service.app import create_app
from service.serve.server import waitress_options

pytestmark = pytest.mark.slow

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--window-size=900,700"]
DEMO = f"/demo/{CONTENT}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = require_program("chromium")
    driver_path = require_program("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def pages(browser):
    """``pages(url)``: the url in a window of its own; windows closed after the test."""
    first = browser.current_window_handle
    opened = []

    def open_(url):
        if opened:
            browser.switch_to.new_window("window")
        browser.get(url)
        opened.append(Page(browser, browser.current_window_handle))
        return opened[-1]

    yield open_
    for page in opened[1:]:
        browser.switch_to.window(page.handle)
        browser.close()
    browser.switch_to.window(first)
    browser.get("about:blank")  # stops the first page's requests


class Page:
    """One window showing the demo page."""

    def __init__(self, driver, handle):
        self.driver = driver
        self.handle = handle

    def run(self, script, *args):
        self.driver.switch_to.window(self.handle)
        return self.driver.execute_script(script, *args)

    def comments(self):
        """[(comment id, body text)] as shown."""
        return [tuple(item) for item in self.run(
            "return Array.prototype.map.call(document.querySelectorAll('#comments li'),"
            " function (li) { return [Number(li.getAttribute('data-id')),"
            " li.querySelector('.body').textContent]; });")]

    def text(self, element_id):
        return self.run("return document.getElementById(arguments[0]).textContent;", element_id)

    def visible(self, element_id):
        return self.run("var e = document.getElementById(arguments[0]);"
                        " return !!e && e.offsetParent !== null;", element_id)

    def click(self, css):
        """A real click on the element ``css`` selects (so it must be shown)."""
        from selenium.webdriver.common.by import By

        self.driver.switch_to.window(self.handle)
        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def type(self, css, text):
        from selenium.webdriver.common.by import By

        self.driver.switch_to.window(self.handle)
        field = self.driver.find_element(By.CSS_SELECTOR, css)
        field.clear()
        field.send_keys(text)

    def screenshot(self, name):
        """The whole page in /tmp/{name}.png (the window grown to fit, then restored)."""
        self.driver.switch_to.window(self.handle)
        size = self.driver.get_window_size()
        height = self.run("return document.documentElement.scrollHeight;")
        self.driver.set_window_size(size["width"], max(size["height"], height + 140))
        try:
            self.driver.save_screenshot(f"/tmp/{name}.png")
        finally:
            self.driver.set_window_size(size["width"], size["height"])


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def wait_live(page, transport, timeout=10):
    wait_until(lambda: page.text("transport") == transport and page.text("status") == "live",
               timeout, f"the page to be live over {transport}")


def shown_everywhere(pages_, predicate, timeout, what):
    """Wait until ``predicate(comments)`` holds on every page; returns the seconds it took."""
    started = time.monotonic()
    for page in pages_:
        wait_until(lambda p=page: predicate(p.comments()), timeout, f"{what} on every page")
    return time.monotonic() - started


def assert_no_duplicates(page):
    ids = [comment_id for comment_id, _ in page.comments()]
    assert len(ids) == len(set(ids)), f"a comment is shown twice: {ids}"


@pytest.fixture
def serve(make_store, sqlite_url):
    """``serve(port=0, wrap=None, **settings)``: (app, server) on a real
    waitress server over this test's SQLite file; a given port is reused (a
    restart). ``wrap(app)``, if given, is served in front of the app."""
    from conftest import Server

    running = []

    def start(port=0, wrap=None, **overrides):
        app = create_app(make_settings(sqlite_url, **overrides), store=make_store(sqlite_url))
        served = wrap(app) if wrap else app
        options = waitress_options(app.settings)
        for name in ("host", "port", "ident"):
            options.pop(name)
        server = Server.create(served, port=port, **options) if port else Server.create(
            served, **options)
        running.append((app, server))
        return app, server

    yield start
    for app, server in running:
        app.close()
        server.shutdown()


#: A page whose only client is a bare EventSource: what a new user writes
#: first. ``log`` collects what it was handed.
PLAIN_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>A plain EventSource</title>
<script>
var id = %d, log = [];
var es = new EventSource("/contents/" + id + "/comments/stream");
es.onmessage = function (e) {
  var c = JSON.parse(e.data);
  log.push(c.deleted ? "deleted " + c.id : c.body);
};
es.addEventListener("reset", function (e) { log.push("reset " + JSON.parse(e.data).cursor); });
</script>
"""


class PlainPage:
    """In front of the app: ``/plain/{id}`` serves :data:`PLAIN_PAGE` from
    the app's origin; while :attr:`gate` is clear, stream requests wait
    before reaching the app (a browser reconnecting, held back)."""

    def __init__(self, app):
        self.app = app
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()  # a stream request is waiting at the gate
        self.last_event_ids = []       # each stream request's Last-Event-ID

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/plain/"):
            page = PLAIN_PAGE % int(path.rpartition("/")[2])
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [page.encode()]
        if path.endswith("/comments/stream"):
            self.last_event_ids.append(environ.get("HTTP_LAST_EVENT_ID"))
            if not self.gate.is_set():
                self.held.set()
                self.gate.wait(30)
        return self.app(environ, start_response)


# -- the tests -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_two_pages_show_posts_deletions_and_bodies_as_text(serve, pages, token, transport,
                                                           signer):
    app, server = serve(poll_interval=0.2)
    port = server.adj.port
    url = f"http://127.0.0.1:{port}{DEMO}?transport={transport}"
    first, second = pages(url), pages(url)
    for page in (first, second):
        wait_live(page, transport)
    if transport == "sse":
        assert app.hub.budget.streams == 2

    comment = post_comment(port, token(AUTHOR), "hello from the API")
    took = shown_everywhere((first, second),
                            lambda shown: (comment["id"], "hello from the API") in shown,
                            2, "the posted comment")
    print(f"\nMEASURED {transport}: shown on both pages {took:.2f} s after the POST answered")

    # A body that is HTML shows as text and runs nothing.
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    attack = post_comment(port, token(AUTHOR), evil)
    shown_everywhere((first, second), lambda shown: (attack["id"], evil) in shown, 2,
                     "the HTML body, as text")
    for page in (first, second):
        assert page.run("return document.querySelectorAll('#comments img, #comments script')"
                        ".length;") == 0
        assert page.run("return window.pwned;") is None

    # Posting through the form of one page shows in the other.
    first.run("document.getElementById('token').value = arguments[0];"
              "document.getElementById('body').value = 'from the form';"
              "document.querySelector('#post button').click();",
              signer.mint(AUTHOR + 1, "user", 600))
    shown_everywhere((first, second),
                     lambda shown: any(body == "from the form" for _, body in shown), 2,
                     "the comment posted through the form")

    status, _ = request(port, "DELETE", f"/contents/{CONTENT}/comments/{comment['id']}",
                        headers={"Authorization": token(AUTHOR)})
    assert status == 204
    shown_everywhere((first, second),
                     lambda shown: all(cid != comment["id"] for cid, _ in shown), 2,
                     "the deleted comment to disappear")
    for page in (first, second):
        assert_no_duplicates(page)
        assert len(page.comments()) == 2
        assert page.text("transport") == transport  # never fell back


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_page_catches_up_after_a_server_restart(serve, pages, make_store, sqlite_url, token,
                                                transport):
    app, server = serve(poll_interval=0.2)
    port = server.adj.port
    before = post_comment(port, token(AUTHOR), "before the restart")
    page = pages(f"http://127.0.0.1:{port}{DEMO}?transport={transport}")
    wait_live(page, transport)
    wait_until(lambda: page.comments() == [(before["id"], "before the restart")], 5,
               "the first comment")

    app.close()  # what SIGTERM does: answer held viewers, end streams
    server.shutdown()
    other = make_store(sqlite_url)
    missed = [other.add_comment(CONTENT, 9, f"while down {n}") for n in range(3)]
    time.sleep(1)  # the page retries against a closed port meanwhile
    app, server = serve(port=port, poll_interval=0.2)
    after = post_comment(port, token(AUTHOR), "after the restart")

    expected = [(before["id"], "before the restart")]
    expected += [(c.id, c.body) for c in missed] + [(after["id"], "after the restart")]
    wait_until(lambda: page.comments() == expected, 20, "the page to catch up")
    assert_no_duplicates(page)
    # A stream resumes by itself: the browser reconnects with Last-Event-ID.
    assert page.text("transport") == transport


def test_streams_that_end_resume_without_loss_or_repeats(serve, pages, token):
    app, server = serve(poll_interval=0.2, sse_max_duration=1.5)
    port = server.adj.port
    page = pages(f"http://127.0.0.1:{port}{DEMO}?transport=sse")
    wait_live(page, "sse")
    posted = []
    for n in range(16):  # across three or four streams, and the gaps between them
        posted.append(post_comment(port, token(AUTHOR), f"comment {n}"))
        time.sleep(0.3)
    expected = [(c["id"], c["body"]) for c in posted]
    wait_until(lambda: page.comments() == expected, 10, "every comment, once, in order")
    assert page.text("transport") == "sse"


def test_a_buffering_proxy_makes_the_page_fall_back_to_long_polling(serve, pages, token,
                                                                    tmp_path):
    # A short keep-alive window for the page; short streams so the one the
    # proxy sits on does not outlive the test.
    app, server = serve(poll_interval=0.2, sse_keepalive=2, sse_max_duration=6)
    with nginx(tmp_path, server.adj.port, BUFFERING) as proxy_port:
        page = pages(f"http://127.0.0.1:{proxy_port}{DEMO}?transport=sse&keepalive_ms=2000")
        wait_until(lambda: page.text("transport") == "sse", 10, "the page to try streaming")
        wait_live(page, "poll", timeout=10)
        comment = post_comment(server.adj.port, token(AUTHOR), "through a buffering proxy")
        took = shown_everywhere([page], lambda shown: (comment["id"], comment["body"]) in shown,
                                2, "the comment, long-polled")
        print(f"\nMEASURED fallback: shown {took:.2f} s after the POST through the proxy")
        assert_no_duplicates(page)


def test_a_plain_eventsource_gets_comments_tombstones_and_a_named_reset(serve, pages, token):
    """The five lines a new user writes first, plus a reset listener: every
    change reaches ``onmessage``; a reset reaches its listener only."""
    # Short streams: the browser reconnects (after retry: 2000) every few
    # seconds, with Last-Event-ID. Three changes behind is a reset.
    fronts = []
    app, server = serve(wrap=lambda app: fronts.append(PlainPage(app)) or fronts[0],
                        poll_interval=0.2, sse_max_duration=3, reset_after=3)
    port, (front,) = server.adj.port, fronts
    page = pages(f"http://127.0.0.1:{port}/plain/{CONTENT}")

    def log():
        return page.run("return log;")

    wait_until(lambda: page.run("return es.readyState;") == 1, 10, "the stream to open")
    first = post_comment(port, token(AUTHOR), "first")
    second = post_comment(port, token(AUTHOR), "second <b>as text</b>")
    wait_until(lambda: log() == ["first", "second <b>as text</b>"], 5, "the comments")

    status, _ = request(port, "DELETE", f"/contents/{CONTENT}/comments/{first['id']}",
                        headers={"Authorization": token(AUTHOR)})
    assert status == 204
    changes = ["first", "second <b>as text</b>", f"deleted {first['id']}"]
    wait_until(lambda: log() == changes, 5, "the tombstone")

    # The page falls behind: its next reconnection waits at the gate while
    # more changes than reset_after are written.
    front.gate.clear()
    try:
        assert front.held.wait(3 + 2 + 5), "the browser did not reconnect"
        # It resumes from the tombstone (the keep-alives carry the same cursor).
        assert front.last_event_ids[-1] == str(second["seq"] + 1)
        missed = [post_comment(port, token(AUTHOR), f"missed {n}") for n in range(4)]
    finally:
        front.gate.set()
    reset = f"reset {missed[-1]['seq']}"
    wait_until(lambda: log() == [*changes, reset], 5, "the reset, as a named event only")

    after = post_comment(port, token(AUTHOR), "after the reset")
    wait_until(lambda: log() == [*changes, reset, "after the reset"], 5,
               "a comment after the reset")
    assert after["seq"] == missed[-1]["seq"] + 1


def mint_in_page(page, author_id, role):
    """Use the page's "who am I" panel (development mode) to become ``author_id``."""
    wait_until(lambda: page.visible("whoami"), 5, "the who-am-I panel")
    page.type("#whoami-author", str(author_id))
    page.run("document.getElementById('whoami-role').value = arguments[0];", role)
    page.click("#whoami-mint")
    wait_until(lambda: page.text("identity") == f"posting as author {author_id} ({role})", 5,
               "the minted identity")


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_a_moderator_page_bans_slows_pins_and_closes_for_a_viewer(serve, pages, token,
                                                                  transport):
    """In development mode: a moderator's page (a token from its who-am-I
    panel) bans a user and retracts their comments, sets slow mode, pins a
    comment and closes the chat; a viewer's page shows each at once.
    Replies show under their parent, bodies and excerpts as text."""
    # A closed chat is polled every closed_poll_after_ms: short, to see it reopen.
    app, server = serve(poll_interval=0.2, dev=True, closed_poll_after_ms=1500)
    port = server.adj.port
    url = f"http://127.0.0.1:{port}{DEMO}?transport={transport}"
    viewer, moderator = pages(url), pages(url)
    for page in (viewer, moderator):
        wait_live(page, transport)
    assert not viewer.visible("moderation")
    mint_in_page(moderator, 100, "moderator")
    wait_until(lambda: moderator.visible("moderation"), 5, "the moderator's controls")

    evil = "<img src=x onerror=\"window.pwned=1\"> kept"
    other = post_comment(port, token(AUTHOR + 1), evil)
    spam = [post_comment(port, token(AUTHOR), f"spam {n}") for n in range(3)]
    expected = [(other["id"], evil)] + [(c["id"], c["body"]) for c in spam]
    shown_everywhere((viewer, moderator), lambda shown: shown == expected, 5, "the comments")

    # A reply, through the moderator's page: under its parent, indented, with its context.
    moderator.click(f'#comments li[data-id="{other["id"]}"] [data-action="reply"]')
    assert moderator.text("replying-to").startswith(f"replying to #{other['id']}")
    moderator.type("#body", "a reply <b>as text</b>")
    moderator.click("#post button[type=submit]")
    wait_until(lambda: len(viewer.comments()) == 5, 5, "the reply")
    reply_id, reply_body = viewer.comments()[1]
    assert reply_body == "a reply <b>as text</b>"
    reply = f'#comments li[data-id="{reply_id}"]'
    assert viewer.run(f"return document.querySelector('{reply}').className;") == "reply depth-1"
    assert viewer.run(f"return document.querySelector('{reply} .context').textContent;") == (
        f"↳ reply to #{other['id']} (author {AUTHOR + 1}: {evil})")
    assert not moderator.visible("replying")
    moderator.screenshot(f"demo-moderator-{transport}")
    viewer.screenshot(f"demo-viewer-before-{transport}")

    # Ban and retract: the user's three comments disappear from the viewer's page.
    moderator.click(f'#comments li[data-id="{spam[1]["id"]}"] [data-action="ban-retract"]')
    shown_everywhere((viewer, moderator),
                     lambda shown: [cid for cid, _ in shown] == [other["id"], reply_id], 5,
                     "the retracted comments to disappear")
    wait_until(lambda: "3 comment(s) retracted" in moderator.text("moderation-status"), 5,
               "the ban's answer")
    wait_until(lambda: f"author {AUTHOR} — for good" in moderator.text("bans"), 5,
               "the ban in the list")
    status, refused = request(port, "POST", f"/contents/{CONTENT}/comments",
                              body={"body": "again"}, headers={"Authorization": token(AUTHOR)})
    assert (status, refused["code"]) == (403, "banned")

    # Slow mode: a banner on the viewer's page.
    moderator.type("#slow-seconds", "30")
    moderator.click("#slow-set")
    wait_until(lambda: viewer.visible("banner-slow"), 5, "the slow-mode banner")
    assert viewer.text("banner-slow") == "slow mode: one comment every 30 s"

    # Pin: the comment on top of the viewer's page, as text.
    moderator.click(f'#comments li[data-id="{other["id"]}"] [data-action="pin"]')
    wait_until(lambda: viewer.visible("pinned"), 5, "the pinned comment")
    assert viewer.run("return document.getElementById('pinned-comment')"
                      ".querySelector('.body').textContent;") == evil
    assert viewer.run("var p = document.getElementById('pinned').getBoundingClientRect();"
                      " var c = document.getElementById('comments').getBoundingClientRect();"
                      " return p.bottom <= c.top;")
    viewer.screenshot(f"demo-viewer-pinned-{transport}")

    # Close: the viewer's page says the chat has ended, and takes no comment.
    moderator.click("#room-close")
    wait_until(lambda: viewer.visible("banner-closed"), 5, "the closed banner")
    assert viewer.text("banner-closed") == "this chat has ended"
    assert viewer.run("return document.getElementById('body').disabled;")
    assert not viewer.visible("banner-slow")
    assert moderator.text("room-close") == "Reopen chat"
    viewer.screenshot(f"demo-viewer-closed-{transport}")
    moderator.screenshot(f"demo-moderator-closed-{transport}")

    # Reopen: the moderator's page at once, the viewer's at its next (rare) poll.
    moderator.click("#room-close")
    for page in (moderator, viewer):
        wait_until(lambda p=page: not p.visible("banner-closed"), 5, "the chat reopened")
    assert not viewer.run("return document.getElementById('body').disabled;")
    assert viewer.visible("banner-slow") and viewer.visible("pinned")
    for page in (viewer, moderator):
        assert page.run("return document.querySelectorAll('img').length;") == 0
        assert page.run("return window.pwned;") is None
        assert_no_duplicates(page)
        assert [cid for cid, _ in page.comments()] == [other["id"], reply_id]


def test_without_development_mode_the_page_has_no_who_am_i_panel(serve, pages):
    app, server = serve(poll_interval=0.2)
    page = pages(f"http://127.0.0.1:{server.adj.port}{DEMO}?transport=poll")
    wait_live(page, "poll")
    wait_until(lambda: page.run("return window.demoDevMode;") is False, 5, "the probe's 404")
    assert not page.visible("whoami") and not page.visible("moderation")
    assert page.text("identity").startswith("no token")
