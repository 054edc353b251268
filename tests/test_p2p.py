"""Prompt2Prompt on tiny models: the token mappers, the attention control through diffusers' attention-processor hook
(fraction 0 = plain SD sampling of the edited prompt from the same noise; fraction 1 = the edited branch's
cross-attention maps are the source's), local blend, and the task through BIVDiff's runner and its row checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import presets
from pipelines.bivdiff.config import resolve_bivdiff_params

from .conftest import quiet, task_row

SRC, MORE, SWAP = "a cat on grass", "a cat on grass at night", "a dog on grass"


@pytest.fixture(scope="module")
def sd(tiny_bivdiff):
    import os

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = quiet(StableDiffusionPipeline.from_pretrained(os.path.join(tiny_bivdiff, "image_model"), safety_checker=None,
                                                          feature_extractor=None, requires_safety_checker=False))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _ids(tok, text):
    return tok(text).input_ids


def test_mappers(sd):
    from pipelines.bivdiff.p2p import refine_mapper, replace_mapper

    tok = sd.tokenizer
    src, more = _ids(tok, SRC), _ids(tok, MORE)
    k = len(src) - 1  # the end token's position in the source
    assert more[:k] == src[:k]  # the edited caption extends the source: its first k tokens align one for one
    mapper, alphas = refine_mapper(SRC, MORE, tok)
    assert mapper[:k].tolist() == list(range(k)) and alphas[:k].eq(1).all()
    assert alphas[k : len(more) - 1].eq(0).all()  # " at night" is new
    assert mapper[len(more) - 1] == k and alphas[len(more) - 1] == 1  # end token to end token
    swap = _ids(tok, SWAP)
    assert len(swap) == len(src)  # "cat" and "dog" have as many tokens: the swap is one for one
    m = replace_mapper(SRC, SWAP, tok)
    assert torch.equal(m, torch.eye(77))
    with pytest.raises(ValueError, match="one for one"):
        replace_mapper(SRC, MORE, tok)


def _run(sd, prompts, latents, control):
    from pipelines.bivdiff.p2p import install

    previous = install(sd.unet, control)
    try:
        step = lambda _p, _i, _t, kw: {"latents": control.after_step(kw["latents"], latents.shape[-2:])}  # noqa: E731
        return sd(prompt=prompts, latents=latents.repeat(2, 1, 1, 1), num_inference_steps=3, guidance_scale=7.5,
                  output_type="np", callback_on_step_end=step).images
    finally:
        sd.unet.set_attn_processor(previous)


def _control(sd, prompts, edit_type, fraction, **kw):
    from pipelines.bivdiff.p2p import P2PControl

    return P2PControl(prompts, sd.tokenizer, edit_type=edit_type, steps=3, cross=fraction, self_=fraction,
                      self_max_tokens=presets.P2P_SELF_MAX_TOKENS, threshold=presets.P2P_BLEND_THRESHOLD, **kw)


@pytest.mark.heavy
def test_fraction_zero_is_plain_sd_of_the_edited_prompt(sd):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for edit_type, edited in (("refine", MORE), ("replace", SWAP)):
        ours = _run(sd, [SRC, edited], noise, _control(sd, [SRC, edited], edit_type, 0.0))
        plain = sd(prompt=edited, latents=noise, num_inference_steps=3, guidance_scale=7.5, output_type="np").images
        assert np.abs(ours[1] - plain[0]).max() < 1e-4
        assert np.abs(ours[0] - sd(prompt=SRC, latents=noise, num_inference_steps=3, guidance_scale=7.5,
                                   output_type="np").images[0]).max() < 1e-4


def test_fraction_one_gives_the_edited_branch_the_source_cross_attention(sd):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    tok = sd.tokenizer
    swap = _control(sd, [SRC, SWAP], "replace", 1.0, record=True)
    _run(sd, [SRC, SWAP], noise, swap)
    cross_layers = sum(name.endswith("attn2.processor") for name in sd.unet.attn_processors)
    assert len(swap.record) == cross_layers * 3 and [s for s, _ in swap.record][::cross_layers] == [0, 1, 2]
    for _, maps in swap.record:
        assert torch.equal(maps[1], maps[0])
    refine = _control(sd, [SRC, MORE], "refine", 1.0, record=True)
    images = _run(sd, [SRC, MORE], noise, refine)
    k, end = len(_ids(tok, SRC)) - 1, len(_ids(tok, MORE)) - 1
    for _, maps in refine.record:
        assert torch.equal(maps[1][..., :k], maps[0][..., :k]) and torch.equal(maps[1][..., end], maps[0][..., k])
    plain = sd(prompt=MORE, latents=noise, num_inference_steps=3, guidance_scale=7.5, output_type="np").images
    assert np.abs(images[1] - plain[0]).max() > 1e-3  # the control changed the edited image


def test_local_blend_keeps_the_source_outside_the_words(sd):
    """Local blend after a step: the words' cross-attention (maps at 1/4 of the latent size), 3 x 3 max-pooled,
    normalised, over 0.3 -> the edited latents keep their values there and take the source's everywhere else. Here the
    word "cat" attends only to the top-left cell of a 4 x 4 map: the mask is the top-left 8 x 8 of 16 x 16 latents."""
    from pipelines.bivdiff.p2p import word_tokens

    control = _control(sd, [SRC, MORE], "refine", 0.4, blend_words=("cat", "cat"))
    probs = torch.full((2, 2, 16, 77), 0.01)
    for k, prompt in enumerate((SRC, MORE)):
        cat = word_tokens(prompt, sd.tokenizer)[1]
        probs[k, :, :, cat] = 0.0
        probs[k, :, 0, cat] = 1.0
    control.maps = [probs]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    out = control.after_step(latents, (16, 16))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:8, :8] = True
    assert torch.equal(out[0], latents[0]) and control.step == 1
    assert torch.allclose(out[1][:, inside], latents[1][:, inside], atol=1e-6)
    assert torch.equal(out[1][:, ~inside], latents[0][:, ~inside])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # and through a real generation
    images = _run(sd, [SRC, MORE], noise, _control(sd, [SRC, MORE], "refine", 0.4, blend_words=("cat", "night")))
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.heavy
def test_p2p_task_rows_and_runner(worker, videos):
    """Through the runner: the source frames inverted by the SD UNet, the edited frames go on (α 0.25); rows are
    checked before any model runs."""
    p = resolve_bivdiff_params(task_row("p2p", videos, local_blend="", idm_prompt=SRC, vdm_prompt=SWAP,
                                        edit_type="replace",
                                    height=32, width=48))  # not the image model's native size
    assert (p.alpha, p.cross_replace, p.self_replace) == (0.25, 0.4, 0.4)
    r = worker.run(p)
    assert r.stage1.shape == (4, 32, 48, 3) and r.calls == {"I": 5, "V": 10}
    for row, match in (({"edit_type": "replace", "vdm_prompt": MORE}, "one for one"),
                       ({"local_blend": "horse"}, "not a word of"),
                       ({"local_blend": "cat,grass,night"}, "one or two"),
                       ({"idm_steps": 3}, "divisor of 1000"),
                       ({"vdm_prompt": ""}, "source caption")):
        with pytest.raises(ValueError, match=match):
            resolve_bivdiff_params(task_row("p2p", videos,
                                            **{"idm_prompt": SRC, "vdm_prompt": MORE, "local_blend": "", **row}))
