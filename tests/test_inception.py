"""The FID Inception-v3: parameter layout of pytorch-fid's weight file, loading, determinism, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from numerics import assert_same_maths

from textok.errors import TextokError
from textok.eval.features import InceptionFeatures, metric_name
from textok.nets.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    FIDInceptionV3,
    load_fid_inception,
)


FIXTURE = Path(__file__).parent / "fixtures" / "inception_keys.txt"


def _fixture_keys() -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for line in FIXTURE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        keys[key] = () if shape == "()" else tuple(int(s) for s in shape.split(","))
    return keys


def _randomise(net: FIDInceptionV3, seed: int = 0) -> FIDInceptionV3:
    """He-init convs and non-trivial BatchNorm statistics so activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
        elif isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.02
            m.bias.data = torch.randn(m.bias.shape, generator=g)
    return net


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    return _randomise(FIDInceptionV3(resize_input=False))


def test_state_dict_keys_and_shapes_match_reference_layout(net: FIDInceptionV3) -> None:
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref = _fixture_keys()
    assert len(ref) == 566
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref
    params = sum(p.numel() for p in net.parameters())
    assert params == 23_850_960  # sum over the fixture's weights and biases (Inception-v3, 1008-way fc)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_features_deterministic_and_batch_independent(net: FIDInceptionV3) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 75, 75, generator=g) * 2 - 1
    with torch.no_grad():
        a = net(x)
        b = net(x)
        single = net(x[1:2])
    assert a.pool.shape == (3, 2048) and a.logits.shape == (3, 1008)
    assert torch.equal(a.pool, b.pool) and torch.equal(a.logits, b.logits)
    assert_same_maths(single.pool[0], a.pool[1], what="batch of 1 vs 3")  # eval-mode BN: no batch coupling
    assert torch.isfinite(a.pool).all() and (a.pool >= 0).all()  # ReLU features, averaged
    assert a.pool.std() > 1e-3  # activations did not vanish
    assert (a.pool[0] - a.pool[2]).abs().max() > 1e-4  # different images -> different features
    torch.testing.assert_close(a.logits - a.logits_unbiased, net.fc.bias.expand(3, -1))
    torch.testing.assert_close(a.logits_unbiased, a.pool @ net.fc.weight.t())
    # A freshly built net with the same weights gives the same numbers.
    other = _randomise(FIDInceptionV3(resize_input=False))
    with torch.no_grad():
        torch.testing.assert_close(other(x).pool, a.pool)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_resize_to_299_is_bilinear_like_pytorch_fid(net: FIDInceptionV3) -> None:
    resizing = FIDInceptionV3(resize_input=True)
    resizing.load_state_dict(net.state_dict())
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    pre = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(resizing(x).pool, net(pre).pool)
    with pytest.raises(TextokError, match="B, 3, H, W"):
        net(torch.zeros(1, 1, 75, 75))


def test_missing_weights_error_names_file_hash_and_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(TextokError) as e:
        load_fid_inception()
    msg = str(e.value)
    assert "\n" not in msg
    assert WEIGHTS_FILENAME in msg and "6726825d" in msg and WEIGHTS_ENV in msg
    missing = tmp_path / "nowhere" / WEIGHTS_FILENAME
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(TextokError, match="not found at .*nowhere"):
        load_fid_inception()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_loads_strictly_and_marks_real_weights(net: FIDInceptionV3, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    state = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / WEIGHTS_FILENAME
    torch.save(state, path)  # like the old file: no BatchNorm counters
    # Our random file is not the real one: the sha256 check refuses it...
    with pytest.raises(TextokError, match="6726825d"):
        load_fid_inception(path)
    # ...and with the check off (a file the user trusts) it loads strictly, found through the env var/folder.
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    loaded = load_fid_inception(check_hash=False, resize_input=False)
    assert loaded.real_weights and not net.real_weights
    x = torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pool, net(x).pool)
    feats = InceptionFeatures(loaded)
    assert metric_name(feats) == "FID" and metric_name(InceptionFeatures(net)) == "FD-inception"
    # A safetensors conversion of the same file loads too (no .pth hash to check).
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "inception.safetensors"))
    converted = load_fid_inception(tmp_path / "inception.safetensors", resize_input=False)
    assert converted.real_weights
    torch.testing.assert_close(converted.fc.weight, net.fc.weight)
    # A file of another layout is refused in one line.
    bad = dict(state)
    bad["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(TextokError, match="does not match the FID Inception layout"):
        load_fid_inception(tmp_path / "bad.pth", check_hash=False)
