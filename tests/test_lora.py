"""
Lesson: LoRA is a low-rank update beside a frozen layer, and int8 is a per-row scale on a frozen weight.

Compared against `peft` (the same A and B give the same output), against the unmerged layer
(merge() changes nothing but speed), and against the float layer (int8 stays within a stated error).

Run:  python -m pytest tests/test_lora.py
"""
import pytest
import torch
import torch.nn as nn

import weights
from lora import (Int8Linear, LoRALinear, apply_lora, load_lora, lora_state_dict, mark_only_lora_as_trainable,
                  quantize_int8_, quantize_weight_int8, save_lora)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.v_proj = nn.Linear(16, 24, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def test_lora_linear_matches_peft(parity):
    peft = pytest.importorskip("peft")
    base = TwoLayers()
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours = TwoLayers()
    ours.load_state_dict({k.replace("base_model.model.", "").replace("base_layer.", ""): v
                          for k, v in ref.state_dict().items() if "lora_" not in k})
    apply_lora(ours, r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    for name in ("q_proj", "v_proj"):         # give both the same non-zero A and B
        layer, ref_layer = getattr(ours, name), getattr(ref.base_model.model, name)
        torch.nn.init.normal_(layer.lora_B)
        ref_layer.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        ref_layer.lora_B["default"].weight.data.copy_(layer.lora_B.data)
    x = torch.randn(3, 5, 16)
    parity("LoRALinear vs peft LoRA (r=4, alpha=8)", ours(x), ref(x), 1e-5)


def test_lora_starts_as_identity_and_merge_is_exact(parity):
    layer = nn.Linear(16, 24)
    lora = LoRALinear(16, 24, r=4, alpha=8.0)
    lora.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(7, 16)
    assert torch.equal(lora(x), layer(x))           # B = 0: exactly the base layer at step 0
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (24, 4) and lora.scaling == 2.0
    torch.nn.init.normal_(lora.lora_B)
    before = lora(x)
    lora.merge()
    parity("LoRA merge() vs unmerged", lora(x), before, 1e-5)


def test_only_lora_parameters_train(tmp_path):
    llm = weights.load_llm(weights.write_tiny_checkpoint("llama", tmp_path / "llama"))
    n = apply_lora(llm, r=2, alpha=4.0, targets=("q_proj", "v_proj"))
    mark_only_lora_as_trainable(llm)
    assert n == 2 * llm.cfg.n_layers
    trainable = [name for name, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in t or "lora_B" in t for t in trainable)
    assert len(trainable) == 2 * n


def test_lora_adapters_save_and_load_alone(tmp_path):
    torch.manual_seed(0)
    a, b = TwoLayers(), TwoLayers()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        apply_lora(m, r=2, alpha=2.0, targets=("q_proj",))
    torch.nn.init.normal_(a.q_proj.lora_B)
    save_lora(tmp_path / "adapters.safetensors", a, r=2, alpha=2.0, targets=("q_proj",))
    load_lora(tmp_path / "adapters.safetensors", b, r=2, alpha=2.0, targets=("q_proj",))
    x = torch.randn(4, 16)
    assert torch.equal(a(x), b(x))
    assert set(lora_state_dict(a)) == {"q_proj.lora_A", "q_proj.lora_B"}
    with pytest.raises(ValueError, match="r=2 targets=q_proj.*--lora.r"):
        load_lora(tmp_path / "adapters.safetensors", b, r=4, alpha=2.0, targets=("q_proj",))


def test_int8_weights_are_half_of_fp16_and_close(parity):
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    q, scale = quantize_weight_int8(layer.weight)
    assert q.dtype == torch.int8 and q.nelement() * q.element_size() * 2 == layer.weight.half().nelement() * 2
    # each weight is off by at most half a quantisation step: scale / 2 per row
    err = (q.float() * scale[:, None] - layer.weight).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(8, 256)
    int8 = Int8Linear.from_linear(layer)
    diff = parity("Int8Linear vs fp32 Linear (|y| ~ 0.6)", int8(x), layer(x), 2e-2)
    assert diff > 0                                  # it really is quantised


def test_lora_trains_on_a_frozen_int8_base(tmp_path):
    llm = weights.load_llm(weights.write_tiny_checkpoint("llama", tmp_path / "llama"))
    apply_lora(llm, r=4, alpha=8.0, targets=("q_proj", "v_proj", "gate_proj"))
    mark_only_lora_as_trainable(llm)
    quantize_int8_(llm)
    assert llm.layers[0].attn.q_proj.weight.dtype == torch.int8        # adapted layer: int8 base
    assert isinstance(llm.layers[0].attn.k_proj, Int8Linear)           # plain layer: Int8Linear
    assert llm.lm_head.weight.dtype == torch.float32                   # tied head stays float
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(15):
        logits = llm(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with pytest.raises(ValueError, match="merge before quantize"):
        llm.layers[0].attn.q_proj.merge()
