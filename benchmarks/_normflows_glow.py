"""Worker for ``benchmarks/images.py``: normflows' Glow (PyTorch) on integer images.

Runs in the benchmark's own PyTorch environment (never in nflax's), started by
``images.py`` as ``PYTHON _normflows_glow.py DATA.npz CONFIG_JSON``; prints one JSON object
on its last line of output. ``DATA.npz`` holds ``train``, ``validation``, ``test`` (integer
levels, ``(n, H, W, C)``) and ``num_levels`` (K).

The model, from normflows' own Glow example (``normflows.MultiscaleFlow`` of ``GlowBlock``,
``Squeeze`` and ``Merge``), for an (H, W, C) image with L levels of K blocks:

* normflows' ``forward`` is latent → data; its ``log_prob`` runs the ``inverse`` passes
  (data → latent). Data → latent: ``Logit`` (``transforms.Logit(alpha)``, as ``transform``,
  its log-det counted), then per level (finest first) ``Squeeze`` (space to depth, 2×2), K
  ``GlowBlock`` s (each ActNorm → invertible 1×1 conv, LU → affine coupling, channel split,
  ``scale_map="sigmoid"``, conditioner ``ConvNet2d`` 3×3 → 1×1 → 3×3 with ``hidden``
  channels, ReLU, last layer zero), then ``Merge.inverse`` factors out half the channels to
  that level's base; the last level keeps all its channels.
* Each level's base is ``distributions.GlowBase`` (a diagonal Gaussian with a learned mean
  and log scale per channel), unconditional (``class_cond=False``).
* ``log_prob(y)`` is the log-density of the continuous ``y = (x + u)/K`` in ``[0, 1]^D``;
  the dequantized NLL in data space adds ``D log K``; bits/dim is
  ``(NLL_y + D ln K) / (D ln 2)`` (normflows' example: ``nll / ln 2 / D + 8`` for K = 256).

Training: Adam, ``steps`` steps of ``batch_size`` images (a fresh permutation each epoch),
fresh uniform noise ``u ~ U[0, 1)^D`` every step; every ``eval_every`` steps the validation
bound (fixed noise) is computed and the best parameters are kept and restored at the end.
Test: the single-sample bound averaged over ``iw_samples`` draws, and the importance-weighted
NLL ``−log (1/S) Σ_s p((x + u_s)/K) K^{−D}`` with ``S = iw_samples``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import normflows as nf
import numpy as np
import torch


def build_glow(shape_hwc, levels: int, depth: int, hidden: int, logit: bool, alpha: float):
    """normflows' Glow for images of shape ``(H, W, C)`` (normflows works in NCHW)."""
    h, w, c = shape_hwc
    if h % 2**levels or w % 2**levels:
        raise ValueError(f"normflows Glow: {levels} levels squeeze H, W by 2^{levels}: {shape_hwc}")
    q0, merges, flows = [], [], []
    for i in range(levels):
        # level i runs at C·2^(L+1−i) channels (after its squeeze and the merge below it)
        blocks = [
            nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(depth)
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.GlowBase(latent))
    transform = nf.transforms.Logit(alpha=alpha) if logit else None
    return nf.MultiscaleFlow(q0, flows, merges, transform=transform, class_cond=False)


def _nchw(levels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(levels.transpose(0, 3, 1, 2))).float()


def log_weights(model, x: torch.Tensor, k: int, samples: int, gen: torch.Generator):
    """``log p((x + u)/K) − D log K`` for ``samples`` noise draws per row: ``(n, samples)``."""
    d = x[0].numel()
    out = []
    for _ in range(samples):
        u = torch.rand(x.shape, generator=gen)
        out.append(model.log_prob((x + u) / k, None) - d * math.log(k))
    return torch.stack(out, 1)


def evaluate(model, x: torch.Tensor, k: int, samples: int, seed: int, batch: int = 512):
    """Per-row bound (mean of the single-sample bounds) and IW NLL, nats in data space."""
    gen = torch.Generator().manual_seed(seed)
    bound, iw = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            lw = log_weights(model, x[start : start + batch], k, samples, gen).double()
            bound.append(-lw.mean(1))
            iw.append(math.log(samples) - torch.logsumexp(lw, 1))
    return torch.cat(bound).numpy(), torch.cat(iw).numpy()


def main(data_path: str, config: dict) -> dict:
    torch.manual_seed(config["seed"])
    if config.get("threads"):  # 0 / None: torch's default (one per core)
        torch.set_num_threads(int(config["threads"]))
    data = np.load(data_path)
    k = int(data["num_levels"])
    train, val, test = (_nchw(data[s]) for s in ("train", "validation", "test"))
    shape = tuple(data["train"].shape[1:])
    d = math.prod(shape)
    model = build_glow(
        shape, config["levels"], config["depth"], config["hidden"], config["logit"], config["alpha"]
    )
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    bsz = min(config["batch_size"], len(train))
    perm, pos = torch.randperm(len(train), generator=gen), 0
    best = (math.inf, 0, None)
    losses, val_curve, stop = [], [], "steps"
    t0 = time.perf_counter()
    for step in range(config["steps"]):
        if pos + bsz > len(train):
            perm, pos = torch.randperm(len(train), generator=gen), 0
        xb = train[perm[pos : pos + bsz]]
        pos += bsz
        y = (xb + torch.rand(xb.shape, generator=gen)) / k
        model.train()
        loss = -model.log_prob(y, None).mean()
        if not torch.isfinite(loss):
            stop = f"non_finite at step {step}"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() + d * math.log(k))
        last = step == config["steps"] - 1
        if (step + 1) % config["eval_every"] == 0 or last:
            model.eval()
            vb, _ = evaluate(model, val, k, 1, seed=config["seed"] + 1)
            val_curve.append((step + 1, float(vb.mean())))
            if vb.mean() < best[0]:
                best = (float(vb.mean()), step + 1, copy.deepcopy(model.state_dict()))
    train_seconds = time.perf_counter() - t0
    steps_run = len(losses)
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    t1 = time.perf_counter()
    bound, iw = evaluate(model, test, k, config["iw_samples"], seed=config["seed"] + 2)
    eval_seconds = time.perf_counter() - t1
    with torch.no_grad():
        torch.manual_seed(config["seed"] + 3)
        samples, _ = model.sample(config["num_grid"], temperature=None)
    to_bits = 1.0 / (d * math.log(2))
    return {
        "model": "normflows Glow",
        "torch": torch.__version__,
        "normflows": getattr(nf, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "num_params": int(num_params),
        "steps_run": steps_run,
        "stop": stop,
        "best_step": best[1],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "steps_per_second": steps_run / train_seconds if train_seconds > 0 else float("nan"),
        "test_bound_bpd": float(bound.mean() * to_bits),
        "test_iw_bpd": float(iw.mean() * to_bits),
        "val_bound_bpd": best[0] * to_bits if best[2] is not None else float("nan"),
        "train_loss_bpd_last": losses[-1] * to_bits if losses else float("nan"),
        "val_curve_bpd": [(s, v * to_bits) for s, v in val_curve],
        "samples": samples.permute(0, 2, 3, 1).numpy().astype(float).round(5).tolist(),
    }


if __name__ == "__main__":
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps(result))
