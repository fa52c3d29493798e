"""
Training checkpoints that never corrupt and never execute code.

A checkpoint is a folder:
    model.safetensors      the trainable tensors only (projector, LoRA, ...), by their state_dict names
    optimizer.safetensors  AdamW's moment tensors, flattened to "state.<param index>.<name>"
    meta.json              step, config, optimizer hyper-parameters, RNG states, anything JSON
    MANIFEST.json          size and SHA-256 of each file above, checked on every load

Why each piece:
  - safetensors + JSON only: `torch.load` of a pickle can run arbitrary code; these formats cannot.
  - Atomic replace: we write everything into `<dir>.tmp`, fsync each file and the folder, then swap
    folders with renames (`<dir>` -> `<dir>.old`, `<dir>.tmp` -> `<dir>`). A rename is atomic on POSIX,
    so a process killed at any instant leaves either the new checkpoint or the previous one complete;
    `load_checkpoint` falls back to `<dir>.old` when `<dir>` is missing.
  - The manifest catches files truncated or edited after the fact (a full disk, a bad copy).

Simplified on purpose: one checkpoint folder per run (the latest), no sharding of large states.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointCorrupt(ValueError):
    """A checkpoint folder that is incomplete or does not match its manifest."""


def _sha256(path):
    # read in 1 MiB blocks: a checkpoint can be larger than we want to hold twice in memory
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path):
    # write() only reaches the OS cache; fsync forces it to the disk. On a folder it persists the
    # folder's list of names, i.e. the effect of a rename.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_tensors(optimizer):
    """AdamW's state_dict as (flat tensors, JSON-able rest)."""
    state = optimizer.state_dict()   # {"state": {param index: {"step", "exp_avg", ...}}, "param_groups": [...]}
    tensors = {f"state.{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()
               if torch.is_tensor(value)}
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer, tensors, rest):
    state = {}
    for key, value in tensors.items():   # "state.3.exp_avg" -> state[3]["exp_avg"]
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(directory, model_tensors, meta, optimizer=None):
    """Write the checkpoint folder atomically (see the module docstring)."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)            # leftovers of a save that was killed
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
    if optimizer is not None:
        opt_tensors, opt_rest = optimizer_to_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        meta = {**meta, "optimizer": opt_rest}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    files = sorted(p.name for p in tmp.iterdir())
    # the manifest is written last: a folder without one was never finished
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    for name in files + ["MANIFEST.json"]:
        _fsync(tmp / name)
    _fsync(tmp)
    # The swap: at every instant one complete checkpoint exists under `directory` or `old`.
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory):
    """-> (model tensors, meta dict, optimizer tensors or None), after checking the manifest."""
    directory = Path(directory)
    if not (directory / "MANIFEST.json").exists():
        old = directory.with_name(directory.name + ".old")
        if (old / "MANIFEST.json").exists():   # killed between the two renames: the previous one is whole
            directory = old
        elif not directory.exists():
            raise CheckpointCorrupt(f"{directory}: no such checkpoint folder")
        else:
            raise CheckpointCorrupt(f"{directory}: no MANIFEST.json, so not a complete checkpoint")
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    for name, expected in manifest.items():   # size first (cheap), then the hash (reads every byte)
        path = directory / name
        if not path.exists() or path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointCorrupt(f"{path}: missing or does not match MANIFEST.json (corrupted or edited)")
    meta = json.loads((directory / "meta.json").read_text())
    optimizer = load_file(str(directory / "optimizer.safetensors")) if "optimizer.safetensors" in manifest else None
    return load_file(str(directory / "model.safetensors")), meta, optimizer
