"""Issue 12: one code path for the recipe image's Megatron-Bridge (nano-v3 branch, 0.3.0rc0) and today's (0.6.x).

Each capability branch of nano3.megatron_compat runs here against stand-ins with the signatures and fields of
both Bridges (written from their sources: nano-v3 @1cedb0a9c, v0.3.1, v0.6.2); the real Bridges run in
tests/gpu on a GPU machine.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from nano3.errors import UserError
from nano3.megatron_compat import (
    adapt_overrides,
    build_megatron_tokenizer,
    dataset_providers,
    loop_hooks,
    model_pattern,
    nemotron_h_classes,
    run_pretrain,
    save_hf_model,
    takes_callbacks,
)

# ---- config spellings -------------------------------------------------------------------------------------------

@dataclass
class OldModel:  # Bridge nano-v3 / 0.3.x on megatron-core 0.16
    hybrid_override_pattern: str = "MEMEM*E"
    cuda_graph_scope: list | None = None
    vocab_size: int | None = 131072


@dataclass
class NewModel:  # Bridge 0.6.x on megatron-core 0.19
    hybrid_layer_pattern: str = "MEMEM*E"
    cuda_graph_modules: list = field(default_factory=list)
    vocab_size: int | None = None


def old_config():
    return SimpleNamespace(model=OldModel(), train=SimpleNamespace(eval_interval=1000, eval_iters=32),
                           tokenizer=SimpleNamespace(tokenizer_type=None))


def new_config():
    return SimpleNamespace(model=NewModel(), train=SimpleNamespace(), validation=SimpleNamespace(eval_interval=1),
                           tokenizer=SimpleNamespace(use_tokenizer_vocab_size=False))


OURS = {"model.hybrid_layer_pattern": "M*E", "validation.eval_interval": 5, "validation.eval_iters": 2,
        "model.cuda_graph_modules": [], "tokenizer.use_tokenizer_vocab_size": True, "optimizer.lr": 1e-4}


def test_todays_bridge_takes_the_overrides_as_they_are():
    adapted, notes = adapt_overrides(new_config(), OURS)
    assert adapted == OURS and notes == []


def test_the_recipe_images_bridge_gets_its_own_spelling_of_each_field():
    adapted, notes = adapt_overrides(old_config(), OURS)
    assert adapted == {"model.hybrid_override_pattern": "M*E", "train.eval_interval": 5, "train.eval_iters": 2,
                       "model.cuda_graph_scope": [], "model.vocab_size": None, "optimizer.lr": 1e-4}
    assert "model.hybrid_layer_pattern -> model.hybrid_override_pattern" in notes and len(notes) == 5


def test_an_explicit_model_vocab_wins_over_the_tokenizers_on_the_older_bridge():
    adapted, notes = adapt_overrides(old_config(), {"tokenizer.use_tokenizer_vocab_size": False,
                                                    "model.vocab_size": 131072})
    assert adapted == {"model.vocab_size": 131072} and "dropped" in notes[0]


def test_the_layer_pattern_is_read_from_whichever_field_the_model_has():
    assert model_pattern(OldModel(hybrid_override_pattern="ME*")) == "ME*"
    assert model_pattern(NewModel(hybrid_layer_pattern="M*E")) == "M*E"
    with pytest.raises(UserError, match="neither hybrid_layer_pattern nor hybrid_override_pattern"):
        model_pattern(SimpleNamespace())


# ---- callbacks: pretrain(callbacks=) or the loop's own functions ---------------------------------------------------

# The nano-v3 training loop's shape: pretrain() calls its imported `train`, which calls `train_step` and, at each
# evaluation interval, the eval module's `evaluate` (both looked up as module globals, as Bridge does); after
# training, pretrain evaluates once more. Names and signatures as in Bridge nano-v3 (train.py, eval.py, pretrain.py).
EVAL_SRC = '''
def evaluate(state, forward_step_func, data_iterator, model, process_non_loss_data_func, config, verbose=False,
             non_loss_data_func=None):
    state.log.append(("evaluate", state.train_state.step))
    return {"lm loss": 2.5}, None, False
'''
TRAIN_SRC = '''
def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, global_state, pg_collection,
               forward_backward_func):
    global_state.log.append(("train_step", global_state.train_state.step))
    return {"lm loss": 3.0 - global_state.train_state.step / 10}, 0, False, False, 0, 0.5, None

def train(forward_step_func, model, optimizer, scheduler, train_data_iterator, valid_data_iterator, global_state,
          checkpointing_context, pg_collection, process_non_loss_data_func=None, non_loss_data_func=None):
    while global_state.train_state.step < 4:
        train_step(forward_step_func, train_data_iterator, model, optimizer, scheduler, global_state, pg_collection,
                   None)
        global_state.train_state.step += 1
        if global_state.train_state.step % 2 == 0:
            EVAL.evaluate(global_state, forward_step_func, valid_data_iterator, model, None, global_state.cfg)
'''
PRETRAIN_SRC = '''
def pretrain(config, forward_step_func):
    state = config.state
    train(forward_step_func, ["model"], config.optimizer, "scheduler", None, None, state, {}, None)
    EVAL.evaluate(state, forward_step_func, None, ["model"], None, config)   # the final validation: no callback
'''


def stand_in_bridge(monkeypatch, with_callbacks: bool) -> SimpleNamespace:
    """Register modules megatron.bridge.training.{pretrain,train,eval} shaped like nano-v3 (or, with_callbacks,
    like Bridge >= 0.3 whose pretrain takes the callbacks)."""
    modules = {}
    for name, src in (("eval", EVAL_SRC), ("train", TRAIN_SRC), ("pretrain", PRETRAIN_SRC)):
        module = types.ModuleType(f"megatron.bridge.training.{name}")
        module.EVAL = modules.get("eval")
        exec(src, module.__dict__)
        modules[name] = module
        monkeypatch.setitem(sys.modules, module.__name__, module)
    modules["pretrain"].train = modules["train"].train  # `from megatron.bridge.training.train import train`
    if with_callbacks:
        def pretrain(config, forward_step_func, callbacks=None):
            config.received = callbacks

        modules["pretrain"].pretrain = pretrain
    return SimpleNamespace(**modules)


class Recorder:
    """Records each event with what DvcliveCallback and EffectiveConfigCallback read from its context."""

    def __init__(self):
        self.events = []

    def on_train_start(self, c):
        self.events.append(("start", c.state.train_state.step, c.model, c.optimizer.param_groups[0]["lr"],
                            c.scheduler))

    def on_train_step_start(self, c):
        self.events.append(("step_start", c.state.train_state.step))

    def on_train_step_end(self, c):
        self.events.append(("step_end", c.state.train_state.step, c.loss_dict["lm loss"], c.grad_norm))

    def on_eval_end(self, c):
        self.events.append(("eval_end", c.state.train_state.step, c.total_loss_dict["lm loss"]))

    def on_train_end(self, c):
        self.events.append(("end", c.state.train_state.step))


def old_run_config():
    state = SimpleNamespace(train_state=SimpleNamespace(step=0), log=[], cfg=None)
    return SimpleNamespace(state=state, optimizer=SimpleNamespace(param_groups=[{"lr": 1e-4}]))


def test_a_bridge_without_callbacks_fires_them_from_its_training_loop(monkeypatch):
    bridge = stand_in_bridge(monkeypatch, with_callbacks=False)
    assert not takes_callbacks(bridge.pretrain.pretrain)
    recorder, cfg = Recorder(), old_run_config()
    run_pretrain(cfg, forward_step=lambda *a: None, callbacks=[recorder])
    assert recorder.events == [
        ("start", 0, ["model"], 1e-4, "scheduler"),
        ("step_start", 0), ("step_end", 0, 3.0, 0.5),
        ("step_start", 1), ("step_end", 1, 2.9, 0.5), ("eval_end", 2, 2.5),
        ("step_start", 2), ("step_end", 2, 2.8, 0.5),
        ("step_start", 3), ("step_end", 3, 2.7, 0.5), ("eval_end", 4, 2.5),
        ("end", 4),
    ]
    assert ("evaluate", 4) in cfg.state.log[-1:]  # the final validation ran, and fired nothing
    # Bridge's own functions are back in place afterwards
    assert bridge.train.train_step.__module__ == bridge.train.__name__
    assert bridge.pretrain.train is bridge.train.train and bridge.eval.evaluate.__module__ == bridge.eval.__name__


def test_a_bridge_with_callbacks_receives_them_and_its_loop_is_left_alone(monkeypatch):
    bridge = stand_in_bridge(monkeypatch, with_callbacks=True)
    original_step = bridge.train.train_step
    recorder, cfg = Recorder(), old_run_config()
    run_pretrain(cfg, forward_step=lambda *a: None, callbacks=[recorder])
    assert cfg.received == [recorder] and bridge.train.train_step is original_step


def test_the_loop_hooks_are_removed_when_training_fails(monkeypatch):
    bridge = stand_in_bridge(monkeypatch, with_callbacks=False)
    originals = (bridge.pretrain.train, bridge.train.train_step, bridge.eval.evaluate)

    class Boom(Recorder):
        def on_train_step_end(self, c):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_pretrain(old_run_config(), forward_step=lambda *a: None, callbacks=[Boom()])
    assert (bridge.pretrain.train, bridge.train.train_step, bridge.eval.evaluate) == originals


def test_a_loop_without_the_expected_functions_is_refused_in_one_line():
    pretrain = types.ModuleType("megatron.bridge.training.pretrain")
    pretrain.train = lambda *a: None
    empty = types.ModuleType("megatron.bridge.training.train")
    with pytest.raises(UserError, match="neither pretrain\\(callbacks=\\) nor megatron.bridge.training.train.train_step"):
        with loop_hooks([], pretrain, empty, types.ModuleType("e")):
            pass


# ---- dataset registry, tokenizer builder, transformers ---------------------------------------------------------

def test_the_dataset_provider_registry_is_found_or_refused(monkeypatch):
    class GPTDatasetConfig:
        pass

    utils = types.ModuleType("megatron.bridge.data.utils")
    utils._REGISTRY = {GPTDatasetConfig: "provider"}
    monkeypatch.setitem(sys.modules, utils.__name__, utils)
    assert dataset_providers(GPTDatasetConfig)[GPTDatasetConfig] == "provider"
    del utils._REGISTRY
    with pytest.raises(UserError, match="no dataset provider registry"):
        dataset_providers(GPTDatasetConfig)


def test_the_tokenizer_is_built_by_megatron_core_where_it_can(spm_dir):
    """This machine's megatron-core (0.19) has the builder: the real one runs."""
    from nano3.data.megatron import bridge_tokenizer_fields
    from nano3.data.tokenizers import read_info

    info = read_info(spm_dir)
    tokenizer = build_megatron_tokenizer(bridge_tokenizer_fields(str(spm_dir), info.kind))
    assert tokenizer.vocab_size == info.vocab_size and tokenizer.eod == info.eod_id


