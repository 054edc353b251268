"""The dataset consumer's scores (pipelines/metrics.py, operators/scoring.py): subject consistency against VBench's
formula written out, motion and VBench's dynamic-degree rule on crafted frames (a static clip, content shifting by
k pixels a frame), the DINO scorer on a tiny random ViT, and the export thresholds on the new columns."""
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from jobs.export import Filter, select
from operators.scoring import SubjectScorer, motion_scores
from pipelines.metrics import dynamic, optical_flow, subject_consistency


def vbench_subject_consistency(features: torch.Tensor) -> float:
    """VBench's loop as its paper describes it: each frame after the first against its predecessor and the first
    frame, negative cosines clipped at 0, the two averaged, then the mean over frames."""
    total, first, former = 0.0, None, None
    for i in range(features.shape[0]):
        f = F.normalize(features[i : i + 1], dim=-1)
        if i == 0:
            first = f
        else:
            sim_pre = max(0.0, F.cosine_similarity(former, f).item())
            sim_fir = max(0.0, F.cosine_similarity(first, f).item())
            total += (sim_pre + sim_fir) / 2
        former = f
    return total / (features.shape[0] - 1)


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture in [0, 1] (blurred noise: optical flow has gradients to follow everywhere)."""
    import cv2

    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    return (x - x.min()) / (x.max() - x.min())


def shifting(k: int, n: int = 16, size: int = 64) -> np.ndarray:
    """n frames of a size x size window moving k pixels right per frame over a larger texture."""
    big = texture(size, size + k * n + 8)
    return np.stack([big[:, i * k : i * k + size] for i in range(n)])


def test_subject_consistency_is_vbenchs_formula():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 12, generator=g)
    feats[3] = -feats[0]  # a frame opposite the first: its cosine with the first is clipped at 0
    assert subject_consistency(feats) == pytest.approx(vbench_subject_consistency(feats), abs=1e-6)
    assert subject_consistency(feats[:1].repeat(5, 1)) == pytest.approx(1.0)
    assert subject_consistency(feats[:1]) == 1.0


@pytest.mark.parametrize("k", [1, 3, 6])
def test_motion_of_content_shifting_k_pixels_a_frame_is_about_k(k):
    frames = shifting(k)
    got = motion_scores(torch.from_numpy(frames), fps=8)
    assert got["motion"] == pytest.approx(k, rel=0.2), got  # DIS flow; the window's new columns bias it a little
    # VBench's rule at 64 x 64: a pair moves past 6 * 64 / 256 = 1.5 pixels, 4 of 16 frames' pairs needed
    assert got["dynamic"] is (k > 1.5)


def test_a_static_clip_has_no_motion_and_is_not_dynamic():
    still = np.repeat(texture(64, 64)[None], 8, axis=0)
    got = motion_scores(torch.from_numpy(still), fps=8)
    assert got["motion"] == pytest.approx(0.0, abs=1e-3) and got["dynamic"] is False
    assert optical_flow(still[:1]).shape == (0, 64, 64)


def test_dynamic_degree_counts_moving_pairs_against_vbenchs_threshold():
    mags = np.zeros((15, 256, 256))  # 16 frames at 256 x 256: threshold 6 pixels, 4 moving pairs needed
    mags[:3, :20, :] = 7.0  # three pairs whose top 5 % move 7 pixels
    assert dynamic(mags, 256, 256) is False
    mags[5, :20, :] = 7.0
    assert dynamic(mags, 256, 256) is True
    mags[5, :20, :] = 5.0  # below the threshold
    assert dynamic(mags, 256, 256) is False
    # 24 fps video: VBench takes every 3rd frame (8 fps); the scorer computes that flow itself
    fast = shifting(1, n=24)
    assert motion_scores(torch.from_numpy(fast), fps=24)["dynamic"] is True  # 3 pixels between taken frames


def test_dino_scorer_on_a_tiny_vit(tmp_path):
    from transformers import ViTModel

    from pipelines.fixtures.models import build_dino

    folder = build_dino(str(tmp_path / "dino"))
    scorer = SubjectScorer(folder, "cpu")
    frames = torch.from_numpy(shifting(2, n=5, size=48))
    # independent: transformers' own ViT on frames already at the processor's size and normalised by hand
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    small = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(32, 32), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        cls = model(pixel_values=(small - 0.5) / 0.5).last_hidden_state[:, 0]
    assert scorer.score(frames) == pytest.approx(vbench_subject_consistency(cls), abs=1e-4)
    assert scorer.score(frames[:1].repeat(4, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)


def test_export_thresholds_on_motion_and_subject_consistency():
    table = pa.table({"id": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "failed"],
                      "motion": [0.1, 2.5, None, 9.0], "subject_consistency": [0.99, 0.90, 0.95, 0.99]})
    assert select(table, Filter(min_motion=1.0)).column("id").to_pylist() == ["b"]
    assert select(table, Filter(min_subject_consistency=0.95)).column("id").to_pylist() == ["a", "c"]
    assert Filter(min_motion=1.0).describe() == "min_motion 1"


def test_without_a_subject_model_the_other_scores_remain(tmp_path):
    from operators.scoring import ScoreModels, VideoScorer
    from pipelines.fixtures.models import build_clip

    scorer = VideoScorer(ScoreModels(build_clip(str(tmp_path / "clip")), None))
    got = scorer.score(torch.from_numpy(shifting(2, n=4, size=32)), "a moving texture", fps=8)
    assert "subject_consistency" not in got
    assert {"clipsim", "frame_consistency", "flicker", "motion", "dynamic"} <= set(got)
