"""ddpm.text: the byte tokenizer and the causal text tower."""

import pytest
import torch

from ddpm.text import BpeTokenizer, ByteTokenizer, TextTransformer


def test_any_string_tokenizes_and_decodes_back():
    tok = ByteTokenizer(max_length=16)
    texts = ["a coat", "", "naïve ✓"]
    ids, mask = tok(texts)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [256, *b"a coat", 257] and mask[0].sum() == 8
    assert ids[1, :2].tolist() == [256, 257] and mask[1].sum() == 2  # the empty text: start and end
    assert all(tok.decode(row) == text for row, text in zip(ids, texts, strict=True))
    long, long_mask = tok(["x" * 40])
    assert long[0, -1] == 257 and long_mask[0].all()  # cut to fit, the end token kept
    with pytest.raises(ValueError):
        ByteTokenizer(max_length=2)


def test_the_pooled_embedding_is_the_end_tokens_and_padding_never_reaches_it():
    torch.manual_seed(0)
    tok, tower = (
        ByteTokenizer(12),
        TextTransformer(width=16, layers=2, heads=2, max_length=12, embed_dim=8).eval(),
    )
    ids, mask = tok(["shoe", "bag"])
    with torch.no_grad():
        out = tower(ids, mask)
        assert out.tokens.shape == (2, 12, 16) and out.pooled.shape == (2, 8)
        changed = ids.clone()
        changed[0, 8:] = 65  # overwrite padding after the end token (position 5)
        again = tower(changed, mask)
        assert torch.allclose(again.pooled, out.pooled, atol=1e-6)  # causal: the end token never sees it
        torch.testing.assert_close(out.pooled[0], tower.projection(out.tokens[0, 5]))
        other = tower(*tok(["shop", "bag"]))
    assert not torch.allclose(other.pooled[0], out.pooled[0])  # the text matters
    assert torch.allclose(other.pooled[1], out.pooled[1], atol=1e-6)  # and each row is its own


def test_encodings_of_different_lengths_join_with_the_padding_masked():
    from ddpm.text import TextEncoding

    a = TextEncoding(torch.ones(1, 2, 4), torch.tensor([[True, True]]), torch.ones(1, 3))
    b = TextEncoding(torch.full((2, 5, 4), 2.0), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 3))
    both = TextEncoding.cat([a, b])
    assert both.tokens.shape == (3, 5, 4) and both.mask[0].tolist() == [True, True, False, False, False]
    assert both.tokens[0, 2:].abs().sum() == 0 and torch.equal(both.tokens[1:], b.tokens)
    assert len(both) == 3 and torch.equal(both[1:].pooled, b.pooled)
    assert len(a.repeat_to(4)) == 4
    with pytest.raises(ValueError, match="2 text encodings for a batch of 3"):
        b.repeat_to(3)


def test_bpe_learns_the_captions_words_and_still_tokenizes_any_string():
    captions = [
        f"a photo of a {a}{c}" for a in ("", "dark ", "large ") for c in ("coat", "bag", "ankle boot")
    ] * 5
    tok = BpeTokenizer.train(captions, vocab_size=400, max_length=12)
    ids, mask = tok(["a photo of a dark ankle boot", "", "naïve ✓ zebra"])
    assert ids[0, 0] == BpeTokenizer.BOS and mask[1].sum() == 2 and ids[1, 1] == BpeTokenizer.EOS
    # frequent words are single tokens: far fewer than the 28 bytes
    assert 2 < mask[0].sum() <= 2 + 7
    assert tok.decode(ids[0]) == "a photo of a dark ankle boot"
    assert mask[2].all() and ids[2, -1] == BpeTokenizer.EOS  # cut to fit, the end token kept
    wide = BpeTokenizer.from_json(tok.to_json(), 40)
    assert wide.decode(wide(["naïve ✓ zebra"])[0][0]) == "naïve ✓ zebra"  # unseen characters, as bytes
    again = BpeTokenizer.from_json(tok.to_json(), 12)
    assert torch.equal(again(["a dark bag"])[0], tok(["a dark bag"])[0])
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        BpeTokenizer.from_json("{junk", 12)