def test_an_older_core_gets_the_tokenizer_from_bridge(monkeypatch):
    """megatron-core 0.16 has no megatron.core.tokenizers builder nor megatron.training.config: Bridge's own."""
    monkeypatch.setitem(sys.modules, "megatron.core.tokenizers.utils.build_tokenizer", None)  # import fails
    config_mod = types.ModuleType("megatron.bridge.training.tokenizers.config")
    tokenizer_mod = types.ModuleType("megatron.bridge.training.tokenizers.tokenizer")
    config_mod.TokenizerConfig = lambda **fields: ("bridge-config", fields)
    tokenizer_mod.build_tokenizer = lambda config: ("bridge-tokenizer", config)
    monkeypatch.setitem(sys.modules, config_mod.__name__, config_mod)
    monkeypatch.setitem(sys.modules, tokenizer_mod.__name__, tokenizer_mod)
    fields = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "m.model"}
    assert build_megatron_tokenizer(fields) == ("bridge-tokenizer", ("bridge-config", fields))


def test_neither_builder_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.tokenizers.utils.build_tokenizer", None)
    monkeypatch.setitem(sys.modules, "megatron.bridge.training.tokenizers.config", None)
    with pytest.raises(UserError, match="needs megatron-core >= 0.17 or Megatron-Bridge"):
        build_megatron_tokenizer({"tokenizer_type": "x"})


