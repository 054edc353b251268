"""The named sampler presets and the run defaults (device, dtype, decode chunk, BIVDiff's tasks and models); each
backbone's model ids and native settings sit on its class (`pipelines/backbones/`, `BackboneDefaults`).

Library code never names a hub id or a device; it reads them from here or the backbone classes through the config
objects. Presets marked `_v1` reproduce the official IV-Mixed code (docs/algorithms.md §5); the others are the
clean, self-consistent versions (docs/algorithms.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import CFGRamp

DEFAULT_DEVICE = "auto"  # "auto": cuda if available, else cpu
DEFAULT_DTYPE = "auto"  # "auto": float16 on cuda, float32 elsewhere
# frames per VAE decode call: the float32 decode of 16 frames at 512 x 512 at once needs far more than a 24 GB GPU
# has left beside the weights (benchmarks/memory.py, docs/checkpoints.md "Memory")
DEFAULT_DECODE_CHUNK = 4
SPEED_SWITCHES = ("auto", "on", "off")  # model.compile, model.channels_last (pipelines/speed.py): auto = on for CUDA
# FreeU's scales for video UNets as diffusers documents them (b1/b2/s1/s2; Si et al., arXiv 2309.11497)
FREEU_VIDEO = "1.2/1.4/0.9/0.2"


@dataclass(frozen=True)
class Preset:
    """A named sampler: variant pattern plus the numbers the paper's code uses for it."""

    name: str
    variant: str  # grammar pattern (pipelines/grammar.py); "standard" = plain DDIM
    description: str
    guidance: float = 7.5  # main-step CFG (AD/MS code: 7.5)
    idm_guidance: CFGRamp = CFGRamp(4.0, 4.0)  # zigzag CFG magnitude of IDM sub-steps, ramp over steps
    vdm_guidance: CFGRamp = CFGRamp(4.0, 4.0)  # same for VDM sub-steps
    interval: str = "0.0..1.0"  # zigzag on every step; fractions scale with --steps
    zz: int | None = None  # I->V substitution when i % zz == zz-1 (None: never)
    timestep_spacing: str = "linspace"  # DDIM grid of the AD/MS code (docs/algorithms.md §1)
    steps_offset: int = 1
    idm_text: str = "own"  # "own": the IDM's text encoder; "vdm": reuse the VDM's embeddings (AD code)
    keep_noop: bool = False  # keep the exact-identity t=0 zigzag (docs/algorithms.md §2) for call-for-call parity
    split_tables: bool = False  # inverse moves read the IDM scheduler's ᾱ table (AD code); else one shared table
    overrides: dict = field(default_factory=dict)  # per-preset defaults for steps/frames/size/seed
    backbones: tuple[str, ...] = ()  # backbones the preset reproduces (or, `applies_only`, runs on); empty: any
    applies_only: bool = False  # `backbones` names where the method exists (FreeNoise), not code it reproduces
    zigzag_on_image_table: bool = False  # both zigzag directions read the IDM scheduler's table (VideoCrafter2 code)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("standard", "standard", "plain DDIM, same grid/CFG/noise as the IV-Mixed presets (the A/B baseline)"),
        Preset("ivmixed", "down:IV-IV",
               "clean IV-IV zigzag, self-consistent timestep labels (docs/algorithms.md §2), t=0 no-op skipped"),
        Preset("ivmixed_fast", "down:IV-IV@reuse=V",
               "IV-IV on the first 40% of the steps, the second video-model call of each zigzag reusing the first's "
               "ε pair (docs/algorithms.md §10): both models on every active step, at most 2x standard's FLOPs on "
               "AnimateDiff", interval="0.0..0.4"),
        # comparators (docs/lab.md): the training-free alternatives, from the same noise and grid as the presets above
        Preset("freeu", f"standard@freeu={FREEU_VIDEO}",
               "plain DDIM with FreeU on the video model (diffusers' documented video values b1 1.2, b2 1.4, s1 0.9, "
               "s2 0.2)"),
        Preset("freeinit", "standard@freeinit=3",
               "plain DDIM run 3 times, FreeInit re-initialising the low frequencies of the noise between runs "
               "(Butterworth, order 4, stop 0.25/0.25: diffusers' enable_free_init defaults; 3x the calls)"),
        Preset("cfg_interval", "standard@cfg=0.0..0.4",
               "plain DDIM with guidance on the first 40% of the steps and the conditional prediction alone after "
               "(diffusers' dynamic-CFG example, ClassifierFreeGuidance(start, stop)): 0.7x standard's FLOPs"),
        Preset("pag", "standard@pag=3",
               "plain DDIM with perturbed-attention guidance of scale 3 on the video model (its mid-block "
               "self-attention, diffusers' AnimateDiffPAGPipeline default layers) beside CFG: 1.5x standard's FLOPs"),
        Preset("freenoise", "standard@freenoise=16/4",
               "plain DDIM with FreeNoise on the motion module (AnimateDiff; diffusers' enable_free_noise defaults: "
               "windows of 16 frames every 4, pyramid fusion, shuffled noise): rows longer than the motion module's "
               "frame limit (e.g. --frames 64); at 16 frames or fewer it is standard",
               backbones=("animatediff",), applies_only=True),
        # the refining steps are the authors' [45, 35, 25, 15] steps left of 50 (the paper's ablation, "Ours"),
        # written as fractions of the run done so that they scale with --steps
        Preset("videoelevator", "standard@elevator=0.1/0.3/0.5/0.7",
               "VideoElevator (arXiv 2403.05438): the image model samples with its self-attention on each video's "
               "first frame; on 4 steps the video model refines the predicted clean video for 16% of the steps and "
               "the result is inverted back (docs/lab.md)"),
        Preset("ivmixed_freeu", f"down:IV-IV@freeu={FREEU_VIDEO}",
               "the ivmixed preset with FreeU on its video-model calls (the image model's calls unchanged)"),
        Preset(
            "ivmixed_ad_v1", "down:IV-IV@labels=legacy_ad",
            "official AnimateDiff code (docs/algorithms.md §5): legacy label swap, VDM text embeddings for the IDM, "
            "zz=1000",
            zz=1000, idm_text="vdm", keep_noop=True, split_tables=True,
            overrides={"seed": 23523}, backbones=("animatediff",),
        ),
        Preset(
            "ivmixed_ms_v1", "down:IV-IV@resize=nearest64,w_go_I=-4,w_back_I=4,w_go_V=-4,w_back_V=4",
            "official ModelScope code (docs/algorithms.md §5): chain labels, IDM moves at 64x64, zigzag CFG fixed at "
            "+-4 (the code ignores its CFG flags), inversions on the IDM scheduler's table, main CFG 7.5",
            keep_noop=True, split_tables=True, overrides={"seed": 23523}, backbones=("modelscope",),
        ),
        Preset(
            "ivmixed_vc_v1", "down:IV-IV@sub_every=3(cfg=I),w_go_I=-4,w_back_I=4,w_go_V=-4,w_back_V=4",
            "official VideoCrafter2 code (docs/algorithms.md §5): chain labels, every third step the VDM replaces the "
            "IDM with the IDM's CFG, zigzag CFG fixed at +-4, zigzag moves on the IDM's table, SDE-DPM-Solver++ main "
            "steps",
            guidance=9.0, keep_noop=True, zigzag_on_image_table=True, overrides={"seed": 23523},
            backbones=("videocrafter2",),
        ),
    )
}

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # quality scores (CLIPSIM, frame consistency)
DEFAULT_SUBJECT_MODEL = "facebook/dino-vitb16"  # subject consistency (VBench's DINO ViT-B/16)
DEFAULT_SAMPLER = "ivmixed"
DEFAULT_SEED = 0
DEFAULT_NEGATIVE_PROMPT = ""


