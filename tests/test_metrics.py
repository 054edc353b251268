"""Quality measures on constructed inputs with known answers; Fréchet distance against independent computations."""
import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.metrics import clipsim, flicker, frame_consistency, frechet_distance, frechet_from_features


def moving_square(frames=8, size=32):
    v = torch.zeros(frames, size, size, 3)
    for t in range(frames):
        v[t, 8:16, 2 + 2 * t : 10 + 2 * t] = 1.0
    return v


def test_identical_frames_give_consistency_one_and_flicker_zero():
    still = moving_square()[:1].repeat(8, 1, 1, 1)
    assert flicker(still) == 0.0
    emb = torch.randn(1, 16).repeat(8, 1)
    assert frame_consistency(emb) == pytest.approx(1.0, abs=1e-6)


def test_shuffled_video_flickers_more_and_is_less_consistent():
    video = moving_square(12)
    shuffled = video[torch.tensor([0, 6, 1, 9, 3, 11, 2, 7, 4, 10, 5, 8])]
    assert flicker(shuffled) > flicker(video) > 0
    assert flicker(video.flip(0)) == pytest.approx(flicker(video))  # reversal keeps every consecutive pair
    # embeddings that drift smoothly over time: shuffling them lowers consecutive similarity
    t = torch.linspace(0, 1.5, 12)[:, None]
    emb = torch.cat([torch.cos(t), torch.sin(t), torch.zeros(12, 2)], 1)
    perm = torch.tensor([0, 6, 1, 9, 3, 11, 2, 7, 4, 10, 5, 8])
    assert frame_consistency(emb[perm]) < frame_consistency(emb) < 1.0
    assert frame_consistency(emb.flip(0)) == pytest.approx(frame_consistency(emb))


def test_flicker_value_is_the_mean_absolute_frame_difference():
    a, b = torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4, 3), 0.25)
    assert flicker(torch.cat([a, b, a])) == pytest.approx(0.25)


def test_clipsim_is_mean_cosine_to_the_text():
    text = torch.tensor([1.0, 0.0])
    frames = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert clipsim(text, frames) == pytest.approx((1 + 0 + 2 ** -0.5) / 3)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    # commuting covariances: tr((S1 S2)^1/2) = sum sqrt(l1 l2) in the shared eigenbasis
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    l1, l2 = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    # general covariances: against scipy's matrix square root (the classic FID implementation)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_from_samples_converges_to_the_population_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(1.0, 2.0, size=(20000, 3))
    # N(0, I) vs N(1, 4I): 3 * 1^2 + 3 * (1 - 2)^2 = 6
    assert frechet_from_features(a, b) == pytest.approx(6.0, rel=0.03)
    with pytest.raises(ValueError):
        frechet_from_features(a[:1], b)


@pytest.mark.heavy
def test_frechet_video_distance_with_a_pluggable_extractor():
    """Videos whose mean colour is drawn from N(0, I) vs N(1, I): with the mean-colour extractor the distance
    is the closed form 3 * 1^2 = 3."""
    from pipelines.metrics import frechet_video_distance

    g = torch.Generator().manual_seed(0)

    def videos(shift, n):
        return [torch.ones(4, 2, 2, 3) * (torch.randn(3, generator=g) + shift) for _ in range(n)]

    mean_colour = lambda v: v.reshape(-1, 3).mean(0).numpy()  # noqa: E731
    assert frechet_video_distance(videos(0.0, 4000), videos(1.0, 4000), mean_colour) == pytest.approx(3.0, rel=0.05)
    same = videos(0.0, 4000)
    assert frechet_video_distance(same, same, mean_colour) == pytest.approx(0.0, abs=1e-9)
