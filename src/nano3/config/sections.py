"""One frozen dataclass per params.yaml section: the keys, their defaults, their documentation and their checks.

params.yaml stays the file DVC tracks and holds every key; these classes say what each key may be. docs/parameters.md's
"Parameters" table is generated from the `doc` of each field (`python -m nano3.config --table`; a test keeps it in
sync). Defaults here equal the embedded default's params.yaml values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nano3.config.schema import knob

positive = (lambda v: v > 0, "> 0")
non_negative = (lambda v: v >= 0, ">= 0")
fraction = (lambda v: 0 <= v < 1, "in [0, 1)")
open_unit = (lambda v: 0 < v <= 1, "in (0, 1]")
PHASE_NAMES = ("phase1", "phase2", "lc")


@dataclass(frozen=True)
class SampleConfig:
    """Stage `sample`: the embedded corpus, built from this Python's standard library."""
    out_dir: str = knob("data/sample", "where the sample corpus goes")
    code_shards: int = knob(4, "Parquet shards of stdlib-code (one document per .py file)", positive)
    docs_shards: int = knob(2, "JSONL shards of stdlib-docs (pydoc topics + module docstrings)", positive)
    exclude_dirs: list[str] = knob(doc="stdlib directories left out", factory=lambda: ("site-packages",))


@dataclass(frozen=True)
class TokenizerConfig:
    """Stage `tokenizer`."""
    name: str = knob("train", "`train` (SentencePiece BPE on `train_datasets`), a Hugging Face hub name, or a local HF tokenizer directory")
    dir: str = knob("data/tokenizer", "where the tokenizer and its `info.json` go")
    vocab_size: int = knob(8192, "`train` only: vocabulary size", positive)
    max_sentences: int = knob(300000, "`train` only: lines sampled for training", positive)
    seed: int = knob(1234, "`train` only: sampling seed")
    train_datasets: list[str] = knob(doc="`train` only: datasets the SentencePiece model learns from", factory=tuple)


@dataclass(frozen=True)
class PrepConfig:
    """Stage `prep@<dataset>`: tokenize each dataset to .bin/.idx shards."""
    out_dir: str = knob("data/prepared", "prepared datasets' manifests, one folder per dataset: what DVC tracks")
    shards_dir: str = knob("data/shards", "the .bin/.idx shards, `<dataset>/<version>/` (outside DVC's cache; their sizes and sha256 are in the manifests: `make verify-data`)")
    work_dir: str = knob("data/work/prep", "per-unit pieces and receipts, so a killed run resumes")
    workers: int = knob(0, "worker processes (0 = all cores); never changes the output", non_negative)
    batch_size: int = knob(1000, "documents per tokenizer call ...", positive)
    batch_mb: float = knob(8, "... and at most this many MB of text (memory bound)", positive)
    unit_mb: float | Literal["auto"] = knob("auto", "size of the units plain JSONL and Parquet are cut into; `auto`: the input's size / 64 within 16 MB .. 1 GB (one 200 MB file: 13 units)")
    sample_rows: int | None = knob(None, "keep only the first N rows of each dataset (`--sample N`)", positive)
    valid_fraction: float = knob(0.001, "default share of documents (by text hash) held out for validation", fraction)
    test_fraction: float = knob(0.001, "... and for test", fraction)
    hf_mirror: str | None = knob(None, "local directory of hub dataset repos (`org/name/...`) used instead of the Hub")
    log_interval_s: float = knob(60, "where stderr is not a terminal (Slurm logs): a progress line this often",
                                 non_negative)
    encoder: Literal["auto", "reference", "gigatoken"] = knob("auto", "`auto` (gigatoken where it gives the tokenizer's ids on the first MB, else the tokenizer), `reference`, `gigatoken`")
    verify_encoder: bool = knob(False, "re-encode every document with the tokenizer itself and fail on a difference (`--verify`)")
    array_tasks: int = knob(1, "on Slurm: tasks of each dataset's prep job array (1 = one job)", positive)
    request_timeout_s: float = knob(300, "hub streaming: seconds one HTTP request may stall before it is retried "
                                         "(NVIDIA's pipeline: 300)", positive)
    request_retries: int = knob(20, "hub streaming: retries of a read cut off mid-file, `retry_wait_s` apart (on "
                                    "top of huggingface_hub's own 5 with backoff 1..8 s per request)", positive)
    unit_attempts: int = knob(3, "hub streaming: a unit that still fails is read again from its start, up to this "
                                 "many times in all; then prep stops, naming the file (finished units stay done)",
                              positive)
    retry_wait_s: float = knob(5, "hub streaming: wait before a retry; doubled before each new attempt of a unit",
                               non_negative)


