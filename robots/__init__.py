"""Robot-side clients that talk to a streamprune policy server."""

from robots.client import ClientStats, PolicyClient, run_episode

__all__ = ["ClientStats", "PolicyClient", "run_episode"]
