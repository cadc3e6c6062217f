"""Robot-side clients that talk to a streamprune policy server: `client` (our zmq protocol),
`openpi_client` (openpi's websocket protocol) and `chunking` (LeRobot-style action-chunk queues)."""

from robots.chunking import ActionQueue
from robots.client import ClientStats, PolicyClient, run_episode

__all__ = ["ActionQueue", "ClientStats", "PolicyClient", "run_episode"]
