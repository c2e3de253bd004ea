"""The hand-set packer (sgm/packing.py): the stock PvtModel's last stage, given per-cell token starts and codes, puts
the k-th start's code at image position k, against a reference written as plain loops. Seconds, CPU."""
import numpy as np
import pytest
import torch
from transformers import PvtConfig, PvtModel

from sgm import packing
from sgm.models import EYES_TOWER


@pytest.fixture(scope="module")
def tower():
    return packing.put_packer(PvtModel(PvtConfig(**EYES_TOWER)).eval())


def stage4(tower, stage3):
    """The tower from stage 3's output on: what LLaVA reads at the 49 image positions, the code channels."""
    with torch.no_grad():
        hidden, height, width = tower.encoder.patch_embeddings[3](stage3)
        for block in tower.encoder.block[3]:
            hidden = block(hidden, height, width)[0]
        return tower.encoder.layer_norm(hidden)[:, 1:, packing.OUT:packing.OUT + packing.CODE].numpy()


def random_map(rng, starts, low, high):
    """A stage-3 output: `starts` first starts (30% with a second) in the top 12 rows of cells, start logits of
    size low..high (negative where none), random codes, noise in every channel the packer must ignore."""
    flags = np.zeros((14, 14, 2), bool)
    for cell in rng.choice(12 * 14, size=starts, replace=False):
        row, col = divmod(int(cell), 14)
        flags[row, col, 0], flags[row, col, 1] = True, rng.random() < 0.3
    codes = rng.normal(size=(14, 14, 2, packing.CODE))
    x = rng.normal(size=(packing.STAGE3_WIDTH, 14, 14))
    for s in range(2):
        x[packing.FLAG_IN[s]] = np.where(flags[..., s], 1, -1) * rng.uniform(low, high, size=(14, 14))
        first = packing.CODE_IN[0] + s * packing.CODE
        x[first:first + packing.CODE] = codes[:, :, s].transpose(2, 0, 1)
    return x, flags, codes


def expected(flags, codes):
    """Reference by loops: cell rows top to bottom, columns left to right, first start before second; the last 49
    of them right-aligned (the last at position 48), zeros before."""
    found = [codes[row, col, s] for row in range(14) for col in range(14) for s in range(2) if flags[row, col, s]]
    want = np.zeros((49, packing.CODE))
    if found:
        want[49 - len(found[-49:]):] = found[-49:]
    return want


@pytest.mark.parametrize("starts,low,high", [(0, 1, 3), (1, 1, 3), (12, 0.005, 0.1), (30, 1, 3), (45, 5, 50),
                                             (80, 5, 50)])  # 45 and 80 first starts: ~58 and ~104 in all, > 49
def test_packs_the_starts_in_reading_order(tower, starts, low, high):
    rng = np.random.default_rng(starts)
    maps = [random_map(rng, starts, low, high) for _ in range(6)]
    out = stage4(tower, torch.tensor(np.stack([m[0] for m in maps]), dtype=torch.float32))
    for got, (_, flags, codes) in zip(out, maps):
        want = expected(flags, codes)
        # codes pass through two LayerNorms whose constants dominate them: the same to ~2% at worst (logits of 50)
        np.testing.assert_allclose(got, want, atol=0.03 * max(1.0, np.abs(want).max()))


def test_packer_is_refused_by_another_tower_and_in_half_precision():
    with pytest.raises(ValueError, match="stage 4 needs depths 4"):
        packing.put_packer(PvtModel(PvtConfig(**dict(EYES_TOWER, depths=[2, 2, 2, 2]))))
    with pytest.raises(ValueError, match="float32"):
        packing.check_precision(torch.bfloat16)
    packing.check_precision(torch.float32)
