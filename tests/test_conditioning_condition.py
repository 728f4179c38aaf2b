"""ddpm.conditioning.condition: one protocol (device move, rows, repeat, concatenate, chunk) that class ids,
text encodings, token ids and low-resolution images all answer, each as doing it by hand to its tensors
gives; and the places that once asked which kind a condition is."""

from types import SimpleNamespace

import pytest
import torch

from ddpm.conditioning import ClassConditioner
from ddpm.conditioning.condition import ClassIds, Condition, as_condition
from ddpm.conditioning.low_res import LowResImage
from ddpm.config import Config, DataConfig, ModelConfig
from ddpm.tasks import Batch
from ddpm.text import TextEncoding, TokenIds
from ddpm.unet import UNet


def tensors(n: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """The tensors of a batch of ``n`` of each kind, by kind."""
    g = torch.Generator().manual_seed(seed)
    return {
        "ClassIds": [torch.randint(0, 10, (n,), generator=g)],
        "TextEncoding": [
            torch.randn(n, 5, 4, generator=g),
            torch.rand(n, 5, generator=g) < 0.7,
            torch.randn(n, 4),
        ],
        "TokenIds": [torch.randint(0, 259, (n, 6), generator=g), torch.rand(n, 6, generator=g) < 0.7],
        "LowResImage": [torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 50, (n,), generator=g)],
    }


KINDS = {"ClassIds": ClassIds, "TextEncoding": TextEncoding, "TokenIds": TokenIds, "LowResImage": LowResImage}


def fields(c) -> list[torch.Tensor]:
    return [getattr(c, name) for name in c.__dataclass_fields__]


def same(c, kind, expected: list[torch.Tensor]) -> bool:
    """``c`` is of ``kind`` and holds exactly ``expected``, dtype and values."""
    got = fields(c)
    return (
        type(c) is kind
        and len(got) == len(expected)
        and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(got, expected, strict=True)
        )
    )


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_of_condition_answers_the_protocol_as_its_tensors_do_by_hand(name):
    kind, parts = KINDS[name], tensors(6)[name]
    c = kind(*parts)
    assert isinstance(c, Condition) and len(c) == 6
    # rows: a slice, an index tensor
    assert same(c[1:4], kind, [p[1:4] for p in parts])
    rows = torch.tensor([5, 0, 0, 3])
    assert same(c[rows], kind, [p[rows] for p in parts])
    # repeat: one row for n examples; n rows as they are; anything else refused
    one = c[2:3]
    assert same(one.repeat_to(4), kind, [p[2:3].expand(4, *p.shape[1:]) for p in parts])
    assert c.repeat_to(6) is c
    with pytest.raises(ValueError, match="for a batch of 4"):
        c[:3].repeat_to(4)
    # concatenate: in order (texts of one length: no padding)
    other = kind(*tensors(3, seed=1)[name])
    both = kind.cat([c, other])
    assert same(both, kind, [torch.cat([a, b]) for a, b in zip(parts, fields(other), strict=True)])
    assert same(type(c).cat([c, other]), kind, fields(both))
    # chunk: as torch.Tensor.chunk splits, uneven parts included
    for n in (2, 4):
        chunks = c.chunk(n)
        by_hand = list(zip(*(p.chunk(n) for p in parts), strict=True))
        assert len(chunks) == len(by_hand)
        assert all(same(a, kind, list(b)) for a, b in zip(chunks, by_hand, strict=True))
    # device move: every tensor, nothing else changed
    moved = c.to("meta")
    assert type(moved) is kind and all(m.device.type == "meta" for m in fields(moved))
    assert [m.dtype for m in fields(moved)] == [p.dtype for p in parts]
    assert same(c.to("cpu"), kind, parts)


def test_text_kinds_concatenate_texts_of_other_lengths_padded_and_masked_out():
    short, long = (
        TokenIds(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)),
        TokenIds(torch.full((2, 4), 7), torch.ones(2, 4, dtype=torch.bool)),
    )
    both = TokenIds.cat([short, long])
    assert both.ids.shape == (3, 4) and both.mask[0].tolist() == [True, True, False, False]


def test_class_ids_wrap_their_tensor_and_older_forms_become_class_ids():
    ids = torch.tensor([3, 1, 4])
    assert ClassIds(ids).ids is ids and ClassIds.of(ids).ids is ids  # no copy
    assert as_condition(ids).ids is ids and isinstance(as_condition(ids), ClassIds)
    assert torch.equal(as_condition(2).ids, torch.tensor([2])) and as_condition(2).ids.dtype == torch.long
    assert torch.equal(as_condition(torch.tensor(2)).ids, torch.tensor([2]))
    assert as_condition(2).repeat_to(3).ids.tolist() == [2, 2, 2]
    for c in (ClassIds(ids), TokenIds(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))):
        assert as_condition(c) is c  # a condition is taken as it is


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_batch_splits_every_kind_of_condition_the_same_way(name):
    cond = KINDS[name](*tensors(4)[name])
    x = torch.arange(8.0).reshape(4, 2)
    parts = Batch(x, cond=cond).chunk(2)
    assert [p.x.tolist() for p in parts] == [x[:2].tolist(), x[2:].tolist()]
    assert all(same(p.cond, KINDS[name], fields(cond[i * 2 : i * 2 + 2])) for i, p in enumerate(parts))


def test_a_class_runs_training_and_grid_conditions_are_class_ids_of_its_rows():
    cfg = Config(model=ModelConfig(num_classes=3), data=DataConfig(channels=1, class_names=("a", "b", "c")))
    labels = torch.tensor([0, 2, 1, 1])
    dataset = SimpleNamespace(class_names=("a", "b", "c"), labels=labels)
    conditions = ClassConditioner(cfg).for_training(dataset, "cpu")
    assert conditions.ids is labels and conditions.null == 3
    rows = torch.tensor([2, 3, 0])  # a batch's rows after condition dropout: 3 is the null class
    assert isinstance(conditions.inputs(rows), ClassIds) and conditions.inputs(rows).ids is rows
    grid_labels, grid = conditions.grid(6)
    assert (
        isinstance(grid, ClassIds) and grid.ids is grid_labels and grid_labels.tolist() == [0, 0, 1, 1, 2, 2]
    )


def small_unet(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4, **kw)
    return net.eval()


def test_the_unet_takes_the_condition_of_what_it_is_and_refuses_any_other():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    text = TextEncoding(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 16))
    low = LowResImage(torch.randn(2, 1, 8, 8), torch.tensor([0, 4]))
    ids = ClassIds(torch.tensor([0, 2]))
    nets = {
        "class-conditional": (small_unet(num_classes=3), ids),
        "text-conditional": (small_unet(context_dim=16), text),
        "a super-resolution stage": (small_unet(low_res_channels=1), low),
        "unconditional": (small_unet(), None),
    }
    with torch.no_grad():
        for kind, (net, good) in nets.items():
            assert net(x, t, good).shape == (2, 1, 8, 8)
            for wrong in (ids, text, low):
                if wrong is not good:
                    with pytest.raises(ValueError, match=f"^this U-Net is {kind}"):
                        net(x, t, wrong)
        net, _ = nets["a super-resolution stage"]  # one low-resolution image for the whole batch
        one = net(x, t, low[:1])
        assert torch.equal(
            one, net(x, t, LowResImage(low.image[:1].expand(2, -1, -1, -1), low.level[:1].expand(2)))
        )
        with pytest.raises(ValueError, match="for a batch of 2"):
            nets["class-conditional"][0](x, t, ClassIds(torch.tensor([0, 1, 2])))
