"""Live comparison of Tamiyo policies: shadow mode, closed-loop paired runs, on-policy agreement.

Can a learned Tamiyo replace the heuristic? Two ways to ask, both on real morphogenetic training:

- **Shadow**: the first policy (the *driver*) drives each episode; every other policy is asked on
  the very same observations, each with its own state (a GRU's hidden state follows the driver's
  trajectory), and never acts. Per-decision agreement, a confusion matrix driver x other, and
  where they disagree (by seed stage).
- **Closed loop**: each policy drives its own episodes from the same seeds. Episode `i` of every
  policy starts from the same initial weights and sees the same data order (the environment draws
  both from the episode's rng seed, never from the actions), so the runs are *paired*: the
  difference of final accuracies on episode `i` is the effect of the policy alone. For every
  policy other than the expert, the expert is asked at every state that policy visited (DAgger's
  on-policy labels, `run_episode(expert=...)`), so on-policy agreement is measured too.

`resolve_specs` checks the policies named on the command line, `pick_seed` chooses held-out run
seeds, `run_comparison` runs every episode of a `ComparisonConfig` through the episode runner (in
this process, in worker processes or as Ray tasks; the shadow policies ride on the driver's jobs,
and checkpoints travel with the jobs), and `build_report` turns the finished episodes into the
report (`simic compare --json` prints it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError, CheckpointOrigin, checkpoint_origin
from ..contracts import (
    ACTION_NAMES,
    FEATURE_NAMES,
    MAX_SEED,
    N_ACTIONS,
    Action,
    Episode,
    EpisodeConfig,
    EpisodeRef,
    episode_rng_seed,
)
from ..learning.metrics import agreement_by_stage, seed_stages
from ..plugins import Registry
from ..policy import policy_version
from ..running.runner import BaseRunner, EpisodeJob
from ..running.weights import checkpoint_options

MODES = ("both", "shadow", "closed-loop")


class CompareError(Exception):
    """Bad input to a comparison (one line; the CLI exits 2)."""


# ================================================================================ policy specs
@dataclass(frozen=True)
class PolicySpec:
    """A policy named on the command line: `NAME` or `NAME=PATH` (a specific checkpoint)."""

    name: str  # registered policy name
    checkpoint: str | None = None
    label: str = ""  # how reports name it (unique among the compared policies)

    @property
    def options(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint} if self.checkpoint is not None else {}


def parse_specs(values: Sequence[str]) -> list[PolicySpec]:
    """Parse `NAME` / `NAME=PATH`; labels are the names, or `NAME=PATH` where a name repeats."""
    raw: list[tuple[str, str | None, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"policy {value!r}: expected NAME or NAME=PATH")
        if sep and not path.strip():
            raise ValueError(f"policy {value!r}: NAME=PATH needs a checkpoint path after '='")
        raw.append((name, path.strip() if sep else None, value))
    counts: dict[str, int] = {}
    for name, _, _ in raw:
        counts[name] = counts.get(name, 0) + 1
    specs = [PolicySpec(name, path, name if counts[name] == 1 else value) for name, path, value in raw]
    labels = [s.label for s in specs]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"policy {dupes[0]!r} is named twice")
    return specs


def build_policy(factory: Any, spec: PolicySpec) -> Any:
    """A fresh instance of a spec's policy (the checkpoint, if any, passed as `checkpoint=`)."""
    options = dict(spec.options)
    if "checkpoint" in options:
        options["checkpoint"] = str(Path(options["checkpoint"]).expanduser())
    return factory(**options)