# ---- BIVDiff (docs/algorithms.md §8) -----------------------------------------------------------------------------
# the quality tags the official ControlNet / InstructPix2Pix stage-1 code appends (docs/algorithms.md §8, typos kept)
BIVDIFF_POS = (" ,best quality, extremely detailed, HD, ultra-realistic, 8K, HQ, masterpiece, trending on artstation, "
               "art, smooth")
BIVDIFF_NEG = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer difits, cropped, worst "
               "quality, low quality, deformed body, bloated, ugly, unrealistic")


@dataclass(frozen=True)
class BivdiffTask:
    """One stage-1 task: which image model runs per frame, what it needs, its mixing ratio α (docs/algorithms.md
    §8)."""

    name: str
    idm: str  # "controlnet" | "t2i_adapter" | "instruct_pix2pix" | "p2p" | "inpainting" | "external"
    alpha: float
    quality_tags: bool  # append BIVDIFF_POS to the prompts and default the negative prompt to BIVDIFF_NEG
    # controlnet / t2i_adapter: "canny" (computed here) | "depth" | "pose" (a condition video)
    condition: str | None = None
    mask: str | None = None  # inpainting: "video" (a mask video) | "horizontal" | "vertical" (static outpaint masks)
    description: str = ""


BIVDIFF_TASKS: dict[str, BivdiffTask] = {
    t.name: t
    for t in (
        BivdiffTask("controlnet-canny", "controlnet", 1.0, True, condition="canny",
                    description="ControlNet on canny edges of the source frames (thresholds 100/200)"),
        BivdiffTask("controlnet-depth", "controlnet", 1.0, True, condition="depth",
                    description="ControlNet on a precomputed depth video (condition_video, else source_video)"),
        BivdiffTask("controlnet-pose", "controlnet", 1.0, True, condition="pose",
                    description="ControlNet on a precomputed OpenPose video (condition_video, else source_video)"),
        BivdiffTask("t2i-adapter-depth", "t2i_adapter", 1.0, False, condition="depth",
                    description="T2I-Adapter (DDIM) on a precomputed depth video (condition_video, else source_video)"),
        BivdiffTask("t2i-adapter-canny", "t2i_adapter", 1.0, False, condition="canny",
                    description="T2I-Adapter (DDIM) on one-channel canny edges of the source frames "
                                "(thresholds 100/200)"),
        BivdiffTask("p2p", "p2p", 0.25, False,
                    description="Prompt2Prompt: the source frames inverted with SD, re-denoised for [idm_prompt "
                                "(source caption), vdm_prompt (edited caption)] with attention control; the edited "
                                "frames go on"),
        BivdiffTask("instruct-pix2pix", "instruct_pix2pix", 1.0, True,
                    description="InstructPix2Pix: idm_prompt is the edit instruction, vdm_prompt the target caption"),
        BivdiffTask("inpaint", "inpainting", 0.1, False, mask="video",
                    description="SD inpainting with a mask video (white = region to fill)"),
        BivdiffTask("outpaint-horizontal", "inpainting", 0.1, False, mask="horizontal",
                    description="SD inpainting of the top and bottom quarters"),
        BivdiffTask("outpaint-vertical", "inpainting", 0.1, False, mask="vertical",
                    description="SD inpainting of the left and right quarters"),
        BivdiffTask("external", "external", 1.0, False,
                    description="frames edited elsewhere (mp4, PNG folder or .npy (F, H, W, 3) in [-1, 1]); "
                                "only Mixed Inversion and smoothing run"),
    )
}


