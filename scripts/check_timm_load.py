#!/usr/bin/env python3
"""Loads candle-finetune's export into timm and torchvision (strict load_state_dict) and compares
eval logits with the ones candle computed. Usage: check_timm_load.py DIR (from the
export_for_timm example)."""
import sys

import timm
import torch
import torchvision
from safetensors.torch import load_file

d = sys.argv[1]
sd = load_file(f"{d}/model.safetensors")
x = load_file(f"{d}/input.safetensors")["input"]
want = load_file(f"{d}/logits.safetensors")["logits"]
for name, model in [("timm", timm.create_model("resnet18", num_classes=196, pretrained=False)),
                    ("torchvision", torchvision.models.resnet18(num_classes=196))]:
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = model.eval()(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{name}: strict load OK, max logit error {err:.2e} (relative to the largest logit)")
    assert err < 1e-4
