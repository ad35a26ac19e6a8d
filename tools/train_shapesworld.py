"""Train the shipped ShapesWorld open_clip ViT contrastively on captioned generated scenes (CPU).

Loss = CLIP InfoNCE on [CLS] vs caption + ``--token-loss-weight`` × a FILIP-style token-level
term: image i vs caption j scores the mean, over the objects caption j names, of the max over
image i's patch tokens (last block → ln_post → proj) of patch·text(object name). Captions in a
batch that name the same set of objects count as positives of each other (in a 24-class world
duplicates are frequent, unlike web alt-text).

    python -m tools.train_shapesworld --steps 1800 --out piaa_index/model/assets/shapesworld/...
    python -m tools.train_shapesworld --eval-only CHECKPOINT
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

# On a shared CPU, spinning OpenMP workers wait on descheduled peers: passive waiting made a
# training step ~3x faster here. Must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from piaa_index.shapes.world import CLASSES, Scene, caption_with_ids, render_scene  # noqa: E402

if TYPE_CHECKING:
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

# A development tool, not shipped: run from the repository root, it writes into the package.
ASSET_DIR = (
    Path(__file__).resolve().parent.parent / "piaa_index" / "model" / "assets" / "shapesworld"
)
MODEL_NAME = "shapesworld"
EVAL_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image with a {}.", "{}"]
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OpenAI defaults, used by the preprocess
STD = (0.26862954, 0.26130258, 0.27577711)


def log(msg: str) -> None:
    """Log a line to stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def create_model(pretrained: str | None = None) -> CLIP:
    """The shapesworld open_clip model (through the same factory path as real weights)."""
    import open_clip

    open_clip.add_model_config(ASSET_DIR)
    return cast("CLIP", open_clip.create_model(MODEL_NAME, pretrained=pretrained))


def get_tokenizer():  # noqa: ANN201 - open_clip tokenizer type varies by version
    """open_clip's default tokenizer with the model's context length."""
    import open_clip

    open_clip.add_model_config(ASSET_DIR)
    return open_clip.get_tokenizer(MODEL_NAME)


def encode_image_tokens(
    model: CLIP, x: torch.Tensor, with_trunk: bool = False
) -> tuple[torch.Tensor, ...]:
    """([CLS] [B,d], patch tokens [B,M,d]) in the joint space, unnormalised (plain last block).

    With `with_trunk`, also the patch tokens after `ln_post` and before `proj` [B,M,width].
    """
    v = cast("VisionTransformer", model.visual)
    h = v.transformer(v._embeds(x))
    h = v.ln_post(h)
    if with_trunk:
        return h[:, 0] @ v.proj, h[:, 1:] @ v.proj, h[:, 1:]
    return h[:, 0] @ v.proj, h[:, 1:] @ v.proj


# ----------------------------------------------------------------------------- data


Objects = list[list[tuple[int, float]]]


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, Objects]:
    """Render scenes [start, start+n) of a pool at 2× resolution, box-downsampled to `size`."""
    seed, start, n, size = args
    imgs = np.empty((n, size, size, 3), np.uint8)
    objs = []
    for k in range(n):
        rng = np.random.default_rng([seed, start + k])
        sc = render_scene(rng, size * 2)
        imgs[k] = np.asarray(sc.image.reduce(2))
        objs.append([(c, a) for c, a in sc.objects])
    return imgs, objs


def make_pool(n: int, seed: int, size: int, workers: int = 2) -> tuple[np.ndarray, Objects]:
    """Pre-render a pool of n scenes (uint8 [n,size,size,3]) and their objects."""
    chunk = 500
    jobs = [(seed, s, min(chunk, n - s), size) for s in range(0, n, chunk)]
    imgs, objs = [], []
    with mp.get_context("fork").Pool(workers) as pool:
        for i, (im, ob) in enumerate(pool.imap(_render_chunk, jobs)):
            imgs.append(im)
            objs.extend(ob)
            if i % 10 == 0:
                log(f"pool {len(objs)}/{n}")
    return np.concatenate(imgs), objs


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- losses


