"""Posting limit: N posts in any S seconds per author, with an honest Retry-After."""

from __future__ import annotations

import math

from service.ratelimit import RateLimiter


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_allows_limit_then_refuses_with_retry_after():
    """The first N posts go through; the next is refused with whole seconds to wait."""
    clock = Clock()
    limiter = RateLimiter(3, 10, clock=clock)
    for _ in range(3):
        assert limiter.hit("a") == 0
        clock.now += 1
    # Oldest post at 1000, now 1003: it leaves the window at 1010.
    retry = limiter.hit("a")
    assert retry == 7
    assert isinstance(retry, int)


def test_retry_after_matches_when_the_oldest_post_leaves_the_window():
    """Waiting Retry-After seconds is enough; waiting less is not."""
    clock = Clock(0.0)
    limiter = RateLimiter(2, 10, clock=clock)
    assert limiter.hit("a") == 0
    clock.now = 2.4
    assert limiter.hit("a") == 0
    clock.now = 3.7
    retry = limiter.hit("a")
    assert retry == math.ceil(0 + 10 - 3.7) == 7
    clock.now = 9.99  # just before the oldest post leaves the window
    assert limiter.hit("a") >= 1
    clock.now = 3.7 + retry
    assert limiter.hit("a") == 0


def test_retry_after_is_at_least_one_second():
    """A refusal never says Retry-After: 0, even a moment before the window frees."""
    clock = Clock(0.0)
    limiter = RateLimiter(1, 10, clock=clock)
    assert limiter.hit("a") == 0
    clock.now = 9.95
    assert limiter.hit("a") == 1


def test_refused_posts_do_not_extend_the_wait():
    """Hammering while refused does not push the next allowed post further away."""
    clock = Clock(0.0)
    limiter = RateLimiter(2, 10, clock=clock)
    assert limiter.hit("a") == 0
    assert limiter.hit("a") == 0
    for step in range(1, 10):
        clock.now = step
        assert limiter.hit("a") == 10 - step
    clock.now = 10
    assert limiter.hit("a") == 0


def test_keys_are_independent():
    """One author hitting the limit does not slow anyone else down."""
    clock = Clock()
    limiter = RateLimiter(2, 10, clock=clock)
    assert limiter.hit(1) == 0
    assert limiter.hit(1) == 0
    assert limiter.hit(1) > 0
    assert limiter.hit(2) == 0
    assert limiter.hit(2) == 0
    assert limiter.hit(2) > 0
    assert limiter.hit(3) == 0


def test_sliding_window_frees_one_slot_at_a_time():
    """The window slides: each old post that ages out frees exactly one slot."""
    clock = Clock(0.0)
    limiter = RateLimiter(3, 10, clock=clock)
    for now in (0.0, 4.0, 8.0):
        clock.now = now
        assert limiter.hit("a") == 0
    clock.now = 9.0
    assert limiter.hit("a") == 1
    clock.now = 10.0  # the post at 0 has left; the ones at 4 and 8 still count
    assert limiter.hit("a") == 0
    assert limiter.hit("a") == 4
    clock.now = 14.0
    assert limiter.hit("a") == 0
    assert limiter.hit("a") > 0


def test_idle_author_starts_afresh():
    """After a quiet window the full allowance is back."""
    clock = Clock(0.0)
    limiter = RateLimiter(3, 10, clock=clock)
    for _ in range(3):
        assert limiter.hit("a") == 0
    assert limiter.hit("a") > 0
    clock.now = 25.0
    for _ in range(3):
        assert limiter.hit("a") == 0
    assert limiter.hit("a") == 10


def test_fractional_window():
    """A window such as 1/0.5 (one post per half second) works with sub-second clocks."""
    clock = Clock(0.0)
    limiter = RateLimiter(1, 0.5, clock=clock)
    assert limiter.hit("a") == 0
    clock.now = 0.2
    assert limiter.hit("a") == 1
    clock.now = 0.5
    assert limiter.hit("a") == 0
