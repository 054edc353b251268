"""Pieces every backbone adapter shares: the class contract a backbone registers with (`BackboneBase`: name, defaults,
main solver, tiny fixture, structure), device/dtype placement, prompt encoding, VAE decode, noise tables, LoRA
loading."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download

from ..params import Structure
from ..presets import DEFAULT_DECODE_CHUNK
from ..sampling import CFGDenoiser, PAGDenoiser
from ..schedule import AlphaTable
from .norms import frame_joint_group_norm

# the self-attention layers perturbed-attention guidance perturbs (diffusers' AnimateDiffPAGPipeline default)
PAG_LAYERS = "mid_block.*attn1"

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BackboneDefaults:
    """Model ids and native settings of one backbone (hub ids or local folders are interchangeable)."""

    base: str
    motion_adapter: str | None
    image_model: str
    frames: int
    height: int
    width: int
    fps: int
    steps: int = 50
    guidance: float | None = None  # main-step CFG default of this backbone's code (None: the preset's)
    unet: str | None = None  # a VDM UNet loaded on its own (VideoCrafter2)


def resolve_placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """"auto" device = cuda if available else cpu; "auto" dtype = float16 on cuda, float32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
    if dev.type == "cpu" and dtype == "float16":
        raise ValueError("dtype: float16 convolutions are not supported on cpu; use float32 or bfloat16")
    return dev, _DTYPES[dtype]


