"""The demo page and livecomments.js in a real browser: headless Chromium
driven by selenium, against a real waitress server.

Uses the system's chromium and chromedriver only (selenium never downloads
a browser). Without them the tests are skipped with the reason shown,
except under ``CI=true``, where that fails them.
"""

from __future__ import annotations

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
    """``serve(port=0, **settings)``: (app, server) on a real waitress server
    over this test's SQLite file; a given port is reused (a restart)."""
    from conftest import Server

    running = []

    def start(port=0, **overrides):
        app = create_app(make_settings(sqlite_url, **overrides), store=make_store(sqlite_url))
        options = waitress_options(app.settings)
        for name in ("host", "port", "ident"):
            options.pop(name)
        server = Server.create(app, port=port, **options) if port else Server.create(
            app, **options)
        running.append((app, server))
        return app, server

    yield start
    for app, server in running:
        app.close()
        server.shutdown()


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
