"""Reading and writing weights: official LlamaGen .pt files, safetensors, transformers folders (Janus),
atomic writes.

Every load in RankE goes through here, so bad input gets one clear error and nothing is unpickled
beyond tensors (torch.load(weights_only=True)); every write goes to a temporary file that is renamed
into place, so a crash never leaves a half-written file behind.
"""
import argparse
import hashlib
import json
import os
import pickle

import torch
from safetensors.torch import load_file, save_file


class BadInput(ValueError):
    """A file or setting the user gave that cannot be used; its message names it and what to do. The
    scripts end on one with that line alone (common.plain_errors), not a traceback."""


def read_state_dict(path, keys=("model", "module", "state_dict")):
    """Tensors of a checkpoint: .safetensors, or a .pt/.pth whose tensors sit under one of `keys`
    (LlamaGen writes {"model": ...}; DeepSpeed {"module": ...}; HPSv2 {"state_dict": ...})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # safetensors names no file in its errors
            raise BadInput(f"cannot read {path} ({e}): a truncated or corrupt safetensors file; copy it again "
                           "(a run's round: resume from the round before, --resume_from)") from None
    try:  # LlamaGen's training scripts store their argparse.Namespace beside the weights: harmless
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInput(f"refusing to load {path}: it pickles objects other than tensors "
                       f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]}). "
                       f"Re-save its state_dict as .safetensors or a plain dict of tensors.") from None
    except (RuntimeError, EOFError) as e:  # torch names no file: "failed finding central directory", ...
        raise BadInput(f"cannot read {path} ({str(e).splitlines()[0]}): a truncated or corrupt checkpoint; "
                       "download or copy it again (a shapes-world file: delete it, and ranke.py writes it anew)") from None
    if isinstance(ckpt, dict):
        for k in keys:
            if k in ckpt and isinstance(ckpt[k], dict):
                ckpt = ckpt[k]
                break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise BadInput(f"{path} holds no state_dict of tensors (looked at the top level and under {keys})")
    return ckpt


def read_pretrained(folder, prefix, keep=("",)):
    """Tensors of a transformers `save_pretrained` folder (model.safetensors, or the shards that
    model.safetensors.index.json lists) whose names start with `prefix` (removed) followed by one of `keep`."""
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} lacks {name}, a file of its weights")
        try:
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    if k.startswith(prefix) and k[len(prefix):].startswith(keep):
                        out[k[len(prefix):]] = f.get_tensor(k)
        except Exception as e:
            raise BadInput(f"cannot read {path} ({e}): a truncated or corrupt safetensors file") from None
    return out


def check_keys(own, state_dict, what):
    """Raise one error naming `what` and the first missing, unexpected and mis-shaped keys."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                 for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshaped:
        head = lambda xs: ", ".join(xs[:5]) + (f" ... ({len(xs)} in all)" if len(xs) > 5 else "")
        lines = [f"checkpoint does not fit {what}:"]
        if missing: lines.append(f"  missing: {head(missing)}")
        if unexpected: lines.append(f"  unexpected: {head(unexpected)}")
        if misshaped: lines.append(f"  mis-shaped (file vs config): {head(misshaped)}")
        raise BadInput("\n".join(lines))


def load_exact(model, state_dict, what):
    """load_state_dict(strict=True), failing with check_keys' error rather than torch's."""
    check_keys(model.state_dict(), state_dict, what)
    model.load_state_dict(state_dict, strict=True)
    return model


def file_digest(path, algo="sha256"):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def fsync(path):
    """Flush a file's (or a folder's entries') data to the disk, so that a rename after it never points
    at data a power cut loses."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(write, path):
    """write(tmp), fsync, then the rename onto path; a failed write (a full disk) leaves no temporary."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fsync(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write(path, text):
    """A text file written via a temporary file and a rename, so a reader never sees half of it."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _replace(write, path)


def atomic_save(tensors, path, metadata=None):
    """safetensors.save_file to `path` via a temporary file and a rename (atomic on POSIX)."""
    _replace(lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                   metadata=metadata), path)