@dataclass(frozen=True)
class DatasetSource:
    """One entry of `datasets`: name -> source."""
    source: str = knob(doc="path, glob or `hf://org/name[/subset]` (names: no `.`, `/` or spaces)")
    watch: str = knob(doc="the local path DVC tracks for the dataset (a local dataset: its source; a hub dataset: `src/nano3/data/sources.py`, the reader, with `revision` pinned)")
    text_field: str = knob("text", "the field holding each document's text")
    split: str = knob("train", "the split of a hub dataset or DatasetDict")
    revision: str | None = knob(None, "the hub revision, for exact reruns")
    gated: bool = knob(False, "a hub dataset whose terms must be accepted: prep and submission refuse to start "
                              "without a Hugging Face token (HF_TOKEN or `hf auth login`) unless `prep.hf_mirror` is set")
    valid_fraction: float | None = knob(None, "this dataset's validation share (null = `prep.valid_fraction`)", fraction)
    test_fraction: float | None = knob(None, "this dataset's test share (null = `prep.test_fraction`)", fraction)
    min_chars: int = knob(0, "keep only documents of at least this many characters (long-context data); 0 keeps all",
                          non_negative)


@dataclass(frozen=True)
class BlendConfig:
    """Stage `blend`: weights are token shares within each phase."""
    out_dir: str = knob("data/blend", "blend files (what DVC tracks)")
    cache_dir: str = knob("data/blend-cache", "megatron-core's index cache (outside DVC: its file names hash what built them)")
    report_dir: str = knob("reports/blend", "report.md, report.png, shares.csv (dvc plots)")
    phases: dict[str, dict[str, float]] = knob(doc="`phase1`, `phase2`, `lc`: dataset -> weight (token share within the phase)", factory=dict)
    max_epochs: float = knob(4.0, "warn when a phase would read a dataset more often than this", positive)
    strict_epochs: bool = knob(False, "... and stop the blend instead, in one line (the report is still written)")
    validate: bool = knob(True, "build each blend with megatron-core's BlendedMegatronDatasetBuilder on the CPU")
    prebuild_cache: bool = knob(True, "... and keep its index cache so a GPU job starts without rebuilding")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = knob("tiny", "`tiny` (the embedded default, minutes on one GPU) or `nano3` (the 52-layer model)")
    overrides: dict[str, Any] = knob(doc="preset fields by their Bridge names (`hybrid_layer_pattern`, `hidden_size`, `num_moe_experts`, ...); other Bridge model fields pass through", factory=dict)
    vocab_size: int | None = knob(None, "null = the tokenizer's; larger pads the embedding; smaller is refused", positive)


@dataclass(frozen=True)
class Budget:
    """A reduced run's size (the CPU reference backend's)."""
    tokens: float = knob(doc="tokens to train on", check=positive)
    seq_length: int = knob(doc="tokens per sequence", check=positive)
    global_batch_size: int = knob(doc="sequences per step", check=positive)
    micro_batch_size: int = knob(doc="sequences per forward pass", check=positive)


@dataclass(frozen=True)
class Parallel:
    tp: int = knob(1, "tensor parallel size", positive)
    pp: int = knob(1, "pipeline parallel size", positive)
    cp: int = knob(1, "context parallel size", positive)
    ep: int = knob(1, "expert parallel size", positive)
    etp: int = knob(1, "expert tensor parallel size", positive)
    sequence_parallel: bool | None = knob(None, "sequence parallelism (null = on when tp > 1)")


