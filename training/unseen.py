"""Suite `unseen`: worlds written apart from the training library, to measure generalisation honestly.

These generators share no code and no shape with `training.scenarios` (which training samples):
other waveforms (sawtooth, sine, square, staircase), other time scales and other combinations.
The policy is never trained on them (`training.trainer` refuses the suite); the evaluation seeds
0..N-1 apply as everywhere. Same contract as the library: `(rng, seconds, randomize)` ->
((load x capacity, capacity factor, heavy share) per second, WorldParams overrides).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

UnseenProfile = tuple[np.ndarray, np.ndarray, np.ndarray]
UnseenGenerator = Callable[[np.random.Generator, int, bool], tuple[UnseenProfile, dict[str, object]]]


def _jitter(rng: np.random.Generator, seconds: int, spread: float) -> np.ndarray:
    """Independent per-second multiplicative noise, log-normal with the given spread (no correlation)."""
    return np.exp(rng.normal(0.0, spread, seconds))


def _heavy(rng: np.random.Generator, seconds: int, randomize: bool) -> np.ndarray:
    return np.full(seconds, float(rng.uniform(0.05, 0.15)) if randomize else 0.1)


def gc_sawtooth(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """A leaking service restarted on a timer: capacity decays linearly to 35-55 % over 45-110 s, then snaps back."""
    period, floor = rng.uniform(45.0, 110.0), rng.uniform(0.35, 0.55)
    age = (np.arange(seconds) + rng.uniform(0, period)) % period / period
    capacity = 1.0 - (1.0 - floor) * age
    load = np.full(seconds, rng.uniform(0.75, 0.95)) * _jitter(rng, seconds, 0.08)
    return (load, capacity, _heavy(rng, seconds, randomize)), {}


def sine_capacity(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """Capacity breathes like a sine (period 20-70 s, amplitude 25-45 %) under demand near its mean."""
    period, amp = rng.uniform(20.0, 70.0), rng.uniform(0.25, 0.45)
    capacity = 1.0 + amp * np.sin(2 * np.pi * np.arange(seconds) / period + rng.uniform(0, 2 * np.pi)) - amp / 2
    load = np.full(seconds, rng.uniform(0.85, 1.15)) * _jitter(rng, seconds, 0.05)
    return (load, capacity, _heavy(rng, seconds, randomize)), {}


def square_demand(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """Cron-like demand: a square wave between 0.3x and 1.8-2.6x capacity, on 15-35 s of every 50-90 s."""
    period, on = rng.uniform(50.0, 90.0), rng.uniform(15.0, 35.0)
    high = rng.uniform(1.8, 2.6)
    t = (np.arange(seconds) + rng.uniform(0, period)) % period
    load = np.where(t < on, high, 0.3) * _jitter(rng, seconds, 0.05)
    return (load, np.ones(seconds), _heavy(rng, seconds, randomize)), {}


def two_peaks_then_cut(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """Two demand peaks (1.6-2.2x for 25-40 s), then the backend loses about a third of its capacity for good."""
    load = np.full(seconds, rng.uniform(0.55, 0.75))
    for centre in (0.2, 0.42):
        at = int((centre + rng.uniform(-0.04, 0.04)) * seconds)
        load[at : at + int(rng.uniform(25, 40))] *= rng.uniform(1.6, 2.2)
    capacity = np.ones(seconds)
    capacity[int(rng.uniform(0.6, 0.7) * seconds) :] = rng.uniform(0.6, 0.72)
    return (load * _jitter(rng, seconds, 0.06), capacity, _heavy(rng, seconds, randomize)), {}


def brownout_staircase(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """A cascading brownout: capacity falls in three stairs (0.8, 0.55, 0.35) 20-40 s apart, then recovers at once."""
    capacity = np.ones(seconds)
    at = int(rng.uniform(0.15, 0.3) * seconds)
    for level in (0.8, 0.55, 0.35):
        capacity[at:] = level
        at += int(rng.uniform(20, 40))
    capacity[at + int(rng.uniform(30, 90)) :] = 1.0
    load = np.full(seconds, rng.uniform(0.7, 0.9)) * _jitter(rng, seconds, 0.05)
    return (load, capacity, _heavy(rng, seconds, randomize)), {}


def thundering_herd(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """Clients vanish (an upstream outage), then all return at once at 3-5x while caches are cold (capacity 0.6x, warming over 60 s)."""
    load = np.full(seconds, rng.uniform(0.5, 0.7))
    gone, back = int(rng.uniform(0.2, 0.35) * seconds), int(rng.uniform(0.45, 0.55) * seconds)
    load[gone:back] = 0.02
    herd = int(rng.uniform(10, 25))
    load[back : back + herd] = rng.uniform(3.0, 5.0)
    capacity = np.ones(seconds)
    warm = np.clip((np.arange(seconds) - back) / 60.0, 0.0, 1.0)
    capacity[back:] = 0.6 + 0.4 * warm[back:]
    overrides: dict[str, object] = {"retry_p_throttled": 0.85, "retry_delay_s": float(rng.uniform(0.3, 0.8))}
    return (load * _jitter(rng, seconds, 0.05), capacity, _heavy(rng, seconds, randomize)), overrides


def heavy_agent_swarm(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[UnseenProfile, dict[str, object]]:
    """Agent swarms of heavy calls: every 40-80 s a 6-15 s swarm doubles the rate and lifts the heavy share to 50-70 %."""
    load = np.full(seconds, rng.uniform(0.3, 0.5))
    heavy = _heavy(rng, seconds, randomize)
    t = int(rng.uniform(10, 30))
    while t < seconds:
        length = int(rng.uniform(6, 15))
        load[t : t + length] *= rng.uniform(1.8, 2.6)
        heavy[t : t + length] = rng.uniform(0.5, 0.7)
        t += int(rng.uniform(40, 80))
    return (load * _jitter(rng, seconds, 0.1), np.ones(seconds), heavy), {}


UNSEEN: dict[str, UnseenGenerator] = {
    "gc_sawtooth": gc_sawtooth,
    "sine_capacity": sine_capacity,
    "square_demand": square_demand,
    "two_peaks_then_cut": two_peaks_then_cut,
    "brownout_staircase": brownout_staircase,
    "thundering_herd": thundering_herd,
    "heavy_agent_swarm": heavy_agent_swarm,
}
