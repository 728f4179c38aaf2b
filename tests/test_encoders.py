"""ddpm.encoders: the frozen text encoders behind one interface (the domain CLIP tower; transformers CLIP
and T5 models loaded from a folder, tested with tiny random ones and a tokenizer built here) and the
caption cache."""

import json

import pytest
import torch

from ddpm.clip import ClipConfig, DomainClip, save_clip
from ddpm.encoders import CaptionCache, DomainTextEncoder, load_text_encoder, run_text_encoder
from ddpm.errors import DataError

TINY = dict(width=32, layers=1, heads=2, max_length=40, embed_dim=32, image_width=8)
WORDS = ["a", "photo", "of", "coat", "bag", "dark", "light", "small", "large", "shoe"]


def domain_encoder(folder):
    torch.manual_seed(0)
    save_clip(DomainClip(ClipConfig(**TINY)), {"format": "ddpm-text-encoder"}, folder)
    return folder


def word_tokenizer(folder, eos="</s>", bos=None):
    """A word-level tokenizer over WORDS, built with `tokenizers` and saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", eos] + ([bos] if bos else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in specials[2:]]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token=eos, model_max_length=16
    )
    fast.save_pretrained(folder)
    return len(vocab)


def tiny_clip_text(folder):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    size = word_tokenizer(folder, eos="<|endoftext|>", bos="<|startoftext|>")
    config = CLIPTextConfig(
        vocab_size=size,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=12,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=3,
    )
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def tiny_t5(folder):
    from transformers import T5Config, T5EncoderModel

    size = word_tokenizer(folder)
    config = T5Config(vocab_size=size, d_model=20, d_kv=5, d_ff=37, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


def test_the_domain_encoder_is_the_clip_pairs_text_tower(tmp_path):
    folder = domain_encoder(tmp_path / "enc")
    encoder = load_text_encoder(folder)
    assert isinstance(encoder, DomainTextEncoder) and encoder.width == 32
    out = encoder.encode(["a coat", "a bag"])
    with torch.no_grad():
        expected = encoder.clip.text(*encoder.clip.tokenizer(["a coat", "a bag"]))
    assert out.tokens.shape == (2, 8, 32)  # cut to the longest text (causal: the rest is padding)
    torch.testing.assert_close(out.pooled, expected.pooled)
    torch.testing.assert_close(out.tokens, expected.tokens[:, :8])


@pytest.mark.parametrize("make", [tiny_clip_text, tiny_t5], ids=["clip", "t5"])
def test_pretrained_encoders_load_from_a_folder_and_follow_the_interface(make, tmp_path):
    pytest.importorskip("transformers")
    folder = make(tmp_path / "model")
    encoder = load_text_encoder(folder)
    out = encoder.encode(["a photo of a coat", "bag"])
    width = 24 if make is tiny_clip_text else 20
    assert encoder.width == width and out.tokens.shape[::2] == (2, width)
    assert out.mask[1].sum() < out.mask[0].sum()  # the shorter text has more padding
    assert out.pooled.shape == (2, 12 if make is tiny_clip_text else width)
    if make is tiny_t5:  # the pooled embedding is the mean of the real tokens' states
        torch.testing.assert_close(out.pooled[1], out.tokens[1][out.mask[1]].mean(0))
    again = load_text_encoder(folder).encode(["bag"])
    torch.testing.assert_close(again.pooled[0], out.pooled[1])  # a text's encoding is its own
    assert encoder.source["kind"].startswith("transformers-")


def test_a_missing_or_unsuitable_encoder_is_one_clear_error(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text encoder"):
        load_text_encoder(tmp_path / "empty")
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "bert"
    )
    word_tokenizer(tmp_path / "bert")
    with pytest.raises(DataError, match="a 'bert' model; text encoders are CLIP or T5"):
        load_text_encoder(tmp_path / "bert")


def test_the_cache_encodes_each_distinct_caption_once_and_adds_the_empty_text(tmp_path):
    encoder = load_text_encoder(domain_encoder(tmp_path / "enc"))
    calls = []
    encode = encoder.encode
    encoder.encode = lambda texts: calls.append(list(texts)) or encode(texts)
    captions = ["a coat", "a bag", "a coat", "a dark coat"]
    cache = CaptionCache(encoder, captions, batch_size=2)
    assert sum(len(c) for c in calls) == 4 and cache.texts == ["a coat", "a bag", "a dark coat", ""]
    assert cache.ids.tolist() == [0, 1, 0, 2] and cache.null == 3
    rows = cache.rows(torch.tensor([2, 3]))
    direct = encode(["a dark coat", ""])
    length = rows.tokens.shape[1]
    assert length == len("a dark coat") + 2  # cut to the longest text: padding is never attended
    torch.testing.assert_close(rows.tokens, direct.tokens[:, :length])
    torch.testing.assert_close(rows.pooled, direct.pooled)


def test_a_run_uses_its_own_copy_and_checks_the_width(tmp_path):
    from ddpm.config import Config

    run = tmp_path / "run"
    domain_encoder(run / "text-encoder")
    cfg = Config()
    cfg.model.text_encoder, cfg.model.context_dim = str(tmp_path / "gone"), 32
    assert run_text_encoder(cfg, run).width == 32  # the original folder is gone: the copy serves
    cfg.model.context_dim = 64
    message = "gives 32-wide states and a 32-wide pooled text; the run was trained on 64 and 64"
    with pytest.raises(DataError, match=message):
        run_text_encoder(cfg, run)
    info = json.loads((run / "text-encoder" / "text-encoder.json").read_text())
    assert info["format"] == "ddpm-text-encoder"
