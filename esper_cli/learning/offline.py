"""Offline outcome learning: advantage-weighted regression (AWR, Peng et al. 2019) on a store.

Behaviour cloning copies what the acting policy did; AWR copies it *in proportion to how well it
turned out*. For every stored decision (s, a):

1. `returns_to_go`  - G = the sum of the episode's rewards from this decision on (undiscounted:
                      an episode is 25 epochs and only its final accuracy counts). A decision's
                      reward is the val accuracy change over the next epoch (minus a penalty for
                      an invalid action), so G = final val accuracy - val accuracy now, in points.
2. `regress_value`  - V(s) ~ E[G | s]: a small network regressed on the training episodes' G,
                      early-stopped on the validation episodes' error (it must generalise to
                      unseen episodes, or the advantages below are just its memorisation error).
3. `awr_weights`    - A = G - V(s); w = min(exp(A / temperature), max_weight). Decisions that did
                      better than usual from their state weigh more, worse ones less.

Training then minimises the w-weighted cross-entropy of the *taken* actions (`training.fit`), so
the policy moves toward pi(a|s) ~ mu(a|s) exp(A(s, a) / temperature), mu being the behaviour.
That only differs from imitation where the behaviour varied its actions: a store collected with
`simic collect --explore EPS` is what makes the advantages of different actions comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..contracts import N_FEATURES
from ..data.decisions import DataError, DecisionData

DEFAULT_TEMPERATURE = 1.0  # accuracy points: an advantage of +1 point weighs e times more
DEFAULT_MAX_WEIGHT = 20.0  # caps exp(A / T) so a few lucky episodes cannot carry the whole loss


@dataclass
class Outcomes:
    """What a store recorded beyond the observation, per decision, in `DecisionData` row order."""

    actions: np.ndarray  # (N,) int64: the action the behaviour policy actually took
    rewards: np.ndarray  # (N,) float64
    behaviour_prob: np.ndarray  # (N,) float64: probability of the taken action, -1 if unknown


def load_outcomes(data: DecisionData) -> Outcomes:
    """Taken actions, rewards and behaviour probabilities of `data`'s store, rows aligned with it.

    Gathered through `data.rows` (each decision's row in the store's columns), so row i here is
    row i of `data.observations`, whatever order `load_decisions` put the episodes in.
    """
    from ..data.store import EpisodeReader, StoreError  # the store pulls in h5py; import when needed

    try:
        with EpisodeReader(data.store) as reader:
            cols = reader.decisions()
    except StoreError as exc:
        raise DataError(str(exc)) from None
    if data.rows is None:
        raise DataError("decisions without their store rows: load them with `load_decisions`")
    order = data.rows
    outcomes = Outcomes(np.asarray(cols["actions"], dtype=np.int64)[order],
                        np.asarray(cols["reward"], dtype=np.float64)[order],
                        np.asarray(cols["behaviour_prob"], dtype=np.float64)[order])
    if not np.isfinite(outcomes.rewards).all():
        raise DataError(f"store {data.store}: {int((~np.isfinite(outcomes.rewards)).sum())} rewards are NaN or inf")
    return outcomes


def explored(behaviour_prob: np.ndarray) -> bool:
    """Whether any decision was taken with probability below 1 (a store collected with --explore)."""
    known = behaviour_prob[behaviour_prob >= 0]
    return bool((known < 1.0 - 1e-9).any())


# ----------------------------------------------------------------------------- 1. returns
def returns_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Undiscounted reward-to-go per decision: G_t = r_t + r_{t+1} + ... + r_last of its episode.

    Episodes are contiguous rows (`starts`, `lengths`). With C the running sum over all rows,
    G_t = C[end of t's episode] - C[t] + r_t: one cumsum, no per-episode loop.
    """
    r = np.asarray(rewards, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(r) == 0:
        return r.copy()
    c = np.cumsum(r)
    ends = np.asarray(starts, dtype=np.int64) + lengths - 1
    return np.repeat(c[ends], lengths) - c + r


# ----------------------------------------------------------------------------- 2. value
def value_network(hidden: int = 64) -> nn.Module:
    """V(s): normalised 27 features -> 64 -> 64 -> 1."""
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


@dataclass
class ValueFit:
    """A fitted V(s) and how well it fits (mean squared error, in squared accuracy points)."""

    model: nn.Module
    scale: tuple[float, float]  # the network predicts (G - mean) / std of the training returns
    train_mse: float
    val_mse: float
    steps: int  # Adam steps taken; the kept one is `best_step`
    best_step: int

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """V(s) in accuracy points for normalised observations (N, 27)."""
        self.model.eval()
        mu, sd = self.scale
        return self.model(x).squeeze(-1).double().numpy() * sd + mu


def regress_value(x_train: torch.Tensor, g_train: np.ndarray, x_val: torch.Tensor, g_val: np.ndarray, seed: int,
                  steps: int = 500, lr: float = 3e-3, patience: int = 50) -> ValueFit:
    """Regress V(s) on returns-to-go with full-batch Adam; keep the step with the lowest val MSE.

    A few thousand decisions fit in one batch, so every step is an exact gradient and the
    validation error can be checked after each one. Targets are standardised (returns span tens
    of points; a fresh network outputs ~0), and the predictions scaled back.
    """
    mu, sd = float(g_train.mean()), float(g_train.std()) or 1.0
    y_train = torch.from_numpy(((g_train - mu) / sd).astype(np.float32))
    y_val = torch.from_numpy(((g_val - mu) / sd).astype(np.float32))
    torch.manual_seed(seed)
    model = value_network()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_step, best_state, step = math.inf, 0, None, 0
    for step in range(1, steps + 1):
        model.train()
        loss = ((model(x_train).squeeze(-1) - y_train) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.inference_mode():
            model.eval()
            val = float(((model(x_val).squeeze(-1) - y_val) ** 2).mean())
        if val < best:
            best, best_step = val, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step - best_step >= patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    fit = ValueFit(model, (mu, sd), 0.0, 0.0, step, best_step)
    fit.train_mse = float(((fit.predict(x_train) - g_train) ** 2).mean())
    fit.val_mse = float(((fit.predict(x_val) - g_val) ** 2).mean())
    return fit


# ----------------------------------------------------------------------------- 3. weights
def awr_weights(advantages: np.ndarray, temperature: float, max_weight: float) -> np.ndarray:
    """w = min(exp(A / temperature), max_weight), float32; monotone in A, capped, always finite."""
    z = np.minimum(np.asarray(advantages, dtype=np.float64) / temperature, math.log(max_weight))
    return np.exp(z).astype(np.float32)


def effective_sample_size(w: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted decisions the weighted set is worth."""
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum()) if (w > 0).any() else 0.0


@dataclass
class AWR:
    """Per-decision AWR weights for each side of the split, and the record kept in the checkpoint."""

    train_weights: np.ndarray  # (N_train,) float32, rows of `DecisionData.select(train positions)`
    val_weights: np.ndarray  # (N_val,) float32
    summary: dict[str, Any]


def check_awr_options(temperature: float, max_weight: float) -> None:
    """One-line errors, naming the option, for a temperature or cap that makes no weights."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise DataError(f"the AWR temperature must be a positive number of accuracy points, got {temperature}",
                        option="temperature")
    if not (math.isfinite(max_weight) and max_weight >= 1):
        raise DataError(f"the AWR weight cap must be at least 1 (exp(0) = 1 is an average decision), got {max_weight}",
                        option="max_weight")


def advantage_weights(data: DecisionData, outcomes: Outcomes, train_pos: np.ndarray, val_pos: np.ndarray,
                      mean: np.ndarray, std: np.ndarray, *, seed: int, temperature: float = DEFAULT_TEMPERATURE,
                      max_weight: float = DEFAULT_MAX_WEIGHT) -> AWR:
    """Returns-to-go, a value fitted on the training episodes, advantages, AWR weights.

    `mean`/`std` are the policy's normaliser (fitted on the training episodes), so the value
    network sees the inputs the policy sees. Validation weights use the same V: they score
    the policy on unseen episodes by the same yardstick.
    """
    check_awr_options(temperature, max_weight)
    g = returns_to_go(outcomes.rewards, data.starts, data.lengths)
    tr, va = data.rows_of(train_pos), data.rows_of(val_pos)
    x = torch.from_numpy((data.observations - mean) / std)
    value = regress_value(x[tr], g[tr], x[va], g[va], seed)
    adv_train, adv_val = g[tr] - value.predict(x[tr]), g[va] - value.predict(x[va])
    w_train, w_val = awr_weights(adv_train, temperature, max_weight), awr_weights(adv_val, temperature, max_weight)
    summary = {
        "method": "awr",
        "temperature": float(temperature),
        "max_weight": float(max_weight),
        "returns": {"mean": float(g[tr].mean()), "std": float(g[tr].std())},
        "value": {"hidden": [64, 64], "train_mse": value.train_mse, "val_mse": value.val_mse,
                  "val_mse_of_mean": float(((g[va] - g[tr].mean()) ** 2).mean()),
                  "steps": value.steps, "best_step": value.best_step},
        "advantage": {"train_mean": float(adv_train.mean()), "train_std": float(adv_train.std()),
                      "val_mean": float(adv_val.mean()), "val_std": float(adv_val.std())},
        "weights": {"train_mean": float(w_train.mean()), "capped_fraction": float((w_train >= max_weight).mean()),
                    "effective_sample_size": effective_sample_size(w_train), "n_train": int(len(w_train)),
                    "val_effective_sample_size": effective_sample_size(w_val), "n_val": int(len(w_val))},
    }
    return AWR(w_train, w_val, summary)