def test_nemotron_h_comes_from_transformers_or_the_export_says_what_to_install(monkeypatch):
    import transformers

    config, model = nemotron_h_classes()
    assert config is transformers.NemotronHConfig and model is transformers.NemotronHForCausalLM
    old = types.ModuleType("transformers")
    old.__version__ = "4.57.6"  # what the recipe image's Bridge pins (transformers < 5)
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(UserError, match="transformers 4.57.6 has no NemotronH model"):
        nemotron_h_classes()


# ---- Hugging Face export ----------------------------------------------------------------------------------------

class PreTrainedCausalLM:  # stands in for Bridge's wrapper of a loaded Hugging Face model
    pass


class PretrainedConfig:  # ... and for transformers' config class
    pass


class TodaysExportBridge:  # Bridge 0.6.x: its gate admits a loaded model or a config, and says so when it refuses
    def __init__(self):
        self.saved, self.hf_pretrained = [], PretrainedConfig()

    def save_hf_pretrained(self, model, path, show_progress=True, strict=True):
        if not isinstance(self.hf_pretrained, (PreTrainedCausalLM, PretrainedConfig)):
            raise ValueError("save_hf_pretrained requires a pretrained HuggingFace model or config.")
        self.saved.append(path)


class OlderExportBridge:  # Bridge 0.3.x: the same call refuses a config-only bridge
    def save_hf_pretrained(self, model, path, show_progress=True, strict=True):
        if not isinstance(getattr(self, "hf_pretrained", None), PreTrainedCausalLM):
            raise ValueError("save_hf_pretrained requires a pretrained HuggingFace model. "
                             "AutoBridge.from_hf_config() creates a config-only bridge")


