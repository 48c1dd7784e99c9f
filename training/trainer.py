"""ARS on the traffic simulator: rollouts in `BatchSim`, the DAgger initialisation and a resumable trainer.

`training.ars` is the algorithm (pure, tested on toy objectives); this module feeds it episodes
of the scenario library and the training part of the packaged traces, scores every perturbation
with the evaluation's own metrics (`training.metrics`), and keeps the best validated parameters.
`training.train` is the command line around it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor

from policy.base import ACTION_SPACE_NAMES, action_anchor, apply_action, rate_to_action
from policy.rl import FEATURES, N_FEATURES, Z_CLIP, PolicyNetwork, batch_actions, features, n_params
from training.ars import ARS, ARSConfig, IterationStats, RunningStat
from training.metrics import episode_metrics
from training.scenarios import TRACE_PREFIX, TRAINABLE_SUITES, make_episode, scenario_names, train_seeds
from training.sim import BatchSim, Episode


@dataclass
class Args(ARSConfig):
    """Everything a training run depends on (logged as MLflow params; `ratepilot train --help` lists them).

    The ARS hyperparameters (N, b, alpha, nu) are `ARSConfig`'s fields, inherited with their defaults.
    """

    seed: int = 1
    """seed of the exploration noise and of the draw of training scenarios"""
    iterations: int = 400
    """ARS iterations at most (the time budget may stop the run earlier)"""
    time_budget_s: float = 560.0
    """stop ARS after this many seconds of training (0 = no limit)"""
    hidden: int = 0
    """hidden tanh units of the policy (0 = linear policy, as in the paper)"""
    episodes_per_iteration: int = 18
    """M: scenario episodes every perturbation is rolled out on (the same for all: common random numbers)"""
    episode_steps: int = 120
    """control intervals (5 s each) per training episode"""
    trace_share: float = 0.3
    """share of training episodes cut from the training part of the packaged real traces"""
    dagger_rounds: int = 4
    """rounds of DAgger imitation of the oracle that initialise the policy (0 = start from zeros)"""
    dagger_episodes: int = 36
    """episodes per DAgger round"""
    dagger_margin: float = 1.0
    """the imitation target is the oracle's rate times this (below 1: the margin a policy that cannot see the next interval needs)"""
    ridge_alpha: float = 1.0
    """L2 regularisation of the imitation fit (scikit-learn Ridge)"""
    validation_episodes: int = 42
    """fixed training-seed episodes that track progress and pick the best parameters"""
    eval_every: int = 10
    """iterations between validation runs (and checkpoints)"""
    suite: str = "default"
    """scenario suite trained on (plus packaged traces with split='train')"""
    slo_weight: float = 1.0
    """objective = goodput_ratio - slo_weight * slo_violation_frac - tracking_weight * rate_tracking_error"""
    tracking_weight: float = 2.0
    """weight of the rate tracking error (clipped at 2) in the objective"""
    curriculum: float = 0.5
    """share of episode draws weighted toward scenarios where a baseline beats the policy most (GENET); 0 = uniform"""
    action_space: str = "relative"
    """what an action is relative to: `relative` (the rate in force) or `anchored` (the fresh capacity estimate, else the rate in force; measured worse, docs/evaluation.md)"""
    init_model: str = ""
    """start ARS from this linear policy file instead of DAgger (an older feature set too: its features keep their weights, new ones start at 0)"""

    @property
    def space(self) -> str:
        """The action space (`policy.base.ACTION_SPACES`) named by `action_space`; ValueError for an unknown name."""
        if self.action_space not in ACTION_SPACE_NAMES:
            raise ValueError(f"action_space must be one of {', '.join(ACTION_SPACE_NAMES)}, got {self.action_space!r}")
        return ACTION_SPACE_NAMES[self.action_space]

    def ars_config(self) -> ARSConfig:
        """The ARS hyperparameters of this run (ARSConfig validates them)."""
        return ARSConfig(**{f.name: getattr(self, f.name) for f in fields(ARSConfig)})


