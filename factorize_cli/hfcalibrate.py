"""``factorize calibrate`` for a Hugging Face model folder: statistics from text, keyed like its checkpoint.

The model runs (transformers, offline) on tokenized text (:mod:`factorize_cli.textdata`); forward
pre-hooks on its ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` and transformers ``Conv1D`` layers collect
each one's input statistics. They are stored under the layer's name *in the checkpoint*, which is what
``factorize apply --calibration`` looks up: a GPT2LMHeadModel's ``transformer.h.0.attn.c_attn`` is
``h.0.attn.c_attn`` in the original GPT-2 file. Layers with no weight of their own in the checkpoint
(an output head tied to the embeddings) are left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from factorize_cli.calibration import SENSITIVITY_KEY
from factorize_cli.distributed import SOLO, Group
from factorize_cli.progress import Progress, Silent
from factorize_cli.sensitivity import CALIBRATE_FRACTION
from factorize_cli.textdata import TextDataConfig


def weights_path(folder: Path) -> Path:
    """What ``factorize apply`` reads for the folder: the folder itself when sharded, else its weights file."""
    from factorize_cli.errors import InputError
    from factorize_cli.formats.sharded import is_sharded

    if is_sharded(folder):
        return folder
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def checkpoint_keys(folder: Path) -> set[str]:
    from factorize_cli.formats import open_checkpoint

    with open_checkpoint(weights_path(folder)) as checkpoint:
        return {info.key for info in checkpoint.infos}


def checkpoint_names(model: Any, keys: set[str]) -> dict[str, str]:
    """``{module name: checkpoint layer name}`` for each module whose ``.weight`` the checkpoint holds,
    under its own name or with the base model's prefix added or dropped."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {}
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is None or not name:
            continue
        forms = [name]
        if prefix:
            forms += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        found = next((f for f in forms if f"{f}.weight" in keys), None)
        if found is not None:
            names[name] = found
    return names


