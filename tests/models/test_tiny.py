"""Tiny tokenizer, processor and random-weight models: they must agree with each other."""
import pytest
import torch
from PIL import Image

from align_ti.models.tiny import (
    build_processor,
    build_tiny_causal_lm,
    build_tiny_llava,
    tiny_llava_config,
)
from align_ti.models.tokenizer import IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_special_ids_and_size(tokenizer):
    ids = tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN])
    assert ids == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.image_token_id) == (0, 2, 3)
    assert tokenizer.image_token == IMAGE_TOKEN
    assert len(tokenizer) < 1271  # below both LM heads' padded row counts
    assert len(build_tokenizer()) == len(tokenizer)
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


@pytest.mark.parametrize("text", [
    "What colour is the circle?",
    "How many squares are there? 3",
    "Unseen words, ÜNICODE ☃ and\ttabs\n\nnewlines  double  spaces 1234",
    "",
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_closed_vocabulary_words_are_single_tokens(tokenizer):
    ids = tokenizer("What colour is the triangle? yellow", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7  # What, colour, is, the, triangle, ?, yellow
    assert tokenizer("top left", add_special_tokens=False)["input_ids"].__len__() == 2


def test_special_tokens_are_atomic(tokenizer):
    ids = tokenizer(f"{IM_START}user\n{IMAGE_TOKEN}\nHi{IM_END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[3] == 3 and ids[-1] == 2


def test_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is red?"}]},
        {"role": "assistant", "content": "circle"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n<image>\nWhat shape is red?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize("size", ["teacher", "student"])
def test_processor_expansion_matches_model(size):
    config = tiny_llava_config(size)
    processor = build_processor(config=config)
    image = Image.new("RGB", (config.vision_config.image_size,) * 2, (200, 10, 10))
    odd = Image.new("RGB", (70, 33), (10, 200, 10))  # resized to the model's size
    batch = processor(images=[image, odd], text=[f"{IMAGE_TOKEN}\nHi", f"a {IMAGE_TOKEN} b"],
                      return_tensors="pt", padding=True)
    n_image = (batch["input_ids"] == config.image_token_index).sum(1)
    assert n_image.tolist() == [config.image_seq_length] * 2
    side = config.vision_config.image_size
    assert batch["pixel_values"].shape == (2, 3, side, side)
    assert config.image_seq_length == (side // config.vision_config.patch_size) ** 2
    assert config.vision_feature_select_strategy == "full"


@pytest.mark.parametrize("text", ["qwen2", "qwen3"])
@pytest.mark.parametrize("size,vocab", [("teacher", 1300), ("student", 1271)])
def test_llava_forward(size, vocab, text):
    model = build_tiny_llava(size, text, seed=0).eval()
    processor = build_processor(config=model.config)
    images = [Image.new("RGB", (48, 48), c) for c in [(255, 0, 0), (0, 0, 255)]]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for q in ["What colour is the circle?", "Where is it?"]
    ]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()
    assert model.config.text_config.vocab_size == model.lm_head.weight.shape[0] == vocab


def test_llava_sizes_and_overrides():
    teacher, student = tiny_llava_config("teacher"), tiny_llava_config("student", "qwen3")
    t = teacher.text_config
    assert t.num_attention_heads > t.num_key_value_heads  # GQA
    assert t.hidden_size > student.text_config.hidden_size
    assert t.num_hidden_layers > student.text_config.num_hidden_layers
    assert student.text_config.head_dim * student.text_config.num_attention_heads == student.text_config.hidden_size
    cfg = tiny_llava_config("student", hidden_size=32, vision_hidden_size=32, patch_size=16)
    assert (cfg.text_config.hidden_size, cfg.vision_config.hidden_size) == (32, 32)
    assert cfg.image_seq_length == 9
    with pytest.raises(ValueError, match="size"):
        tiny_llava_config("huge")


def test_same_seed_same_weights():
    a, b = build_tiny_llava("student", seed=3), build_tiny_llava("student", seed=3)
    c = build_tiny_llava("student", seed=4)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    for name, value in state_a.items():
        assert torch.isfinite(value).all(), name  # every parameter is initialised
        assert torch.equal(value, state_b[name]), name
    assert not torch.equal(state_a["lm_head.weight"], state_c["lm_head.weight"])


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llava("teacher", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("text", ["qwen2", "qwen3"])
def test_causal_lm(text):
    model = build_tiny_causal_lm("teacher", text, seed=0, attn_implementation="eager").eval()
    ids = torch.randint(4, 500, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 11, 1300) and torch.isfinite(logits).all()
    assert model.config._attn_implementation == "eager"
    again = build_tiny_causal_lm("teacher", text, seed=0, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)


def test_dtype():
    model = build_tiny_llava("student", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
