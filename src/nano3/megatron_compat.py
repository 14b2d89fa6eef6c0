"""Run on the Megatron-Bridge that is installed, the recipe image's or today's, by looking at what it has.

The recipe's image `nemo:25.11.nemotron_3_nano` carries Bridge's `nano-v3` branch (December 2025, version
string 0.3.0rc0) on megatron-core 0.16.0rc0; today's pin is Bridge 0.6.2 on megatron-core 0.19.2. Every
difference this repository meets is detected from the installed code (a field, a parameter, a module),
never from a version string, so a backport or a patched image works too:

- the layer pattern field: `hybrid_layer_pattern` (Bridge >= 0.4) or `hybrid_override_pattern`;
- evaluation settings: a `validation` section (Bridge >= 0.4) or fields of `train`;
- the CUDA-graph module list: `cuda_graph_modules` or megatron-core's older `cuda_graph_scope`;
- the vocabulary from the tokenizer: `tokenizer.use_tokenizer_vocab_size` (Bridge >= 0.6), or a model
  `vocab_size` of None (older Bridge then takes the tokenizer's);
- training callbacks: `pretrain(callbacks=...)` (Bridge >= 0.3.0); without it the same callback objects are
  driven from wrappers of the training loop's own functions (`train`, `train_step`, `evaluate`);
- the dataset provider registry Bridge picks a provider from (the phase-sized index hooks into it);
- the tokenizer builder: megatron-core's (`megatron.core.tokenizers`) or Bridge's own (older cores);
- megatron-core 0.16's BlendedDataset asks torch.distributed for its rank even in one process: the CPU-side
  blend build runs inside a one-process group where none exists;
- transformers' NemotronH classes (transformers >= 5), which the HF export needs;
- packed sequences for Mamba (lc.mix): megatron-core's PackedSeqParams derives the Mamba `seq_idx` (state
  resets) from `cu_seqlens_q` and `total_tokens`, and Bridge's forward step must fill `total_tokens`
  (Bridge >= 0.6 on megatron-core >= 0.18); older stacks would run packed attention with an unbroken Mamba
  state, so lc.mix is refused there;
- tensor parallelism above the KV groups (the recipe's LC layout: TP 8 on 2 KV groups): megatron-core splits a
  group over TP ranks from 0.16.0 (commit f7dfb99, 2025-12-06); the recipe image's core divides the groups by TP
  and asserts (`tp_splits_kv_groups`).

Everything imports lazily: this module imports on any machine, and tests drive each branch with stand-ins.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

from nano3.errors import UserError

NEWER_IMAGE = "use an image with a newer Megatron-Bridge (the profile's container_image; see docs/stacks.md)"


def adapt_overrides(cfg, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our Bridge overrides (spelled for today's Bridge) in the spelling of the ConfigContainer `cfg`.

    Returns the adapted overrides and one note per key spelled differently here (written with the run).
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        new = key
        if key == "model.hybrid_layer_pattern" and not hasattr(cfg.model, "hybrid_layer_pattern"):
            new = "model.hybrid_override_pattern"
        elif section == "validation" and not hasattr(cfg, "validation"):
            new = f"train.{name}"
        elif key == "model.cuda_graph_modules" and not hasattr(cfg.model, "cuda_graph_modules"):
            new = "model.cuda_graph_scope"
        elif key == "tokenizer.use_tokenizer_vocab_size" and not hasattr(cfg.tokenizer, "use_tokenizer_vocab_size"):
            if value and "model.vocab_size" not in overrides:  # older Bridge sizes a None vocab from the tokenizer
                out["model.vocab_size"] = None
                notes.append(f"{key}={value} -> model.vocab_size=None")
            else:
                notes.append(f"{key}={value} dropped (this Bridge has no such field; model.vocab_size decides)")
            continue
        if new != key:
            notes.append(f"{key} -> {new}")
        out[new] = value
    return out, notes


def graph_modules(names: Iterable[str]) -> list:
    """CUDA-graph module names (`mamba`, `attn`, `moe`...) as the installed megatron-core's enum members
    (CudaGraphModule, or the older CudaGraphScope); an unknown name is one error line listing the known ones."""
    from megatron.core.transformer import enums

    kind = getattr(enums, "CudaGraphModule", None) or enums.CudaGraphScope
    out = []
    for name in names:
        member = name if not isinstance(name, str) else kind.__members__.get(name.rsplit(".", 1)[-1])
        if member is None:
            raise UserError(f"model.cuda_graph_modules: unknown module {name!r}; this megatron-core knows "
                            f"{', '.join(kind.__members__)}")
        out.append(member)
    return out


def model_pattern(model_config) -> str:
    """The hybrid layer pattern of a Bridge model config or megatron-core model, whichever field it has."""
    for name in ("hybrid_layer_pattern", "hybrid_override_pattern"):
        value = getattr(model_config, name, None)
        if value:
            return value
    raise UserError("the Megatron model config has neither hybrid_layer_pattern nor hybrid_override_pattern; "
                    + NEWER_IMAGE)


def takes_callbacks(pretrain: Callable) -> bool:
    return "callbacks" in inspect.signature(pretrain).parameters


def run_pretrain(cfg, forward_step: Callable, callbacks: list) -> None:
    """Bridge's pretrain() with our callbacks, whether or not this Bridge accepts callbacks."""
    pretrain_module = importlib.import_module("megatron.bridge.training.pretrain")
    if takes_callbacks(pretrain_module.pretrain):
        pretrain_module.pretrain(config=cfg, forward_step_func=forward_step, callbacks=callbacks)
        return
    train_module = importlib.import_module("megatron.bridge.training.train")
    eval_module = importlib.import_module("megatron.bridge.training.eval")
    with loop_hooks(callbacks, pretrain_module, train_module, eval_module):
        pretrain_module.pretrain(config=cfg, forward_step_func=forward_step)