def training_names(args: Args) -> tuple[list[str], list[str]]:
    """Scenario names trained on: the suite's generators and the packaged traces (training split)."""
    if args.suite not in TRAINABLE_SUITES:
        raise ValueError(f"suite {args.suite!r} is not trained on; choose from {', '.join(TRAINABLE_SUITES)}")
    scenarios = [name for name in scenario_names(args.suite) if not name.startswith(TRACE_PREFIX)]
    return scenarios, list(scenario_names("traces"))


def _draw(rng: np.random.Generator, names: list[str], weights: dict[str, float]) -> str:
    """One name, with probability proportional to its weight (uniform when none is given)."""
    w = np.array([weights.get(name, 1.0) for name in names], dtype=np.float64)
    return str(names[int(rng.choice(len(names), p=w / w.sum()))])


def sample_episodes(args: Args, rng: np.random.Generator, n: int, weights: dict[str, float] | None = None) -> list[Episode]:
    """n fresh domain-randomised training episodes (training seeds only, traces from their training split).

    `weights` (scenario name -> relative weight, from `curriculum_weights`) skews the draw of names.
    """
    scenarios, traces = training_names(args)
    episodes = []
    for _ in range(n):
        use_trace = bool(traces) and rng.random() < args.trace_share
        name = _draw(rng, traces if use_trace else scenarios, weights or {})
        seed = train_seeds(1, start=int(rng.integers(0, 400_000_000)))[0]
        episodes.append(make_episode(name, seed, args.episode_steps, split="train"))
    return episodes


def validation_episodes(args: Args) -> list[Episode]:
    """A fixed set of training-seed episodes (never evaluation seeds) covering every scenario."""
    scenarios, traces = training_names(args)
    names = scenarios + traces
    seeds = train_seeds(args.validation_episodes, start=900_000_000)
    return [make_episode(names[i % len(names)], seeds[i], args.episode_steps, split="train") for i in range(len(seeds))]


@dataclass
class RolloutResult:
    """Per parameter vector, means over its episodes: the objective and the harness's metrics."""

    objective: np.ndarray
    metrics: dict[str, np.ndarray]
    states: np.ndarray
    per_episode: dict[str, np.ndarray]
    """objective and goodput_ratio of every (parameter vector, episode), shape (P, M)"""


def objective(metrics: dict[str, np.ndarray], args: Args) -> np.ndarray:
    """What ARS maximises, per world: the evaluation's own metrics (training.metrics) combined."""
    tracking = np.clip(np.nan_to_num(metrics["rate_tracking_error"], nan=0.0), 0.0, 2.0)
    return metrics["goodput_ratio"] - args.slo_weight * metrics["slo_violation_frac"] - args.tracking_weight * tracking


def rollout(
    episodes: list[Episode], thetas: np.ndarray, obs_mean: np.ndarray, obs_std: np.ndarray, args: Args
) -> RolloutResult:
    """Roll out P parameter vectors (P, n_params) on the same episodes in one BatchSim of P x M worlds.

    The objective is computed per episode from the evaluation's own metrics rather than as the
    sum of per-interval rewards: an interval's goodput over its bound is noisy when the bound is
    small (a backlog served after demand fell), and the yardstick is the harness's metrics.
    """
    p, m = thetas.shape[0], len(episodes)
    sim = BatchSim([e for _ in range(p) for e in episodes])  # perturbation-major: world i*M + j
    obs = sim.reset()
    states, infos, rewards = [], [], []
    done = False
    while not done:
        feats = features(obs.vector)
        states.append(feats)
        actions = batch_actions(thetas, feats.reshape(p, m, -1), obs_mean, obs_std, args.hidden).reshape(-1)
        obs, reward, done, info = sim.step(apply_action(args.space, obs.rate, obs.vector, actions))
        infos.append(info)
        rewards.append(reward)
    stacked = {key: np.stack([i[key] for i in infos]) for key in infos[0]}
    per_world = episode_metrics(stacked, np.stack(rewards))
    per_world["objective"] = objective(per_world, args)
    means = {key: np.nanmean(value.reshape(p, m), axis=1) for key, value in per_world.items()}
    per_episode = {key: per_world[key].reshape(p, m) for key in ("objective", "goodput_ratio")}
    return RolloutResult(means.pop("objective"), means, np.concatenate(states), per_episode)