def resolve_specs(values: list[str], reg: Registry, expert: str | None, *,
                  origins: dict[str, CheckpointOrigin] | None = None) -> tuple[list[PolicySpec], dict[str, str]]:
    """Parse and check every policy (registered, buildable: checkpoint present and readable).

    Returns the specs and each spec's version (`policy_version`). A trainable policy named without
    a checkpoint comes back with the default one its factory loaded as its `checkpoint`, so the
    jobs carry those weights to any node. With `origins`, also fills it with the checkpoint each
    compared policy was built from (label -> `CheckpointOrigin`, as the framework handed it;
    policies with no checkpoint are left out), so a comparison can avoid the episodes they
    learned from, or say it cannot."""
    try:
        specs = parse_specs(values)
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    names = [s.name for s in specs] + ([expert] if expert else [])
    for name in names:
        if name not in reg.policies:
            raise CompareError(f"policy {name!r}: {reg.unknown('policy', name)}")
    versions: dict[str, str] = {}
    resolved: list[PolicySpec] = []
    for spec in specs + ([PolicySpec(expert, label=f"expert {expert}")] if expert else []):
        try:
            agent = build_policy(reg.policies[spec.name], spec)
            origin = checkpoint_origin(spec.name, spec.options, agent, trainable=spec.name in reg.trainables)
        except CheckpointError as exc:
            raise CompareError(f"policy {spec.label!r}: {exc}") from None
        except Exception as exc:
            raise CompareError(f"policy {spec.label!r} could not be created: {type(exc).__name__}: {exc}") from None
        versions[spec.label] = policy_version(reg, spec.name, agent)
        if spec not in specs:  # the expert
            continue
        if origins is not None and (origin.path is not None or not origin.known):
            origins[spec.label] = origin
        resolved.append(spec if spec.checkpoint is not None or origin.path is None
                        else replace(spec, checkpoint=str(origin.path)))
    return resolved, versions


# ================================================================================ held-out seeds
#: An episode id as `Episode.id` writes it: POLICY-TASK-sSEED-iINDEX-KEY8 (policy and task may
#: hold hyphens themselves, so the fields are read from the right).
_EPISODE_ID = re.compile(r"^(?P<prefix>.+)-s(?P<seed>\d+)-i(?P<index>\d+)-(?P<key>[0-9a-f]+)$")


def trained_rng_seeds(split: Mapping[str, Any] | None, task: str) -> set[int]:
    """RNG seeds of the `task` episodes a checkpoint was trained or validated on.

    `split` is the checkpoint's `split` record: its `episodes` list (an `EpisodeRef` per episode)
    where present, else the episode ids of older checkpoints, parsed.
    """
    if not split:
        return set()
    listed = split.get("episodes")
    if listed is not None:
        return {ref.rng_seed for ref in map(EpisodeRef.parse, listed) if ref.task == task}
    seeds = set()
    for episode_id in [*split.get("train_ids", []), *split.get("val_ids", [])]:
        m = _EPISODE_ID.match(str(episode_id))
        # An old id cannot say where the policy name ends: any prefix ending in the task counts,
        # erring on the side of calling an episode seen.
        if m and (m["prefix"] == task or m["prefix"].endswith(f"-{task}")):
            seeds.add(episode_rng_seed(int(m["seed"]), int(m["index"])))
    return seeds


def overlapping_indices(trained: Collection[int], seed: int, episodes: int) -> list[int]:
    """Indices i < `episodes` whose episode (run `seed`, index i) has an RNG seed in `trained`:
    the same host initialisation and data order as an episode a checkpoint learned from."""
    if not trained:
        return []
    return [i for i in range(episodes) if episode_rng_seed(seed, i) in trained]


def held_out_seed(trained: Collection[int], episodes: int, start: int = 0) -> int:
    """The smallest run seed >= `start` whose episodes 0..episodes-1 are none of `trained`.

    Terminates quickly: each trained episode can rule out at most one candidate seed per index.
    """
    seed = start
    while seed <= MAX_SEED and overlapping_indices(trained, seed, episodes):
        seed += 1
    if seed > MAX_SEED:
        raise ValueError(f"no run seed from {start} to {MAX_SEED} has {episodes} held-out episodes")
    return seed


def pick_seed(seed: int | None, trained: Collection[int], episodes: int, *, start: int = 0,
              option: str = "--seed", what: str = "a compared checkpoint trained or validated on",
              ) -> tuple[int, list[int], str | None]:
    """The run seed to compare on: (seed, indices of its episodes in `trained`, a line for stderr).

    `trained` holds the rng seeds of the episodes to stay off; `what` says what they are ("an
    episode {what}"). None picks the smallest held-out seed from `start` (the line says which and
    why); an explicit seed is kept, and the line is a warning when some of its episodes are in
    `trained` (None when none is). The line is plain text (no Rich markup).
    """
    if seed is not None:
        overlap = overlapping_indices(trained, seed, episodes)
        if not overlap:
            return seed, [], None
        shown = ", ".join(map(str, overlap[:8])) + (", ..." if len(overlap) > 8 else "")
        return seed, overlap, (f"Warning: {option} {seed}: episode(s) {shown} of this seed are episodes {what} "
                               f"(same host init and data order), so this comparison is not held out; "
                               f"omit {option} to pick a held-out seed")
    chosen = held_out_seed(trained, episodes, start)
    why = f"the smallest seed from {start} with no episode {what}"
    if not trained:
        why += " (there is none of this task)"
    elif chosen != start:
        why += f"; seed {start} has some"
    last = f"0..{episodes - 1}" if episodes > 1 else "0"
    return chosen, [], f"Comparing on run seed {chosen} (episodes {last}): {why}; {option} N picks another"