def _fire(callbacks: Iterable, event: str, context: SimpleNamespace) -> None:
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(context)


def _arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    return inspect.signature(function).bind_partial(*args, **kwargs).arguments


@contextlib.contextmanager
def loop_hooks(callbacks: list, pretrain_module, train_module, eval_module):
    """Drive Bridge-style callbacks on a Bridge without them, from wrappers of its loop's functions.

    `pretrain` calls `train(...)` (its own imported name), `train` calls `train_step(...)` every iteration and,
    at each evaluation interval, `evaluate(...)` of the eval module. The wrappers fire what Bridge >= 0.3
    fires at those points, with a context carrying the same attributes (state, model, optimizer, scheduler,
    loss_dict, grad_norm, total_loss_dict). Evaluations after training (pretrain's final valid/test pass)
    fire nothing, as in Bridge.
    """
    targets = ((pretrain_module, "train"), (train_module, "train_step"), (eval_module, "evaluate"))
    for module, name in targets:
        if not callable(getattr(module, name, None)):
            raise UserError(f"this Megatron-Bridge has neither pretrain(callbacks=) nor {module.__name__}.{name}, "
                            f"so training metrics cannot be recorded; {NEWER_IMAGE}")
    original = {name: getattr(module, name) for module, name in targets}
    loop: dict[str, Any] = {}

    def train(*args, **kwargs):
        a = _arguments(original["train"], args, kwargs)
        loop.update(state=a.get("global_state"), model=a.get("model"), optimizer=a.get("optimizer"),
                    scheduler=a.get("scheduler"))
        _fire(callbacks, "on_train_start", SimpleNamespace(**loop))
        try:
            result = original["train"](*args, **kwargs)
        finally:
            ended = dict(loop)
            loop.clear()
        _fire(callbacks, "on_train_end", SimpleNamespace(**ended))
        return result

    def train_step(*args, **kwargs):
        _fire(callbacks, "on_train_step_start", SimpleNamespace(**loop))
        result = original["train_step"](*args, **kwargs)
        loss_dict, grad_norm = result[0], result[5]  # (loss_dict, skipped, checkpoint?, exit?, code, grad_norm, zeros)
        _fire(callbacks, "on_train_step_end", SimpleNamespace(**loop, loss_dict=loss_dict, grad_norm=grad_norm))
        return result

    def evaluate(*args, **kwargs):
        result = original["evaluate"](*args, **kwargs)
        if loop and not _arguments(original["evaluate"], args, kwargs).get("is_test", False):
            _fire(callbacks, "on_eval_end", SimpleNamespace(**loop, total_loss_dict=result[0]))
        return result

    wrappers = {"train": train, "train_step": train_step, "evaluate": evaluate}
    for module, name in targets:
        setattr(module, name, wrappers[name])
    try:
        yield
    finally:
        for module, name in targets:
            setattr(module, name, original[name])


