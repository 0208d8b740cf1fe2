"""A probe for the batched engine: N bare digits hosts trained as one `torch.func.vmap` computation
against N lone trainings of the same functional step, side by side in one run.

It asks the two questions the engine's design turns on: how much faster per host the fused step
is, and whether a member's parameters depend on the width of the batch it trained in (bit for
bit). Bare hosts only (no seeds), the first `STEPS` minibatches, Adam written out so vmap can
carry its moments; each member has its own initialisation and data order.

    python bench/bench_fused_probe.py [N] [STEPS]      # default 8 hosts, 20 steps
"""
import sys
import time

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from esper_cli.tasks import BUILTIN_TASKS

torch.set_num_threads(1)
task = BUILTIN_TASKS["digits"]
data = task.load(None, 0)
X, Y = data.train_x, data.train_y
B, LR, STEPS = 64, 0.01, int(sys.argv[2]) if len(sys.argv) > 2 else 20


def hosts(n):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(task.build_host())
    return out


def batches(i, steps):  # each member its own data order
    g = torch.Generator().manual_seed(1000 + i)
    order = torch.randperm(len(Y), generator=g)
    return [order[(s * B) % len(Y):(s * B) % len(Y) + B] for s in range(steps)]


def adam(p, g, m, v, t):
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    mh, vh = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
    return p - LR * mh / (vh.sqrt() + 1e-8), m, v


def lone(model, idxs):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    for t, idx in enumerate(idxs, 1):
        g = grad(loss)(params, X[idx], Y[idx])
        for k in params:
            params[k], m[k], v2[k] = adam(params[k], g[k], m[k], v2[k], t)
    return params


def fused(models, idx_lists):
    params, _ = stack_module_state(models)
    base = models[0]
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, p, (x,)), y)
    vg = vmap(grad(loss))
    for t in range(1, len(idx_lists[0]) + 1):
        idx = torch.stack([il[t - 1] for il in idx_lists])
        g = vg(params, X[idx], Y[idx])
        for k in params:
            params[k], m[k], v2[k] = adam(params[k], g[k], m[k], v2[k], t)
    return params


n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
ms = hosts(n)
idx = [batches(i, STEPS) for i in range(n)]
lone(ms[0], idx[0][:2])  # warm both paths up: the first functional call pays one-off costs
fused(ms[:2], [il[:2] for il in idx[:2]])
t0 = time.perf_counter()
solo = [lone(ms[i], idx[i]) for i in range(n)]
t1 = time.perf_counter()
together = fused(ms, idx)
t2 = time.perf_counter()
same = all(torch.equal(solo[i][k], together[k][i]) for i in range(n) for k in together)
maxdiff = max(float((solo[i][k] - together[k][i]).detach().abs().max()) for i in range(n) for k in together)
print(f"N={n} steps={STEPS}: lone {t1 - t0:.2f}s, vmap {t2 - t1:.2f}s, ratio {(t1 - t0) / (t2 - t1):.2f}x; "
      f"bit-identical: {same}; max |diff| {maxdiff:.2e}")


# Width independence: member 0 trained in batches of different widths.
def fused_at(width):
    return fused(ms[:width], idx[:width])


widths = [w for w in (1, 2, 3, 5, 12, 32, 64) if w <= n]
runs = {w: fused_at(w) for w in widths}
for a, b in zip(widths, widths[1:]):
    same_w = all(torch.equal(runs[a][k][0], runs[b][k][0]) for k in runs[b])
    d = max(float((runs[a][k][0] - runs[b][k][0]).detach().abs().max()) for k in runs[b])
    print(f"member 0, width {a} vs {b}: bit-identical {same_w}, max |diff| {d:.2e}")
