"""What is held, woken and answered: the feed hub, one feed and one poller
per watched content, the pages they answer with, the hold budget. Knows
neither SQL nor HTTP: the store and the clock are handed in."""
