"""Envoy's global rate-limit service (`envoy.service.ratelimit.v3.RateLimitService`) on the limiter's buckets."""
