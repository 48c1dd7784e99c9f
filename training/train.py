"""`ratepilot train`: train the RL policy with ARS in the simulator, evaluate it, log and register it in MLflow.

    ratepilot train                          # the default run (<= 15 min on 2 cores), writes policy/models/default_policy.npz
    ratepilot train --iterations 5 --out /tmp/p.npz --no-mlflow
    ratepilot train --resume runs/NAME/checkpoint.json
    ratepilot train --calibration calibration.json   # worlds with a measured backend (`ratepilot calibrate`)

Steps: DAgger imitation of the oracle initialises a linear policy over normalised observation
features; ARS V2-t (`training/ars.py`, run on the simulator by `training/trainer.py`) improves it
on fresh domain-randomised episodes of the whole scenario library and the training part of the real traces; the best parameters on fixed
validation episodes (training seeds) become the policy. It is then evaluated by the harness
against every baseline on held-out evaluation seeds (and on the held-out part of the traces),
and everything is logged to MLflow: params, learning curve, evaluation tables, plots, the
environment spec and the policy as a pyfunc model, registered with the alias `candidate`.
With `--calibration` every training and evaluation world has the calibrated backend's service
model (`training.calibration`); the file is logged with the run (artifact and `calibration.*` params).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from limiter.paths import check_outputs
from policy.base import ACTION_SPACE_NAMES
from policy.observation import OBS_SCHEMA
from policy.rl import DEFAULT_MODEL_PATH, RLPolicy, make_meta, save
from training.calibrate import load_calibration
from training.scenarios import calibrated_worlds
from training.trainer import Args, Trainer

ENV_ID = "ratepilot/Traffic-v0"
ALGORITHM = "ars"
BASELINES = ("static", "threshold", "aimd", "gradient", "pid", "oracle")
POLICY_VERSION = 4  # 2: the asymmetric action space (cut 4x, raise 2x); 3: the capacity estimate features (obs v2); 4: the capacity-anchored action space; bump when the meaning of the weights changes


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under the fields of a dataclass and its dataclass bases (CleanRL style), by field name."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = str(after.value.value)  # type: ignore[union-attr]
    return docs


def build_parser() -> argparse.ArgumentParser:
    """The command line: every Args field as an option, plus where things go."""
    parser = argparse.ArgumentParser(prog="ratepilot train", description=__doc__.splitlines()[0])
    docs = field_docs(Args)
    for f in dataclasses.fields(Args):
        default = f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(default), default=default, help=f"{docs.get(f.name, '')} (default: {default})"
        )
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH, help="where the trained policy file goes (default: the committed default policy)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs"), help="checkpoints and plots go under RUN_DIR/RUN_NAME (default: runs)")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint.json (its args win but --iterations and --time-budget-s)")
    parser.add_argument("--eval-seeds", type=int, default=5, help="held-out evaluation seeds (0..N-1) for the final comparison (default: 5)")
    parser.add_argument("--eval-suites", default="default,traces", help="suites of the final evaluation (default: default,traces)")
    parser.add_argument("--no-eval-plots", action="store_true", help="skip the per-scenario evaluation PNGs (faster)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (nor register the model)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the project store)")
    parser.add_argument("--json", type=Path, help="write the run summary (validation and evaluation) as JSON here")
    parser.add_argument("--calibration", type=Path, help="train and evaluate in worlds with this calibrated backend (`ratepilot calibrate`; give it again on --resume)")
    return parser


def args_from(ns: argparse.Namespace) -> Args:
    """Args from parsed options; ValueError on a value ARS cannot use."""
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)})
    args.ars_config()  # validates the ARS hyperparameters
    checks = {
        "iterations": args.iterations >= 0, "time_budget_s": args.time_budget_s >= 0, "hidden": 0 <= args.hidden <= 64,
        "episodes_per_iteration": args.episodes_per_iteration >= 1, "episode_steps": args.episode_steps >= 1,
        "trace_share": 0 <= args.trace_share <= 1, "dagger_rounds": args.dagger_rounds >= 0,
        "dagger_episodes": args.dagger_episodes >= 1, "validation_episodes": args.validation_episodes >= 1,
        "eval_every": args.eval_every >= 1, "ridge_alpha": args.ridge_alpha > 0,
        "dagger_margin": 0 < args.dagger_margin <= 2,
    }  # fmt: skip
    from training.scenarios import TRAINABLE_SUITES

    if args.suite not in TRAINABLE_SUITES:
        raise ValueError(f"--suite {args.suite!r} is not trained on (it measures generalisation); choose from {', '.join(TRAINABLE_SUITES)}")
    checks["curriculum"] = 0 <= args.curriculum <= 1
    checks["action_space"] = args.action_space in ACTION_SPACE_NAMES
    if args.init_model and not Path(args.init_model).is_file():
        raise ValueError(f"--init-model {args.init_model}: no such file")
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"invalid value for --{bad[0].replace('_', '-')}: {getattr(args, bad[0])!r}")
    return args


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (a checkpoint is never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle)
    os.replace(tmp, path)


def plot_curve(curve: list[dict[str, float]], path: Path) -> Path:
    """Learning curve PNG: validation objective and goodput / SLO violations over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [c["iteration"] for c in curve]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(its, [c["objective"] for c in curve], marker="o", label="validation objective")
    top.plot(its, [c.get("train_mean", np.nan) for c in curve], alpha=0.6, label="mean perturbed objective (training)")
    top.set_ylabel("objective")
    top.legend()
    bottom.plot(its, [c["goodput_ratio"] for c in curve], label="goodput_ratio")
    bottom.plot(its, [c["slo_violation_frac"] for c in curve], label="slo_violation_frac")
    bottom.plot(its, [c["rate_tracking_error"] for c in curve], label="rate_tracking_error")
    bottom.set_xlabel("ARS iteration")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def env_spec(args: Args) -> dict[str, Any]:
    """What the policy was trained on, for the record."""
    from training.scenarios import SCENARIOS, SUITES, TRAIN_SEED_OFFSET
    from training.sim import INTERVAL_S, REWARD, SUBSTEP_S, WorldParams

    return {
        "env_id": ENV_ID,
        "obs_schema": OBS_SCHEMA,
        "interval_s": INTERVAL_S,
        "substep_s": SUBSTEP_S,
        "scenarios": list(SCENARIOS),
        "trace_scenarios": list(SUITES["traces"]),
        "trace_split": "train",
        "train_seed_offset": TRAIN_SEED_OFFSET,
        "episode_steps": args.episode_steps,
        "nominal_world": dataclasses.asdict(WorldParams()),
        "reward_weights": dataclasses.asdict(REWARD),
        "objective": "goodput_ratio - slo_weight * slo_violation_frac - tracking_weight * min(rate_tracking_error, 2)",
    }


