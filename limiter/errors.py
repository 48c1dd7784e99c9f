"""Errors of the limiter backends: one wrapped type for "Redis could not decide"."""

from __future__ import annotations

from limiter.bucket import BucketError

__all__ = ["BucketError", "LimiterBackendError", "RedisUnavailable"]


class LimiterBackendError(RuntimeError):
    """A backend could not decide; the caller falls back (fail-open local guard or fail-closed)."""


class RedisUnavailable(LimiterBackendError):
    """Redis timed out, refused the connection, answered with an error, or is in its back-off window.

    A check that raised this may or may not have run on the server; it is never replayed.
    """
