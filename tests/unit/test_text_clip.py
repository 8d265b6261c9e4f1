"""The ``clip`` stage (issue 11): CLIP trained contrastively on the shard's training pairs, and the text
encoders that load it."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from genmodels import clip as clip_mod
from pipeline.store import Store, local_file, open_artifact
from tests.fakes import write_fake_shard
from workflows import text_clip


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    want = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(clip_mod.contrastive_loss(img, txt, scale), want)
    # Rows 0 and 1 share a caption: each is the other's positive, the target spreads over both.
    tokens = torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6], [7, 8]])
    same = clip_mod.contrastive_loss(img, txt, scale, tokens)
    target = torch.eye(5)
    target[:2, :2] = 0.5
    assert torch.allclose(same, (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    assert not torch.allclose(same, want)
    # Matched pairs cost less than mismatched ones.
    assert clip_mod.contrastive_loss(img, img, scale) < clip_mod.contrastive_loss(img, img.roll(1, 0), scale)


def test_pooled_token_is_the_projected_embedding_as_one_token():
    caps = ["a red circle on a white background", "a blue square"]
    full = clip_mod.TextEncoder(tokens=8)(caps)
    one = clip_mod.TextEncoder(tokens=8, pooled_token=True)(caps)
    assert one["text"].shape == (2, 1, 64) and one["text_mask"].all() and one["text_mask"].shape == (2, 1)
    assert torch.allclose(one["text"][:, 0], full["text_embed"])
    assert torch.allclose(one["text_embed"], full["text_embed"])
    assert full["text"].shape == (2, 8, 64)


def test_stage_trains_clip_on_training_pairs_and_encoders_load_it(tmp_path):
    store = Store(str(tmp_path / "root"))
    shard = store.artifact("shard", "k")
    write_fake_shard(shard, 48, resolutions=(32,), scene="simple")
    out = store.artifact("clip", "k")
    cfg = text_clip.ClipConfig(steps=40, batch_size=16, lr=2e-3)
    counts = text_clip.run({"shard": shard}, cfg, out)
    meta = out.read_json("clip.json")
    assert counts["steps"] == 40 and meta["pairs"] == counts["pairs"] > 30 and meta["heldout_pairs"] >= 2
    assert meta["loss_last"] < meta["loss_first"] - 0.3  # it learns to tell the pairs apart
    assert 0 <= meta["heldout_top1"] <= 1
    # A random encoder of the same model gets the weights; a named tag or another model keeps its own.
    uri = text_clip.weights(out, clip_mod.TINY, "")
    assert uri == out.child_uri(text_clip.CHECKPOINT)
    assert text_clip.weights(out, clip_mod.TINY, "my-tag") == "my-tag"
    assert text_clip.weights(out, "ViT-B-32", "") == ""
    assert text_clip.weights(None, clip_mod.TINY, None) == ""
    trained, random_ = text_clip.encoder(pretrained=uri, tokens=4), text_clip.encoder(tokens=4)
    state = torch.load(local_file(uri), weights_only=True)
    assert torch.equal(trained.clip.token_embedding.weight, state["token_embedding.weight"])
    assert not torch.equal(trained.clip.token_embedding.weight, random_.clip.token_embedding.weight)
    assert torch.equal(text_clip.clip_model(pretrained=uri).logit_scale, state["logit_scale"])
    # steps 0 trains nothing, and every encoder keeps its own weights.
    skip = store.artifact("clip", "skip")
    assert text_clip.run({"shard": shard}, text_clip.ClipConfig(steps=0), skip) == {"steps": 0}
    assert text_clip.weights(skip, clip_mod.TINY, "") == "" and not skip.exists(text_clip.CHECKPOINT)


def test_checkpoint_on_s3_is_fetched_once_to_a_local_file(tmp_path, monkeypatch, moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="runs")
    art = open_artifact("s3://runs/clip/k")
    model, _, _ = clip_mod.build_clip(seed=3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    art.write_bytes(text_clip.CHECKPOINT, buf.getvalue())
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = local_file(art.child_uri(text_clip.CHECKPOINT))
    assert path.startswith(str(tmp_path)) and path == local_file(art.child_uri(text_clip.CHECKPOINT))
    enc = text_clip.encoder(pretrained=art.child_uri(text_clip.CHECKPOINT))
    assert torch.equal(enc.clip.positional_embedding, model.positional_embedding)


def test_config_rejects_unknown_model_and_bad_numbers():
    with pytest.raises(ValueError, match="unknown open_clip model 'nope'"):
        text_clip.ClipConfig(model="nope").validate()
    with pytest.raises(ValueError, match="batch_size >= 2"):
        text_clip.ClipConfig(batch_size=1).validate()


def test_known_models_are_validated_without_importing_open_clip(monkeypatch, tmp_path):
    """A config naming one of open_clip's shipped models is checked against its JSON file: importing
    open_clip (torchvision, transformers, timm) took ~10 s of every CLI run's ~16 s `--dry-run`.
    Names without such a file still go to open_clip, which gives the exact answer."""
    from workflows.wuerstchen.models import TextEncoderConfig

    asked = []

    def no_import():
        asked.append(1)
        raise AssertionError("open_clip imported")

    monkeypatch.setattr(clip_mod, "open_clip_lib", no_import)
    for name in ("ViT-B-32", "ViT-H-14", "ViT-bigG-14", clip_mod.TINY):
        assert text_clip.known_clip_model(name), name
    text_clip.ClipConfig(model="ViT-H-14").validate()
    TextEncoderConfig(name="ViT-bigG-14").validate()
    assert not asked
    for name in ("nope", "../model_configs/ViT-B-32"):
        with pytest.raises(AssertionError, match="open_clip imported"):
            text_clip.known_clip_model(name)
    assert len(asked) == 2
    # A file open_clip would not register (it lacks embed_dim, vision_cfg, text_cfg) is not taken as a model.
    (tmp_path / "model_configs").mkdir()
    (tmp_path / "model_configs" / "Partial.json").write_text('{"embed_dim": 8}')
    monkeypatch.setattr(text_clip.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(AssertionError, match="open_clip imported"):
        text_clip.known_clip_model("Partial")
    assert len(asked) == 3
    monkeypatch.undo()
    assert not text_clip.known_clip_model("nope") and not text_clip.known_clip_model("../model_configs/ViT-B-32")
