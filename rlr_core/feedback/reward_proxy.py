"""The reward proxy: what the app learns from a few hundred human judgements.

    reward = mean over an ensemble of small MLP heads of head(image embedding, prompt features)

- The image embedding comes from a frozen ``ImageEncoder`` (built in: the ShapesWorld perception
  model's 128-d embedding; CLIP image features fit the same protocol). Frozen because a few
  hundred ratings cannot train an encoder, and a fixed encoder keeps dR/dx meaningful.
- Prompt features come from a ``PromptEncoder`` (built in: a bag of words plus hashed bigrams)
  and condition each head FiLM-style (scale and shift of its hidden layer).
- Heads are trained with the Bradley-Terry loss on comparisons (ties as 0.5, skips never reach
  here) and an ordered-logit loss on stars, each head on its own bootstrap weights of the data,
  so their spread (``disagreement``) says where the proxy is unsure.
- ``proxy(images, prompts)`` returns a (B,) tensor differentiable in ``images``.
- Saved as safetensors (weights) + JSON (architecture, encoders, training metadata); no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from rlr_core.backends.base import DiffusionBackend
from rlr_core.feedback.encoders import PerceptionImageEncoder, make_image_encoder
from rlr_core.feedback.prompt_encoders import default_prompt_encoder, prompt_encoder_from_config
from rlr_core.feedback.protocols import ImageEncoder, PromptEncoder

if TYPE_CHECKING:
    from feedback_store import FeedbackStore

FORMAT = "rlr-reward-proxy"
FORMAT_VERSION = 1
N_STARS = 5


# ----------------------------------------------------------------------------- the model
class RewardProxy(nn.Module):
    """An ensemble of ``n_heads`` FiLM-conditioned MLP heads over frozen image embeddings."""

    def __init__(self, image_encoder: ImageEncoder, prompt_encoder: PromptEncoder, n_heads: int = 5,
                 hidden: int = 32, seed: int = 0, bilinear_rank: int = 0):
        super().__init__()
        # Plain attributes, not submodules: the encoders are frozen and not part of the weights.
        self.__dict__["image_encoder"] = image_encoder
        self.__dict__["prompt_encoder"] = prompt_encoder
        self.n_heads, self.hidden, self.bilinear_rank = n_heads, hidden, bilinear_rank
        d, p = image_encoder.dim, prompt_encoder.dim
        self.register_buffer("emb_mean", torch.zeros(d))
        self.register_buffer("emb_std", torch.ones(d))
        self.w1 = nn.Parameter(torch.empty(n_heads, d, hidden))
        self.b1 = nn.Parameter(torch.empty(n_heads, hidden))
        self.film_scale = nn.Parameter(torch.empty(n_heads, p, hidden))
        self.film_shift = nn.Parameter(torch.empty(n_heads, p, hidden))
        self.w2 = nn.Parameter(torch.empty(n_heads, hidden))
        # Optional low-rank bilinear prompt x image term: sum_k (p U)_k (z V)_k.
        self.bil_u = nn.Parameter(torch.empty(n_heads, p, bilinear_rank))
        self.bil_v = nn.Parameter(torch.empty(n_heads, d, bilinear_rank))
        self.b2 = nn.Parameter(torch.empty(n_heads))
        # Ordered-logit cut points for stars: first cut + positive gaps (always increasing).
        self.cut0 = nn.Parameter(torch.empty(n_heads, 1))
        self.cut_gaps = nn.Parameter(torch.empty(n_heads, N_STARS - 2))
        self.training_info: dict[str, Any] = {}
        self.reset_parameters(seed)

    def to(self, *args, **kwargs) -> RewardProxy:
        # The frozen image encoder is a plain attribute (not trained, not saved with the heads), so
        # nn.Module.to does not reach it; it follows the heads.
        super().to(*args, **kwargs)
        self.image_encoder.to(self.w1.device)
        return self

    def reset_parameters(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)  # each head gets its own init: part of the diversity
        d, p = self.w1.shape[1], self.film_scale.shape[1]
        with torch.no_grad():
            self.w1.copy_(torch.randn(self.w1.shape, generator=g) / math.sqrt(d))
            self.b1.zero_()
            self.film_scale.copy_(torch.randn(self.film_scale.shape, generator=g) * 0.1 / math.sqrt(p))
            self.film_shift.copy_(torch.randn(self.film_shift.shape, generator=g) * 0.1 / math.sqrt(p))
            self.w2.copy_(torch.randn(self.w2.shape, generator=g) / math.sqrt(self.hidden))
            self.bil_u.copy_(torch.randn(self.bil_u.shape, generator=g) / math.sqrt(p))
            self.bil_v.copy_(torch.randn(self.bil_v.shape, generator=g) * 0.1 / math.sqrt(d))
            self.b2.zero_()
            self.cut0.fill_(-1.5)
            self.cut_gaps.fill_(math.log(math.e - 1))  # softplus -> gaps of 1

    def set_normalizer(self, embeddings: torch.Tensor) -> None:
        with torch.no_grad():
            self.emb_mean.copy_(embeddings.mean(0))
            if len(embeddings) > 1:
                self.emb_std.copy_(embeddings.std(0).clamp_min(1e-4))
            else:
                self.emb_std.fill_(1.0)

    def heads_from_features(self, emb: torch.Tensor, prompt_feats: torch.Tensor) -> torch.Tensor:
        """(B, dim) embeddings and (B, P) prompt features -> (n_heads, B) rewards."""
        z = (emb - self.emb_mean) / self.emb_std
        h = F.silu(torch.einsum("bd,hdk->hbk", z, self.w1) + self.b1[:, None])
        scale = torch.einsum("bp,hpk->hbk", prompt_feats, self.film_scale)
        shift = torch.einsum("bp,hpk->hbk", prompt_feats, self.film_shift)
        h = F.silu(h * (1 + scale) + shift)
        r = torch.einsum("hbk,hk->hb", h, self.w2) + self.b2[:, None]
        if self.bilinear_rank:
            r = r + (torch.einsum("bp,hpr->hbr", prompt_feats, self.bil_u)
                     * torch.einsum("bd,hdr->hbr", z, self.bil_v)).sum(-1)
        return r

    def embed(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        emb = self.image_encoder.embed(images)
        return emb, self.prompt_encoder.encode(prompts).to(emb)

    def head_rewards(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.heads_from_features(*self.embed(images, prompts))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Mean reward over heads, (B,); gradients flow to ``images``."""
        return self.head_rewards(images, prompts).mean(0)

    def disagreement(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Std of the reward across heads, (B,): how unsure the ensemble is about each image."""
        return self.head_rewards(images, prompts).std(0)

    def win_probs(self, left: torch.Tensor, right: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(n_heads, B): each head's P(left beats right) under Bradley-Terry."""
        r = self.head_rewards(torch.cat([left, right]), list(prompts) * 2)
        return torch.sigmoid(r[:, : len(left)] - r[:, len(left):])

    def cutpoints(self) -> torch.Tensor:
        return torch.cat([self.cut0, self.cut0 + torch.cumsum(F.softplus(self.cut_gaps), -1)], -1)

    # ------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  folder / "reward_proxy.safetensors")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_heads": self.n_heads,
                "hidden": self.hidden, "bilinear_rank": self.bilinear_rank,
                "image_encoder": {"name": self.image_encoder.name, "dim": self.image_encoder.dim,
                                  "fingerprint": self.image_encoder.fingerprint(),
                                  "spec": self.image_encoder.spec},
                "prompt_encoder": self.prompt_encoder.config(), "training": self.training_info}
        (folder / "reward_proxy.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path, image_encoder: ImageEncoder | None = None,
             check_fingerprint: bool = True) -> RewardProxy:
        folder = Path(folder)
        meta = json.loads((folder / "reward_proxy.json").read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder} does not hold a reward proxy this version can read")
        image_encoder = image_encoder or PerceptionImageEncoder()
        want = meta["image_encoder"]
        if (want["name"], want["dim"]) != (image_encoder.name, image_encoder.dim):
            raise ValueError(f"proxy was trained on {want['name']} ({want['dim']}-d) features, "
                             f"not {image_encoder.name} ({image_encoder.dim}-d)")
        if check_fingerprint and want["fingerprint"] != image_encoder.fingerprint():
            raise ValueError(f"the {want['name']} encoder's weights changed (or were loaded in another dtype) "
                             "since this proxy was trained; retrain it")
        proxy = cls(image_encoder, prompt_encoder_from_config(meta["prompt_encoder"]), meta["n_heads"],
                    meta["hidden"], bilinear_rank=int(meta.get("bilinear_rank", 0)))
        proxy.load_state_dict(load_file(folder / "reward_proxy.safetensors"))
        proxy.training_info = meta["training"]
        return proxy.eval()


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class FitConfig:
    steps: int = 150
    lr: float = 1e-2
    weight_decay: float = 1e-2
    star_weight: float = 0.5  # weight of the stars loss relative to the comparisons loss
    centering: float = 1.0
    holdout_frac: float = 0.2  # of comparisons, for the reported held-out accuracy
    bootstrap: bool = True
    seed: int = 0