@dataclass(frozen=True)
class Kernels:
    """What this machine's stack supports (the NeMo container has all of it)."""
    moe_dispatcher: Literal["alltoall", "flex"] = knob("alltoall", "`alltoall` (everywhere) or `flex` (HybridEP, the recipe's, in the NeMo container)")
    flex_backend: str = knob("hybridep", "the `flex` dispatcher's backend")
    cuda_graphs: Literal["none", "transformer_engine"] = knob("none", "`none` or `transformer_engine` (the recipe's benchmarks use graphs)")
    grad_accum_fusion: bool = knob(False, "fused weight-gradient accumulation (needs APEX, in the NeMo container)")
    fused_mamba: bool = knob(True, "Megatron's fused Mamba path (needs causal-conv1d); false = the unfused path, same math")
    moe_permute_fusion: bool = knob(True, "fused MoE token permutation (Transformer Engine)")


@dataclass(frozen=True)
class TrainConfig:
    """Stage `pretrain`: both curriculum phases in one logical run."""
    backend: Literal["auto", "megatron", "reference"] = knob("auto", "`auto` (Megatron where a CUDA GPU is present, else the CPU reference), `megatron`, `reference`")
    reference: Budget = knob(doc="the reference backend's budget: it replaces `tokens`, `seq_length`, `global_batch_size`, `micro_batch_size`",
                             factory=lambda: Budget(49152, 256, 4, 4))
    tokens: float = knob(3276800, "total pretraining tokens of both phases (recipe: 25e12)", positive)
    seq_length: int = knob(1024, "sequence length (recipe: 4096; tech report: 8192)", positive)
    global_batch_size: int = knob(16, "sequences per step (recipe: 8192)", positive)
    micro_batch_size: int = knob(4, "sequences per GPU per micro-step", positive)
    phase2_start: float = knob(0.94, "fraction of the tokens after which phase 2's blend takes over", open_unit)
    lr: float = knob(1.0e-3, "peak LR (recipe: 1e-4)", positive)
    min_lr: float = knob(1.0e-4, "final LR (recipe: 1e-5)", non_negative)
    warmup_fraction: float = knob(0.05, "linear warm-up over this fraction of iterations", fraction)
    decay_start: float = knob(0.8, "Warmup-Stable-Decay: hold the peak LR until this fraction of training ...",
                              (lambda v: 0 <= v <= 1, "in [0, 1]"))
    decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = knob("linear", "... then decay to `min_lr`: `linear`, `cosine`, `exponential`, `minus_sqrt`")
    weight_decay: float = knob(0.1, "AdamW weight decay (also Bridge's scheduler start/end weight decay, which megatron-core applies)", non_negative)
    adam_beta1: float = knob(0.9, "AdamW beta1", fraction)
    adam_beta2: float = knob(0.95, "AdamW beta2", fraction)
    adam_eps: float = knob(1.0e-8, "AdamW epsilon (not in the recipe; megatron-core's and Bridge's default)", positive)
    clip_grad: float = knob(1.0, "gradient-norm clipping", non_negative)
    seed: int = knob(1234, "seed of data order and initialisation")
    eval_interval: int = knob(50, "iterations between validation runs", non_negative)
    eval_iters: int = knob(4, "batches per validation run", non_negative)
    log_interval: int = knob(5, "iterations between metric logs", positive)
    save_interval: int = knob(50, "iterations between checkpoints", positive)
    save_minutes: float | None = knob(None, "GPU runs: minutes of training between checkpoints instead, turned into "
                                            "iterations by the plan (at `measured_tflops_per_gpu`); null = `save_interval`", positive)
    keep_checkpoints: int | None = knob(None, "keep the newest N checkpoints of a run (Bridge's `most_recent_k`); null = all", positive)
    checkpoint_dir: str = knob("checkpoints", "checkpoints `<dir>/<stage>/<run digest>/` and the DVC outs `<dir>/<stage>.json` (nano3.train.rundir)")
    live_dir: str = knob("dvclive", "dvclive metrics: `<dir>/<stage>/` (dvc plots show)")
    nodes: int | None = knob(None, "GPUs = nodes x gpus_per_node; null = the cluster profile's, the Slurm allocation's, or this machine's", positive)
    gpus_per_node: int | None = knob(None, "as `nodes`", positive)
    parallel: Parallel = knob(doc="parallel layout of pretraining", factory=Parallel)
    precision: Literal["bf16", "fp8", "fp8_delayed", "fp8_blockwise", "mxfp8"] = knob(
        "bf16", "`bf16`; FP8 with TE's current (`fp8`), delayed (`fp8_delayed`) or 128-block (`fp8_blockwise`, "
                "Hopper) scaling; `mxfp8` (Blackwell)")
    fp8_edge_layers_bf16: bool = knob(True, "FP8 recipes keep the first and last layer in BF16 (Bridge's current "
                                            "scaling default); false quantizes them too, as NVIDIA's benchmarks do")
    recompute_modules: list[str] = knob(doc="selective activation recompute (recipe: `[moe, layernorm]`)", factory=tuple)
    kernels: Kernels = knob(doc="what the machine's stack supports (the NeMo container has all of it)", factory=Kernels)
    num_workers: int = knob(2, "data loader workers per rank (the reference backend's too)", non_negative)
    measured_tflops_per_gpu: float = knob(183, "throughput (Bridge's formula) the plan's GPU-hours assume", positive)
    bridge_overrides: dict[str, Any] = knob(doc="any Megatron-Bridge field, `{section.field: value}` (on the command line: `bridge.section.field=value`)",
                                            factory=dict)
    env: dict[str, Any] = knob(doc="environment variables for the GPU ranks, over the recipe's and the shell's "
                                   "(docs/training.md: The ranks' environment), e.g. `{PYTORCH_CUDA_ALLOC_CONF: \"\"}`", factory=dict,
                               check=(lambda v: all(isinstance(x, (str, int, float, bool)) for x in v.values()),
                                      "names to plain values (text or numbers)"))


