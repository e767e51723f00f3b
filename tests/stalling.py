"""A file wrapper for the kill-mid-write tests (imported by their subprocess drivers): writes go through until
`after` bytes, then it flushes, prints PARTIAL and sleeps, so the test's kill lands half-way through a write."""
import time


class StallingFile:
    def __init__(self, f, after: int, sleep: float):
        self.f, self.n, self.after, self.sleep = f, 0, after, sleep

    def write(self, b):
        r = self.f.write(b)
        self.n += len(b)
        if self.n > self.after:
            self.f.flush()
            print("PARTIAL", flush=True)
            time.sleep(self.sleep)
        return r

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return self.f.__exit__(*a)
