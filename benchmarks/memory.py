"""Peak memory of the real architectures at the real size, measured on the CPU with full-size random models.

    python benchmarks/memory.py [--models .cache/fullsize-bf16] [--frames 16] [--size 512] [--json out.json]

Each measurement runs in its own process and reads the kernel's peak-RSS counter (reset through /proc/self/clear_refs
just before the measured step), so it sees every allocation (weights, activations, allocator slack), not an estimate.
The models are the published architectures in bfloat16 (`python -m pipelines.fixtures.tiny KIND DIR --full-size --dtype
bfloat16`): two bytes per value like the float16 a GPU runs, and runnable on a CPU. Measured:

- load: host RAM while one actor loads each backbone (peak RSS over the interpreter with torch/diffusers imported),
  against the bytes of the weights it ends up holding (goal: <= 1.3x);
- vdm / idm: one CFG-doubled model call of one video (2 x frames x size x size; the IDM sees the frames folded);
- decode: the float32 VAE decode of `frames` frames at size x size with chunk 16, 4 and 1;
and the pre-flight estimate of `pipelines/memory.py` for the same shapes, which must not be below the measurement.
CPU kernels are not CUDA kernels (no cuDNN workspace, another attention kernel): the 24 GB projection printed at the
end adds the measured activations to the float16 weights and is a plan to check with `benchmarks/gpu_check.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from pipelines import memory
from pipelines.backbones.common import framewise_eps
from pipelines.backbones.registry import BACKBONES as REGISTERED
from pipelines.backbones.registry import load_backbone
from pipelines.cli import quiet_libraries
from pipelines.config import ModelSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = tuple(name for name, cls in REGISTERED.items() if cls.tiny is not None)  # those with full-size sets
GIB = 2**30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)


def _peak_during(fn) -> tuple[int, float]:
    """(peak RSS above the RSS before `fn`, seconds)."""
    import gc

    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    fn()
    return _status("VmHWM") - before, time.perf_counter() - start


def _weights(backbone) -> int:
    mods = [backbone.text_encoder, backbone.unet, backbone.image_unet, backbone.image_text_encoder, backbone.vae]
    return sum(p.numel() * p.element_size() for m in mods if m is not None for p in m.parameters())


def measure(kind: str, backbone_name: str, folder: str, frames: int, size: int) -> dict:
    """One measurement in this process (called in a child)."""
    import torch

    quiet_libraries()
    torch.set_grad_enabled(False)
    spec = ModelSpec.from_model_dir(backbone_name, folder, dtype="bfloat16", device="cpu")
    holder: dict = {}

    def load():  # every weight read once: memory-mapped files count only once their pages are in
        bb = holder["bb"] = load_backbone(spec)
        for m in (bb.text_encoder, bb.unet, bb.image_unet, bb.image_text_encoder, bb.vae):
            for p in () if m is None else m.parameters():
                p.detach().reshape(-1)[::1024].sum()  # one value per 2 KiB: every page is read

    load_peak, load_s = _peak_during(load)
    bb = holder["bb"]
    out = {"backbone": backbone_name, "kind": kind, "weights_bytes": _weights(bb)}
    if kind == "load":
        return {**out, "peak_bytes": load_peak, "seconds": load_s, "ratio": load_peak / out["weights_bytes"]}
    h = size // bb.spatial_factor
    x = torch.randn(2, bb.latent_channels, frames, h, h)  # CFG-doubled batch of one video
    if kind in ("vdm", "idm"):
        # VDM (2, L, Dv) and IDM (2 x frames, L, Di) conditioning, each model with its own text encoder
        emb_v, emb_i = bb.own_text_embeddings(["a prompt"], [""], frames, "own")
        eps = bb.vdm_eps(emb_v, frames, 24) if kind == "vdm" else framewise_eps(bb.image_unet, emb_i, bb.dtype)
        peak, secs = _peak_during(lambda: eps(x.to(bb.dtype), 500))
        return {**out, "peak_bytes": peak, "seconds": secs,
                "estimate_bytes": memory.estimate(bb, 1, frames, size, size, 1).model_call}
    if kind.startswith("decode"):
        chunk = int(kind.split(":")[1])
        bb.decode_chunk = chunk
        z = torch.randn(1, bb.latent_channels, frames, h, h)
        peak, secs = _peak_during(lambda: bb.decode(z))
        return {**out, "chunk": chunk, "peak_bytes": peak, "seconds": secs,
                "estimate_bytes": memory.estimate(bb, 1, frames, size, size, chunk).decode}
    raise ValueError(kind)


def ensure_models(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    if not os.path.isfile(os.path.join(folder, "tiny.json")):
        subprocess.run([sys.executable, "-m", "pipelines.fixtures.tiny", name, folder, "--full-size", "--dtype",
                        "bfloat16"], check=True, cwd=ROOT)
    return folder


def fits_24gb(weights_fp16: int, call: int, decode: int, budget: float = 24 * GIB, reserve: float = 1.5 * GIB) -> int:
    """Largest sampler_batch b with weights + max(b x one video's call, decode) <= 24 GB minus a reserve (CUDA
    context, allocator slack); activations scale with the batch (one video's call measured)."""
    b = 0
    while weights_fp16 + max((b + 1) * call, decode) <= budget - reserve and b < 64:
        b += 1
    return b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=os.path.join(ROOT, ".cache", "fullsize-bf16"))
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--kinds", help="only these measurements, e.g. load,vdm (default: all)")
    ap.add_argument("--json", help="write the measurements here too")
    ap.add_argument("--measure", nargs=3, metavar=("KIND", "BACKBONE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.frames, args.size)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for name in args.backbones.split(","):
        folder = ensure_models(args.models, name)
        kinds = ["load", "vdm"] + (["idm", "decode:16", "decode:4", "decode:1"] if name == BACKBONES[0] else [])
        kinds = [k for k in kinds if not args.kinds or k.split(":")[0] in args.kinds.split(",")]
        for kind in kinds:
            proc = subprocess.run([sys.executable, __file__, "--measure", kind, name, folder, "--frames",
                                   str(args.frames), "--size", str(args.size)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            extra = (f"  estimate {r['estimate_bytes'] / GIB:6.2f} GiB" if "estimate_bytes" in r else
                     f"  weights {r['weights_bytes'] / GIB:.2f} GiB, ratio {r['ratio']:.2f}")
            logging.info("%-14s %-10s peak %6.2f GiB  %7.1f s%s", name, kind, r["peak_bytes"] / GIB, r["seconds"],
                         extra)
    by = {(r["backbone"], r["kind"]): r for r in results}
    idm = by.get((BACKBONES[0], "idm"))
    decode = {k.split(":")[1]: r["peak_bytes"] for (b, k), r in by.items() if k.startswith("decode")}
    rows = []
    for name in args.backbones.split(","):
        if (name, "vdm") not in by or (name, "load") not in by:
            continue  # --kinds left a part out: no projection
        vdm, load = by[(name, "vdm")], by[(name, "load")]
        call = max(vdm["peak_bytes"], idm["peak_bytes"] if idm else 0)  # the IDM (SD-1.5 architecture) is shared
        weights = load["weights_bytes"]  # bfloat16 weights + the float32 VAE: what a float16 GPU actor holds
        per_chunk = {c: fits_24gb(weights, call, d) for c, d in decode.items()} or {"?": fits_24gb(weights, call, 0)}
        rows.append({"backbone": name, "weights_gib": weights / GIB, "call_gib": call / GIB,
                     "load_ratio": load["ratio"], "sampler_batch_24gb": per_chunk})
        logging.info("%-14s weights %.2f GiB, one video's largest call %.2f GiB, load peak %.2fx weights; "
                     "sampler_batch that fits 24 GB by decode chunk: %s", name, weights / GIB, call / GIB,
                     load["ratio"], per_chunk)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": args.frames, "size": args.size, "measurements": results, "fits_24gb": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
