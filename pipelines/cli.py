"""What both single-video CLIs (`pipelines.sample`, `pipelines.bivdiff`) share: their one `main`, the placement and
output flags, checks of model sources before loading, one-line model errors, a quiet console (the libraries' load
bars and advisory warnings off), the per-step progress bar, writing the result, exit codes."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from typing import Any, Callable, TypeVar

import numpy as np

from . import interrupt, presets
from .config import DTYPE_NAMES
from .outputs import write_atomic
from .video import write_mp4

logger = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_CODES = ("exit status: 0 written; 2 bad input or a model that cannot be loaded (one 'error: <what>: <why>' line); "
              "1 a crash; 130 interrupted (Ctrl-C)")
# a hub repository id: "name" or "org/name" (what huggingface_hub accepts); anything else must be an existing path
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def check_source(name: str, value: str | None) -> None:
    """A model source is an existing file/folder or a hub id; a mistyped local path fails here, before loading."""
    if value is None or os.path.exists(os.path.expanduser(value)):
        return
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value
    if looks_local or not HUB_ID.match(value) or "--" in value or ".." in value:
        raise ValueError(f"{name}: {value!r} is not an existing file or folder (nor a hub id such as 'org/name')")


def tiny_kind(folder: str) -> str | None:
    """The model kind a `python -m pipelines.fixtures.tiny KIND DIR` folder holds (its tiny.json), or None for other
    folders."""
    try:
        with open(os.path.join(folder, "tiny.json")) as f:
            return json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def load_models(load: Callable[[], T]) -> T:
    """Run a model loader; whatever it raises becomes one ValueError line (the CLI prints `error: ...`, exit 2)."""
    try:
        return load()
    except ValueError as err:
        if type(err) is ValueError and re.match(r"^[\w.-]+: ", str(err)):  # our own checks name the parameter
            raise
        raise ValueError(_one_line(err)) from err
    except Exception as err:  # noqa: BLE001 - a missing repo, a wrong folder, a bad checkpoint: all input problems
        logger.debug("model loading failed", exc_info=True)
        raise ValueError(_one_line(err)) from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"models: could not be loaded ({type(err).__name__}: {text[:400]})"


def quiet_libraries(load: bool = True) -> None:
    """Silence what a user would read as failure or noise: the libraries' per-file load bars, advisory warnings
    (a missing optional torchvision, diffusers' dtype-cast note, tokenizer length notes) and the S3 clients' INFO lines.
    Our own log lines (progress, truncated prompts, results) stay; Ray's are the job's business (jobs/generate.py).
    `load` False (the job's driver, which loads no diffusion model): diffusers and transformers are not imported for
    this (~3 s on 2 cores); their environment switches are set, and those already imported are quieted."""
    for name in ("aiobotocore", "botocore", "s3fs", "fsspec", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for key, value in (("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        if load or module in sys.modules:
            lib = importlib.import_module(module)
            lib.set_verbosity_error()
            lib.disable_progress_bar()


def progress_bar(total: int, desc: str, quiet: bool):
    """A per-step bar on stderr (step, model calls so far, ETA), as diffusers pipelines show; `quiet` hides it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def add_placement_flags(group, *, speed_options: bool = True) -> None:
    """--dtype, --device, --decode-chunk and (`speed_options`) --compile, --channels-last: how the models run (a
    model spec's placement fields)."""
    group.add_argument("--dtype", default=presets.DEFAULT_DTYPE, choices=DTYPE_NAMES,
                       help="auto: float16 on CUDA, float32 on CPU")
    group.add_argument("--device", default=presets.DEFAULT_DEVICE, help="auto: cuda if available, else cpu")
    group.add_argument("--decode-chunk", type=int, default=presets.DEFAULT_DECODE_CHUNK,
                       help=f"frames per VAE decode call (default {presets.DEFAULT_DECODE_CHUNK}; lower it if "
                            "decoding runs out of memory)")
    if speed_options:
        group.add_argument("--compile", default="auto", choices=presets.SPEED_SWITCHES,
                           help="torch.compile of the UNets' and VAE decoder's repeated blocks (auto: on for CUDA; "
                                "the first video of each size pays the compile)")
        group.add_argument("--channels-last", default="auto", choices=presets.SPEED_SWITCHES,
                           help="channels-last convolution weights (auto: on for CUDA)")


def add_output_flags(group, *, required: bool) -> None:
    """--output-type, --out, -q."""
    group.add_argument("--output-type", default="mp4", choices=["mp4", "latent"], help="default mp4")
    group.add_argument("--out", required=required,
                       help="output path or fsspec URI (s3://...): .mp4, or .npy for --output-type latent")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar or log lines; errors and the result only")


def model_dir_kind(folder: str) -> str | None:
    """`--model-dir`: it must be a folder; the tiny kind it holds (None: not a tiny folder)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--model-dir: {folder!r} is not a folder")
    return tiny_kind(folder)


def write_output(path: str, output_type: str, latents, frames, fps: int) -> None:
    """Write `latents` as float32 .npy (output_type "latent") or `frames` as an mp4, atomically, to a path or URI."""
    if output_type == "latent":
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, latents.numpy().astype(np.float32))
    else:
        def save(tmp: str) -> None:
            write_mp4(frames, tmp, fps)
    write_atomic(path, save)


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], summary: Callable[[Any], str],
         argv: list[str] | None = None, *, listing: Callable[[argparse.Namespace], str | None] | None = None) -> int:
    """The one main of both CLIs: parse, answer a listing flag (`listing` returns its text, None: no listing), set up
    logging, `run`, print its `summary`; a ValueError is one `error: ...` line and exit status 2 (EXIT_CODES)."""
    interrupt.loaded()
    try:
        args = parser.parse_args(argv)
        text = listing(args) if listing else None
        if text is not None:
            print(text)
            return 0
        configure_logging(args.quiet)
        out = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all (outputs.write_atomic): nothing to clean
        print(interrupt.CLI, file=sys.stderr)
        return 130
    print(summary(out))
    return 0
