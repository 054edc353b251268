"""Exact speed options of a loaded backbone (docs/speed.md): `torch.compile` of the repeated blocks of every UNet and
of the VAE decoder (regional compilation, as diffusers' `compile_repeated_blocks`: each block class is compiled once
per input shape and shared by the blocks of that shape, at a fraction of a whole-model compile's time), and
channels-last convolution weights. Neither changes what is computed: outputs agree with eager ones within float
rounding (tests/test_speed.py). Settings `auto` (on for CUDA), `on`, `off`; the model spec's `compile` and
`channels_last` (`model.compile`, `--compile`)."""
from __future__ import annotations

import logging
from typing import Iterable

import torch

logger = logging.getLogger(__name__)
# Dynamo keeps this many compiled variants of one block's code: a UNet's resnets differ in channels and resolution
# (about 17 variants in SD 1.5's at one size), times the row sizes of a run; past Dynamo's default of 8 the rest
# would run eager without a word
RECOMPILE_LIMIT = 256


def enabled(setting: str, device: torch.device) -> bool:
    """`auto` is on for CUDA only: on a CPU the compile takes longer than the runs it would speed up."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def use_channels_last(modules: Iterable[torch.nn.Module]) -> int:
    """Give every 2-D convolution's weight the channels-last layout (the NHWC kernels of cuDNN; a convolution with
    such a weight answers in that layout too); returns how many. 3-D convolutions keep theirs."""
    count = 0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.Conv2d):
                sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last)
                count += 1
    return count


def compile_blocks(modules: Iterable[torch.nn.Module], blocks: tuple[str, ...]) -> int:
    """`torch.compile` every submodule whose class is named in `blocks` (static shapes: a new batch size or frame
    size compiles once more); returns how many. A block that Dynamo cannot compile runs eager (`suppress_errors`):
    a compiler fault on a GPU node must not fail rows."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           RECOMPILE_LIMIT * 8)
    torch._dynamo.config.suppress_errors = True
    count = 0
    for module in modules:
        for sub in module.modules():
            if type(sub).__name__ in blocks:
                sub.compile(dynamic=False)
                count += 1
    return count


def accelerate(backbone, *, compile: str, channels_last: str) -> dict[str, int]:
    """Apply the spec's speed options to a loaded backbone in place: its video and image UNets and its VAE decoder
    (`backbone.repeated_blocks` names the classes compiled). Returns {"compiled": blocks, "channels_last": convs}."""
    models = [m for m in (backbone.unet, backbone.image_unet, backbone.vae.decoder) if m is not None]
    done = {"compiled": 0, "channels_last": 0}
    if enabled(channels_last, backbone.device):
        done["channels_last"] = use_channels_last(models)
    if enabled(compile, backbone.device):
        done["compiled"] = compile_blocks(models, backbone.repeated_blocks)
    if any(done.values()):
        logger.info("speed options: %d block(s) compiled, %d convolution(s) channels-last", done["compiled"],
                    done["channels_last"])
    return done
