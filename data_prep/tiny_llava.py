"""A tiny random LLaVA (+ processor) built offline, so the recaption path runs for real on a CPU.

Same classes as ``llava-hf/llava-1.5-7b-hf`` (``LlavaForConditionalGeneration``,
``LlavaProcessor`` = ``CLIPImageProcessor`` + a fast tokenizer with an ``<image>`` token), at
toy size: a 2-layer CLIP vision tower on 32x32 images (patch 8 → 16 image tokens) and a
2-layer Llama. The tokenizer is a small byte-level BPE trained in-process on a fixed word list,
so nothing is downloaded. Its captions are gibberish, which is the point: the pipeline, not
the model, is under test.

    python -m data_prep.tiny_llava /tmp/tiny-llava     # then recaption.model=/tmp/tiny-llava
"""

from __future__ import annotations

import os
import shutil
import sys

IMAGE_SIZE = 32
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = (
    "a photo of the small large red green blue yellow white black gray orange purple pink brown "
    "circle square triangle star ring cross diamond hexagon rectangle shape shapes on in with and "
    "background picture drawing illustration image of an cat dog man woman person street city sky "
    "tree house car water mountain flower table cup coffee rocket moon astronaut close-up portrait "
    "USER ASSISTANT Describe this image in one sentence . , : ! ?"
)


def build(path: str, seed: int = 0) -> str:
    """Write the tiny model and processor to ``path`` (``save_pretrained``); returns ``path``.

    Deterministic in ``seed``. ``from_pretrained(path)`` gives the same weights back exactly.
    """
    # lazy: torch, tokenizers and transformers take seconds to import; only a build needs them
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.padding_side = "left"  # batched generation
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(IMAGE_SIZE // 8) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def ensure(path: str, seed: int = 0) -> str:
    """Build once: reuse ``path`` when a previous build finished (its ``config.json`` exists)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        build(tmp, seed)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve(model: str) -> str:
    """``tiny`` → a local directory with the tiny LLaVA, built on first use on each machine under
    ``$GENMODELS_CACHE`` (default ``~/.cache/genmodels``); anything else is returned unchanged."""
    if model != "tiny":
        return model
    cache = os.environ.get("GENMODELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "genmodels"))
    return ensure(os.path.join(cache, "tiny-llava-seed0"))


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else "tiny-llava"))