@dataclasses.dataclass
class Features:
    """Embedded training items and the judgements about them (indices into the items)."""

    emb: torch.Tensor  # (N, dim)
    prompt_feats: torch.Tensor  # (N, P)
    pairs: torch.Tensor  # (M, 2) long: (left, right)
    labels: torch.Tensor  # (M,) P(left beats right): 1, 0 or 0.5
    rated: torch.Tensor  # (K,) long
    stars: torch.Tensor  # (K,) long in 1..5


def _ordinal_nll(r: torch.Tensor, cuts: torch.Tensor, stars: torch.Tensor) -> torch.Tensor:
    """Ordered logit: P(stars <= c) = sigmoid(cut_c - r). r (H, K), cuts (H, 4) -> (H, K)."""
    cdf = torch.sigmoid(cuts[:, None, :] - r[..., None])  # (H, K, 4)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], -1)
    p = (cdf[..., 1:] - cdf[..., :-1]).gather(-1, (stars - 1).expand(r.shape[0], -1)[..., None])
    return -p.squeeze(-1).clamp_min(1e-6).log()


def _train(proxy: RewardProxy, f: Features, cfg: FitConfig, seed: int) -> float:
    proxy.reset_parameters(seed)
    proxy.set_normalizer(f.emb)
    # Only items that some judgement mentions take part in the loss: compute rewards for those.
    used, inverse = torch.unique(torch.cat([f.pairs.reshape(-1), f.rated]), return_inverse=True)
    pairs, rated = inverse[: f.pairs.numel()].reshape(-1, 2), inverse[f.pairs.numel():]
    emb, pf = f.emb[used], f.prompt_feats[used]
    _, group = torch.unique(pf, dim=0, return_inverse=True)  # items grouped by prompt
    n_groups = int(group.max()) + 1
    group_size = torch.bincount(group, minlength=n_groups).float()
    g = torch.Generator().manual_seed(seed + 1)
    h, m, k = proxy.n_heads, len(pairs), len(rated)
    # Poisson(1) bootstrap weights: each head sees its own resample of the data.
    w_pairs = torch.poisson(torch.ones(h, m), g) if cfg.bootstrap else torch.ones(h, m)
    w_stars = torch.poisson(torch.ones(h, k), g) if cfg.bootstrap else torch.ones(h, k)
    opt = torch.optim.AdamW(proxy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = torch.tensor(0.0)
    proxy.train()
    for _ in range(cfg.steps):
        r = proxy.heads_from_features(emb, pf)
        # Bradley-Terry only sees differences within a prompt, so each head could drift by an
        # arbitrary offset per prompt and their spread would mean nothing: centre each prompt's
        # rewards at 0 (a penalty on offsets only; it leaves reward differences free).
        group_mean = torch.zeros(h, n_groups).index_add_(1, group, r) / group_size
        loss = cfg.centering * group_mean.pow(2).mean()
        if m:
            logits = r[:, pairs[:, 0]] - r[:, pairs[:, 1]]
            bt = F.binary_cross_entropy_with_logits(logits, f.labels.expand(h, -1), reduction="none")
            loss = loss + (bt * w_pairs).sum() / w_pairs.sum().clamp_min(1)
        if k:
            nll = _ordinal_nll(r[:, rated], proxy.cutpoints(), f.stars)
            loss = loss + cfg.star_weight * (nll * w_stars).sum() / w_stars.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    proxy.eval()
    return float(loss.detach())


@torch.no_grad()
def pairwise_accuracy(proxy: RewardProxy, f: Features) -> float | None:
    """Share of decisive pairs (label 0 or 1) the ensemble mean orders correctly."""
    decisive = f.labels != 0.5
    if not decisive.any():
        return None
    r = proxy.heads_from_features(f.emb, f.prompt_feats).mean(0)
    pred = r[f.pairs[decisive, 0]] > r[f.pairs[decisive, 1]]
    return float((pred == (f.labels[decisive] == 1)).float().mean())


def _subset_pairs(f: Features, idx: torch.Tensor) -> Features:
    return dataclasses.replace(f, pairs=f.pairs[idx], labels=f.labels[idx])


def fit_features(proxy: RewardProxy, f: Features, cfg: FitConfig | None = None) -> dict[str, Any]:
    """Fit the heads; report held-out pairwise accuracy (on a split of the comparisons, from a
    fit without them) and then refit on everything. Returns the report (also in training_info)."""
    cfg = cfg or FitConfig()
    m = len(f.pairs)
    if m == 0 and len(f.rated) == 0:
        raise ValueError("no comparisons or ratings to learn from")
    report: dict[str, Any] = {"n_comparisons": m, "n_ratings": len(f.rated), "n_items": len(f.emb),
                              "heldout_accuracy": None, "heldout_pairs": 0, "config": dataclasses.asdict(cfg)}
    n_hold = int(m * cfg.holdout_frac)
    if n_hold >= 5:
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(cfg.seed))
        hold, train = perm[:n_hold], perm[n_hold:]
        _train(proxy, _subset_pairs(f, train), cfg, cfg.seed)
        held = _subset_pairs(f, hold)
        report["heldout_accuracy"] = pairwise_accuracy(proxy, held)
        report["heldout_pairs"] = int((held.labels != 0.5).sum())
    report["train_loss"] = _train(proxy, f, cfg, cfg.seed)
    report["train_accuracy"] = pairwise_accuracy(proxy, f)
    with torch.no_grad():
        heads = proxy.heads_from_features(f.emb, f.prompt_feats)  # (n_heads, items)
        report["mean_disagreement"] = float(heads.std(0).mean())
        # the scale of the proxy's reward (its ensemble mean) over the images people judged
        report["reward_spread"] = float(heads.mean(0).std()) if heads.shape[1] > 1 else 0.0
    proxy.training_info = report
    return report


