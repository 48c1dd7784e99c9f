"""The controller's side of Redis: read the world fresh each tick, write all rates in one fenced script.

`read_world` fetches the rate table, the operator overrides, the mode switch and the server clock in
one pipeline round trip; `write` sends every tier's rate and decision to `write_rates.lua` in one
EVALSHA, which checks the lease and the fencing token inside Redis before it touches anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from controller.lease import FENCE_KEY, LEADER_KEY, lua
from limiter.bucket import MAX_RATE
from limiter.rate_table import RATES_KEY, SOURCES, VERSION_KEY, RateEntryError, parse_entry

DECISIONS_KEY = "ratepilot:decisions"
OVERRIDES_KEY = "ratepilot:overrides"
MODE_KEY = "ratepilot:controller:mode"
MODES = ("active", "shadow")


class FencedError(RuntimeError):
    """Redis refused the write: this replica no longer holds the lease or its fencing token is stale."""


@dataclass(frozen=True)
class World:
    """What Redis holds at the start of a tick."""

    rates: dict[str, bytes]  # tier -> raw rate-table entry
    overrides: dict[str, bytes]  # tier -> raw override JSON
    mode: str | None  # the operator's mode switch, None when unset
    server_now_s: float


@dataclass(frozen=True)
class InForce:
    """The rate each limiter applies right now, and why, derived from the table like the limiter does."""

    rates: np.ndarray  # tokens/s; the static rate where the entry is missing, expired or garbage
    versions: list[int | None]
    problems: dict[str, str]  # tier -> why its entry was not used (missing entries are not problems)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# The exact text write_rates.lua stores; an entry in this form is read without json.loads (10,000 tiers:
# ~5x faster); anything else (a hand edit, garbage) goes through limiter.rate_table.parse_entry.
_NUMBER = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"  # a JSON number
_WRITTEN = re.compile(
    rb'\{"rate":' + _NUMBER + rb',"burst":' + _NUMBER + rb',"version":(0|[1-9][0-9]*),"source":"(?:'
    + "|".join(SOURCES).encode() + rb')","written_at":' + _NUMBER + rb',"expires_at":' + _NUMBER + rb"\}"
)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@dataclass(frozen=True)
class Written:
    """What this replica's last write stored: each tier's entry text exactly as write_rates.lua formats it, and its values."""

    tiers: tuple[str, ...]
    entries: list[bytes]
    rates: np.ndarray
    version: int
    expires_at: float  # the value of the expires_at text, as a reader parses it
    usable: np.ndarray  # per tier: the entry passes the limiter's checks (finite, positive, sane)


def written_entries(
    tiers: Sequence[str], rate_texts: Sequence[str], burst_texts: Sequence[str], sources: Sequence[str],
    version: int, server_now_us: int, ttl_text: str,
) -> Written:
    """The entries write_rates.lua stored for a write stamped `server_now_us` (same text: Lua's %.6f, %.14g)."""
    written_at = "%.6f" % (server_now_us / 1e6)
    expires_at = "%.6f" % (server_now_us / 1e6 + float(ttl_text))
    tail = f',"version":{version},"source":"'
    end = f'","written_at":{written_at},"expires_at":{expires_at}}}'
    entries = [f'{{"rate":{r},"burst":{b}{tail}{s}{end}'.encode()
               for r, b, s in zip(rate_texts, burst_texts, sources, strict=True)]  # fmt: skip
    rates = np.array(rate_texts, dtype=np.float64)
    bursts = np.array(burst_texts, dtype=np.float64)
    stamps_ok = 0 < float(written_at) <= 1e11 and 0 < float(expires_at) <= 1e11
    with np.errstate(invalid="ignore"):
        usable = (rates > 0) & (rates <= MAX_RATE) & (bursts > 0) & (bursts <= MAX_RATE) & stamps_ok
    return Written(tuple(tiers), entries, rates, version, float(expires_at), usable)


def rates_in_force(world: World, tiers: Sequence[str], static: np.ndarray, written: Written | None = None) -> InForce:
    """Per tier: the table's rate when valid and unexpired (server clock), else the static rate.

    An entry byte-for-byte equal to what `written` (this replica's last write) stored is read from
    `written`'s values; any other entry (another writer, a hand edit, garbage) is parsed.
    """
    rates = np.array(static, dtype=np.float64, copy=True)
    versions: list[int | None] = [None] * len(tiers)
    problems: dict[str, str] = {}
    raws = [world.rates.get(tier) for tier in tiers]
    if written is not None and len(written.tiers) == len(tiers) and written.tiers == tuple(tiers):
        same = np.fromiter((_bytes(raw) == entry if raw is not None else False
                            for raw, entry in zip(raws, written.entries, strict=True)), dtype=bool, count=len(tiers))  # fmt: skip
        known = same & written.usable
        if world.server_now_s >= written.expires_at:
            for i in np.flatnonzero(known).tolist():
                problems[tiers[i]] = "entry expired"
        else:
            rates[known] = written.rates[known]
            for i in np.flatnonzero(known).tolist():
                versions[i] = written.version
        present = [(i, raws[i]) for i in np.flatnonzero(~known).tolist() if raws[i] is not None]
    else:
        present = [(i, raw) for i, raw in enumerate(raws) if raw is not None]
    matches = [_WRITTEN.fullmatch(_bytes(raw)) for _, raw in present]  # type: ignore[arg-type]
    fast = [(i, m.groups()) for (i, _), m in zip(present, matches, strict=True) if m is not None]
    slow = [(i, raw) for (i, raw), m in zip(present, matches, strict=True) if m is None]
    if fast:
        index = np.array([i for i, _ in fast], dtype=np.int64)
        rate, burst, _, written_at, expires = np.array([[float(x) for x in g] for _, g in fast]).T
        with np.errstate(invalid="ignore"):
            valid = ((rate > 0) & (rate <= MAX_RATE) & (burst > 0) & (burst <= MAX_RATE)
                     & (written_at > 0) & (written_at <= 1e11) & (expires > 0) & (expires <= 1e11))  # fmt: skip
        expired = valid & (world.server_now_s >= expires)
        used = valid & ~expired
        rates[index[used]] = rate[used]
        for k in np.flatnonzero(used).tolist():
            versions[fast[k][0]] = int(fast[k][1][2])
        for k in np.flatnonzero(expired).tolist():
            problems[tiers[fast[k][0]]] = "entry expired"
        slow += [(fast[k][0], raws[fast[k][0]]) for k in np.flatnonzero(~valid).tolist()]
    for i, raw in sorted(slow):
        tier = tiers[i]
        try:
            entry = parse_entry(raw)  # type: ignore[arg-type]
        except (RateEntryError, OverflowError) as exc:  # OverflowError: an integer too large for a float
            problems[tier] = f"unusable entry: {exc}"
            continue
        if entry.is_expired(world.server_now_s):
            problems[tier] = "entry expired"
            continue
        rates[i], versions[i] = entry.rate, entry.version
    return InForce(rates, versions, {tier: problems[tier] for tier in tiers if tier in problems})


class RateStore:
    """Reads the world and writes the rate table plus the decisions stream."""

    def __init__(self, client: redis.Redis, ttl_s: float, decisions_maxlen: int):
        self._client = client
        self.ttl_s = ttl_s
        self.decisions_maxlen = decisions_maxlen
        self._write = client.register_script(lua("write_rates.lua"))
        self.last_written: Written | None = None  # read back by the next tick without parsing (rates_in_force)

    def read_world(self) -> World:
        """Rate table, overrides, mode and server time in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(RATES_KEY)
        pipe.hgetall(OVERRIDES_KEY)
        pipe.get(MODE_KEY)
        pipe.time()
        rates, overrides, mode, (seconds, micros) = pipe.execute()
        mode_text = _text(mode) if mode is not None else None
        return World(
            rates={_text(k): v for k, v in rates.items()},
            overrides={_text(k): v for k, v in overrides.items()},
            mode=mode_text if mode_text in MODES else None,
            server_now_s=seconds + micros / 1e6,
        )

    def write(
        self,
        replica_id: str,
        fence: str,
        tiers: Sequence[str],
        rates: np.ndarray,
        bursts: np.ndarray,
        sources: Sequence[str],
        decisions: Sequence[str],
        write_rates: bool,
    ) -> tuple[int, float]:
        """Write rates (unless shadow) and decisions; returns (version, server time s). FencedError if refused."""
        ttl = repr(float(self.ttl_s))
        rate_texts, burst_texts = list(map(repr, rates.tolist())), list(map(repr, bursts.tolist()))
        args: list[str | int | float] = [replica_id, fence, ttl, "1" if write_rates else "0", self.decisions_maxlen, len(tiers)]
        for row in zip(tiers, rate_texts, burst_texts, sources, decisions, strict=True):
            args += row
        keys = [RATES_KEY, VERSION_KEY, LEADER_KEY, FENCE_KEY, DECISIONS_KEY]
        version, stamp = self._write(keys=keys, args=args)
        if int(version) < 0:
            raise FencedError(_text(stamp))
        if write_rates:
            self.last_written = written_entries(tiers, rate_texts, burst_texts, sources, int(version), int(stamp), ttl)
        return int(version), int(stamp) / 1e6

    def set_mode(self, mode: str) -> None:
        """Switch every replica to `mode` (read by the leader at its next tick)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self._client.set(MODE_KEY, mode)
