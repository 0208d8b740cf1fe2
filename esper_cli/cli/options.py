"""The options every episode-running command shares (collect, compare, dagger, improve), each
declared once as a Typer `Annotated` alias: a command writes `task: Task = "digits"` and gets the
same flag, bounds and help as every other command, so their help cannot drift apart.

`EPISODE_OPTIONS` and `RUNNER_OPTIONS` name them for the test that checks every episode-running
command takes them all. Only typer is imported here: `simic --help` loads no command module, but
every command that runs episodes imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# -- what one episode is
Task = Annotated[str, typer.Option(
    "--task", help="Training task (a task plugin, see `simic plugins`): digits (bundled) or cifar10 (needs --data-dir).")]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs (= decisions) per episode.")]
DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Folder holding the task's data: cifar-10-batches-py for --task cifar10.")]
Device = Annotated[str, typer.Option("--device", help="Torch device the episodes train on: cpu, cuda, cuda:1, ...")]
Threads = Annotated[int, typer.Option(
    "--threads", min=1,
    help="Torch CPU threads per episode, and for this command's own training if it trains "
         "(1 is fastest for the small default host).")]

# -- where episodes run
Workers = Annotated[Optional[str], typer.Option(
    "--workers", "-w",
    help="Episodes run in parallel: a number or 'auto' (= CPU cores). Default: 1 locally; every CPU of the "
         "cluster with --backend ray.")]
Backend = Annotated[str, typer.Option(
    "--backend", help="Where episodes run: local (this machine) or ray (a Ray cluster; needs the ray extra).")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address",
    help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one. Needs --backend ray.")]
EnvsPerWorker = Annotated[int, typer.Option(
    "--envs-per-worker", min=1,
    help="Episodes each worker trains together as one fused computation (the batched engine); an episode is "
         "the same at any width. Default: the width measured fastest for the default task on a CPU.")]

#: The flags of the aliases above, for the test that every episode-running command takes each
#: with one help text.
EPISODE_OPTIONS = ("--task", "--epochs", "--data-dir", "--device", "--threads")
RUNNER_OPTIONS = ("--workers", "--backend", "--ray-address", "--envs-per-worker")

# -- what a learning run shows while it runs
TensorBoardDir = Annotated[Optional[Path], typer.Option(
    "--tensorboard", help="Write TensorBoard curves (event files) to this folder; watch with `tensorboard --logdir DIR`. "
                          'Needs the tensorboard extra: pip install "simic[tensorboard]".')]
