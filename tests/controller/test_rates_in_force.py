"""`rates_in_force` reads entries in write_rates.lua's exact form without json.loads: same answers as parse_entry."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.rate_store import World, rates_in_force, written_entries
from limiter.rate_table import RateEntryError, parse_entry

NOW = 1_700_000_000.0
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-10, max_value=2e7),
    st.integers(min_value=-5, max_value=10**20),
    st.sampled_from([0, 1e7, 1e7 + 1, 1e11, NOW, NOW + 30, 1e-300, 5e-324]),
)


def lua_form(rate: object, burst: object, version: object, source: str, written: object, expires: object) -> str:
    """The entry as write_rates.lua formats it (numbers as Python repr)."""
    return (f'{{"rate":{rate!r},"burst":{burst!r},"version":{version!r},"source":"{source}",'
            f'"written_at":{written!r},"expires_at":{expires!r}}}')  # fmt: skip


entries = st.one_of(
    st.builds(lua_form, numbers, numbers, st.one_of(st.integers(min_value=-2, max_value=10**18), st.just(True)),
              st.sampled_from(["controller", "override", "static", "fallback", "bogus"]), numbers, numbers),  # fmt: skip
    st.builds(lambda r, e: f'{{"rate":{r!r},"burst":1,"version":1,"source":"static","expires_at":{e!r}}}', numbers, numbers),
    st.builds(lambda r: f'{{"burst":2,"rate":{r!r},"version":3,"source":"override","written_at":1,"expires_at":{NOW + 5!r}}}', numbers),
    st.text(max_size=30),
    st.sampled_from(['{"rate":1,"burst":1,"version":01,"source":"static","written_at":1,"expires_at":2e10}', "[]", "null"]),
)


def reference(world: World, tiers: list[str], static: np.ndarray) -> tuple[list[float], list[int | None], dict[str, str]]:
    """The straightforward reading: parse_entry per tier."""
    rates, versions, problems = list(static.tolist()), [None] * len(tiers), {}
    for i, tier in enumerate(tiers):
        raw = world.rates.get(tier)
        if raw is None:
            continue
        try:
            entry = parse_entry(raw)
        except (RateEntryError, OverflowError) as exc:
            problems[tier] = f"unusable entry: {exc}"
            continue
        if entry.is_expired(world.server_now_s):
            problems[tier] = "entry expired"
            continue
        rates[i], versions[i] = entry.rate, entry.version
    return rates, versions, problems  # type: ignore[return-value]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(entries, st.none()), min_size=1, max_size=12), st.floats(min_value=0, max_value=2e9))
def test_fast_reading_matches_parse_entry(raws: list[str | None], now: float) -> None:
    tiers = [f"t{i}" for i in range(len(raws))]
    world = World({t: raw.encode() for t, raw in zip(tiers, raws, strict=True) if raw is not None}, {}, None, now)
    static = np.arange(1.0, len(tiers) + 1.0)
    got = rates_in_force(world, tiers, static)
    rates, versions, problems = reference(world, tiers, static)
    assert got.rates.tolist() == rates and got.versions == versions and got.problems == problems
    assert list(got.problems) == [t for t in tiers if t in problems]  # tier order, as the log lines expect


def test_the_form_write_rates_lua_stores_is_read_fast_and_right() -> None:
    raw = b'{"rate":123.5,"burst":247.0,"version":42,"source":"controller","written_at":1700000000.000001,"expires_at":1700000030.000001}'
    world = World({"free": raw, "pro": raw.replace(b"123.5", b"0.0")}, {}, None, 1_700_000_010.0)
    got = rates_in_force(world, ["free", "pro", "new"], np.array([1.0, 2.0, 3.0]))
    assert got.rates.tolist() == [123.5, 2.0, 3.0] and got.versions == [42, None, None]
    assert set(got.problems) == {"pro"} and "rate must be finite" in got.problems["pro"]
    later = World(world.rates, {}, None, 1_700_000_030.000001)
    assert rates_in_force(later, ["free"], np.array([1.0])).problems == {"free": "entry expired"}
    assert not math.isnan(got.rates.sum())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1, max_value=2e7),
                       st.one_of(entries, st.none(), st.just("written"))), min_size=1, max_size=12),  # fmt: skip
    st.integers(min_value=0, max_value=2 * 10**15),
    st.floats(min_value=0, max_value=2e9),
)
def test_entries_known_from_our_last_write_read_like_parsed_ones(
    cells: list[tuple[float, float, str | None]], stamp_us: int, now: float
) -> None:
    tiers = [f"t{i}" for i in range(len(cells))]
    written = written_entries(tiers, [repr(r) for r, _, _ in cells], [repr(b) for _, b, _ in cells],
                              ["controller"] * len(cells), 7, stamp_us, "30.0")  # fmt: skip
    raws = {t: (entry if raw == "written" else raw.encode())
            for t, entry, (_, _, raw) in zip(tiers, written.entries, cells, strict=True) if raw is not None}  # fmt: skip
    world = World(raws, {}, None, now)
    static = np.arange(1.0, len(tiers) + 1.0)
    got = rates_in_force(world, tiers, static, written)
    rates, versions, problems = reference(world, tiers, static)
    assert got.rates.tolist() == rates and got.versions == versions and got.problems == problems
    assert list(got.problems) == [t for t in tiers if t in problems]