def tiny_hf_config():
    from nano3.model.hf import nemotron_h_config
    from nano3.model.presets import PRESETS

    return nemotron_h_config(PRESETS["tiny"], vocab_size=512, eod_id=2, max_positions=256)


def test_todays_bridge_exports_from_the_config_alone(tmp_path):
    bridge = TodaysExportBridge()
    save_hf_model(bridge, ["model"], tmp_path, tiny_hf_config(), load_bridge=lambda source: pytest.fail("no source"))
    assert bridge.saved == [tmp_path]


def test_the_older_bridge_exports_through_a_source_model_of_the_same_config(tmp_path):
    """The source folder must hold a loadable model of exactly the exported config, in the checkpoint layout Bridge
    0.3 orders its weights by (one tensor per expert, as the published checkpoints), and the source's missing
    tokenizer must not be asked for."""
    import re

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config()
    seen = {}

    def load_bridge(source):
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
        seen["config"], seen["missing"] = model.config.to_dict(), info["missing_keys"]
        with safe_open(f"{source}/model.safetensors", "pt") as f:
            seen["keys"] = set(f.keys())
        pretrained = SimpleNamespace(tokenizer="would be loaded from the source")

        def save(model, path, show_progress=True, strict=True):
            seen["tokenizer"], seen["path"] = pretrained.tokenizer, path
        return SimpleNamespace(hf_pretrained=pretrained, save_hf_pretrained=save)

    save_hf_model(OlderExportBridge(), ["model"], tmp_path, config, load_bridge=load_bridge)
    assert not seen["missing"]
    fields = ("hidden_size", "vocab_size", "layers_block_type", "n_routed_experts")
    assert {k: seen["config"][k] for k in fields} == {k: config.to_dict()[k] for k in fields}
    per_expert = [k for k in seen["keys"] if re.fullmatch(r"backbone\.layers\.\d+\.mixer\.experts\.\d+\.up_proj\.weight", k)]
    assert len(per_expert) == config.layers_block_type.count("moe") * config.n_routed_experts
    unnamed = sorted(k for k in seen["keys"] if not any(re.fullmatch(p, k) for p in PUBLISHED_LAYOUT))
    assert not unnamed, f"weights the published checkpoints (and Bridge 0.3's mapping) do not name: {unnamed}"
    assert seen["tokenizer"] is None and seen["path"] == tmp_path


# The weight names of the published NemotronH checkpoints, which Bridge 0.3's NemotronH mapping is written against
# (its source ordering skips any other name, then fails on it: issue 12's GPU run, "Unknown parallelism type").
PUBLISHED_LAYOUT = [
    r"backbone\.embeddings\.weight", r"backbone\.norm_f\.weight", r"lm_head\.weight",
    r"backbone\.layers\.\d+\.norm\.weight",
    r"backbone\.layers\.\d+\.mixer\.(in_proj|out_proj)\.weight", r"backbone\.layers\.\d+\.mixer\.conv1d\.(weight|bias)",
    r"backbone\.layers\.\d+\.mixer\.(A_log|D|dt_bias|norm\.weight)",
    r"backbone\.layers\.\d+\.mixer\.[qkvo]_proj\.weight",
    r"backbone\.layers\.\d+\.mixer\.(up_proj|down_proj)\.weight",
    r"backbone\.layers\.\d+\.mixer\.gate\.(weight|e_score_correction_bias)",
    r"backbone\.layers\.\d+\.mixer\.shared_experts\.(up_proj|down_proj)\.weight",
    r"backbone\.layers\.\d+\.mixer\.experts\.\d+\.(up_proj|down_proj)\.weight",
]


# ---- packed sequences for Mamba (lc.mix) ------------------------------------------------------------------------

TODAYS_FORWARD_STEP = '''
def _forward_step_common(state, data_iterator, model):
    if packed_seq_metadata.get("cu_seqlens_q") is not None:
        pass
    if getattr(config, "is_hybrid_model", False):
        packed_seq_metadata["total_tokens"] = tokens.size(1)
'''
OLDER_FORWARD_STEP = '''
def forward_step(state, data_iterator, model):
    if "cu_seqlens" in batch:
        forward_args["packed_seq_params"] = get_packed_seq_params(batch)
'''


