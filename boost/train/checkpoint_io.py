"""Checkpoints without pickle: one folder per saved step under ``out_dir/checkpoints/``.

    checkpoints/step-00000004/
        model.safetensors      every model tensor (tied weights stored once), or, with LoRA,
        adapter/               the PeftModel's own save_pretrained (adapter_config.json + weights)
        head.safetensors       the reweighting head: parameters and buffers (score pool, reference)
        optimizer.pt           {"model": AdamW state_dict, "head": Adam state_dict}; loaded with
                               ``torch.load(weights_only=True)``: tensors, numbers, strings only
        state.safetensors      the warm-start v of Neumann / CG (if any) and the RNG states (uint8)
        trainer_state.json     step, config, data position, what the other files hold

A folder is written under a temporary name (``.step-00000004.<random>.tmp``) and renamed once
complete, so a crash (even ``kill -9``) never leaves a half checkpoint under a ``step-*`` name; the
next start deletes the temporary folders (:func:`remove_stale_checkpoint_folders`). After a save only
the newest ``keep`` folders stay; an older one is first renamed to a temporary name, then deleted.
No file is ever unpickled: a pickle payload in ``optimizer.pt`` is refused (:class:`CheckpointError`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from boost.atomic import AtomicWriteError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_FILE, ADAPTER_DIR, HEAD_FILE = "model.safetensors", "adapter", "head.safetensors"
OPTIMIZER_FILE, TENSORS_FILE, STATE_FILE = "optimizer.pt", "state.safetensors", "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, unsafe (a pickle payload) or of another format; the message
    names the file and what to do."""


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "save_pretrained")


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoint folders of the run in ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def remove_stale_checkpoint_folders(out: Path) -> list[str]:
    """Delete the temporary folders a killed save (or a killed clean-up) left; returns their paths."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = sorted(str(p) for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def _set_rng_states(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].cpu())
    cuda = [tensors[k].cpu() for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    out: Path,
    step: int,
    *,
    model: torch.nn.Module,
    head: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    tensors: dict[str, torch.Tensor | None],
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``out/checkpoints/step-<step>/`` atomically, then keep only the newest ``keep`` folders.

    ``tensors``: named extra tensors (None: absent), e.g. the warm start ``last_v``; ``info``: JSON
    values stored in ``trainer_state.json`` (the config, the data position). A folder of this step
    that already exists holds this very state (a step is saved once per run) and is kept as it is.

    Raises:
        AtomicWriteError: a file could not be written (e.g. a full disk); the folder is not created.
    """

    def write(tmp: Path) -> None:
        if is_peft_model(model):
            model.save_pretrained(tmp / ADAPTER_DIR)  # peft's format: adapter_config.json + safetensors
        else:
            save_model(model, str(tmp / MODEL_FILE))  # drops the duplicates of tied weights
        write_run_state(tmp, step, head=head, optimizers=optimizers, tensors=tensors, info=info)

    return write_step_folder(out, step, keep, write)