def packed_mamba_gap(packed_seq_params_cls, gpt_step_module) -> str | None:
    """None where packed sequences restart the Mamba state, else what is missing. Packed attention alone is not
    enough: without `seq_idx` the state would flow from one short sequence into the next."""
    fields = getattr(packed_seq_params_cls, "__dataclass_fields__", {})
    if not {"seq_idx", "total_tokens"} <= set(fields):
        return "megatron-core's PackedSeqParams has no seq_idx/total_tokens (Mamba state resets; megatron-core >= 0.18)"
    try:
        source = inspect.getsource(gpt_step_module)
    except (OSError, TypeError):
        return "Megatron-Bridge's forward step could not be read"
    if "total_tokens" not in source or "cu_seqlens_q" not in source:
        return "Megatron-Bridge's forward step does not pass packed sequences' total_tokens (Megatron-Bridge >= 0.6)"
    return None


def require_packed_mamba() -> None:
    """Refuse lc.mix in one line on a stack whose packed sequences would not restart the Mamba state."""
    from megatron.core.packed_seq_params import PackedSeqParams

    gap = packed_mamba_gap(PackedSeqParams, importlib.import_module("megatron.bridge.training.gpt_step"))
    if gap:
        raise UserError(f"lc.mix.short_share needs packed sequences with Mamba state resets: {gap}; set "
                        f"lc.mix.short_share=0 or {NEWER_IMAGE}")


def dataset_providers(config_type) -> dict:
    """Bridge's registry mapping a dataset config type to its provider (read at pretrain() time)."""
    data_utils = importlib.import_module("megatron.bridge.data.utils")
    registry = getattr(data_utils, "_REGISTRY", None)
    if not isinstance(registry, dict) or config_type not in registry:
        raise UserError("this Megatron-Bridge has no dataset provider registry (megatron.bridge.data.utils._REGISTRY) "
                        f"to size each phase's index by; {NEWER_IMAGE}")
    return registry


def build_megatron_tokenizer(fields: dict[str, Any]):
    """The tokenizer Bridge builds for these TokenizerConfig fields, with megatron-core's vocab padding off.

    megatron-core >= 0.17 builds it (`megatron.core.tokenizers`, configured by megatron.training's
    TokenizerConfig); older cores have neither, and Bridge builds its own.
    """
    try:
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
        from megatron.training.config import TokenizerConfig
    except ImportError:
        try:
            from megatron.bridge.training.tokenizers.config import TokenizerConfig
            from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer
        except ImportError as e:
            raise UserError(f"building the training tokenizer needs megatron-core >= 0.17 or Megatron-Bridge "
                            f"({e.name or e} is missing here); run `make setup`, or run in the NeMo container") from None
        return build_tokenizer(TokenizerConfig(**fields))
    return build_tokenizer(TokenizerConfig(**fields, pad_vocab_size=False))


