"""The fused engine: N episodes' hosts and seeds trained as one computation, one step for all.

Tolaria's per-step work (forward, backward, Adam) for N independent training runs is a handful of
tensor ops, not N times as many: the host and every seed family run *packed*. A packed activation
holds the members ("lanes") side by side in its channel dimension, (B, L*C, H, W), so a member's
convolution is one group of a grouped convolution, its BatchNorm channels are its own channels of
one batch norm, and ReLU, pooling, means over space and gating act per channel as they always do.
A module family (the host; one per slot and blueprint) keeps its members' parameters as the rows
of one flat (N, P) tensor; a family's module runs packed by replacing, for the call, each of its
Conv2d / Linear / BatchNorm2d leaves with the packed equivalent (`_PACKERS`) and calling the
module's own `forward`. A family whose module does something else (a channel-mixing reshape, an
unknown parametrised layer) is detected when it is created, by running both ways, and falls back
to `torch.func.vmap` over `functional_call`: the same numbers, more overhead.

Seeds diverge across members, so per epoch a `SlotGroups` per slot lists which rows of which
family run where:

- live (BLENDING, FOSSILIZED): the slot outputs h + alpha * seed(h), alpha per member and step;
- probe (TRAINING): the seed at full strength on the *detached* host features, the rest of the
  network with the member's host parameters *detached* (buffers copied), so the seed gets the task
  gradient and the host none from that path, and the host's own output is unchanged (alpha 0);
- GERMINATED rows run nowhere and get no gradient, so their Adam state stays fresh.

Adam is written out per family with a step count and moments per row: a row whose member did not
use it this step (not yet trained, or in another stage) is left exactly as it was.

Width independence: a member's numbers are bit-identical whatever rows share its computation and
wherever it sits among them (tests/test_engine.py; bench/bench_engine.py compares whole stores at
widths 1 to 128). What that takes, on CPU:
- a width-1 convolution takes another kernel than a grouped one, so every computation runs on at
  least two lanes: a lone row is padded with a copy of itself whose output is thrown away (it
  adds exact zeros to the row's gradient);
- activations stay channels-last between convolutions (oneDNN's grouped convolution and pooling
  are several times faster so), but seeds, batch norms and the head take NCHW (`_nchw`) and the
  gradients handed back into them are made contiguous (`contiguous_grad`): a sum over space or
  batch of a strided tensor runs in an order that depends on how many lanes it holds;
- batch norm is written out over one row per channel (`_batch_norm`), Adam with single-rounding
  operations and tabled bias corrections (`Family.adam`), a linear layer as a grouped 1x1
  convolution (`_linear`): each avoids a kernel whose sums or roundings depend on the tensor's size.
Nothing in the step reads a tensor back to Python: the per-epoch sums are read once an epoch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..kasmina import HostCNN

#: Images per evaluation chunk: fixed, so that no sum's order depends on the batch width.
EVAL_CHUNK = 512
BETAS, EPS = (0.9, 0.999), 1e-8

Params = Mapping[str, torch.Tensor]


def _padded(rows: Sequence[int]) -> list[int]:
    """Rows to compute on: a lone row runs beside a copy of itself (see the module docstring)."""
    return list(rows) * 2 if len(rows) == 1 else list(rows)


# ------------------------------------------------------------------------------ packed layout
def _lanes(h: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n*C, ...) seen as (B, n, C, ...)."""
    return h.view(h.shape[0], n, h.shape[1] // n, *h.shape[2:])


def take(h: torch.Tensor, n: int, at: torch.Tensor) -> torch.Tensor:
    """Lanes `at` of a packed tensor of `n` lanes, packed."""
    return _lanes(h, n)[:, at].reshape(h.shape[0], -1, *h.shape[2:])


def add_at(h: torch.Tensor, n: int, at: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """h with lanes `at` plus `src` (packed, one lane per entry of `at`), each times its `scale`."""
    s = _lanes(src, len(at))
    if scale is not None:
        s = scale.view(1, -1, *([1] * (s.dim() - 2))) * s
    return _lanes(h, n).index_add(1, at, s).reshape(h.shape)


def repeat_lanes(x: torch.Tensor, n: int) -> torch.Tensor:
    """An unpacked batch (B, C, ...) given to `n` lanes, packed."""
    return x.repeat(1, n, *([1] * (x.dim() - 2)))


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """`x` in NCHW order: a reduction over space or batch (a mean, batch-norm statistics) of a
    channels-last tensor sums in an order that depends on how many channels, and so lanes, it
    holds; in NCHW each channel is reduced alone. Seeds, batch norms and the head get NCHW."""
    return x.contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient in contiguous (NCHW) order.

    A gradient arriving from a channels-last convolution keeps that layout through elementwise
    ops, and a later sum over space or batch (the gradient of a gate, of batch-norm weights) then
    runs strided, in an order that depends on how many lanes the tensor holds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """`x`, with its gradient made contiguous on the way back (see `_ContiguousGrad`)."""
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def _conv(mod: nn.Conv2d, p: Params, b: Params, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    weight = p["weight"].reshape(n * mod.out_channels, *p["weight"].shape[2:])
    bias = p["bias"].reshape(-1) if "bias" in p else None
    # oneDNN's grouped convolution (and max pooling after it) is several times faster
    # channels-last than NCHW, so activations stay channels-last between convolutions; see
    # `_nchw` for where they must not.
    return lambda x: F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, mod.stride,
                              mod.padding, mod.dilation, mod.groups * n)


def _linear(mod: nn.Linear, p: Params, b: Params, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A grouped 1x1 convolution: unlike a batched matmul plus a broadcast bias, its bias gradient
    does not depend on how many lanes share it."""
    weight = p["weight"].reshape(n * mod.out_features, mod.in_features, 1, 1)
    bias = p["bias"].reshape(-1) if "bias" in p else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1], 1, 1).contiguous(memory_format=torch.channels_last)
        return F.conv2d(flat, weight, bias, groups=n).reshape(*lead, n * mod.out_features)
    return forward


def _batch_norm(mod: nn.BatchNorm2d, p: Params, b: Params, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batch norm written out over one row per channel, (L*C, B*H*W): PyTorch's CPU kernel
    changes how it sums once a tensor has 32 channels or more, so a lane's statistics and
    gradients would depend on how many lanes share the tensor; a sum along a contiguous row
    does not."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        rows = x.transpose(0, 1).reshape(channels, -1)
        running_mean, running_var = b.get("running_mean"), b.get("running_var")
        if mod.training or running_mean is None:
            mean = rows.mean(1, keepdim=True)
            centred = rows - mean
            var = (centred * centred).mean(1, keepdim=True)
            if mod.training and running_mean is not None and running_var is not None:
                with torch.no_grad():
                    count = rows.shape[1]
                    running_mean.view(-1, 1).mul_(1.0 - mod.momentum).add_(mod.momentum * mean)
                    running_var.view(-1, 1).mul_(1.0 - mod.momentum).add_(mod.momentum * var * (count / max(count - 1, 1)))
                    if "num_batches_tracked" in b:
                        b["num_batches_tracked"].add_(1)
        else:
            centred = rows - running_mean.reshape(-1, 1)
            var = running_var.reshape(-1, 1)  # type: ignore[union-attr]
        out = centred / torch.sqrt(var + mod.eps)
        if "weight" in p:
            out = out * p["weight"].reshape(-1, 1)
        if "bias" in p:
            out = out + p["bias"].reshape(-1, 1)
        return contiguous_grad(out).reshape(channels, batch, *x.shape[2:]).transpose(0, 1).contiguous()
    return forward


_PACKERS: dict[type, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm2d: _batch_norm,
}


def _leaves(template: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaves to pack, or None when some parametrised leaf has no packed form."""
    leaves = []
    for name, mod in template.named_modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if type(mod) in _PACKERS:
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                return None
            if isinstance(mod, nn.BatchNorm2d) and mod.momentum is None:
                return None
            leaves.append((name, mod))
        elif own:
            return None
    return leaves


def _own(d: Params, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


class Family:
    """The rows of one module family: a template module (its structure), and per row the flat
    parameters, buffers and Adam state of one member's copy."""

    def __init__(self, template: nn.Module, width: int, device: torch.device) -> None:
        self.template = template
        named = list(template.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        total = sum(self.sizes)
        self.flat = torch.zeros(width, total, device=device, requires_grad=True)
        self.buffers = {n: torch.zeros((width, *b.shape), dtype=b.dtype, device=device)
                        for n, b in template.named_buffers()}
        self.m = torch.zeros(width, total, device=device)
        self.v = torch.zeros(width, total, device=device)
        self.steps = torch.zeros(width, 1, dtype=torch.long, device=device)
        self.leaves = _leaves(template)

    @torch.no_grad()
    def load(self, row: int, module: nn.Module) -> None:
        """Make `row` a fresh copy of `module` (its initial weights), with fresh Adam state."""
        self.flat[row] = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        for name, b in module.named_buffers():
            self.buffers[name][row] = b
        self.m[row] = 0.0
        self.v[row] = 0.0
        self.steps[row] = 0

    def views(self, flat: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameter tensors (lanes, *shape) named relative to `prefix`, as views of `flat`."""
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            if name.startswith(prefix):
                out[name[len(prefix):]] = flat[:, start:start + size].view(flat.shape[0], *shape)
            start += size
        return out

    def module(self, row: int) -> nn.Module:
        """A plain module holding row `row`'s current weights (a copy: for inspection and tests)."""
        mod = copy.deepcopy(self.template)
        with torch.no_grad():
            for p, tensor in zip(mod.parameters(), self.views(self.flat[row:row + 1]).values()):
                p.copy_(tensor[0])
            for name, b in mod.named_buffers():
                b.copy_(self.buffers[name][row])
        return mod

    @torch.no_grad()
    def adam(self, trained: torch.Tensor | None, lr: torch.Tensor, corrections: torch.Tensor) -> None:
        """One Adam step on the rows in `trained` (a (W, 1) bool mask; None: every row): Adam's
        arithmetic (Kingma and Ba; `torch.optim.Adam`'s defaults), each row with its own step count.

        Written with single-rounding operations only (no lerp, no fused multiply-add, the bias
        corrections looked up in `corrections`, see `bias_corrections`): a vectorised kernel and its
        scalar remainder loop then give the same bits, so a row's update does not depend on
        where in the tensor (how many rows before it) it sits."""
        grad = self.flat.grad
        if grad is None:
            return
        b1, b2 = BETAS
        steps = self.steps + (1 if trained is None else trained.long())
        c1, c2 = corrections[steps.clamp(max=len(corrections) - 1)].unbind(-1)
        m = self.m * b1 + grad * (1.0 - b1)
        v = self.v * b2 + (grad * grad) * (1.0 - b2)
        new = self.flat - (lr / c1) * (m / (v.sqrt() / c2 + EPS))
        if trained is None:
            self.m, self.v = m, v
            self.flat.copy_(new)
        else:
            self.m = torch.where(trained, m, self.m)
            self.v = torch.where(trained, v, self.v)
            self.flat.copy_(torch.where(trained, new, self.flat))
        self.steps = steps
        self.flat.grad = None


def bias_corrections(max_steps: int, device: torch.device) -> torch.Tensor:
    """Adam's bias corrections for steps 0..max_steps, (max_steps + 1, 2): 1 - beta1^t and
    sqrt(1 - beta2^t), computed in float64 once (step 0, never used, reads 1)."""
    b1, b2 = BETAS
    rows = [(1.0 - b1 ** t, math.sqrt(1.0 - b2 ** t)) if t else (1.0, 1.0) for t in range(max_steps + 1)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def packed_call(module: nn.Module, leaves: list[tuple[str, nn.Module]] | None, params: Params,
                buffers: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    """`module` run for `n` lanes of packed `x` with each lane's parameters (lane-first tensors).

    Packable modules (`leaves` not None) run their own forward with packed leaves; the others run
    under vmap (unpacked, then packed back)."""
    if leaves is None:
        fn = lambda p, b, inp: functional_call(module, (p, b), (inp,))  # noqa: E731
        out = vmap(fn, in_dims=(0, 0, 1), out_dims=1)(dict(params), dict(buffers), _lanes(x, n))
        return out.reshape(out.shape[0], -1, *out.shape[3:])
    for name, leaf in leaves:
        prefix = f"{name}." if name else ""
        leaf.forward = _PACKERS[type(leaf)](leaf, _own(params, prefix), _own(buffers, prefix), n)  # type: ignore[method-assign]
    try:
        return module(x)
    finally:
        for _, leaf in leaves:
            del leaf.forward


def _packs_faithfully(template: nn.Module, leaves: list[tuple[str, nn.Module]], channels: int) -> bool:
    """Whether `template` packed gives what it gives alone, lane by lane (train and eval mode)."""
    gen = torch.Generator().manual_seed(0)
    device = next(iter(template.parameters()), torch.empty(0)).device
    mods = [copy.deepcopy(template) for _ in range(2)]
    with torch.no_grad():
        for mod in mods:
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.5)
    x = torch.randn(2, 4, channels, 5, 5, generator=gen).to(device)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in mods]) for n, _ in template.named_parameters()}
    for training in (True, False):
        buffers = {n: torch.stack([dict(m.named_buffers())[n].clone() for m in mods]) for n, _ in template.named_buffers()}
        for mod in (*mods, template):
            mod.train(training)
        try:
            with torch.no_grad():
                alone = torch.stack([m(x[i]) for i, m in enumerate(mods)], dim=1)
                packed = packed_call(template, leaves, params, buffers, x.transpose(0, 1).reshape(4, 2 * channels, 5, 5), 2)
        except Exception:
            return False
        if packed.shape != (4, 2 * channels, 5, 5) or not torch.allclose(_lanes(packed, 2), alone, atol=1e-5, rtol=1e-4):
            return False
    return True


@dataclass
class SlotGroups:
    """Rows of one slot's families by role this epoch: blueprint -> member indices."""

    live: dict[str, list[int]] = field(default_factory=dict)
    probe: dict[str, list[int]] = field(default_factory=dict)


class FusedHosts:
    """N members' hosts and seeds, trained and evaluated together.

    The caller (the environment) owns the lifecycle: it says which member holds which blueprint
    in which slot at which stage (`groups`, one `SlotGroups` per slot, set before each epoch) and
    each member's alpha per step. This class only computes.
    """

    def __init__(self, hosts: Sequence[HostCNN], lrs: Sequence[float], device: torch.device,
                 max_steps: int = 100_000) -> None:
        self.n = len(hosts)
        self.device = device
        self.template = hosts[0]
        self.n_slots = len(self.template.stages)
        self.channels = [slot.channels for slot in self.template.slots]  # type: ignore[attr-defined]
        self.host = Family(self.template, self.n, device)
        for k, host in enumerate(hosts):
            self.host.load(k, host)
        self.lr = torch.tensor(list(lrs), dtype=torch.float32, device=device)[:, None]
        self.corrections = bias_corrections(max_steps, device)  # `max_steps`: the most a row takes
        self.families: dict[tuple[int, str], Family] = {}
        self.groups = [SlotGroups() for _ in range(self.n_slots)]
        self.lanes = _padded(range(self.n))
        self._stage_leaves = [_leaves(stage) for stage in self.template.stages]
        self._head_leaves = _leaves(self.template.head)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def index(self, positions: Sequence[int]) -> torch.Tensor:
        """`positions` as an index tensor on the device, made once (no copy to the device per step)."""
        key = tuple(positions)
        found = self._indices.get(key)
        if found is None:
            found = self._indices[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        return found

    # ------------------------------------------------------------------------------ rows
    def germinate(self, member: int, slot: int, blueprint: str, module: nn.Module) -> None:
        """Member `member`'s new seed `module` (built under its own seed) goes into its row."""
        key = (slot, blueprint)
        if key not in self.families:
            family = Family(copy.deepcopy(module), self.n, self.device)
            if family.leaves is not None and not _packs_faithfully(family.template, family.leaves, self.channels[slot]):
                family.leaves = None
            self.families[key] = family
        self.families[key].load(member, module)

    def seed_module(self, member: int, slot: int, blueprint: str) -> nn.Module:
        return self.families[(slot, blueprint)].module(member)

    def host_module(self, member: int) -> HostCNN:
        return self.host.module(member)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ forward
    def _host_params(self, lanes: list[int] | None, detach: bool) -> dict[str, torch.Tensor]:
        flat = self.host.flat.detach() if detach else self.host.flat
        return self.host.views(flat if lanes is None else flat.index_select(0, self.index(lanes)))

    def _stage(self, i: int, params: Params, x: torch.Tensor, n: int) -> torch.Tensor:
        sub = _sub(params, f"stages.{i}.")
        return packed_call(self.template.stages[i], self._stage_leaves[i], sub, {}, x, n)

    def _head(self, params: Params, x: torch.Tensor, n: int) -> torch.Tensor:
        return packed_call(self.template.head, self._head_leaves, _sub(params, "head."), {}, _nchw(x), n)

    def _seed(self, key: tuple[int, str], rows: list[int], x: torch.Tensor, *, frozen: bool,
              training: bool) -> torch.Tensor:
        """The seeds of `rows` on packed `x` (one lane per row), packed. Running statistics are
        written back to the rows when training and not `frozen`."""
        fam = self.families[key]
        lanes = _padded(rows)
        if len(rows) == 1:
            x = torch.cat([x, x], dim=1)
        flat = fam.flat.detach() if frozen else fam.flat
        at = self.index(lanes)
        buffers = {n: b.index_select(0, at) for n, b in fam.buffers.items()}  # copies: written back below
        _set_mode(fam.template, training)
        out = packed_call(fam.template, fam.leaves, fam.views(flat.index_select(0, at)), buffers, _nchw(x), len(lanes))
        out = contiguous_grad(out)
        if training and not frozen and buffers:
            with torch.no_grad():
                for name, b in buffers.items():
                    fam.buffers[name].index_copy_(0, self.index(rows), b[: len(rows)])
        return take(out, len(lanes), self.index([0])) if len(rows) == 1 else out

    def _slot(self, s: int, h: torch.Tensor, members: list[int], alphas: Mapping[int, torch.Tensor],
              *, frozen: bool, training: bool) -> torch.Tensor:
        """Slot `s` on packed `h` (lane i holds member `members[i]`): h + alpha * seed(h) for each
        member with a live seed there (`alphas[s]`: every member's alpha), h for the rest. A member
        on two lanes (padding) gets its seed on the first only."""
        position: dict[int, int] = {}
        for i, m in enumerate(members):
            position.setdefault(m, i)
        for blueprint, rows in self.groups[s].live.items():
            rows = [r for r in rows if r in position]
            if not rows:
                continue
            at = self.index([position[r] for r in rows])
            out = self._seed((s, blueprint), rows, take(h, len(members), at), frozen=frozen, training=training)
            h = add_at(h, len(members), at, out, alphas[s].index_select(0, self.index(rows)))
        return h

    def _downstream(self, s: int, p: torch.Tensor, members: list[int], alphas: Mapping[int, torch.Tensor],
                    *, frozen: bool, training: bool) -> torch.Tensor:
        """Logits (B, len(members), K) of packed `p` (the output of slot `s` for `members`) through
        the rest of the network; host parameters detached if `frozen`."""
        lanes = _padded(members)
        if len(members) == 1:
            p = torch.cat([p, p], dim=1)
        params = self._host_params(lanes, detach=frozen)
        for j in range(s + 1, self.n_slots):
            p = self._stage(j, params, p, len(lanes))
            p = self._slot(j, p, lanes, alphas, frozen=frozen, training=training)
        return _lanes(self._head(params, p, len(lanes)), len(lanes))[:, : len(members)]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, alphas: Mapping[int, torch.Tensor],
                   trained: Mapping[tuple[int, str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step for every member on its own minibatch: x packed (B, N*C, H, W), y (B, N).

        `alphas[s]` is each member's alpha at slot s for this step (N,); `trained` the rows of each
        seed family that learn this epoch. Returns the host's loss (N,) and correct count (N,)."""
        n, lanes = self.n, self.lanes
        if n == 1:
            x = torch.cat([x, x], dim=1)
        width = len(lanes)
        params = self._host_params(None if n > 1 else lanes, detach=False)
        _set_mode(self.template, True)
        h = x
        objective = torch.zeros((), device=self.device)
        for s in range(self.n_slots):
            h = self._stage(s, params, h, width)
            for blueprint, rows in self.groups[s].probe.items():
                at = self.index(rows)
                p = take(h, width, at).detach()
                p = p + self._seed((s, blueprint), rows, p, frozen=False, training=True)
                logits = self._downstream(s, p, rows, alphas, frozen=True, training=True)
                objective = objective + _member_losses(logits, y.index_select(1, at)).sum()
            h = self._slot(s, h, lanes, alphas, frozen=False, training=True)
        logits = _lanes(self._head(params, h, width), width)[:, :n]
        losses = _member_losses(logits, y)
        (objective + losses.sum()).backward()
        self.host.adam(None, self.lr, self.corrections)
        for key, mask in trained.items():
            self.families[key].adam(mask, self.lr, self.corrections)
        correct = (logits.detach().argmax(-1) == y).sum(0)
        return losses.detach(), correct

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, alphas: Mapping[int, torch.Tensor],
                 worth: Mapping[int, list[int]] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every member on the same images (eval mode): loss sum (N,), correct (N,), and for the
        members in `worth[s]` (slot -> members whose managed seed sits in slot s) the correct count
        of the counterfactual path from that slot on (TRAINING: the isolated probe; BLENDING: the
        slot at alpha 0), else 0."""
        n, lanes = self.n, self.lanes
        width = len(lanes)
        params = self._host_params(None if n > 1 else lanes, detach=True)
        _set_mode(self.template, False)
        loss = torch.zeros(n, dtype=torch.float64, device=self.device)
        correct = torch.zeros(n, dtype=torch.long, device=self.device)
        other = torch.zeros(n, dtype=torch.long, device=self.device)
        worth = worth or {}
        for i in range(0, len(y), EVAL_CHUNK):
            xc, yc = x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]
            h = repeat_lanes(xc, width)
            for s in range(self.n_slots):
                h = self._stage(s, params, h, width)
                rows = worth.get(s)
                if rows:
                    at = self.index(rows)
                    branch = take(h, width, at)
                    for blueprint, group in self.groups[s].probe.items():
                        sel = [r for r in rows if r in group]
                        if sel:
                            pos = self.index([rows.index(r) for r in sel])
                            out = self._seed((s, blueprint), sel, take(branch, len(rows), pos), frozen=True, training=False)
                            branch = add_at(branch, len(rows), pos, out)
                    hits = (self._downstream(s, branch, rows, alphas, frozen=True, training=False).argmax(-1)
                            == yc[:, None]).sum(0)
                    other = other.index_add(0, at, hits)
                h = self._slot(s, h, lanes, alphas, frozen=True, training=False)
            logits = _lanes(self._head(params, h, width), width)[:, :n]
            loss += _member_losses(logits, yc[:, None].expand(-1, n), reduce="sum").double()
            correct += (logits.argmax(-1) == yc[:, None]).sum(0)
        return loss, correct, other


def _set_mode(module: nn.Module, training: bool) -> None:
    """`module.train(training)`, skipped when already so (it walks every submodule)."""
    if module.training != training:
        module.train(training)


def _sub(params: Params, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _member_losses(logits: torch.Tensor, y: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Cross-entropy per member: logits (B, L, K), labels (B, L) -> (L,), each member's mean (or
    sum) over its own batch, reduced along a contiguous row as a lone member's would be."""
    b, n, k = logits.shape
    per = F.cross_entropy(logits.reshape(b * n, k), y.reshape(b * n), reduction="none").view(b, n).T.contiguous()
    return per.mean(1) if reduce == "mean" else per.sum(1)