# ================================================================================ statistics
def mean_ci95(values: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """(mean, [low, high]) with a Student-t 95% interval; the interval is None for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return None, None
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    from scipy.stats import t  # scikit-learn depends on scipy

    half = float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, [mean - half, mean + half]


def _confusion(rows: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    m = np.zeros((N_ACTIONS, N_ACTIONS), dtype=np.int64)
    np.add.at(m, (rows, cols), 1)
    return m.tolist()


@dataclass
class PolicyRuns:
    """The closed-loop episodes of one compared policy, by episode index."""

    spec: PolicySpec
    is_expert: bool
    episodes: dict[int, Episode] = field(default_factory=dict)


def closed_loop_summary(runs: Mapping[str, PolicyRuns], reference: str) -> dict[str, Any]:
    """Per policy: accuracies with 95% intervals, paired differences against `reference`, seed
    counts, action mix, invalid actions, and agreement with the expert on the states it visited."""
    ref = runs[reference].episodes
    out: dict[str, Any] = {}
    for label, r in runs.items():
        eps = [r.episodes[i] for i in sorted(r.episodes)]
        finals = [e.final_accuracy for e in eps]
        bests = [e.best_accuracy for e in eps]
        fm, fci = mean_ci95(finals)
        bm, bci = mean_ci95(bests)
        paired = sorted(set(r.episodes) & set(ref))
        d_final = [r.episodes[i].final_accuracy - ref[i].final_accuracy for i in paired]
        d_best = [r.episodes[i].best_accuracy - ref[i].best_accuracy for i in paired]
        d_test = [r.episodes[i].test_accuracy - ref[i].test_accuracy for i in paired]
        dm, dci = mean_ci95(d_final)
        dbm, dbci = mean_ci95(d_best)
        tests = [e.test_accuracy for e in eps]
        tm, tci = mean_ci95(tests)
        dtm, dtci = mean_ci95(d_test)
        # Net of the growth charge: the same as the accuracies on a task that does not price growth.
        scores = [e.test_score for e in eps]
        sm, sci = mean_ci95(scores)
        d_final_score = [r.episodes[i].final_score - ref[i].final_score for i in paired]
        dfsm, dfsci = mean_ci95(d_final_score)
        d_test_score = [r.episodes[i].test_score - ref[i].test_score for i in paired]
        dtsm, dtsci = mean_ci95(d_test_score)
        counts = dict.fromkeys(ACTION_NAMES, 0)
        invalid = dict.fromkeys(ACTION_NAMES, 0)
        acted, labels, visited = [], [], []
        for e in eps:
            for d in e.decisions:
                counts[Action(d.action).name] += 1
                if not d.valid:
                    invalid[Action(d.action).name] += 1
                if d.expert_action >= 0:
                    acted.append(int(d.action))
                    labels.append(int(d.expert_action))
                    visited.append(d.observation)
        n_dec = sum(counts.values())
        entry: dict[str, Any] = {
            "policy": r.spec.name,
            "checkpoint": r.spec.checkpoint,
            "policy_version": eps[0].policy_version if eps else None,
            "n_episodes": len(eps),
            "final_accuracy_mean": fm,
            "final_accuracy_ci95": fci,
            "final_accuracies": finals,
            "best_accuracy_mean": bm,
            "best_accuracy_ci95": bci,
            "best_accuracies": bests,
            # Validation accuracy is what the controller sees; test accuracy is the honest score.
            "test_accuracy_mean": tm,
            "test_accuracy_ci95": tci,
            "test_accuracies": tests,
            "paired_against": reference,
            "final_accuracy_diff_mean": dm,
            "final_accuracy_diff_ci95": dci,
            "final_accuracy_diffs": d_final,
            "best_accuracy_diff_mean": dbm,
            "best_accuracy_diff_ci95": dbci,
            "test_accuracy_diff_mean": dtm,
            "test_accuracy_diff_ci95": dtci,
            "test_accuracy_diffs": d_test,
            "growth_charge_mean": mean_ci95([e.growth_charge for e in eps])[0],
            "test_score_mean": sm,
            "test_score_ci95": sci,
            "final_score_diff_mean": dfsm,
            "final_score_diff_ci95": dfsci,
            "final_score_diffs": d_final_score,
            "test_score_diff_mean": dtsm,
            "test_score_diff_ci95": dtsci,
            "test_score_diffs": d_test_score,
            "seeds_created": sum(e.seeds_created for e in eps),
            "seeds_fossilized": sum(e.seeds_fossilized for e in eps),
            "seeds_culled": sum(e.seeds_culled for e in eps),
            "n_decisions": n_dec,
            "action_counts": counts,
            "action_mix": {a: (c / n_dec if n_dec else 0.0) for a, c in counts.items()},
            "invalid_actions": sum(invalid.values()),
            "invalid_action_counts": invalid,
            "expert_agreement": None,
            "expert_labelled_decisions": 0,
            "expert_confusion": None,
            "expert_by_stage": None,
        }
        if not r.is_expert and labels:
            a, y = np.asarray(acted), np.asarray(labels)
            entry["expert_agreement"] = float((a == y).mean())
            entry["expert_labelled_decisions"] = len(y)
            entry["expert_confusion"] = _confusion(y, a)  # rows: expert, columns: this policy
            entry["expert_by_stage"] = agreement_by_stage(a == y, seed_stages(np.stack(visited)))
        out[label] = entry
    return out


def shadow_summary(driver: str, episodes: Iterable[Episode], observers: Sequence[str]) -> dict[str, Any]:
    """Agreement of each observer with the driver on the driver's own trajectories."""
    eps = list(episodes)
    out: dict[str, Any] = {"driver": driver, "n_episodes": len(eps)}
    if not eps:
        return out
    acted = np.concatenate([[int(d.action) for d in e.decisions] for e in eps]).astype(np.int64)
    obs = np.concatenate([np.stack([d.observation for d in e.decisions]) for e in eps])
    stages = seed_stages(obs)
    for label in observers:
        other = np.concatenate([e.shadow[label] for e in eps]).astype(np.int64)
        agree = acted == other
        by_stage = agreement_by_stage(agree, stages)
        out[label] = {
            "agreement": float(agree.mean()),
            "n_decisions": len(agree),
            "disagreements": int((~agree).sum()),
            "confusion": _confusion(acted, other),  # rows: driver, columns: this policy
            "by_stage": by_stage,
        }
    return out


# ================================================================================ running a comparison
@dataclass(frozen=True)
class ComparisonConfig:
    """One comparison: the policies (checked by `resolve_specs`), the episodes, how they run."""

    specs: tuple[PolicySpec, ...]  # the first drives in shadow mode and is the paired reference
    versions: Mapping[str, str]  # label -> policy version (from `resolve_specs`)
    episode: EpisodeConfig
    episodes: int  # paired episodes per policy (indices 0..episodes-1)
    seed: int  # run seed of every policy's episodes
    mode: str = "both"  # one of MODES
    expert: str | None = None  # labels every state a non-expert policy visits
    threads: int = 1  # torch CPU threads per episode

    @property
    def closed(self) -> bool:
        return self.mode in ("both", "closed-loop")

    @property
    def shadowing(self) -> bool:
        return self.mode in ("both", "shadow") and len(self.specs) > 1


def _jobs(plan: ComparisonConfig, runs: Mapping[str, PolicyRuns]) -> Iterator[EpisodeJob]:
    """Every compare episode, drawn by the runner as workers free up (never listed); each job is
    tagged with its policy's label, and each checkpoint is read here once and travels with the jobs."""
    options = {s.label: checkpoint_options(s.checkpoint) for s in plan.specs}
    driver = plan.specs[0]
    observers = tuple((s.label, s.name, options[s.label]) for s in plan.specs[1:]) if plan.shadowing else ()
    for i in range(plan.episodes):
        for s in (plan.specs if plan.closed else [driver]):
            labelled = plan.closed and plan.expert is not None and not runs[s.label].is_expert
            yield EpisodeJob(policy=s.name, config=plan.episode, seed=plan.seed, index=i, policy_options=options[s.label],
                             policy_version=plan.versions[s.label], threads=plan.threads,
                             expert=plan.expert if labelled else None,
                             observers=observers if s is driver else (), tag=s.label)


def run_comparison(plan: ComparisonConfig, runner: BaseRunner, *,
                   on_episode: Callable[[str, Episode], None] | None = None,
                   ) -> tuple[dict[str, PolicyRuns], list[Episode]]:
    """Run every compare episode on `runner`; (closed-loop runs, shadow episodes).

    The driver's episodes carry the shadow policies' answers (`Episode.shadow`) in shadow mode.
    `on_episode(label, episode)` is called as each episode finishes (in completion order).
    Raises `JobFailed` when a policy fails or an episode is lost."""
    runs = {s.label: PolicyRuns(s, is_expert=(s.name == plan.expert and not s.options)) for s in plan.specs}
    shadow_eps: list[Episode] = []
    for job, episode in runner.run(_jobs(plan, runs), strict=True):
        runs[job.tag].episodes[episode.index] = episode
        if job.observers:
            shadow_eps.append(episode)
        if on_episode is not None:
            on_episode(job.tag, episode)
    shadow_eps.sort(key=lambda e: e.index)
    return runs, shadow_eps


def build_report(specs: list[PolicySpec], runs: dict[str, PolicyRuns], shadow_eps: list[Episode], *,
                 mode: str, expert: str | None, config: EpisodeConfig, episodes: int, seed: int,
                 seed_choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison report (`simic compare --json`): closed-loop and shadow summaries of a run."""
    closed = mode in ("both", "closed-loop")
    shadow = None
    if mode in ("both", "shadow"):
        shadow = shadow_summary(specs[0].label, shadow_eps, [s.label for s in specs[1:]])
    return {
        "mode": mode,
        "episodes": episodes,
        "seed": seed,
        "seed_choice": seed_choice,
        "expert": expert,
        "config": config.to_dict(),
        "policies": [s.label for s in specs],
        "closed_loop": closed_loop_summary(runs, specs[0].label) if closed else None,
        "shadow": shadow,
    }


# ================================================================================ the plot
_VAL_ACCURACY = FEATURE_NAMES.index("val_accuracy")


def plot_curves(path: Path, runs: Mapping[str, PolicyRuns], max_episodes: int = 3) -> Path:
    """Validation accuracy per epoch, one row per policy, one column per episode (first few):
    seed stages shaded, non-WAIT actions marked (invalid ones faded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    indices = sorted(set().union(*(r.episodes for r in runs.values())))[:max_episodes]
    fig, axes = plt.subplots(len(labels), max(1, len(indices)), squeeze=False, sharey=True,
                             figsize=(4.2 * max(1, len(indices)), 2.8 * len(labels)))
    colours = {"GERMINATED": "#fde68a", "TRAINING": "#bfdbfe", "BLENDING": "#c7d2fe",
               "FOSSILIZED": "#bbf7d0", "CULLED": "#fecaca"}
    markers = {Action.GERMINATE: ("^", "tab:green"), Action.ADVANCE: (">", "tab:blue"),
               Action.CULL: ("x", "tab:red")}
    for row, label in enumerate(labels):
        for col, i in enumerate(indices):
            ax = axes[row][col]
            e = runs[label].episodes.get(i)
            if e is None:
                ax.set_axis_off()
                continue
            # Epoch 0 is the untrained host; the decision at epoch t is marked on the curve at t.
            acc = [float(e.decisions[0].observation[_VAL_ACCURACY])] + [d.outcome.val_accuracy for d in e.decisions]
            epochs = np.arange(len(acc))
            end = len(acc) - 1
            for s in e.seeds:
                spans = list(s.stages) + [("END", end)]
                for (stage, start), (_, stop) in pairwise(spans):
                    if stage in colours and stop > start:
                        ax.axvspan(start, stop, color=colours[stage], alpha=0.6, lw=0)
            ax.plot(epochs, acc, color="black", lw=1.2)
            for t, d in enumerate(e.decisions):
                a = Action(d.action)
                if a in markers:
                    m, c = markers[a]
                    y = d.observation[_VAL_ACCURACY]  # when the action was taken
                    ax.scatter([t], [y], marker=m, s=40, zorder=3, color=c, alpha=1.0 if d.valid else 0.35)
            ax.set_title(f"{label}: episode {i}  final {e.final_accuracy:.1f}%", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            if col == 0:
                ax.set_ylabel("val accuracy (%)", fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, alpha=0.6, label=s.lower()) for s, c in colours.items()]
    handles += [Line2D([], [], marker=m, color=c, ls="", label=a.name) for a, (m, c) in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