CURRICULUM_BASELINES = ("static", "threshold", "aimd", "gradient", "pid")


def baseline_scores(episodes: list[Episode], args: Args) -> dict[str, np.ndarray]:
    """Per episode, the best objective and the best goodput_ratio of any baseline, shape (M,) each."""
    from policy.registry import make_policy

    best = {"objective": np.full(len(episodes), -np.inf), "goodput_ratio": np.full(len(episodes), -np.inf)}
    for name in CURRICULUM_BASELINES:
        policy = make_policy(name)
        sim = BatchSim(episodes)
        obs = sim.reset()
        infos, done = [], False
        while not done:
            obs, _, done, info = sim.step(np.asarray(policy.act(obs), dtype=np.float64))
            infos.append(info)
        per_world = episode_metrics({key: np.stack([i[key] for i in infos]) for key in infos[0]})
        per_world["objective"] = objective(per_world, args)
        for key, values in best.items():
            np.maximum(values, per_world[key], out=values)
    return best


def curriculum_weights(
    names: list[str], policy: dict[str, np.ndarray], baselines: dict[str, np.ndarray], share: float
) -> dict[str, float]:
    """GENET-style sampling weights (Xia et al., SIGCOMM 2022): scenarios where a baseline beats the policy most.

    Per scenario name (entries of `names` align with the arrays), the gap is the larger of the
    best baseline's objective minus the policy's and the same for goodput_ratio, averaged over the
    name's episodes and floored at 0. The weight mixes the uniform draw (1 - share) with one
    proportional to the gap (share), so no world is ever dropped; uniform when no baseline wins.
    """
    unique = sorted(set(names))
    index = np.array([unique.index(name) for name in names])
    gap = np.maximum(baselines["objective"] - policy["objective"], baselines["goodput_ratio"] - policy["goodput_ratio"])
    per_name = np.array([max(float(np.mean(gap[index == k])), 0.0) for k in range(len(unique))])
    uniform = np.full(len(unique), 1.0 / len(unique))
    skewed = per_name / per_name.sum() if per_name.sum() > 0 else uniform
    weights = (1.0 - share) * uniform + share * skewed
    return {name: float(w) for name, w in zip(unique, weights, strict=True)}


def fit_imitation(z: np.ndarray, targets: np.ndarray, hidden: int, alpha: float, seed: int) -> np.ndarray:
    """Flat parameters that regress the oracle's action on normalised features (Ridge or a tiny MLP)."""
    if hidden == 0:
        ridge = Ridge(alpha=alpha).fit(z, targets)
        return np.concatenate([ridge.coef_, [ridge.intercept_]])
    mlp = MLPRegressor(hidden_layer_sizes=(hidden,), activation="tanh", alpha=alpha * 1e-3, max_iter=300, random_state=seed)
    mlp.fit(z, targets)
    w0 = np.vstack([mlp.coefs_[0], mlp.intercepts_[0][None, :]])
    return np.concatenate([w0.reshape(-1), mlp.coefs_[1][:, 0], mlp.intercepts_[1]])