@torch.no_grad()
def embed_items(proxy: RewardProxy, images: torch.Tensor, prompts: Sequence[str],
                batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    embs = [proxy.image_encoder.embed(images[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(embs), proxy.prompt_encoder.encode(prompts)


def fit(proxy: RewardProxy, images: torch.Tensor, prompts: Sequence[str],
        comparisons: Sequence[tuple[int, int, float]], ratings: Sequence[tuple[int, int]] = (),
        cfg: FitConfig | None = None) -> dict[str, Any]:
    """Fit on items (images + their prompts) and judgements that index into them:
    comparisons (left, right, P(left beats right)) and ratings (item, stars)."""
    emb, pf = embed_items(proxy, images, prompts)
    f = Features(emb, pf, torch.tensor([c[:2] for c in comparisons], dtype=torch.long).reshape(-1, 2),
                 torch.tensor([float(c[2]) for c in comparisons]),
                 torch.tensor([r[0] for r in ratings], dtype=torch.long),
                 torch.tensor([r[1] for r in ratings], dtype=torch.long))
    return fit_features(proxy, f, cfg)


def load_image_tensor(paths: Sequence[str | Path]) -> torch.Tensor:
    """PNG files -> (B, 3, H, W) floats in [0, 1] (all images must share a size); animated PNGs
    (the store's clips) -> (B, F, 3, H, W), every frame."""
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            frames = []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        arrays.append(frames[0] if len(frames) == 1 else np.stack(frames))
    batch = torch.from_numpy(np.stack(arrays))
    return batch.movedim(-1, -3).contiguous()  # channels before height and width


def train_from_store(store: FeedbackStore, image_encoder: ImageEncoder | None = None,
                     prompt_encoder: PromptEncoder | None = None, rater_ids: Sequence[str] | None = None,
                     n_heads: int = 5, cfg: FitConfig | None = None) -> tuple[RewardProxy, dict[str, Any]]:
    """Read comparisons (skips excluded) and stars from the store and fit a new proxy.

    Without a ``prompt_encoder``: the ShapesWorld bag of words when every prompt uses only its
    words, else the free-text hashed-words encoder (see ``encoders.default_prompt_encoder``)."""
    records = store.preference_records(rater_ids)
    if not records.comparisons and not records.ratings:
        raise ValueError("the store has no comparisons or ratings to learn from yet")
    ids = sorted(records.samples)
    index = {sid: i for i, sid in enumerate(ids)}
    prompts = [records.samples[i]["prompt"] for i in ids]
    if prompt_encoder is None:
        prompt_encoder = default_prompt_encoder(prompts)
    proxy = RewardProxy(image_encoder or PerceptionImageEncoder(), prompt_encoder, n_heads=n_heads)
    images = load_image_tensor([records.samples[i]["path"] for i in ids])
    report = fit(proxy, images, prompts,
                 [(index[a], index[b], y) for a, b, y in records.comparisons],
                 [(index[s], k) for s, k in records.ratings], cfg)
    report["rater_ids"] = list(rater_ids) if rater_ids is not None else None
    return proxy, report


def saved_encoder_spec(folder: str | Path) -> str:
    """The spec of the image encoder a saved proxy was trained with ("perception" for files
    written before specs were recorded: only the perception encoder existed then)."""
    meta = json.loads((Path(folder) / "reward_proxy.json").read_text())
    return meta["image_encoder"].get("spec") or "perception"


def load_proxy(folder: str | Path, backend: DiffusionBackend | None = None, device: str | torch.device = "cpu",
               image_encoder: ImageEncoder | None = None) -> RewardProxy:
    """Load a saved proxy with the encoder it was trained with (rebuilt from its recorded spec
    unless given); refuses, like :meth:`RewardProxy.load`, when name, size or weights differ."""
    encoder = image_encoder or make_image_encoder(saved_encoder_spec(folder), backend, device)
    return RewardProxy.load(folder, image_encoder=encoder)