@dataclass(frozen=True)
class BivdiffPreset:
    """Stages 2-3 settings: `bivdiff_compat` reproduces the official code (docs/algorithms.md §8)."""

    name: str
    compat: bool  # official inversion grid 1 -> ... -> 981 -> 998 and inversion on the negative prompt's embedding
    frame_joint_norm: bool  # default of the inversion UNet's frame-joint GroupNorm (docs/algorithms.md §8)
    description: str


BIVDIFF_PRESETS: dict[str, BivdiffPreset] = {
    "bivdiff": BivdiffPreset("bivdiff", False, False,
                             "clean: inversion mirrors the smoothing grid (0 -> 1 -> ... -> 981), explicit "
                             "inversion_prompt (default null text), per-frame SD GroupNorm"),
    "bivdiff_compat": BivdiffPreset("bivdiff_compat", True, True,
                                    "official code: inversion 1 -> ... -> 981 -> 998, conditioned on the negative "
                                    "prompt's embedding, frame-joint GroupNorm in the inversion UNet"),
}
# the official configs (docs/bivdiff.md "The official configurations"; stride = the code's frame_rate); the zeroscope
# VDM is the default
BIVDIFF_DEFAULTS = dict(sampler="bivdiff", steps=50, idm_steps=50, frames=8, stride=4, height=512, width=512, seed=42,
                        guidance=7.5, idm_guidance=7.5, image_guidance=1.5, fps=8, noise="independent",
                        edit_type="refine", cross_replace=0.4, self_replace=0.4, local_blend="")
# Prompt2Prompt (docs/algorithms.md §8): the official controller's fractions of the steps with cross / self attention
# replaced
P2P_REPLACE = 0.4
P2P_EDIT_TYPES = ("refine", "replace")
# self-attention maps replaced only at latent resolutions up to 16 x 16 (the official controller)
P2P_SELF_MAX_TOKENS = 16**2
P2P_BLEND_THRESHOLD = 0.3  # local blend: the official LocalBlend mask threshold
BIVDIFF_MODELS = dict(
    vdm="zeroscope",
    image_model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # inversion UNet, SD VAE and the ControlNet base
    controlnet_canny="lllyasviel/control_v11p_sd15_canny",
    controlnet_depth="lllyasviel/control_v11f1p_sd15_depth",
    controlnet_pose="lllyasviel/control_v11p_sd15_openpose",
    t2i_adapter_depth="TencentARC/t2iadapter_depth_sd15v2",
    t2i_adapter_canny="TencentARC/t2iadapter_canny_sd15v2",
    instruct_pix2pix="timbrooks/instruct-pix2pix",
    inpainting="stable-diffusion-v1-5/stable-diffusion-inpainting",
)
