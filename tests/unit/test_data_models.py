"""The Ray Data callables outside Ray: tiny CLIP scorer + heads, tiny LLaVA captioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import models, tiny_llava


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return tiny_llava.ensure(str(tmp_path_factory.mktemp("llava") / "tiny-llava"))


def _heads(tmp_path, dim=64):
    g = torch.Generator().manual_seed(0)
    aest = models.save_head(str(tmp_path / "aesthetic.safetensors"),
                            [(torch.randn(16, dim, generator=g), torch.zeros(16)), (torch.randn(1, 16, generator=g),
                                                                                     torch.full((1,), 5.0))])
    wm = tmp_path / "watermark.pt"
    torch.save({"weight": torch.randn(2, dim, generator=g), "bias": torch.zeros(2)}, wm)
    return aest, str(wm)


def test_embedding_head_layouts_and_errors(tmp_path):
    aest, wm = _heads(tmp_path)
    emb = torch.randn(5, 64)
    a = models.EmbeddingHead(aest, "score")
    assert (a.in_dim, a.out_dim, a.activation) == (64, 1, "none")
    x = torch.nn.functional.normalize(emb, dim=-1)
    w0, b0 = a.weights[0]
    w1, b1 = a.weights[1]
    np.testing.assert_allclose(a(emb), ((x @ w0.T + b0) @ w1.T + b1)[:, 0].numpy(), rtol=1e-5)
    p = models.EmbeddingHead(wm, "probability")(emb)
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a linear head"):
        models.EmbeddingHead(str(tmp_path / "bad.pt"))
    torch.save({"weight": torch.zeros(3, 64)}, tmp_path / "three.pt")
    with pytest.raises(ValueError, match="needs 1 or 2 outputs"):
        models.EmbeddingHead(str(tmp_path / "three.pt"), "probability")


def test_clip_transform_matches_open_clip_preprocess():
    from genmodels.clip import build_clip

    _, preprocess, _ = build_clip("tiny-clip")
    ours = models.clip_transform("tiny-clip", None)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(ours(img), preprocess(img))
    with pytest.raises(ValueError, match="unknown to open_clip"):
        models.clip_transform("no-such-clip", None)


def test_clip_scorer_scores_and_skips_unconfigured_heads(tmp_path):
    aest, wm = _heads(tmp_path)
    t = models.clip_transform("tiny-clip", None)
    imgs = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    batch = {"pixels": np.stack([t(i).numpy().astype(np.float16) for i in imgs]),
             "caption": np.array(["a red square", "", "a green square"], dtype=object),
             "key": np.array(["k0", "k1", "k2"], dtype=object), "width": np.array([40, 40, 40], np.int32)}
    scorer = models.ClipScorer("tiny-clip", None, {"aesthetic": aest, "pwatermark": wm, "punsafe": None})
    out = scorer(batch)
    assert out.column_names == ["caption", "key", "width", "clip_sim", "embedding", "aesthetic", "pwatermark",
                                "punsafe"]
    assert out.column("punsafe").null_count == 3 and out.column("aesthetic").null_count == 0
    sims = np.array(out.column("clip_sim").to_pylist())
    assert np.all(np.abs(sims) <= 1.0 + 1e-5)
    emb = np.array(out.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)
    torch.save({"weight": torch.zeros(1, 32)}, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="expects 32-d embeddings, tiny-clip gives 64"):
        models.ClipScorer("tiny-clip", None, {"aesthetic": str(tmp_path / "small.pt")})


def test_tiny_llava_round_trips_and_captions(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    a = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    b = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    cap = models.LlavaCaptioner(tiny_llava_dir, "USER: <image>\nDescribe this image. ASSISTANT:", max_new_tokens=6)
    batch = {"image": np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
             "caption": np.array(["x", "y", "z"], dtype=object)}
    out = cap(batch)
    assert set(out) == {"caption", "recaption"} and len(out["recaption"]) == 3
    assert list(out["recaption"]) == list(cap(batch)["recaption"])  # greedy: deterministic
    assert all("\x00" not in r for r in out["recaption"])
    with pytest.raises(ValueError, match="must contain the image token"):
        models.LlavaCaptioner(tiny_llava_dir, "no image here", 4)


def test_embedding_heads_load_from_s3_as_from_disk(tmp_path, moto_s3):
    """cluster.yaml keeps LAION's heads on S3: both layouts load from there with their metadata."""
    import boto3

    aest, wm = _heads(tmp_path)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="heads")
    for local in (aest, wm):
        s3.upload_file(local, "heads", local.rsplit("/", 1)[1])
    emb = torch.randn(7, 64)
    for local, kind in ((aest, "score"), (wm, "probability")):
        remote = models.EmbeddingHead(f"s3://heads/{local.rsplit('/', 1)[1]}", kind)
        here = models.EmbeddingHead(local, kind)
        assert remote.activation == here.activation and (remote.in_dim, remote.out_dim) == (here.in_dim, here.out_dim)
        np.testing.assert_array_equal(remote(emb), here(emb))
    with pytest.raises(FileNotFoundError):
        models.EmbeddingHead("s3://heads/missing.safetensors")
