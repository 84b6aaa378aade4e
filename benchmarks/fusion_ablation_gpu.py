"""Which fusion makes M3Net's scale attention name the deciding view? An ablation, for a GPU.

The tasks of :mod:`m3netcore.data.mechanism` (only macro context decides; only micro
texture decides), 320 training and 128 validation nodules, 12 epochs, five seeds each, for:

* ``votes`` with ``aux`` 0.5 (what :class:`m3netcore.models.m3net.M3Net` does): attention
  weighs per-scale votes, each vote trained on its own view (``scale_vote_loss``);
* ``old``: attention weighs value vectors, one classifier on their mix (the earlier form);
* ``votes`` with ``aux`` 0 and 1: the vote fusion without and with a stronger vote loss;
* ``single-micro`` on the macro task: the micro view alone.

Prints AUC and mean attention per run. On a GPU it takes about a minute and a half
(``python3 benchmarks/fusion_ablation_gpu.py``); ``smoke`` as an argument runs a tiny
version anywhere. The output of 2026-11-28 on an H200 is in ``benchmarks/results/``.
"""

import math
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3netcore.crops import default_preprocessing, extract_crops
from m3netcore.data.mechanism import mechanism_patch
from m3netcore.losses import cross_scale_infonce, scale_vote_loss
from m3netcore.metrics import roc_auc
from m3netcore.models import build_model
from m3netcore.models.output import ModelOutput

P = default_preprocessing()
SCALES = P.scale_names
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = len(sys.argv) > 1


def one(args):
    seed, i, label, task = args
    rng = np.random.default_rng([seed, i])
    click = rng.uniform(-1.0, 1.0, 3)
    crops = extract_crops(mechanism_patch(rng, bool(label), task), click, P)
    return [crops[s] for s in SCALES]


def dataset(count, seed, task, pool):
    labels = np.arange(count) % 2
    rows = pool.map(one, [(seed, i, int(label), task) for i, label in enumerate(labels)], chunksize=8)
    views = [torch.from_numpy(np.stack([r[k] for r in rows]))[:, None].to(DEV) for k in range(3)]
    return views, torch.from_numpy(labels).to(DEV)


def old_head(self, features):
    tokens = (
        torch.stack([self.tokenizers[n](features[:, i]) for i, n in enumerate(self.scale_names)], 1)
        + self.scale_embedding
    )
    query = self.query(tokens[:, self._query_index])
    keys = self.key(tokens)
    att = torch.einsum("bst,bt->bs", keys, query).div(math.sqrt(tokens.shape[-1])).softmax(1)
    fused = torch.einsum("bs,bst->bt", att, self.value(tokens))
    logit = self.classifier(self.dropout(fused)).squeeze(-1)
    emb = torch.stack(
        [F.normalize(self.projections[n](features[:, i]), dim=-1) for i, n in enumerate(self.scale_names)], 1
    )
    return ModelOutput(logit=logit, scale_attention=att, embeddings=emb)


def make(variant, seed):
    torch.manual_seed(seed)
    if variant == "single-micro":
        return build_model("single-micro").to(DEV)
    net = build_model("m3net")
    if variant == "old":
        net.classifier = nn.Linear(net.config.token_dim, 1)
        net.forward_head = old_head.__get__(net)
    return net.to(DEV)


def augment(views, g):
    b = views[0].shape[0]
    flips = (torch.rand(b, 3, generator=g) < 0.5).to(DEV)
    swap = (torch.rand(b, generator=g) < 0.5).to(DEV)
    out = []
    for v in views:
        v = v.clone()
        for a in range(3):
            v = torch.where(flips[:, a, None, None, None, None], v.flip(2 + a), v)
        v = torch.where(swap[:, None, None, None, None], v.transpose(3, 4), v)
        out.append(v)
    return out


def train(net, views, labels, seed, aux, epochs=12, bs=32, lr=2e-3):
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    spe = n // bs
    total = spe * epochs
    warm = max(1, int(0.05 * total))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sch = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    for _ in range(epochs):
        net.train()
        order = torch.randperm(n, generator=g).to(DEV)
        for st in range(spe):
            idx = order[st * bs : (st + 1) * bs]
            batch = augment([v[idx].float() for v in views], g)
            y = labels[idx].float()
            out = net(batch)
            loss = F.binary_cross_entropy_with_logits(out.logit, y)
            if out.embeddings is not None:
                loss = loss + 0.1 * cross_scale_infonce(out.embeddings, 0.1)
            if aux > 0 and out.scale_logits is not None:
                loss = loss + aux * scale_vote_loss(out.scale_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()


if __name__ == "__main__":
    t0 = time.time()
    with Pool(2 if SMOKE else 16) as pool:
        n_train, n_val = (64, 32) if SMOKE else (320, 128)
        data = {task: (dataset(n_train, 1, task, pool), dataset(n_val, 2, task, pool)) for task in ("macro", "micro")}
    print(f"data {time.time() - t0:.0f}s", flush=True)
    runs = [("votes", 0.5), ("old", 0.0), ("votes", 0.0), ("votes", 1.0)]
    print(
        f"{'variant':<10} {'aux':>4} {'task':<6} {'seed':>4} {'AUC':>6} {'micro':>6} {'meso':>6} {'macro':>6}",
        flush=True,
    )
    for variant, aux in runs:
        for task in ("macro", "micro"):
            for seed in range(1 if SMOKE else 5):
                net = make(variant, seed)
                train(net, *data[task][0], seed, aux, epochs=1 if SMOKE else 12)
                net.eval()
                with torch.inference_mode():
                    out = net(data[task][1][0])
                auc = roc_auc(out.logit.float().cpu().numpy(), data[task][1][1].cpu().numpy())
                att = out.scale_attention.float().mean(0).tolist()
                print(
                    f"{variant:<10} {aux:>4} {task:<6} {seed:>4} {auc:>6.3f} " + " ".join(f"{a:>6.3f}" for a in att),
                    flush=True,
                )
    for seed in range(1 if SMOKE else 3):
        net = make("single-micro", seed)
        train(net, [data["macro"][0][0][0]], data["macro"][0][1], seed, 0, epochs=1 if SMOKE else 12)
        net.eval()
        with torch.inference_mode():
            out = net([data["macro"][1][0][0]])
        auc = roc_auc(out.logit.float().cpu().numpy(), data["macro"][1][1].cpu().numpy())
        print(f"single-micro macro seed {seed} AUC {auc:.3f}", flush=True)
    print(f"total {time.time() - t0:.0f}s")
