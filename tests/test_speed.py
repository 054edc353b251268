"""The exact speed options (pipelines/speed.py, docs/speed.md) change no output beyond float rounding: the same rows
sampled by an eager backbone and by one loaded with `compile: on` and `channels_last: on`, on the tiny AnimateDiff set
(both UNets and the VAE decoder in play: IV-Mixed), CPU float32. Stated tolerance: relative error of the latents and
largest frame difference under 1e-4 (measured about 3e-6)."""
import dataclasses

import pytest
import torch

from pipelines.backbones.registry import load_backbone
from pipelines.config import ModelSpec, resolve_params
from pipelines.generate import generate

TOL = 1e-4


def rows():
    return [resolve_params({"prompt": "A paper lantern rising into the night sky.", "seed": 3, "steps": 2,
                            "frames": 4, "height": 32, "width": 32, "sampler": "ivmixed"}, {})]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.heavy
def test_compiled_channels_last_sampling_equals_eager_within_float_rounding(tiny_ad_dir):
    spec = ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32", compile="off",
                                    channels_last="off")
    eager = generate(load_backbone(spec), rows())[0]

    fast = load_backbone(dataclasses.replace(spec, compile="on", channels_last="on"))
    convs = [m for m in fast.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    compiled = [m for m in fast.image_unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    assert compiled and all(m._compiled_call_impl is not None for m in compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = generate(fast, rows())[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= 6  # the blocks really ran compiled
    assert out.calls == eager.calls
    assert rel(out.latents, eager.latents) < TOL
    assert (out.frames - eager.frames).abs().max().item() < TOL
    again = generate(fast, rows())[0]  # the second call at that size reuses the graphs: the same numbers
    assert torch.equal(again.latents, out.latents)


def test_auto_is_on_for_cuda_only_and_bad_settings_are_refused(tiny_ad_dir):
    from pipelines.speed import enabled

    assert enabled("auto", torch.device("cuda")) and not enabled("auto", torch.device("cpu"))
    assert enabled("on", torch.device("cpu")) and not enabled("off", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"compile: must be one of \('auto', 'on', 'off'\), got 'yes'"):
        ModelSpec.from_model_dir("animatediff", tiny_ad_dir, compile="yes")
    with pytest.raises(ValueError, match="channels_last: must be one of"):
        ModelSpec.from_model_dir("animatediff", tiny_ad_dir, channels_last=True)
