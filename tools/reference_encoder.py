"""The two-pass reference encoder the tests and the throughput benchmark compare against.

Development only (not shipped): `Encoder.encode_images` gets [CLS] and patch tokens from one
forward pass; this computes them the slow, obvious way — `encode_image` for [CLS], then a
hooked second forward for the patches — so the one-pass path can be checked against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from piaa_index.model.encoder import Encoder, _front_end_block


def encode_two_pass(enc: Encoder, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """encode_image for [CLS], a hooked full forward for the patches."""
    v = enc.visual
    captured: list[torch.Tensor] = []
    last = v.transformer.resblocks[-1]

    def replace_last(_m: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> torch.Tensor:
        return _front_end_block(enc.spec.front_end, last, args[0], enc._batch_first)

    def capture(_m: torch.nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
        captured.append(out)

    with torch.inference_mode():
        x = enc._prepare(batch)
        cls = enc.model.encode_image(x)
        hooks = [v.transformer.register_forward_hook(capture)]
        if enc.spec.front_end != "clip":
            hooks.append(last.register_forward_hook(replace_last))
        try:
            enc.model.encode_image(x)
        finally:
            for hook in hooks:
                hook.remove()
        patches = enc._project_patches(captured[-1])  # Transformer.forward returns NLD
        return enc._normalise(cls), enc._normalise(patches)