def soft_clip_loss(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where `same[i, j]` marks extra positives (identical object sets)."""
    tgt = same / same.sum(1, keepdim=True)
    li = -(tgt * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(tgt.T * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def token_sim(patches: torch.Tensor, cls_text: torch.Tensor, mention: torch.Tensor) -> torch.Tensor:
    """FILIP-style [B_img, B_txt]: mean over caption j's objects of max over image i's patches."""
    m = torch.einsum("bmd,cd->bmc", patches, cls_text).amax(1)  # [B, C]
    return (m @ mention.T) / mention.sum(1).clamp(min=1)[None, :]


# ----------------------------------------------------------------------------- evaluation


def mean_ap(scores: np.ndarray, targets: np.ndarray, valid: np.ndarray | None = None) -> float:
    """mAP over classes; `valid` masks images out per class."""
    from piaa_index.eval.metrics import average_precision

    aps = []
    for c in range(scores.shape[1]):
        keep = np.ones(len(scores), bool) if valid is None else valid[:, c]
        aps.append(average_precision(scores[keep, c], targets[keep, c]))
    return float(np.nanmean(aps)) * 100


@torch.no_grad()
def text_prototypes(
    model: CLIP,
    tokenizer,
    templates: list[str],  # noqa: ANN001
) -> torch.Tensor:
    """[C, d] normalised mean over templates of normalised text embeddings."""
    protos = []
    for name in CLASSES:
        t = F.normalize(model.encode_text(tokenizer([tp.format(name) for tp in templates])), dim=-1)
        protos.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(protos)


@torch.no_grad()
def evaluate(model: CLIP, n: int = 500, seed: int = 987654, size: int = 224) -> dict[str, float]:
    """mAP of [CLS] zero-shot and patch-text on held-out scenes, preprocessed like the product."""
    from open_clip.transform import image_transform

    model.eval()
    tok = get_tokenizer()

    pre = image_transform(model.visual.image_size, is_train=False)
    rng = np.random.default_rng(seed)
    scenes = [render_scene(rng, size) for _ in range(n)]
    C = len(CLASSES)
    y = np.zeros((n, C), bool)
    area = np.zeros((n, C))
    for i, s in enumerate(scenes):
        for c, a in s.objects:
            y[i, c] = True
            area[i, c] = max(area[i, c], a)
    T = text_prototypes(model, tok, EVAL_TEMPLATES)
    scale = model.logit_scale.exp()
    cls_s, patch_s, patch_raw = [], [], []
    for b in range(0, n, 100):
        x = torch.stack([pre(s.image) for s in scenes[b : b + 100]])
        cls, pt = encode_image_tokens(model, x)
        cls, pt = F.normalize(cls, dim=-1), F.normalize(pt, dim=-1)
        cls_s.append((scale * cls @ T.T).softmax(-1))
        lp = scale * pt @ T.T  # [B, M, C]
        patch_s.append(lp.softmax(-1).amax(1))
        patch_raw.append((pt @ T.T).amax(1))
    cs, ps, pr = (torch.cat(v).numpy() for v in (cls_s, patch_s, patch_raw))
    small = ~y | (area < 0.04)  # per class: positives only where the object is small
    large = ~y | (area >= 0.1)  # ... or only where it is large
    dom = np.array([s.objects[0][0] if s.objects else -1 for s in scenes])
    out = {
        "cls_map": mean_ap(cs, y),
        "patch_text_map": mean_ap(ps, y),
        "patch_max_raw_map": mean_ap(pr, y),
        "cls_map_small": mean_ap(cs, y, small),
        "patch_text_map_small": mean_ap(ps, y, small),
        "cls_map_large": mean_ap(cs, y, large),
        "patch_text_map_large": mean_ap(ps, y, large),
        "cls_top1_dominant": float((cs.argmax(1) == dom).mean() * 100),
        "patch_text_top1_dominant": float((ps.argmax(1) == dom).mean() * 100),
        "logit_scale": float(scale),
        "n_images": n,
    }
    model.train()
    return out


# ----------------------------------------------------------------------------- checkpoint


def save_checkpoint(model: CLIP, path: Path) -> None:
    """Save the open_clip state_dict as fp16 safetensors (atomic rename)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "model": MODEL_NAME})
    tmp.replace(path)


# ----------------------------------------------------------------------------- training


