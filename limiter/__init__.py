"""Token-bucket rate limiting on Redis: atomic Lua check-and-consume, tiers, ASGI middleware, edge app."""