def collect_token_stats(model: Any, batches: Iterable[dict], layers: Iterable[str]) -> dict[str, Any]:
    """Like :func:`factorize_cli.calibration.collect_activation_stats`, counting real tokens only: where a
    layer's input is ``batch x tokens x features``, the rows of padding (attention mask 0) are left out."""
    import torch

    from factorize_cli.calibration import ActivationStats, _fan_in, input_rows, padding_mask

    targets = {name: model.get_submodule(name) for name in layers}
    stats = {name: ActivationStats.empty(_fan_in(m)) for name, m in targets.items()}
    keep: list[Any] = [None]

    def hook(layer, args, name):
        stats[name].add(input_rows(layer, args[0].detach(), keep[0]).cpu())

    handles = [m.register_forward_pre_hook(lambda layer, args, name=name: hook(layer, args, name))
               for name, m in targets.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                keep[0] = padding_mask(batch)
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _ticking(batches: Iterable[Any], progress: Progress) -> Iterator[Any]:
    for i, batch in enumerate(batches, 1):
        yield batch
        progress.advance(f"batch {i}")  # the model has run on it


def _sensitivities(model: Any, batches: list[dict], collected: dict[str, Any], names: dict[str, str], device: str,
                   progress: Progress, group: Group = SOLO) -> dict[str, float]:
    """Each layer's measured effect on the model output (factorize_cli.sensitivity), by checkpoint layer name,
    for the budgets of ``apply --calibration``. Under torchrun each rank measures a cost-balanced share of
    the layers (every rank holds the whole statistics by then, and each layer's measurement is seeded by
    its name, so who measures it does not matter) and the measurements are gathered."""
    from factorize_cli.api import model_layers
    from factorize_cli.execution import layer_seed
    from factorize_cli.factorization import whitening
    from factorize_cli.sensitivity import OutputProbe, first_samples, layer_sensitivity

    geometries = {c.name: c.geometry for c, _ in model_layers(model, {})}
    modules = list(collected)
    costs = [float(m) * n * min(m, n) for m, n in (geometries[module].matrix_shape for module in modules)]
    mine = [modules[i] for i in group.share(costs)]
    out: dict[str, float] = {}
    with group.step():
        probe = OutputProbe(lambda batch: model(**batch), first_samples(batches)) if mine else None
        progress.start(_stage("sensitivities", group), len(mine))
        try:
            for module in mine:
                progress.advance(names[module])
                try:
                    pair = whitening(collected[module].second_moment)
                except (ValueError, RuntimeError):
                    continue
                value = layer_sensitivity(probe, model.get_submodule(module).weight, geometries[module], pair,
                                          CALIBRATE_FRACTION, engine="auto", seed=layer_seed(0, names[module]),
                                          device=device)
                if value is not None:
                    out[names[module]] = value
        finally:
            progress.stop()
    return {name: value for part in group.gather(out) for name, value in part.items()}


def _stage(what: str, group: Group) -> str:
    return f"{what} (rank {group.rank} of {group.world})" if group.distributed else what


def calibrate_folder(folder: str | Path, data: str | Path, stats: str | Path, *,
                     config: TextDataConfig = TextDataConfig(), device: str = "cpu", force: bool = False,
                     progress: Progress | None = None, sensitivity: bool = True) -> dict[str, Any] | None:
    """Run the folder's model on DATA and write each layer's input statistics to ``stats`` (and, with
    ``sensitivity``, each layer's measured effect on the model output: one more forward pass of the first
    samples per layer).

    Launched by torchrun, each rank runs the model on a share of the batches; the shares' statistics are
    summed over the ranks, rank 0 writes them and returns the summary, the other ranks return None."""
    from factorize_cli import distributed
    from factorize_cli.calibration import _calibrated, reduce_stats, save_activation_stats
    from factorize_cli.errors import InputError, describe
    from factorize_cli.hf import load_pretrained
    from factorize_cli.outputs import check_targets
    from factorize_cli.textdata import my_batches, text_batches

    folder, data, stats = Path(folder), Path(data), Path(stats)
    progress = progress or Silent()
    group = distributed.current(device)
    device = group.device(device)
    with group.step():  # every rank reads everything: a failure on one (memory, a file) stops them all
        check_targets({"statistics": stats}, [folder, data], force=force)
        batches = text_batches(folder, data, config, device)
        model = load_pretrained(folder, device=device)
        names = {module: layer for module, layer in checkpoint_names(model, checkpoint_keys(folder)).items()
                 if _calibrated(model.get_submodule(module))}
        if not names:
            raise InputError(f"{folder}: no Linear, Conv1d, Conv2d or Conv1D layer of the model has its weight in "
                             "the checkpoint")
    mine = my_batches(batches, group)
    with group.step():
        progress.start(_stage("calibrating", group), len(mine))
        try:
            collected = collect_token_stats(model, _ticking(mine, progress), names)
        except RuntimeError as e:
            raise InputError(f"{folder}: running the model on {data} failed ({describe(e)})") from e
        finally:
            progress.stop()
    reduce_stats(collected, group)
    by_layer = {names[module]: s for module, s in collected.items() if s.count}
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    meta = {"model": str(folder), "inputs": str(data), "batches": str(len(batches)), "samples": str(samples),
            "seq_len": str(config.seq_len), "processes": str(group.world)}
    if sensitivity:
        measured = _sensitivities(model, batches, {m: s for m, s in collected.items() if s.count}, names, device,
                                  progress, group)
        meta.update({SENSITIVITY_KEY: json.dumps(dict(sorted(measured.items()))),
                     "sensitivity_fraction": str(CALIBRATE_FRACTION)})
    with group.step():  # a refused write on rank 0 fails every rank, not only rank 0
        if group.lead:
            save_activation_stats(by_layer, stats, meta)
    if not group.lead:
        return None
    return {"stats": str(stats), "layers": {name: s.count for name, s in sorted(by_layer.items())},
            "batches": len(batches), "samples": samples, "processes": group.world}