def dagger_init(args: Args, rng: np.random.Generator) -> tuple[np.ndarray, RunningStat]:
    """DAgger (Ross, Gordon & Bagnell, AISTATS 2011): imitate the oracle's rate, on the states the learner visits.

    Round 0 follows the oracle with random detours (so that states off its path are seen); later
    rounds follow the current fit. Every state is labelled with the action that moves the run's
    action-space anchor as close as one interval allows to the oracle's rate (`rate_to_action`),
    and the features also seed ARS's running normaliser.
    """
    stat = RunningStat.empty(N_FEATURES)
    theta = np.zeros(n_params(args.hidden))
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for round_ in range(args.dagger_rounds):
        sim = BatchSim(sample_episodes(args, rng, args.dagger_episodes))
        obs = sim.reset()
        done = False
        while not done:
            feats = features(obs.vector)
            assert obs.capacity_tokens is not None  # the simulator always knows the optimum
            xs.append(feats)
            anchor = action_anchor(obs.rate, obs.vector) if args.action_space == "anchored" else obs.rate
            ys.append(rate_to_action(anchor, args.dagger_margin * obs.capacity_tokens))
            if round_ == 0:
                rate = obs.capacity_tokens * 2.0 ** rng.normal(0.0, 0.5, obs.rate.shape)
            else:
                actions = batch_actions(theta[None], feats[None], stat.mean, stat.std, args.hidden)[0]
                rate = apply_action(args.space, obs.rate, obs.vector, actions)
            obs, _, done, _ = sim.step(rate)
        stat.update(np.concatenate(xs[-sim.steps :]))
        x, y = np.concatenate(xs), np.concatenate(ys)
        z = np.clip((x - stat.mean) / stat.std, -Z_CLIP, Z_CLIP)
        theta = fit_imitation(z, y, args.hidden, args.ridge_alpha, args.seed)
    return theta, stat