class Logger:
    """MLflow logging that is a no-op with --no-mlflow."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log finite metrics at a step."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in values.items() if np.isfinite(v)}, step=step)


def run_training(trainer: Trainer, run_dir: Path, log: Logger, console: Console) -> None:
    """The ARS loop with progress, validation, checkpoints and the time budget."""
    args = trainer.args
    started = time.monotonic() - trainer.elapsed_s
    checkpoint = run_dir / "checkpoint.json"
    if not trainer.curve:
        scores = trainer.validate()
        trainer.curve.append({"iteration": 0, **scores})
        log.metrics({f"charts/val_{k}": v for k, v in scores.items()}, 0)
    with Progress(
        TextColumn("[bold]ARS"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task("train", total=args.iterations, completed=trainer.ars.iteration, status="")
        while trainer.ars.iteration < args.iterations:
            if args.time_budget_s and time.monotonic() - started >= args.time_budget_s:
                console.print(f"time budget of {args.time_budget_s:g} s reached after {trainer.ars.iteration} iterations")
                break
            stats = trainer.iterate()
            it = trainer.ars.iteration
            trainer.elapsed_s = time.monotonic() - started
            log.metrics(
                {"charts/mean_objective": stats.mean_return, "charts/best_objective": stats.best_return,
                 "losses/return_std": stats.return_std, "losses/update_norm": stats.update_norm,
                 "charts/env_steps": trainer.env_steps, "charts/elapsed_s": trainer.elapsed_s}, it,
            )  # fmt: skip
            if it % args.eval_every == 0 or it == args.iterations:
                scores = trainer.validate()
                trainer.curve.append({"iteration": it, "train_mean": stats.mean_return, **scores})
                log.metrics({f"charts/val_{k}": v for k, v in scores.items()}, it)
                write_json(checkpoint, trainer.state())
            last = trainer.curve[-1]
            bar.update(task, completed=it, status=f"val {last['objective']:.3f} best {trainer.best['objective']:.3f}")
    trainer.elapsed_s = time.monotonic() - started
    write_json(checkpoint, trainer.state())


def final_evaluation(policy: RLPolicy, suites: list[str], seeds: int, plots: Path | None) -> dict[str, dict[str, Any]]:
    """The harness report per suite: rl against every baseline (static tuned) on held-out seeds 0..N-1."""
    from training.evaluate import STATIC_TUNED, evaluate

    reports = {}
    for suite in suites:
        policies: dict[str, Any] = {"rl": policy} | {name: (STATIC_TUNED if name == "static" else name) for name in BASELINES}
        plots_dir = None if plots is None else plots / suite
        reports[suite] = evaluate(policies, suite=suite, seeds=seeds, plots_dir=plots_dir, progress=True)
    return reports


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot train`."""
    ns = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        check_outputs(files={"--out": ns.out, "--json": ns.json}, dirs={"--run-dir": ns.run_dir})
        calibration = load_calibration(ns.calibration) if ns.calibration else None
        if ns.resume:
            trainer = Trainer.from_state(json.loads(ns.resume.read_text()))
            run_name = ns.resume.parent.name
            for name in ("iterations", "time_budget_s"):  # the only options that may change on resume
                if f"--{name.replace('_', '-')}" in argv:
                    trainer.args = dataclasses.replace(trainer.args, **{name: getattr(ns, name)})
        else:
            args = args_from(ns)
            run_name = None
        if ns.eval_seeds < 1:
            raise ValueError("--eval-seeds must be >= 1")
        suites = [s for s in ns.eval_suites.split(",") if s]
        from training.scenarios import SUITES

        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise ValueError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    except (ValueError, OSError, json.JSONDecodeError) as exc:  # a bad calibration file is a ValueError too
        print(f"ratepilot train: {exc}", file=sys.stderr)
        return 2
    from training import registry

    if not ns.resume:
        trainer = None  # type: ignore[assignment]
        run_name = registry.run_name(ENV_ID, ALGORITHM, args.seed)
    args = trainer.args if ns.resume else args
    run_dir = ns.run_dir / str(run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(not ns.no_mlflow)
    mlflow_run = None
    if log.enabled:
        import mlflow

        registry.configure(ns.tracking_uri)
        mlflow_run = mlflow.start_run(run_name=run_name)
        registry.log_args(args)
        mlflow.set_tags({"env_id": ENV_ID, "algorithm": "ARS-V2t", "resumed": str(bool(ns.resume))})
        if calibration is not None:
            mlflow.log_params(calibration.mlflow_params())
            mlflow.log_artifact(str(ns.calibration), "calibration")
    try:
        with calibrated_worlds(calibration):
            if trainer is None:
                with console.status("DAgger initialisation (imitating the oracle)"):
                    trainer = Trainer.start(args)
            run_training(trainer, run_dir, log, console)
            network = trainer.best_network()
            training_info = {
                "iterations": trainer.ars.iteration, "env_steps": trainer.env_steps, "elapsed_s": round(trainer.elapsed_s, 1),
                "seed": args.seed, "best_iteration": trainer.best["iteration"], "run_name": run_name,
                "run_id": mlflow_run.info.run_id if mlflow_run else None,
                "validation": {k: v for k, v in trainer.best.items() if isinstance(v, float)},
            }  # fmt: skip
            if calibration is not None:  # provenance: the backend the worlds were calibrated to
                training_info["calibration"] = {"path": str(ns.calibration), **calibration.to_dict()["model"]}
            if args.init_model:  # provenance: what the carried-over weights were trained as
                with np.load(args.init_model, allow_pickle=False) as data:
                    training_info["init_model"] = {"path": args.init_model, "meta": json.loads(str(data["meta"]))}
            start = f"warm-started from {Path(args.init_model).name}" if args.init_model else "DAgger-initialised"
            meta = make_meta(network, f"ARS-V2t (Mania et al. 2018), {start}", training_info, args.space)
            meta["version"] = POLICY_VERSION
            policy = RLPolicy(network, meta)
            out = save(policy, ns.out)
            console.print(f"policy written to {out} ({out.stat().st_size} bytes)")
            curve_png = plot_curve(trainer.curve, run_dir / "learning_curve.png")
            reports = final_evaluation(policy, suites, ns.eval_seeds, None if ns.no_eval_plots else run_dir / "plots")
            from training.evaluate import goodput_table, public_report, summary_table

            for suite, report in reports.items():
                console.print(f"suite {suite}: held-out seeds 0..{ns.eval_seeds - 1}", goodput_table(report), summary_table(report))
            summary = {"run_name": run_name, "policy": str(out), "training": training_info, "curve": trainer.curve,
                       "evaluation": {s: public_report(r)["summary"] for s, r in reports.items()}}  # fmt: skip
            if log.enabled:
                import mlflow

                for suite, report in reports.items():
                    registry.log_evaluation(public_report(report), prefix=f"eval_{suite}")
                mlflow.log_artifact(str(curve_png), "plots")
                if (run_dir / "plots").is_dir():
                    mlflow.log_artifacts(str(run_dir / "plots"), "plots")
                registry.log_json(env_spec(args), "env_spec.json")
                registry.log_json(trainer.curve, "learning_curve.json")
                mlflow.log_artifact(str(out), "policy_file")
                version = registry.register_candidate(registry.log_policy(out), {"run_name": str(run_name)})
                summary["registered_version"] = version.version
                console.print(f"registered {registry.REGISTERED_MODEL} version {version.version} as '{registry.CANDIDATE}'")
            if ns.json:
                write_json(ns.json, json.loads(json.dumps(summary, default=float)))
    finally:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run()
    return 0
