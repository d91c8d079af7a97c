"""The parameter tensors of real models, built with ``torch.nn`` on the meta device (shapes
only: no memory, no downloads, no torchvision or transformers), checked against their
published parameter counts.

* ``gpt2-small``: GPT-2 small as published (vocabulary 50257, context 1024, width 768, 12
  layers, 12 heads, the output projection tied to the token embedding): 124,439,808
  parameters in 148 tensors.
* ``resnet50``: ResNet-50 (bottleneck blocks [3, 4, 6, 3], width 64, 1000 classes, batch
  norms' affine weights and biases): 25,557,032 parameters in 161 tensors.
* ``cnn-1m``: a small CNN for 32x32 images (four 3x3 convolutions 3-64-128-256-256 with
  batch norm, global pooling, a 10-way linear head): 964,170 parameters in 14 tensors.

``shapes(name)`` returns the shapes of ``model.parameters()`` (tied ones once, as an
optimizer sees them); it raises if a count differs from the published one.
"""
from __future__ import annotations

REAL_MODELS = ("cnn-1m", "resnet50", "gpt2-small")

# (parameters, tensors): GPT-2 small as the published checkpoint holds it (transformer and
# tied head); ResNet-50 as torchvision.models.resnet50 counts it; cnn-1m is defined here
PUBLISHED = {"gpt2-small": (124_439_808, 148), "resnet50": (25_557_032, 161),
             "cnn-1m": (964_170, 14)}
DESCRIPTION = {
    "gpt2-small": "GPT-2 small: vocab 50257, context 1024, 768 wide, 12 layers, 12 heads, "
                  "tied embedding",
    "resnet50": "ResNet-50: bottlenecks [3, 4, 6, 3], 1000 classes",
    "cnn-1m": "small CNN: 3x3 convs 3-64-128-256-256 + batch norm, linear 256-10",
}


def _gpt2(nn, vocab=50257, context=1024, width=768, layers=12):
    # 12 heads split the 768-wide projections; they add no parameters
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(width)
            self.attn_qkv = nn.Linear(width, 3 * width)     # GPT-2's c_attn
            self.attn_proj = nn.Linear(width, width)        # c_proj
            self.ln_2 = nn.LayerNorm(width)
            self.mlp_fc = nn.Linear(width, 4 * width)
            self.mlp_proj = nn.Linear(4 * width, width)

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(context, width)
            self.h = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(width)
            self.lm_head = nn.Linear(width, vocab, bias=False)
            self.lm_head.weight = self.wte.weight           # tied: one tensor

    return GPT2()


def _resnet50(nn, layers=(3, 4, 6, 3), classes=1000):
    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            out = planes * self.expansion
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
            self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                             nn.BatchNorm2d(out)) if downsample else None)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            inplanes, stages = 64, []
            for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
                stride = 1 if i == 0 else 2
                stage = []
                for b in range(blocks):
                    stage.append(Bottleneck(inplanes, planes, stride if b == 0 else 1,
                                            downsample=b == 0))
                    inplanes = planes * Bottleneck.expansion
                stages.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.fc = nn.Linear(512 * Bottleneck.expansion, classes)

    return ResNet()


def _cnn_1m(nn, widths=(64, 128, 256, 256), classes=10):
    mods, c = [], 3
    for w in widths:
        mods += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*mods)


_BUILDERS = {"gpt2-small": _gpt2, "resnet50": _resnet50, "cnn-1m": _cnn_1m}


def module(name: str, torch):
    """The ``torch.nn.Module`` of ``name`` on the meta device (parameters without memory)."""
    if name not in _BUILDERS:
        raise ValueError(f"no real model {name!r}; expected one of {', '.join(REAL_MODELS)}")
    with torch.device("meta"):
        return _BUILDERS[name](torch.nn)


def shapes(name: str, torch) -> list:
    """The shapes of ``name``'s parameters, in ``model.parameters()`` order (tied tensors
    once); raises ``RuntimeError`` if the count is not the published one."""
    ps = list(module(name, torch).parameters())
    out = [tuple(p.shape) for p in ps]
    count = sum(p.numel() for p in ps)
    want = PUBLISHED[name]
    if (count, len(out)) != want:
        raise RuntimeError(f"{name}: built {count:,} parameters in {len(out)} tensors; the "
                           f"published model has {want[0]:,} in {want[1]}")
    return out