def warm_start(args: Args, rng: np.random.Generator) -> tuple[np.ndarray, RunningStat]:
    """Parameters and normaliser that act exactly as the linear policy in `args.init_model` does.

    The file may have been written for an older observation schema (that is the point: carry a
    trained policy over to new features), so it is read without `policy.rl.load`'s schema check;
    every feature it names must still exist. Its features keep their weights and normalisation; the
    features it lacks get weight 0 and the statistics of states the carried-over policy visits.
    """
    try:
        with np.load(args.init_model, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            old_theta, old_mean, old_std = (np.asarray(data[k], dtype=np.float64) for k in ("theta", "obs_mean", "obs_std"))
        names = list(meta["features"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"--init-model {args.init_model}: not a policy file ({exc})") from None
    if args.hidden != 0 or meta.get("hidden") != 0:
        raise ValueError("--init-model needs a linear policy (hidden 0) and --hidden 0")
    unknown = [name for name in names if name not in FEATURES]
    if unknown or old_theta.shape != (len(names) + 1,):
        raise ValueError(f"--init-model {args.init_model}: features this build lacks or shapes that do not fit ({unknown})")
    index = np.array([FEATURES.index(name) for name in names])
    theta = np.zeros(n_params(0))
    theta[index], theta[-1] = old_theta[:-1], old_theta[-1]
    mean, std = np.zeros(N_FEATURES), np.ones(N_FEATURES)
    mean[index], std[index] = old_mean, old_std
    sim = BatchSim(sample_episodes(args, rng, args.dagger_episodes))
    obs, states, done = sim.reset(), [], False
    while not done:
        feats = features(obs.vector)
        states.append(feats)
        obs, _, done, _ = sim.step(apply_action(args.space, obs.rate, obs.vector, batch_actions(theta[None], feats[None], mean, std, 0)[0]))
    stat = RunningStat.empty(N_FEATURES)
    stat.update(np.concatenate(states))
    stat.mean[index] = old_mean
    stat.m2[index] = old_std**2 * (stat.count - 1)
    return theta, stat


@dataclass
class Trainer:
    """A resumable ARS training run: the algorithm state, the best parameters so far and the learning curve."""

    args: Args
    ars: ARS
    best: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    env_steps: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    """curriculum sampling weights by scenario name (empty: uniform), renewed at every validation"""
    _baselines: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, args: Args) -> Trainer:
        """A new run: DAgger initialisation (or zeros), then ready for ARS iterations."""
        rng = np.random.default_rng(args.seed)
        config = args.ars_config()
        if args.init_model:
            theta, stat = warm_start(args, rng)
        elif args.dagger_rounds > 0:
            theta, stat = dagger_init(args, rng)
        else:
            theta, stat = np.zeros(n_params(args.hidden)), RunningStat.empty(N_FEATURES)
        return cls(args, ARS(theta, stat, config, rng))

    def validate(self) -> dict[str, float]:
        """Score the current parameters on the fixed validation episodes; remember them if they are the best."""
        stat = self.ars.obs_stat
        episodes = validation_episodes(self.args)
        result = rollout(episodes, self.ars.theta[None], stat.mean, stat.std, self.args)
        scores = {"objective": float(result.objective[0])} | {k: float(v[0]) for k, v in result.metrics.items()}
        if self.args.curriculum > 0:
            if self._baselines is None:  # fixed episodes and baselines: computed once per run
                self._baselines = baseline_scores(episodes, self.args)
            policy = {key: value[0] for key, value in result.per_episode.items()}
            self.weights = curriculum_weights([e.name for e in episodes], policy, self._baselines, self.args.curriculum)
        if not self.best or scores["objective"] > self.best["objective"]:
            self.best = {**scores, "iteration": self.ars.iteration, "theta": self.ars.theta.copy(),
                         "obs_mean": stat.mean.copy(), "obs_std": stat.std.copy()}
        return scores

    def iterate(self) -> IterationStats:
        """One ARS iteration on M fresh training episodes."""
        episodes = sample_episodes(self.args, self.ars.rng, self.args.episodes_per_iteration, self.weights)

        def run(thetas: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            result = rollout(episodes, thetas, mean, std, self.args)
            return result.objective, result.states

        stats = self.ars.iterate(run)
        self.env_steps += 2 * self.args.n_directions * len(episodes) * self.args.episode_steps
        return stats

    def best_network(self) -> PolicyNetwork:
        """The best validated parameters with the normaliser they were validated with."""
        if not self.best:
            self.validate()
        return PolicyNetwork(self.best["theta"], self.best["obs_mean"], self.best["obs_std"], self.args.hidden)

    # -- checkpoints: one JSON document, everything needed to continue exactly -------------------
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state of the run."""
        best = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.best.items()}
        return {
            "args": asdict(self.args),
            "theta": self.ars.theta.tolist(),
            "iteration": self.ars.iteration,
            "obs_stat": {"count": self.ars.obs_stat.count, "mean": self.ars.obs_stat.mean.tolist(), "m2": self.ars.obs_stat.m2.tolist()},
            "rng": self.ars.rng.bit_generator.state,
            "best": best,
            "curve": self.curve,
            "elapsed_s": self.elapsed_s,
            "env_steps": self.env_steps,
            "weights": self.weights,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Trainer:
        """Continue a run from `state()`; ValueError if it does not fit this code."""
        try:
            args = Args(**state["args"])
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
            s = state["obs_stat"]
            stat = RunningStat(float(s["count"]), np.array(s["mean"], dtype=np.float64), np.array(s["m2"], dtype=np.float64))
            theta = np.array(state["theta"], dtype=np.float64)
            if theta.shape != (n_params(args.hidden),) or stat.mean.shape != (N_FEATURES,):
                raise ValueError("parameter shapes do not match this policy architecture")
            config = args.ars_config()
            best = {k: (np.array(v) if k in ("theta", "obs_mean", "obs_std") else v) for k, v in state["best"].items()}
            return cls(args, ARS(theta, stat, config, rng, int(state["iteration"])), best, list(state["curve"]),
                       float(state["elapsed_s"]), int(state["env_steps"]), dict(state.get("weights", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a training checkpoint ({exc})") from None