@dataclass(frozen=True)
class Mix:
    """Short sequences among lc's long ones, as the tech report mixes 4k sequences into its 512k training."""
    short_share: float = knob(0.0, "share of lc's samples cut into independent short sequences (packed: attention and "
                                   "Mamba state restart at each boundary; nothing is truncated; on GPUs lc.micro_batch_size 1 and the fused "
                                   "Mamba path); 0 = off", fraction)
    short_length: int = knob(256, "tokens per short sequence; divides lc's sequence length (and lc.reference's)",
                             positive)


@dataclass(frozen=True)
class LCConfig:
    """Stage `lc`: long-context extension from the final pretrain checkpoint."""
    tokens: float = knob(524288, "long-context extension tokens (recipe: 121e9)", positive)
    seq_length: int = knob(4096, "its sequence length (recipe: up to 1M)", positive)
    global_batch_size: int = knob(4, "sequences per step (recipe: 48)", positive)
    micro_batch_size: int = knob(1, "sequences per GPU per micro-step", positive)
    lr: float = knob(1.0e-4, "constant LR (recipe: 1e-5)", positive)
    reference: Budget = knob(doc="the reference backend's budget for lc", factory=lambda: Budget(8192, 1024, 2, 1))
    nodes: int | None = knob(None, "as `train.nodes`", positive)
    gpus_per_node: int | None = knob(None, "as `train.gpus_per_node`", positive)
    parallel: Parallel = knob(doc="parallel layout of lc (recipe: TP/CP/EP 8, PP 4)", factory=Parallel)
    mix: Mix = knob(doc="short sequences mixed into lc (and its short-context validation loss)", factory=Mix)


@dataclass(frozen=True)
class RetrievalConfig:
    """Stage `retrieval`: synthetic pass-key documents (a key planted at a random depth of real text, asked for at
    the end) for the lc blend."""
    out_dir: str = knob("data/retrieval", "JSONL shards of the generated documents (a dataset's `source`)")
    haystack_dataset: str = knob("stdlib-docs", "the dataset whose train-split documents give the haystacks' text")
    watch: str = knob("data/sample/stdlib-docs", "the local path DVC tracks for that text (the dataset's `watch`)")
    documents: int = knob(600, "documents to generate", positive)
    min_chars: int = knob(2000, "shortest haystack, in characters", positive)
    max_chars: int = knob(12000, "longest haystack, in characters", positive)
    shards: int = knob(2, "JSONL shards", positive)
    seed: int = knob(1234, "seed of the keys, depths and lengths")


