"""The candidate in shadow: a second policy deciding on the champion's observation every tick, never written.

`ShadowCandidate` holds the candidate of the `candidate` settings (by default the registry's
`candidate` alias, pinned to the version it points at, so every decision names the exact model).
`refresh()` runs beside the tick, never in it (a scheduler job every `candidate.refresh_s`, and once
before `ratepilot controller --once`): it loads the candidate when none is loaded or when the alias
has moved. A load that fails is logged, counted in `ratepilot_controller_errors_total{stage=
"candidate_load"}` and tried again at the next refresh; what was loaded before stays.

`decide()` runs in the tick after the champion: the candidate's proposal goes through its own
`SafePolicy` over the loop's safety engine with the same operator caps, so a candidate that raises or
answers NaN is contained exactly like the champion (counted as `stage="candidate"`) and its clamped
rates are what it would have written. Nothing the candidate does can fail the champion's tick.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from controller.metrics import ControllerMetrics
from controller.policies import LoadedPolicy, PolicyLoadError, load_policy, pin_alias
from controller.settings import CandidateSettings
from policy.observation import Observation
from policy.safety import OperatorCaps, SafePolicy, SafetyEngine, SafetyResult

log = logging.getLogger("ratepilot.controller.shadow")


@dataclass(frozen=True)
class CandidateDecision:
    """What the candidate would have written this tick, and what was wrong with its proposal (None: nothing)."""

    loaded: LoadedPolicy
    safety: SafetyResult
    error: str | None


class ShadowCandidate:
    """The candidate policy in shadow; `initial` is a candidate given directly (kept unless the settings enable loading)."""

    def __init__(self, settings: CandidateSettings, metrics: ControllerMetrics, initial: LoadedPolicy | None = None):
        self.settings = settings
        self.metrics = metrics
        self.last_error: str | None = None  # the last load or decide failure
        self._loaded = initial
        self._safe: SafePolicy | None = None
        self._lock = threading.Lock()
        metrics.candidate_loaded.set(1.0 if initial is not None else 0.0)

    @property
    def current(self) -> LoadedPolicy | None:
        """The candidate in shadow, None when there is none."""
        return self._loaded

    def refresh(self) -> LoadedPolicy | None:
        """Load the candidate when none is loaded or its alias moved; on failure log, count and keep what is loaded."""
        if not self.settings.enabled:
            return self._loaded
        with self._lock:
            loaded = self._loaded
            try:
                model = pin_alias(self.settings.model) if self.settings.name == "rl" and self.settings.model else None
                if loaded is not None and (self.settings.name != "rl" or model == loaded.model):
                    return loaded  # the same version: nothing to do
                loaded = load_policy(self.settings.policy_settings(model))
            except PolicyLoadError as exc:
                self.last_error = str(exc)
                self.metrics.errors.labels("candidate_load").inc()
                log.warning("event=candidate_load_failed reason=%r kept=%s", str(exc), None if loaded is None else loaded.model)
                return self._loaded
            self._loaded, self.last_error = loaded, None
            self.metrics.candidate_loaded.set(1.0)
            log.info("event=candidate_loaded name=%s model=%s", loaded.name, loaded.model)
            return loaded

    def reset(self) -> None:
        """A new leadership term: the candidate's stale counters start afresh, as the champion's."""
        if self._safe is not None:
            self._safe.reset()

    def decide(self, observation: Observation, caps: OperatorCaps | None, engine: SafetyEngine) -> CandidateDecision | None:
        """The candidate's clamped decision on the champion's observation; None without a candidate. Never raises."""
        loaded = self._loaded
        if loaded is None:
            return None
        try:
            if self._safe is None or self._safe.inner is not loaded.policy or self._safe.engine is not engine:
                self._safe = SafePolicy(loaded.policy, engine)
            self._safe.caps = caps
            safety = self._safe.decide(observation)
        except Exception as exc:  # noqa: BLE001 - whatever the candidate does, the champion's tick goes on
            self._count_error(f"{type(exc).__name__}: {exc}")
            return None
        if self._safe.last_error is not None:
            self._count_error(self._safe.last_error)
        return CandidateDecision(loaded, safety, self._safe.last_error)

    def _count_error(self, reason: str) -> None:
        self.last_error = reason
        self.metrics.errors.labels("candidate").inc()
        log.warning("event=candidate_error reason=%r", reason)
