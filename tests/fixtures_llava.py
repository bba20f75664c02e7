"""LLaVA-NeXT fixtures shared across test modules: a tiny random ``LlavaNextForConditionalGeneration`` (CLIP tower,
Llama LM, 2 grid pinpoints), its ``LlavaNextProcessor`` (PIL image processor, tiny WordLevel tokenizer, chat
template), and a converted VLM base with a shard set (:func:`make_vlm_assets`)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from lmfusion import hf
from tests.fixtures import TINY_CONFIG, build_set, make_images

VOCAB = 300
IMAGE_TOKEN = VOCAB - 3  # <image>; the tokenizer below adds it, and <boi>/<eoi> get VOCAB-2, VOCAB-1 by flag
BOI, EOI = VOCAB - 2, VOCAB - 1
TILE, PATCH = 28, 7  # CLIP image and patch size (4x4 features a tile); pinpoints are 1x2 and 2x1 tiles


def llava_config(**overrides) -> LlavaNextConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH, projection_dim=16)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                  image_grid_pinpoints=[[TILE, 2 * TILE], [2 * TILE, TILE]], image_seq_length=4)
    kwargs.update(overrides)
    return LlavaNextConfig(**kwargs)


def make_llava(config: LlavaNextConfig, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so a swap would be caught
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.uniform_(0.5, 1.5)
    return model


def add_processor(directory: Path, config: LlavaNextConfig):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    words = [f"w{i}" for i in range(IMAGE_TOKEN - 3)]  # ids 3..IMAGE_TOKEN-1, so <image> gets IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", hf.BOI_TOKEN, hf.EOI_TOKEN]})
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template="{% for m in messages %}USER: {{ m['content'] }} {% endfor %}")
    processor.save_pretrained(directory)
    return processor


# A LLaVA-style template over content lists (the tiny processor's own renders strings only).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_vlm_assets(root: Path, seed: int = 3) -> dict[str, str]:
    """A tiny random LLaVA-NeXT (HF directory with its processor and a content-list chat template), converted to a
    VLM base, and a shard set of random 8 x 8 images whose captions the LLaVA tokenizer reads (w0 ... w39)."""
    from lmfusion.hf import convert_hf

    config = llava_config()
    make_llava(config, seed=seed).save_pretrained(root / "hf", safe_serialization=True)
    processor = add_processor(root / "hf", config)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(root / "hf")
    convert_hf(root / "hf", root / "base")
    make_images(root / "img", 24, seed=7)
    build_set(root / "shards", root / "img", 8)
    return {"hf": str(root / "hf"), "base": str(root / "base"), "shards": str(root / "shards"),
            "config": str(TINY_CONFIG)}
