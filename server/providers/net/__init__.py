"""Outgoing connections below httpx2: network backends and the clients built on them."""