@contextlib.contextmanager
def process_group_for_dataset_builds():
    """A one-process gloo group around megatron-core dataset builds when no group exists (the blend stage, the
    reference backend): megatron-core 0.16 calls torch.distributed.get_rank() unguarded while building a blended
    index; newer cores check first. With one process every rank-0 branch and barrier is the single-process path."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def nemotron_h_classes():
    """transformers' (NemotronHConfig, NemotronHForCausalLM): native from transformers 5 on."""
    transformers = importlib.import_module("transformers")
    config = getattr(transformers, "NemotronHConfig", None)
    model = getattr(transformers, "NemotronHForCausalLM", None)
    if config is None or model is None:
        raise UserError(f"transformers {getattr(transformers, '__version__', '?')} has no NemotronH model, which the "
                        "Hugging Face export and the reference backend need (transformers >= 5); "
                        "`pip install 'transformers>=5.12'` in the image, or " + NEWER_IMAGE)
    return config, model


def tp_splits_kv_groups(attention_source: str | None = None) -> bool | None:
    """Whether megatron-core's attention runs TP above the KV groups (it replicates a group over TP ranks where
    `num_query_groups < world_size`); older cores `divide(num_query_groups, tp)` and assert. Read from the
    installed module's source without importing it; None where megatron-core is not installed."""
    if attention_source is None:
        try:
            spec = importlib.util.find_spec("megatron.core.transformer.attention")
        except ModuleNotFoundError:  # find_spec imports the parent packages: no `megatron` at all (a bare login node)
            spec = None
        if not spec or not spec.origin:
            return None
        attention_source = Path(spec.origin).read_text()
    return "num_query_groups < world_size" in attention_source


def installed_stack() -> dict[str, str | None]:
    """Versions of the training stack as installed (for the record, never for decisions)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("megatron-bridge", "megatron-core", "transformer-engine", "torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def refuses_config_only_export(bridge) -> bool:
    """Bridge 0.3's `save_hf_pretrained` refuses a bridge made from a config alone: its gate admits only a loaded
    model. 0.6's gate also admits a `PretrainedConfig` ("requires a pretrained HuggingFace model or config")."""
    source = inspect.getsource(type(bridge).save_hf_pretrained)
    return "requires a pretrained HuggingFace model" in source and "PretrainedConfig" not in source


# Weights transformers 5 saves under another name than the published NemotronH checkpoints, whose names Bridge 0.3's
# mapping expects (it skips a weight its source lacks, then fails on it: "Unknown parallelism type: None").
PUBLISHED_HF_NAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def use_published_names(folder: Path) -> None:
    """Rename a saved Hugging Face model's weights to the published checkpoints' names, shard by shard."""
    import json

    from safetensors.torch import load_file, save_file

    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        if set(tensors) & set(PUBLISHED_HF_NAMES):
            save_file({PUBLISHED_HF_NAMES.get(k, k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {PUBLISHED_HF_NAMES.get(k, k): v for k, v in doc["weight_map"].items()}
        index.write_text(json.dumps(doc, indent=2))


def save_hf_model(bridge, model, out_dir, hf_config, load_bridge=None) -> None:
    """Write the Hugging Face config and weights of `model`. Where Bridge needs a source model to export (0.3: it
    orders the weights by the source's safetensors and copies its artifacts), a randomly initialised one is written
    from the same config to a temporary folder and the bridge is made from it; its tokenizer is not copied (the
    export stage writes ours). `load_bridge` is `AutoBridge.from_hf_pretrained` unless a test passes another."""
    if not refuses_config_only_export(bridge):
        bridge.save_hf_pretrained(model, out_dir, show_progress=False, strict=True)
        return
    import tempfile

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    if load_bridge is None:
        from megatron.bridge import AutoBridge

        load_bridge = AutoBridge.from_hf_pretrained
    distributed = dist.is_available() and dist.is_initialized()
    with tempfile.TemporaryDirectory() as own:
        folder = [own]
        if distributed:  # every rank reads rank 0's folder
            dist.broadcast_object_list(folder, src=0)
        source = folder[0]
        if not distributed or dist.get_rank() == 0:
            AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).save_pretrained(source)
            use_published_names(Path(source))
        if distributed:
            dist.barrier()
        source_bridge = load_bridge(source)
        source_bridge.hf_pretrained.tokenizer = None  # the source has none; a None artifact is skipped
        source_bridge.save_hf_pretrained(model, out_dir, show_progress=False, strict=True)