@dataclass
class OlderPackedSeqParams:  # megatron-core 0.16: THD attention only
    qkv_format: str = None
    cu_seqlens_q: object = None
    max_seqlen_q: int = None


def bridge_packed_seq_params(batch):
    """Bridge 0.6's get_packed_seq_params for current-style metadata (cu_seqlens_q, max_seqlen_q), in short, into
    the installed megatron-core's own PackedSeqParams (total_tokens: what Bridge's forward step adds for hybrids)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens, max_seqlen = batch["cu_seqlens_q"].squeeze(), int(batch["max_seqlen_q"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, total_tokens=batch.get("total_tokens"))


def forward_step_module(tmp_path, monkeypatch, source: str, name: str):
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name)


def test_packed_sequences_need_mamba_state_resets_from_core_and_bridge(tmp_path, monkeypatch):
    """lc.mix runs where megatron-core derives the Mamba seq_idx (PackedSeqParams' seq_idx/total_tokens) and
    Bridge's forward step fills total_tokens; the installed megatron-core here is checked, not a stand-in of it."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nano3.megatron_compat import packed_mamba_gap

    todays = forward_step_module(tmp_path, monkeypatch, TODAYS_FORWARD_STEP, "todays_gpt_step")
    older = forward_step_module(tmp_path, monkeypatch, OLDER_FORWARD_STEP, "older_gpt_step")
    assert packed_mamba_gap(PackedSeqParams, todays) is None  # megatron-core 0.19.2, Bridge 0.6's forward step
    assert "Megatron-Bridge >= 0.6" in packed_mamba_gap(PackedSeqParams, older)
    assert "megatron-core >= 0.18" in packed_mamba_gap(OlderPackedSeqParams, todays)


def test_megatron_core_derives_one_state_reset_per_short_sequence_from_our_metadata():
    """What Bridge 0.6's forward step does with a lc.mix sample (batch of one): cu_seqlens_q and max_seqlen_q as
    they come out of torch's collate, total_tokens from the tokens; megatron-core's own PackedSeqParams must give
    every token the index of its short sequence (the Mamba kernels restart the state where it changes)."""
    import torch
    from torch.utils.data import default_collate

    from nano3.data.lc_mix import ShortSequenceMix

    samples = [{"tokens": torch.arange(64), "labels": torch.arange(1, 65), "loss_mask": torch.ones(64)}] * 4
    mixed = ShortSequenceMix(samples, share=0.5, short_length=16)
    cut = [i for i in range(4) if "cu_seqlens_q" in mixed[i]]
    assert len(cut) == 2 and all(torch.equal(mixed[i]["tokens"], samples[i]["tokens"]) for i in range(4))
    batch = default_collate([mixed[cut[0]]])
    params = bridge_packed_seq_params({**batch, "total_tokens": batch["tokens"].size(1)})
    assert params.cu_seqlens_q.tolist() == [0, 16, 32, 48, 64] and params.max_seqlen_q == 16
    assert params.seq_idx.tolist() == [[i // 16 for i in range(64)]]


def test_the_packed_micro_batches_that_ran_are_recorded(tmp_path, monkeypatch):
    """entry.record_packed_batches wraps the forward step's builder of PackedSeqParams (here megatron-core's own
    class behind a stand-in of Bridge 0.6's gpt_step module) and counts what the model was given."""
    import json

    import torch

    from nano3.train.entry import record_packed_batches

    gpt_step = types.ModuleType("megatron.bridge.training.gpt_step")
    gpt_step.get_packed_seq_params = bridge_packed_seq_params
    monkeypatch.setitem(sys.modules, "megatron.bridge.training.gpt_step", gpt_step)
    record = tmp_path / "packed.lc.json"
    record_packed_batches(record)
    batch = {"cu_seqlens_q": torch.tensor([[0, 16, 32, 48, 64]], dtype=torch.int32), "max_seqlen_q": torch.tensor([16])}
    for _ in range(3):
        params = gpt_step.get_packed_seq_params({**batch, "total_tokens": 64})
    assert params.seq_idx is not None
    assert json.loads(record.read_text()) == {"micro_batches": 3, "sequences": 4, "max_seqlen": 16,
                                              "mamba_seq_idx": True}
    gpt_step.get_packed_seq_params(batch)  # no total_tokens (an older forward step): no Mamba resets, and it says so
    assert json.loads(record.read_text())["mamba_seq_idx"] is False
