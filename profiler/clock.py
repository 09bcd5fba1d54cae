"""Time, injected so that logic depending on it can be tested without sleeping."""
import time


class SystemClock:
    def time(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()


class FakeClock:
    def __init__(self, start=1_700_000_000.0):
        self.now = start
        self.mono = 1000.0

    def time(self):
        return self.now

    def monotonic(self):
        return self.mono

    def advance(self, seconds):
        self.now += seconds
        self.mono += seconds
