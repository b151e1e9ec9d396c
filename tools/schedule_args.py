"""Schedule flags shared by every subcommand that takes `--schedule` (flags default to None)."""

from __future__ import annotations

import argparse

from graphs.schedule import CLUSTER_METHODS, PRUNE_QUERIES, SCATTER_MODES, Schedule, load_schedule, preset_names

KNOB_FLAGS = ("cluster_method", "kmeans_iters", "seed", "scatter_mode", "prune_query", "kcenter_lambda")


def add_schedule_args(p: argparse.ArgumentParser, default: str | None = "csp") -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", default=default,
                   help=f"preset ({', '.join(preset_names())}) or a schedule .json file. Defaults to {default}.")
    g.add_argument("--cluster-method", choices=CLUSTER_METHODS, default=None)
    g.add_argument("--kmeans-iters", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="seed of cluster_method=random")
    g.add_argument("--scatter-mode", choices=SCATTER_MODES, default=None)
    g.add_argument("--prune-query", choices=PRUNE_QUERIES, default=None)
    g.add_argument("--kcenter-lambda", type=float, default=None)


def schedule_from_args(args: argparse.Namespace, n_layers: int, n_image_tokens: int) -> Schedule:
    """Resolve --schedule against the model, then apply only the knobs the user set."""
    knobs = {k: getattr(args, k) for k in KNOB_FLAGS if getattr(args, k, None) is not None}
    return load_schedule(args.schedule, n_layers, n_image_tokens, **knobs)
