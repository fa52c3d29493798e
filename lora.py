"""
LoRA and weight-only int8: the two ways this project shrinks what training has to touch.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; microsoft/LoRA's loralib)
-----------------------------------------------------------------------------------------------------
A frozen Linear layer computes y = x W^T + b. LoRA adds a trainable low-rank update beside it:

    y = x W^T + b + (dropout(x) A^T B^T) * (alpha / r)        A: (r, in), B: (out, r), r << in, out

A starts random (Kaiming) and B starts at zero, so at step 0 the model is exactly the pretrained one
and only B's gradient is non-zero. Training r * (in + out) numbers per layer instead of in * out
cuts the optimizer state by ~100x, and `merge()` folds B @ A into W afterwards so inference pays nothing.
LoRALinear subclasses nn.Linear, so a checkpoint's `weight` / `bias` names load unchanged.

Weight-only int8 (as in gpt-fast's quantize.py)
------------------------------------------------
Each output row of W is stored as int8 with one fp32 scale: scale = max|row| / 127, q = round(W / scale).
At run time y = (x q^T) * scale + b. Memory for frozen weights halves vs fp16 (quarters vs fp32);
the rounding error per weight is at most scale / 2. LoRA trains on top of an int8 base because
the base is frozen anyway: gradients flow through x q^T to x, never into q. That is the laptop mode.

Simplified on purpose: no 4-bit (QLoRA), no per-group scales, no fused int8 kernels; the int8 weight
is cast to the activation dtype inside the matmul, which saves memory, not time.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


# -----------------------------------------------------------------------------
# int8

def quantize_weight_int8(weight):
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0         # (out,) one scale per output row
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x, weight_int8, scale, bias=None):
    """y = (x q^T) * scale + b: the scale is per output channel, so it can be applied after the matmul."""
    y = F.linear(x, weight_int8.to(x.dtype)) * scale.to(x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y


class Int8Linear(nn.Module):
    """A frozen Linear whose weight is stored as int8 + one scale per output row."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.weight_scale = quantize_weight_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.to(linear.weight.device)

    def forward(self, x):
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


# -----------------------------------------------------------------------------
# LoRA

class LoRALinear(nn.Linear):
    """nn.Linear + a trainable low-rank update. The base weight may be float or (after
    quantize_int8_) int8; the LoRA branch keeps its own dtype (fp32 master weights by default)."""

    def __init__(self, in_features, out_features, r, alpha, dropout=0.0, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        assert r > 0, "LoRA rank must be positive"
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))   # (r, in), fp32
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))  # (out, r), zeros: no-op at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # the same init nn.Linear uses
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        if self.weight.dtype == torch.int8:                     # frozen int8 base (see quantize_int8_)
            y = int8_linear(x, self.weight, self.weight_scale, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # The low-rank branch runs in the adapter's dtype (fp32 master weights), then joins y's dtype.
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling   # (..., out)
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold B @ A * scaling into the base weight: the same function, one matmul cheaper."""
        if self.weight.dtype == torch.int8:
            raise ValueError("merge() on an int8 base would re-quantize it; merge before quantize_int8_")
        if not self.merged:
            self.weight += (self.lora_B @ self.lora_A * self.scaling).to(self.weight.dtype)
            self.merged = True


def apply_lora(model, r, alpha, targets=("q_proj", "v_proj"), dropout=0.0):
    """Replace every nn.Linear whose attribute name is in `targets` with a LoRALinear sharing its
    weight and bias. Returns the number of layers adapted."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                lora = LoRALinear(child.in_features, child.out_features, r, alpha, dropout,
                                  bias=child.bias is not None, device=child.weight.device)
                lora.weight, lora.bias = child.weight, child.bias     # share, do not copy
                setattr(module, name, lora)
                count += 1
    if count == 0:
        raise ValueError(f"apply_lora: no nn.Linear named any of {targets} in the model")
    return count


def mark_only_lora_as_trainable(model):
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


def lora_state_dict(model):
    return {name: t for name, t in model.state_dict().items() if "lora_" in name}


def save_lora(path, model, r, alpha, targets):
    """Adapters alone, as safetensors; rank and targets go in the header so a mismatch is caught."""
    meta = {"r": str(r), "alpha": str(alpha), "targets": ",".join(targets)}
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path), metadata=meta)


def load_lora(path, model, r, alpha, targets):
    """Load adapters saved by save_lora into a model that already has apply_lora(r, alpha, targets)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    saved = (meta.get("r"), meta.get("targets"))
    if saved != (str(r), ",".join(targets)):
        raise ValueError(f"{path}: LoRA adapters have r={saved[0]} targets={saved[1]}, but the model was "
                         f"built with r={r} targets={','.join(targets)}; set --lora.r / --lora.targets to match")
    tensors = load_file(str(path))
    expected = lora_state_dict(model)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}: adapter names differ from the model's: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(tensors, strict=False)


def quantize_int8_(model, skip=("lm_head",)):
    """In place: every frozen nn.Linear becomes Int8Linear, and every LoRALinear's base weight becomes
    int8 (its adapters stay float and trainable). Modules named in `skip` stay as they are
    (lm_head is usually tied to the embedding table, which stays float)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in skip:
                continue
            if isinstance(child, LoRALinear):
                q, scale = quantize_weight_int8(child.weight)
                del child.weight                              # drop the float Parameter ...
                child.register_buffer("weight", q)            # ... keep an int8 buffer under the same name
                child.register_buffer("weight_scale", scale.to(q.device))
                if child.bias is not None:
                    child.bias.requires_grad_(False)
            elif type(child) is nn.Linear:
                setattr(module, name, Int8Linear.from_linear(child))
    return model
