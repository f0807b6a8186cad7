"""Loads a train-cars / train model folder the way a timm user would, offline, and compares.

    python scripts/check_timm_hub_load.py MODEL_DIR IMAGES_DIR [--repo-id OWNER/NAME]

1. Puts MODEL_DIR (config.json + model.safetensors) into a fresh Hugging Face Hub cache as the
   snapshot of OWNER/NAME at a made-up commit (`models--OWNER--NAME/refs/main`, `snapshots/...`),
   the layout `huggingface_hub` reads with HF_HUB_OFFLINE=1.
2. `timm.create_model("hf-hub:OWNER/NAME", pretrained=True)` from that cache, offline.
3. Checks the class names (`pretrained_cfg["label_names"]`) against MODEL_DIR/config.json.
4. Reads MODEL_DIR/README.md with huggingface_hub's `ModelCard` (the Hub's metadata rules: YAML
   front matter, `model-index` parsed into eval results) and prints what the Hub will show.
5. Evaluates IMAGES_DIR (one sub-folder per class, named as the class) with timm's own eval
   transform (`resolve_data_config` + `create_transform`) and prints timm's top-1 beside ours
   (MODEL_DIR/eval.json, when the run evaluated the same images).

Needs: timm, torch, huggingface_hub, pillow. Exits non-zero when loading fails, the names
differ, or the two top-1 figures are more than --tolerance points apart.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("images_dir")
    ap.add_argument("--repo-id", default="local/candle-finetuned")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1.0, help="top-1 points")
    a = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="hub-cache-")
    commit = "0" * 40
    owner, name = a.repo_id.split("/")
    repo = os.path.join(cache, f"models--{owner}--{name}")
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for fname in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(a.model_dir, fname), os.path.join(snap, fname))
    # Offline, from this cache only (set before huggingface_hub is imported).
    os.environ["HF_HUB_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"

    import timm
    import torch
    from PIL import Image

    model = timm.create_model(f"hf-hub:{a.repo_id}", pretrained=True).eval()
    with open(os.path.join(a.model_dir, "config.json")) as f:
        ours = json.load(f)
    names = list(model.pretrained_cfg.get("label_names") or [])
    want = ours.get("label_names")
    print(f"timm {timm.__version__}: loaded hf-hub:{a.repo_id} ({ours['architecture']}, "
          f"{model.num_classes} classes) offline from {cache}")
    if names != want:
        print(f"FAIL: label names differ: timm {names[:5]}... vs config {want[:5]}...")
        return 1
    print(f"label names: {len(names)}, in config order ({names[0]!r} ... {names[-1]!r})")

    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(a.model_dir, "README.md"))
    d = card.data
    if d.library_name != "timm":
        print(f"FAIL: card library_name {d.library_name!r}, want 'timm'")
        return 1
    results = d.eval_results or []
    print(f"card: library_name {d.library_name}, license {d.license}, base_model {d.base_model}, "
          f"datasets {d.datasets}, tags {d.tags}")
    for r in results:
        print(f"  model-index: {r.task_type} on {r.dataset_name} ({r.dataset_type}, split "
              f"{r.dataset_split}): {r.metric_type} = {r.metric_value}")
    if not results:
        print("FAIL: the card has no model-index results")
        return 1

    data_cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_cfg)
    print(f"timm eval transform: {data_cfg}")
    index = {n: i for i, n in enumerate(names)}
    items = []
    for cls in sorted(os.listdir(a.images_dir)):
        d = os.path.join(a.images_dir, cls)
        if not os.path.isdir(d):
            continue
        if cls not in index:
            print(f"FAIL: image folder {cls!r} is not a class of the model")
            return 1
        for fn in sorted(os.listdir(d)):
            if fn.lower().endswith(IMAGE_EXT):
                items.append((os.path.join(d, fn), index[cls]))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(items), a.batch_size):
            chunk = items[i:i + a.batch_size]
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in chunk])
            pred = model(x).argmax(-1)
            correct += sum(int(p) == y for p, (_, y) in zip(pred, chunk))
    top1 = 100.0 * correct / max(len(items), 1)
    print(f"timm top-1 on {len(items)} images of {a.images_dir}: {top1:.2f} %")
    eval_json = os.path.join(a.model_dir, "eval.json")
    if os.path.exists(eval_json):
        with open(eval_json) as f:
            ev = json.load(f)
        ours_top1 = 100.0 * ev["top1"]
        print(f"ours (eval.json, {ev.get('n', '?')} images): {ours_top1:.2f} %; "
              f"difference {top1 - ours_top1:+.2f} points")
        if abs(top1 - ours_top1) > a.tolerance:
            print(f"FAIL: more than {a.tolerance} points apart")
            return 1
    shutil.rmtree(cache)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