def write_step_folder(
    out: Path,
    step: int,
    keep: int,
    write: Callable[[Path], None],
    *,
    main: bool = True,
    share: Callable[[Path | None], Path | None] = lambda tmp: tmp,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Create ``out/checkpoints/step-<step>/`` atomically and keep only the newest ``keep`` folders:
    ``write(tmp)`` fills a temporary folder ``.step-<step>.<random>.tmp``, which is then renamed. A
    folder of this step that already exists is kept as it is (``write`` is not called). Returns the
    folder. Serves :func:`save_checkpoint` and the torchrun save
    (:func:`boost.train.distributed.save_distributed_checkpoint`).

    Under torchrun every rank calls it: only the ``main`` rank creates, renames, prunes and cleans up;
    ``share`` hands the main rank's temporary folder (None: the step is saved already) to every rank,
    and ``barrier`` waits for every rank once the folder is written and once it is renamed.

    Raises:
        AtomicWriteError: a file could not be written (e.g. a full disk); the folder is not created.
    """
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = None
    if main and not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    tmp = share(tmp)
    if tmp is None:  # this step is saved already
        return final
    try:
        write(tmp)
        barrier()
        if main:
            os.replace(tmp, final)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise AtomicWriteError(
            f"could not write the checkpoint {final}: {type(err).__name__}: {err}; the earlier "
            "checkpoints are unchanged"
        ) from err
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        prune_checkpoints(out, keep)
    barrier()
    return final


def write_run_state(
    folder: Path,
    step: int,
    *,
    head: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    tensors: dict[str, torch.Tensor | None],
    info: dict[str, Any],
) -> None:
    """Write everything of a checkpoint but the model into ``folder`` (a temporary folder that the
    caller renames): ``head.safetensors``, ``optimizer.pt`` ({name: state_dict}), ``state.safetensors``
    (``tensors`` that are not None, on the CPU, plus the RNG states) and ``trainer_state.json``
    (``info`` plus the format, the step and the stored tensor names)."""
    folder = Path(folder)
    save_model(head, str(folder / HEAD_FILE))
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, folder / OPTIMIZER_FILE)
    stored = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if v is not None}
    save_file({**stored, **_rng_states()}, str(folder / TENSORS_FILE))
    state = {"format": FORMAT_VERSION, "step": step, "tensors": sorted(stored), **info}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep only the newest ``keep`` ``step-*`` folders of ``out/checkpoints``: an older one is renamed
    to a temporary name first, so it is never half-deleted under a ``step-*`` name."""
    for old in checkpoint_dirs(out)[:-keep]:
        doomed = old.with_name(f".{old.name}.removed.tmp")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint folder ``path`` (step, config, data position...)."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err}); delete the folder "
                              "to resume from the previous checkpoint") from err  # fmt: skip
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def load_optimizer_states(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The optimiser states of ``path/optimizer.pt``, unpickling nothing but tensors and plain values.

    Raises:
        CheckpointError: the file holds anything else (e.g. an object with ``__reduce__``).
    """
    file = Path(path) / OPTIMIZER_FILE
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle.UnpicklingError, or a truncated file)
        raise CheckpointError(
            f"{file}: refused, it is not a plain optimiser state ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); checkpoints never load pickled objects. "
            "Resume from another checkpoint folder or start the run again"
        ) from err


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint folder (the adapter's with LoRA), on the CPU."""
    path = Path(path)
    if (path / ADAPTER_DIR).is_dir():
        from peft.utils import load_peft_weights

        return load_peft_weights(str(path / ADAPTER_DIR), device="cpu")
    return load_file(str(path / MODEL_FILE))


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    head: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the folder ``path`` into ``model``, ``head`` and ``optimizers``; restore the RNG states.

    Returns ``(trainer_state.json, the named extra tensors on device)``.

    Raises:
        CheckpointError: a file is missing, of another model (LoRA vs full), or unsafe.
    """
    path = Path(path)
    state = read_state(path)
    peft = is_peft_model(model)
    if peft != (path / ADAPTER_DIR).is_dir():
        kind = "a LoRA adapter" if (path / ADAPTER_DIR).is_dir() else "full model weights"
        raise CheckpointError(f"{path}: holds {kind}, but the model is {'' if peft else 'not '}a LoRA model")
    optim_states = load_optimizer_states(path, device)
    try:
        if peft:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, model_tensors(path))
            missing = [k for k in getattr(result, "unexpected_keys", [])]
            if missing:
                raise CheckpointError(f"{path / ADAPTER_DIR}: tensors the model lacks: {missing[:5]}")
        else:
            load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
        load_model(head, str(path / HEAD_FILE), strict=True, device=str(device))
        tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    except (OSError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: {type(err).__name__}: {err}") from err
    for name, opt in optimizers.items():
        opt.load_state_dict(optim_states[name])
    _set_rng_states(tensors)
    extra = {k: v.to(device) for k, v in tensors.items() if not k.startswith("rng.")}
    return state, extra


def read_checkpoint(path: Path) -> dict[str, Any]:
    """For tests and tools: ``trainer_state.json`` plus ``"model"``, the model (or adapter) tensors."""
    return {**read_state(path), "model": model_tensors(path)}
