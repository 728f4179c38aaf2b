"""ddpm.text: the byte tokenizer and the causal text tower."""

import pytest
import torch

from ddpm.text import ByteTokenizer, TextTransformer


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