def place(module, device: torch.device, dtype: torch.dtype):
    """Move to device; cast only when the dtype differs (loaders already read weights in the run dtype)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module.eval().requires_grad_(False)


def load_pretrained(cls, source: str, dtype: torch.dtype, **kwargs):
    """`cls.from_pretrained` straight into `dtype`: no float32 copy in host RAM and no cast afterwards (diffusers
    calls the argument torch_dtype, transformers dtype). Pickled `.bin` weights load too (torch >= 2.6 declared)."""
    key = "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"
    return cls.from_pretrained(source, **{key: dtype}, **kwargs)


_TRUNCATED: set[str] = set()  # texts already reported as truncated in this process


def encode_prompts(tokenizer, text_encoder, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP last hidden state for each text, padded/truncated to the tokenizer's max length (as diffusers)."""
    max_len = tokenizer.model_max_length
    tokens = tokenizer(list(texts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    full = tokenizer(list(texts), padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_len:
        long = sorted(t for t, n in zip(texts, (full != tokenizer.pad_token_id).sum(-1).tolist()) if n > max_len)
        if long and not _TRUNCATED:  # said once per process (every long text is truncated the same way)
            logger.warning("prompts longer than %d CLIP tokens are truncated to %d, as diffusers does (first: %r); "
                           "said once", max_len, max_len, long[0][:60] + "…")
        _TRUNCATED.update(long)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    with torch.inference_mode():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def load_lora_into_unet(unet, source: str, scale: float) -> None:
    """Load a LoRA (diffusers or kohya format) into a UNet through diffusers' loader, then fuse it at
    `scale`; per-layer alpha/rank scaling is the loader's (unlike the official merge, docs/algorithms.md §5)."""
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    if os.path.isfile(source):
        source, kwargs["weight_name"] = os.path.dirname(source) or ".", os.path.basename(source)
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    if not any(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"lora: {source!r} holds no UNet LoRA weights")
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, adapter_name="idm_lora",
                                                metadata=metadata)
    unet.fuse_lora(lora_scale=scale, adapter_names=["idm_lora"])
    unet.unload_lora()
    logger.info("fused LoRA %s into the image model at scale %g", source, scale)


class BackboneBase:
    """Shared behaviour: components, noise tables, decode. Subclasses load (`from_spec`) and implement `denoisers`.

    What the registry (`registry.py`) and the rest of the library read from a backbone class, without loading it: its
    `name`, its `defaults` (model ids, native size, steps), its `main_solver`, its `tiny` fixture builder and
    `read_structure(spec)`."""

    name: str
    defaults: BackboneDefaults
    main_solver: str = "ddim"  # "ddim" or "sde-dpmpp2m" (SDE-DPM-Solver++ order 2, VideoCrafter2 code)
    # (out_dir, seed) -> out_dir: writes a tiny random model set of this backbone (`pipelines/fixtures/models.py`,
    # through `pipelines.fixtures.fixture`); None: the backbone has no tiny set of its own
    tiny: Callable[[str, int], str] | None = None

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler_config, image_unet,
                 image_tokenizer=None, image_text_encoder=None, image_scheduler_config=None,
                 device: torch.device, dtype: torch.dtype):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        # an IDM folder without its own tokenizer reads text with the VDM's
        self.image_unet, self.image_tokenizer = image_unet, image_tokenizer or tokenizer
        self.image_text_encoder = image_text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.image_scheduler_config = dict(image_scheduler_config or scheduler_config)
        self.device, self.dtype = device, dtype
        self.latent_channels = int(unet.config.in_channels)
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    decode_chunk: int = DEFAULT_DECODE_CHUNK  # frames per VAE call; load_backbone sets the spec's

    max_frames: int | None = None  # a motion adapter's positional table bounds the frames
    # the block classes `model.compile` compiles (pipelines/speed.py): diffusers' resnets, transformer blocks (spatial
    # and the motion modules' temporal ones) and the 3-D UNets' temporal convolutions
    repeated_blocks: tuple[str, ...] = ("ResnetBlock2D", "BasicTransformerBlock", "TemporalConvLayer")

    @property
    def structure(self) -> Structure:
        return Structure(self.spatial_factor, self.max_frames)

    @classmethod
    def read_structure(cls, spec) -> Structure:
        """The model set's VAE factor and frame limit read from its config files, without weights: what the driver
        resolves rows with. Config files it cannot read (a hub id with no access from the driver) leave the default
        (factor 8, no frame limit) with a warning; the actor's `check` applies the loaded models' own facts anyway."""
        try:
            return Structure(cls._read_spatial_factor(spec), cls._read_max_frames(spec))
        except Exception as err:  # noqa: BLE001 - no hub access, a missing folder: the actors check anyway
            logger.warning("could not read the model configs (%s); rows are checked against a VAE factor of 8 here "
                           "and against the loaded models in the actors", " ".join(str(err).split())[:200])
            return Structure()

    @classmethod
    def _read_spatial_factor(cls, spec) -> int:
        config = vae_from(spec, read_config)
        return 2 ** (len(config["block_out_channels"]) - 1)

    @classmethod
    def _read_max_frames(cls, spec) -> int | None:
        """The frame limit of the model set's configs (None: none); AnimateDiff's motion adapter has one."""
        return None

    def check(self, p) -> None:
        """The structural rules of the loaded models for one row's parameters (`config.Structure`), and whether its
        video model takes the comparators the row's variant names (docs/lab.md)."""
        variant = getattr(p, "parsed", None)  # generation rows; BIVDiff rows name no variant
        windows = None if variant is None else variant.freenoise
        self.structure.check(p.frames, p.height, p.width, windows and windows[0])
        if windows is not None and not self.free_noise_blocks():
            raise ValueError(f"variant: freenoise windows the temporal attention of a motion module (AnimateDiff), "
                             f"which the {self.name} video model ({type(self.unet).__name__}) does not have")
        if variant is not None and variant.freeu is not None and not hasattr(self.unet, "enable_freeu"):
            raise ValueError(f"variant: freeu needs diffusers' FreeU hooks, which the {self.name} video model "
                             f"({type(self.unet).__name__}) does not have")
        if variant is not None and variant.pag is not None and not self.pag_layers():
            raise ValueError(f"variant: pag perturbs diffusers' self-attention layers matching {PAG_LAYERS!r}, which "
                             f"the {self.name} video model ({type(self.unet).__name__}) does not have")

    def pag_layers(self) -> list:
        """The video UNet's layers that perturbed-attention guidance perturbs: diffusers' `Attention` modules that are
        self-attention and whose name matches PAG_LAYERS (diffusers' default for AnimateDiffPAGPipeline)."""
        from diffusers.models.attention_processor import Attention  # the class diffusers' processors act in

        return [m for name, m in self.unet.named_modules()
                if isinstance(m, Attention) and not m.is_cross_attention and re.search(PAG_LAYERS, name)]

    @contextlib.contextmanager
    def perturbed_attention(self, on: bool):
        """While the block runs, the PAG layers use diffusers' CFG-PAG processor, which treats the last third of a
        batch as the perturbed branch (attention replaced by its values); their own processors come back after."""
        if not on:
            yield
            return
        from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

        saved = [(m, m.processor) for m in self.pag_layers()]
        processor = PAGCFGIdentitySelfAttnProcessor2_0()
        for m, _ in saved:
            m.processor = processor
        try:
            yield
        finally:
            for m, p in saved:
                m.processor = p

    @contextlib.contextmanager
    def first_frame_attention(self, frames: int | None):
        """While the block runs, every self-attention layer of the image UNet takes its keys and values from the first
        frame of each video in its batch (`FirstFrameAttnProcessor`: VideoElevator's inflated image model); its own
        processors come back after. None: nothing changes."""
        if frames is None:
            yield
            return
        from diffusers.models.attention_processor import Attention  # the class diffusers' processors act in

        saved = [(m, m.processor) for m in self.image_unet.modules()
                 if isinstance(m, Attention) and not m.is_cross_attention]
        processor = FirstFrameAttnProcessor(frames)
        for m, _ in saved:
            m.processor = processor
        try:
            yield
        finally:
            for m, p in saved:
                m.processor = p

    def video_denoiser(self, emb: torch.Tensor, prompts: int, frames: int, fps: int, pag: float | None,
                       eps_of: Callable | None = None):
        """The video model's denoiser over (2B, L, D) CFG-batched embeddings (negatives first): CFG with a
        conditional-only path (steps outside a variant's cfg=), or with PAG the three branches in one call.
        `eps_of(emb)`: the model's ε with those embeddings bound (default `vdm_eps`)."""
        eps_of = eps_of or (lambda e: self.vdm_eps(e, frames, fps))
        if pag is not None:
            return PAGDenoiser(eps_of(torch.cat([emb, emb[prompts:]])), pag)
        return CFGDenoiser(eps_of(emb), eps_of(emb[prompts:]))

    def image_denoiser(self, emb: torch.Tensor, prompts: int, frames: int) -> CFGDenoiser:
        """The image model's denoiser over (2B*F, L, D) per-frame embeddings (negatives first), with its
        conditional-only path (a `main=I` variant's steps outside cfg=)."""
        return CFGDenoiser(framewise_eps(self.image_unet, emb, self.dtype),
                           framewise_eps(self.image_unet, emb[prompts * frames:], self.dtype))

    @contextlib.contextmanager
    def freeu(self, values: tuple[float, float, float, float] | None):
        """FreeU (Si et al., arXiv 2309.11497) on the video model's calls while the block runs: diffusers'
        `enable_freeu` hooks of its UNet with backbone scales b1, b2 and skip scales s1, s2, removed afterwards (the
        loaded model serves rows without it next). The image model's calls are left as they are."""
        if values is None:
            yield
            return
        b1, b2, s1, s2 = values
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
        try:
            yield
        finally:
            self.unet.disable_freeu()

    def free_noise_blocks(self) -> list[tuple[torch.nn.Module, int]]:
        """(motion module, index) of each temporal transformer block FreeNoise windows: the BasicTransformerBlocks of
        the `motion_modules` in the video UNet's down, mid and up blocks (those diffusers' `enable_free_noise`
        replaces)."""
        from diffusers.models.attention import BasicTransformerBlock

        unet = self.unet
        blocks = [*getattr(unet, "down_blocks", []), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", [])]
        return [(mm, i) for block in blocks for mm in (getattr(block, "motion_modules", None) or [])
                for i, b in enumerate(mm.transformer_blocks) if isinstance(b, BasicTransformerBlock)]

    @contextlib.contextmanager
    def free_noise(self, windows: tuple[int, int] | None):
        """FreeNoise (Qiu et al., arXiv 2310.15169, §3.3 window-based fusion) on the video model while the block runs:
        each temporal transformer block is replaced by diffusers' `FreeNoiseTransformerBlock` (attention over windows of
        `context` frames every `stride` frames, outputs fused with pyramid weights) sharing the block's own parameter
        tensors (built on `meta`, then assigned: nothing copied), and its attention processors; the blocks come back
        after (the loaded model serves rows without it next)."""
        if windows is None:
            yield
            return
        from diffusers.models.attention import FreeNoiseTransformerBlock

        context, stride = windows
        swapped = []
        for mm, i in self.free_noise_blocks():
            old = mm.transformer_blocks[i]
            with torch.device("meta"):
                new = FreeNoiseTransformerBlock(
                    dim=old.dim, num_attention_heads=old.num_attention_heads, attention_head_dim=old.attention_head_dim,
                    dropout=old.dropout, cross_attention_dim=old.cross_attention_dim, activation_fn=old.activation_fn,
                    attention_bias=old.attention_bias, only_cross_attention=old.only_cross_attention,
                    double_self_attention=old.double_self_attention, positional_embeddings=old.positional_embeddings,
                    num_positional_embeddings=old.num_positional_embeddings, context_length=context,
                    context_stride=stride, weighting_scheme="pyramid")
            new.load_state_dict(old.state_dict(), strict=True, assign=True)
            new.set_chunk_feed_forward(old._chunk_size, old._chunk_dim)
            for name in ("attn1", "attn2"):
                if getattr(old, name, None) is not None:
                    getattr(new, name).set_processor(getattr(old, name).processor)
            new.train(old.training)
            mm.transformer_blocks[i] = new
            swapped.append((mm, i, old))
        try:
            yield
        finally:
            for mm, i, old in swapped:
                mm.transformer_blocks[i] = old

    def image_table(self) -> AlphaTable:
        return AlphaTable.from_scheduler_config(self.image_scheduler_config)

    def video_table(self) -> AlphaTable:
        """The VDM's ᾱ table (its scheduler config; DDIM's construction, clip_sample off)."""
        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return AlphaTable.from_scheduler_config({**cfg, "clip_sample": False})

    def encode_text(self, texts: Sequence[str], model: str = "V") -> torch.Tensor:
        """(B, L, D) embeddings of `texts` from the VDM's ("V") or the IDM's own ("I") text encoder, in the run
        dtype."""
        if model == "V":
            return encode_prompts(self.tokenizer, self.text_encoder, texts, self.device).to(self.dtype)
        if self.image_text_encoder is None:
            raise ValueError(f"image_model: {self.name}'s image model has no text encoder of its own")
        return encode_prompts(self.image_tokenizer, self.image_text_encoder, texts, self.device).to(self.dtype)

    def vdm_eps(self, emb: torch.Tensor, frames: int, fps: int):
        """ε of the video UNet on (B', C, F, h, w) latents with the (B', L, D) text embeddings bound. This default
        serves UNets that share each sample's text over its frames themselves and take no fps (ModelScope, VidRD)."""
        unet, dtype = self.unet, self.dtype

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            return unet(x.to(dtype), t, encoder_hidden_states=emb).sample

        return eps

    @classmethod
    def assemble(cls, spec, unet, dtype: torch.dtype, device: torch.device):
        """A backbone from its video UNet plus the base folder's text encoder, tokenizer, VAE (float32) and scheduler
        config and an IDM with its own text encoder, every model placed and in eval mode (ModelScope, VidRD, VC2)."""
        parts = {**load_base_components(spec, dtype), **load_own_text_image_model(spec, cls.name, dtype), "unet": unet}
        for name in ("text_encoder", "unet", "image_unet", "image_text_encoder"):
            place(parts[name], device, dtype)
        place(parts["vae"], device, torch.float32)  # every backbone decodes in float32 (docs/checkpoints.md)
        return cls(**parts, device=device, dtype=dtype)

    def own_text_embeddings(self, prompts: Sequence[str], negatives: Sequence[str], frames: int,
                            idm_text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG-batched text conditioning for backbones whose IDM must read text with its own encoder (its width differs
        from the VDM's): VDM (2B, L, Dv) and IDM (2B*F, L, Di), uncond rows first (docs/algorithms.md §1)."""
        if idm_text != "own":
            raise ValueError(f"{self.name}'s IDM needs its own text encoder (the VDM's embeddings have another width)")
        texts = [*negatives, *prompts]
        return self.encode_text(texts, "V"), self.encode_text(texts, "I").repeat_interleave(frames, dim=0)

    def denoisers(self, prompts: Sequence[str], negatives: Sequence[str], *, frames: int, idm_text: str,
                  fps: int, pag: float | None = None, freenoise: tuple[int, int] | None = None) -> dict:
        """One CFG denoiser per model ("V", "I") with the batch's text conditioning bound (docs/algorithms.md §1);
        `pag`: the video model's with perturbed-attention guidance of that scale."""
        emb_v, emb_i = self.own_text_embeddings(prompts, negatives, frames, idm_text)
        b = len(prompts)  # the prompt halves alone: the steps without guidance (a variant's cfg=)
        return {"V": self.video_denoiser(emb_v, b, frames, fps, pag), "I": self.image_denoiser(emb_i, b, frames)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, F, H, W, 3) float32 frames in [0, 1] (as AnimateDiffPipeline 'np'),
        `decode_chunk` frames per VAE call (frames are independent: the chunk trades memory for speed)."""
        return decode_latents(self.vae, latents, self.device, self.decode_chunk)


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, device: torch.device, chunk: int = 16) -> torch.Tensor:
    """VAE-decode (B, C, F, h, w) latents (÷ the VAE's own scaling factor, frames folded into the batch) to
    (B, F, H, W, 3) float32 frames in [0, 1]."""
    b, c, f, h, w = latents.shape
    z = latents.to(device, next(vae.parameters()).dtype) / vae.config.scaling_factor
    z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    out = torch.cat([vae.decode(z[i : i + chunk]).sample for i in range(0, z.shape[0], chunk)])
    out = (out.float() / 2 + 0.5).clamp(0, 1)
    return out.reshape(b, f, *out.shape[1:]).permute(0, 1, 3, 4, 2).cpu()


def read_config(source: str, subfolder: str | None = None) -> dict:
    """A model's `config.json` from a local folder or a hub id (through the hub cache, as `from_pretrained` finds it),
    read without importing diffusers: the job's driver checks rows against the models' structure with it. A missing
    config raises OSError, as diffusers' `load_config` does."""
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", "config.json")
        if not os.path.isfile(path):
            raise OSError(f"{source}: no {os.path.join(subfolder or '', 'config.json')}")
    else:
        try:
            path = hf_hub_download(source, "config.json", subfolder=subfolder)
        except Exception as err:  # noqa: BLE001 - the hub's own error classes differ by version; one kind here
            raise OSError(f"{source}: could not read {os.path.join(subfolder or '', 'config.json')} ({err})") from err
    with open(path) as f:
        return json.load(f)


def _unet_source(path: str) -> tuple[str, str | None]:
    """An IDM given as a pipeline (has unet/) or as a bare UNet folder; hub ids are pipelines."""
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "unet")):
        return path, None
    return path, "unet"


def _optional(loader, path: str, subfolder: str, **kwargs):
    """Load a pipeline sub-component if the source has it (local folder check; hub: try)."""
    if os.path.isdir(path):
        if not os.path.isdir(os.path.join(path, subfolder)):
            return None
        return loader(path, subfolder=subfolder, **kwargs)
    try:
        return loader(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError):
        return None


def vae_from(spec, load: Callable[[str, str | None], object]):
    """`load(source, subfolder)` on the VAE a spec names: `spec.vae` — a standalone VAE (config at its root, like
    `stabilityai/sd-vae-ft-mse`) or a pipeline with `vae/`, hub id or folder — else the base pipeline's `vae/`.
    diffusers falls back to a folder's root only for local folders; a hub id is tried at its root first, then as a
    pipeline. The one place that decides where a VAE sits, for its weights and its config alike."""
    if not spec.vae:
        return load(spec.base, "vae")
    if os.path.isdir(spec.vae):
        root = os.path.isfile(os.path.join(spec.vae, "config.json"))
        return load(spec.vae, None if root else "vae")
    try:
        return load(spec.vae, None)
    except OSError:
        return load(spec.vae, "vae")


def load_vae(spec):
    """The VAE in float32 (every backbone decodes in float32, docs/checkpoints.md), found by `vae_from`."""
    from diffusers import AutoencoderKL

    return vae_from(spec, lambda source, subfolder: load_pretrained(AutoencoderKL, source, torch.float32,
                                                                     subfolder=subfolder))


def load_base_components(spec, dtype: torch.dtype) -> dict:
    """tokenizer, text encoder (in `dtype`), VAE (float32) and scheduler config of the VDM's base pipeline."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(tokenizer=CLIPTokenizer.from_pretrained(spec.base, subfolder="tokenizer"),
                text_encoder=load_pretrained(CLIPTextModel, spec.base, dtype, subfolder="text_encoder"),
                vae=load_vae(spec),
                scheduler_config=DDIMScheduler.load_config(spec.base, subfolder="scheduler"))


def load_own_text_image_model(spec, backbone: str, dtype: torch.dtype) -> dict:
    """The IDM for backbones whose IDM must use its own text encoder (ModelScope, VideoCrafter2)."""
    unet, tok, te, sched = load_image_model(spec.image_model, spec.lora, spec.lora_scale, dtype)
    if te is None:
        raise ValueError(f"image_model: {backbone}'s IDM uses its own text encoder; {spec.image_model!r} has none")
    return dict(image_unet=unet, image_tokenizer=tok, image_text_encoder=te, image_scheduler_config=sched)


def load_image_model(path: str, lora: str | None, lora_scale: float, dtype: torch.dtype):
    """The IDM in `dtype`: (unet, tokenizer | None, text_encoder | None, scheduler config | None), LoRA fused if
    given."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src, sub = _unet_source(path)
    unet = load_pretrained(UNet2DConditionModel, src, dtype, subfolder=sub)
    tokenizer = _optional(CLIPTokenizer.from_pretrained, path, "tokenizer") if sub else None
    text_encoder = _optional(CLIPTextModel.from_pretrained, path, "text_encoder", dtype=dtype) if sub else None
    scheduler_config = _optional(DDIMScheduler.load_config, path, "scheduler") if sub else None
    if lora:
        load_lora_into_unet(unet, lora, lora_scale)
    return unet, tokenizer, text_encoder, scheduler_config


class FirstFrameAttnProcessor:
    """Self-attention in which every frame attends to the first frame of its video: queries from the frame, keys and
    values from frame 0 (the cross-frame attention with which VideoElevator inflates the image model, arXiv
    2403.05438, after Text2Video-Zero). The batch holds whole videos of `frames` frames each, frame-major within a
    video (`framewise_eps`'s layout), CFG halves included."""

    def __init__(self, frames: int):
        self.frames = frames

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 \
                or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("first-frame attention: a plain self-attention layer on (N, L, C) tokens expected")
        n, length, _ = hidden_states.shape
        videos = n // self.frames
        anchor = hidden_states.view(videos, self.frames, length, -1)[:, :1].expand(-1, self.frames, -1, -1) \
            .reshape(n, length, -1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(attn.to_q(hidden_states)), heads(attn.to_k(anchor)),
                                             heads(attn.to_v(anchor)))
        out = out.transpose(1, 2).reshape(n, length, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class FrameJointGroupNorm(torch.nn.Module):
    """A GroupNorm whose statistics pool over the `frames` frames of each video that sit folded in the batch
    (docs/algorithms.md §8: the official inflated SD UNet normalises its resnet and output GroupNorms
    on the 5-D tensor). With `frames` unset it is the wrapped GroupNorm."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm
        self.frames: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames is None:
            return self.norm(x)
        return frame_joint_group_norm(self.norm, x, self.frames)


def frame_joint_norms(unet) -> list[FrameJointGroupNorm]:
    """Wrap (once) the GroupNorms of every resnet block and `conv_norm_out` of a 2-D UNet; returns the wrappers."""
    from diffusers.models.resnet import ResnetBlock2D

    found = getattr(unet, "_frame_joint_norms", None)
    if found is None:
        found = []
        for block in [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]:
            for name in ("norm1", "norm2"):
                wrapper = FrameJointGroupNorm(getattr(block, name))
                setattr(block, name, wrapper)
                found.append(wrapper)
        if isinstance(getattr(unet, "conv_norm_out", None), torch.nn.GroupNorm):
            unet.conv_norm_out = FrameJointGroupNorm(unet.conv_norm_out)
            found.append(unet.conv_norm_out)
        unet._frame_joint_norms = found
    return found


def framewise_eps(unet, emb: torch.Tensor, dtype: torch.dtype, *, joint_norm: bool = False):
    """ε of an image UNet on (B', C, F, h, w) latents with frames folded into the batch; `emb` is (B'*F, L, D).
    joint_norm: resnet/output GroupNorm statistics pooled over each video's frames (`FrameJointGroupNorm`)."""
    norms = frame_joint_norms(unet) if joint_norm else []

    def eps(x2: torch.Tensor, t: int) -> torch.Tensor:
        b, c, f, h, w = x2.shape
        flat = x2.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        for n in norms:
            n.frames = f
        try:
            out = unet(flat.to(dtype), t, encoder_hidden_states=emb).sample
        finally:
            for n in norms:
                n.frames = None
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    return eps