@dataclass(frozen=True)
class ExportConfig:
    """Stage `export`: the final checkpoint as a Hugging Face NemotronH directory."""
    source: Literal["lc", "pretrain"] = knob("lc", "whose final checkpoint: `lc` or `pretrain`")
    out_dir: str = knob("models/hf", "the Hugging Face directory (config.json, model.safetensors, tokenizer files, nano3_export.json)")
    report: str = knob("reports/export/export.json", "DVC metrics file of the logits check")
    verify_tokens: int = knob(4096, "GPU: test tokens on which transformers' and Megatron's logits are compared (0 = off)",
                              non_negative)
    max_rel_l2: float = knob(0.02, "... and the largest relative L2 difference accepted", positive)
    pretrain_dir: str = knob("models/hf-pretrain", "the pretrain checkpoint's export, always (eval's long context "
                                                   "before lc; with `source: pretrain`, a copy of `out_dir`)")


@dataclass(frozen=True)
class LongContextEval:
    """Long-context evaluation, before and after lc: pass-key retrieval and loss by position."""
    lengths: list[int] = knob(doc="context lengths (tokens) of the retrieval prompts; the longest is the per-position window",
                              factory=lambda: (256, 512, 1024))
    prompts: int = knob(12, "retrieval prompts per length, at depths spread evenly from 0 to 1", positive)
    haystack_dataset: str = knob("stdlib-docs", "the dataset whose test split gives the haystacks")
    documents_dataset: str = knob("stdlib-long", "the dataset whose longest test documents give the loss by position")
    documents: int = knob(8, "test documents (of at least the longest length) for the loss by position", positive)
    buckets: int = knob(8, "position ranges the loss is reported in", positive)


@dataclass(frozen=True)
class EvalConfig:
    """Stage `eval`: the exported model with transformers (GPU if present, else CPU)."""
    out_dir: str = knob("reports/eval", "results.json, its headline metrics.json (DVC metrics), report.md, continuations.json")
    seq_length: int = knob(1024, "window for test-split perplexity", positive)
    max_tokens: int = knob(8192, "test tokens per dataset (every dataset a blend phase draws from)", positive)
    batch_size: int = knob(4, "windows per forward pass", positive)
    logits_chunk_tokens: int = knob(4096, "logits made this many tokens at a time (GPU memory: tokens x vocab x 4 "
                                          "bytes; results equal while a forward pass fits one chunk)", positive)
    prompts: list[str] = knob(doc="prompts continued greedily in the report", factory=tuple)
    max_new_tokens: int = knob(32, "how far", non_negative)
    long_context: LongContextEval = knob(factory=LongContextEval)


@dataclass(frozen=True)
class WandbConfig:
    """Optional Weights & Biases logging through Bridge."""
    enabled: bool = knob(False, "log to Weights & Biases through Bridge")
    project: str = knob("nano3", "its project")
    entity: str | None = knob(None, "its entity")


@dataclass(frozen=True)
class Settings:
    """Every section of params.yaml, parsed once (`Params.settings`)."""
    sample: SampleConfig = knob(factory=SampleConfig)
    tokenizer: TokenizerConfig = knob(factory=TokenizerConfig)
    prep: PrepConfig = knob(factory=PrepConfig)
    datasets: dict[str, DatasetSource] = knob(doc="name -> source", factory=dict)
    blend: BlendConfig = knob(factory=BlendConfig)
    model: ModelConfig = knob(factory=ModelConfig)
    train: TrainConfig = knob(factory=TrainConfig)
    lc: LCConfig = knob(factory=LCConfig)
    retrieval: RetrievalConfig = knob(factory=RetrievalConfig)
    export: ExportConfig = knob(factory=ExportConfig)
    eval: EvalConfig = knob(factory=EvalConfig)
    wandb: WandbConfig = knob(factory=WandbConfig)

    def training(self, stage: str) -> TrainConfig | LCConfig:
        """The section a training stage reads its size and parallel layout from: `train` for pretrain, `lc` for lc."""
        return getattr(self, section_name(stage))


def phase_section(phase: str) -> str:
    """params.yaml section a curriculum phase (phase1, phase2, lc) is sized by."""
    return "lc" if phase == "lc" else "train"


def section_name(stage: str) -> str:
    """params.yaml section of a training stage (the one home of `"train" if stage == "pretrain" else "lc"`)."""
    return "train" if stage == "pretrain" else "lc"