def train(a: argparse.Namespace) -> None:
    """Contrastive training loop."""
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    model = create_model(str(a.init) if a.init else None)  # --init: continue from a checkpoint
    model.float()
    tok = get_tokenizer()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    t0 = time.time()
    imgs, objs = make_pool(a.pool, a.seed, size, workers=a.threads)
    log(f"pool of {len(objs)} scenes at {size}px in {time.time() - t0:.0f}s")
    cls_tokens = tok([f"a photo of a {n}." for n in CLASSES])
    tok_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))  # token-loss temperature
    # A token head that is trained and then thrown away (--head-token-loss-weight): it teaches
    # the trunk's patch tokens class evidence without aligning the shipped `proj` on them, the
    # way web-scale CLIP's patches carry evidence that sits far from the text.
    visual = cast("VisionTransformer", model.visual)
    width, dim = visual.proj.shape
    head_proj = torch.nn.Parameter(torch.randn(width, dim) * width**-0.5)
    head_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay + [head_proj], "weight_decay": a.wd},
            {"params": no_decay + [tok_scale, head_scale], "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def progress(s: int) -> float:
        # With a time budget the schedule follows wall time, so a run on a contended CPU still
        # completes its cosine decay; otherwise it follows steps.
        p = s / a.steps
        if a.time_limit:
            p = max(p, (time.time() - t_start) / (a.time_limit * 60))
        return min(1.0, p)

    def lr_at(s: int) -> float:
        p = progress(s)
        if p < a.warmup:
            return a.lr * max(p, 1 / a.steps) / a.warmup
        return a.lr * 0.5 * (1 + math.cos(math.pi * (p - a.warmup) / (1 - a.warmup)))

    rng = np.random.default_rng(a.seed + 1)
    model.train()
    t_start, ema = time.time(), None
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = rng.integers(0, len(objs), size=a.batch)
        batch = imgs[idx]
        flip = rng.random(a.batch) < 0.5
        batch[flip] = batch[flip][:, :, ::-1]
        x = to_tensor(np.ascontiguousarray(batch))
        caps, mention = [], torch.zeros(a.batch, len(CLASSES))
        for i, j in enumerate(idx):
            stub = Scene(image=None, labels=[], objects=objs[j])  # type: ignore[arg-type]
            text, ids = caption_with_ids(stub, rng)
            caps.append(text)
            mention[i, ids] = 1.0
        same = (mention[:, None, :] == mention[None, :, :]).all(-1).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            cls, patches, trunk = encode_image_tokens(model, x, with_trunk=True)
            txt = model.encode_text(tok(caps))
            any_token = a.token_loss_weight > 0 or a.head_token_loss_weight > 0
            ct = model.encode_text(cls_tokens) if any_token else None
        # Losses in fp32: bf16 only speeds up the towers (about 1.5x on this CPU).
        cls, txt = F.normalize(cls.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss_clip = soft_clip_loss(scale * cls @ txt.T, same)
        loss = loss_clip
        loss_tok = torch.zeros(())
        loss_head = torch.zeros(())
        if ct is not None:
            ct = F.normalize(ct.float(), dim=-1)
            has = mention.sum(1) > 0
            if a.token_loss_weight > 0:
                sim = token_sim(F.normalize(patches.float(), dim=-1), ct, mention)
                loss_tok = soft_clip_loss(
                    tok_scale.exp().clamp(max=100) * sim[has][:, has], same[has][:, has]
                )
                loss = loss + a.token_loss_weight * loss_tok
            if a.head_token_loss_weight > 0:
                head_patches = F.normalize(trunk.float() @ head_proj, dim=-1)
                sim = token_sim(head_patches, ct, mention)
                loss_head = soft_clip_loss(
                    head_scale.exp().clamp(max=100) * sim[has][:, has], same[has][:, has]
                )
                loss = loss + a.head_token_loss_weight * loss_head
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % a.log_every == 0 or step == a.steps - 1:
            el = time.time() - t_start
            log(
                f"step {step}/{a.steps} loss {loss.item():.3f} (ema {ema:.3f}) clip "
                f"{loss_clip.item():.3f} tok {loss_tok.item():.3f} head {loss_head.item():.3f} scale {scale.item():.1f} "
                f"tokscale {tok_scale.exp().item():.1f} lr {lr_at(step):.2e} "
                f"{(step + 1) / el:.3f} steps/s"
            )
        if a.ckpt_every and step > 0 and step % a.ckpt_every == 0:
            save_checkpoint(model, a.tmp_ckpt)
            log(f"saved {a.tmp_ckpt}")
        if progress(step + 1) >= 1.0:
            log(f"time limit reached at step {step}")
            break
    train_min = (time.time() - t_start) / 60
    save_checkpoint(model, a.out)
    log(f"saved {a.out} ({a.out.stat().st_size / 1e6:.1f} MB) after {train_min:.1f} min")
    res: dict[str, object] = dict(evaluate(model, n=a.eval_images))
    res.update(
        {
            "steps_done": step + 1,
            "train_minutes": round(train_min, 1),
            "final_loss_ema": round(float(ema or 0), 4),
            "args": {k: str(v) for k, v in vars(a).items()},
        }
    )
    log("eval " + json.dumps(res))
    if a.metrics_json:
        a.metrics_json.write_text(json.dumps(res, indent=2))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100000, help="cap; see --time-limit")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--pool", type=int, default=20000, help="pre-rendered scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--token-loss-weight", type=float, default=1.0, help="0 disables")
    p.add_argument(
        "--head-token-loss-weight",
        type=float,
        default=0.0,
        help="token-level loss through a separate projection that is discarded (0 disables)",
    )
    p.add_argument("--out", type=Path, default=ASSET_DIR / "shapesworld.safetensors")
    p.add_argument("--init", type=Path, default=None, help="start from these weights")
    p.add_argument("--tmp-ckpt", type=Path, default=Path("/tmp/shapesworld_ckpt.safetensors"))
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--time-limit",
        type=float,
        default=50.0,
        help="training minutes; the LR schedule follows it (0: steps only)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the towers",
    )
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--metrics-json", type=Path, default=None)
    p.add_argument("--eval-only", type=Path, default=None, metavar="CHECKPOINT")
    a = p.parse_args(argv)
    if a.eval_only is not None:
        torch.set_num_threads(a.threads)
        res = evaluate(create_model(str(a.eval_only)), n=a.eval_images)
        print(json.dumps(res, indent=2))
        return
    train(a)


if __name__ == "__main__":
    main()
