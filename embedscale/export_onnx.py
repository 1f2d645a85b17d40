"""ONNX export: the encoder as graphs an inference runtime runs without PyTorch, checked before they are kept.

    embedscale export model.name_or_path=runs/train/<ts>/model [onnx.quantize=int8] [onnx.output=DIR]

Each graph maps tokens to the model's embeddings, with the backbone, the model's pooling and (when the model
normalises) L2 normalisation inside:

    input_ids (B, L) int64, attention_mask (B, L) int64  ->  embeddings (B, D) float32      (B and L dynamic)

Tokenisation stays outside the graph, as for every ONNX text model: `OnnxEncoder` applies the model's own
(`embedscale.encoder.tokenize`: prefixes, truncation, an appended EOS), and embedscale_onnx.json records the
prefixes and token budgets for other runtimes. Written into `onnx.output` (default `<model>/onnx`):

  model.onnx (shared towers) or query.onnx + document.onnx      fp32, torch.onnx's exporter (opset >= 18)
  <tower>.int8.onnx                                             onnx.quantize=int8: onnxruntime's dynamic
                                                                quantisation (int8 weights of MatMul/Gemm, one
                                                                scale per output channel; activations quantised
                                                                per batch at run time)
  tokenizer files, embedscale_onnx.json                         model settings, files, opset, parity

Before anything is kept, `onnx.check_texts` texts of different lengths are encoded by PyTorch and by onnxruntime:
an fp32 graph whose smallest cosine is below `onnx.min_cosine` is an error and nothing is written; the int8
graph's cosine is recorded (its retrieval cost is measured by bench/onnx_export.py). The directory is written
under a temporary name and renamed into place (export.atomic_directory).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedscale.config import ModelConfig, OnnxConfig, OnnxQuantize
from embedscale.encoder.biencoder import SIDES, BiEncoder, length_batches, load_tokenizer, restore_model_config
from embedscale.encoder.tokenize import tokenize
from embedscale.export import _write_json, atomic_directory, export_tokenizer, refuse_nonfinite

log = logging.getLogger(__name__)

ONNX_META = "embedscale_onnx.json"
"""The export's record: model settings, graph files, opset, parity with PyTorch."""

_WORDS = (
    "protein cell gene expression tumour patient cohort dose receptor binding pathway signal mutation "
    "the of and in to a is that with for as was on by an are this from which be at or"
).split()


class _Tower(nn.Module):
    """One side of the encoder as tokens -> embeddings (the graph exported)."""

    def __init__(self, encoder: BiEncoder, side: str) -> None:
        super().__init__()
        self.encoder, self.side = encoder, side

    def forward(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode({"input_ids": input_ids_BL, "attention_mask": attention_mask_BL}, side=self.side)


def check_texts(n: int, max_words: int) -> list[str]:
    """`n` deterministic texts from 1 word up to `max_words` words: padding, truncation and every length between."""
    rng = np.random.default_rng(0)
    lengths = np.linspace(1, max(1, max_words), num=n).round().astype(int)
    return [" ".join(rng.choice(_WORDS, size=int(k))) for k in lengths]


def tower_files(encoder: BiEncoder) -> dict[str, str]:
    """{side: graph file name}: one shared graph, or one per tower."""
    return {side: "model.onnx" for side in SIDES} if encoder.shared else {side: f"{side}.onnx" for side in SIDES}


def export_onnx(encoder: BiEncoder, tokenizer, out_dir: str | Path, cfg: OnnxConfig, *, source: str = "") -> dict:
    """Write the ONNX export of `encoder` to `out_dir` (see the module docstring); returns its record."""
    import onnxruntime

    model_cfg = encoder.cfg
    if model_cfg.multivector:
        raise ValueError(
            "model.multivector: the ONNX export writes one pooled vector per text; a multi-vector model's token "
            "matrices are not exported to ONNX yet (its export is sentence-transformers' MultiVectorEncoder layout)"
        )
    if model_cfg.pool_exclude_prefix:
        raise ValueError(
            "model.pool_exclude_prefix=true pools a different token set than the attention mask, which the ONNX "
            "graph's two inputs cannot express yet: export with model.pool_exclude_prefix=false only if the model "
            "was trained so"
        )
    out = Path(out_dir)
    _check_output(out, overwrite=cfg.overwrite)
    encoder.merge_adapters()
    refuse_nonfinite(encoder, out)
    encoder.eval()
    files = tower_files(encoder)
    record: dict[str, Any] = {
        "model": model_cfg,
        "source": source,
        "graphs": files,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["embeddings"],
        "opset": cfg.opset,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    with atomic_directory(out) as tmp:
        for side in dict.fromkeys(files.values()):  # each graph once
            tower_side = next(s for s, f in files.items() if f == side)
            _export_graph(encoder, tokenizer, tower_side, tmp / side, cfg.opset)
        if cfg.quantize is OnnxQuantize.int8:
            record["int8_graphs"] = {s: f.replace(".onnx", ".int8.onnx") for s, f in files.items()}
            for name in dict.fromkeys(files.values()):
                _quantize_int8(tmp / name, tmp / name.replace(".onnx", ".int8.onnx"))
        export_tokenizer(tokenizer, model_cfg).save_pretrained(str(tmp))
        _write_json(tmp / ONNX_META, record)
        record["parity"] = parity(encoder, tokenizer, tmp, n_texts=cfg.check_texts)
        worst = min(p["min_cosine"] for p in record["parity"]["fp32"].values())
        if not worst >= cfg.min_cosine:  # NaN fails too
            raise ValueError(
                f"ONNX export of {source or 'the model'}: the fp32 graph's embeddings differ from PyTorch's (smallest "
                f"cosine {worst:.8f} over {cfg.check_texts} texts, onnx.min_cosine={cfg.min_cosine}); nothing was "
                "written. Report the model type and torch/onnxruntime versions, or try another onnx.opset"
            )
        record["files"] = sorted(p.name for p in tmp.iterdir()) + [ONNX_META]
        _write_json(tmp / ONNX_META, record)
    log.info("ONNX export written to %s: %s", out, json.dumps(record["parity"]))
    return record


def _check_output(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace anything but a previous ONNX export, and that only with onnx.overwrite=true."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / ONNX_META).is_file():
        raise ValueError(
            f"onnx.output={out} exists and is not an embedscale ONNX export (no {ONNX_META}): choose another "
            "onnx.output; nothing there is replaced"
        )
    if not overwrite:
        raise ValueError(f"onnx.output={out} already holds an ONNX export: set onnx.overwrite=true to replace it")
    listed = set(json.loads((out / ONNX_META).read_text()).get("files", []))
    unknown = sorted(p.name for p in out.iterdir() if p.name not in listed)
    if unknown:
        raise ValueError(
            f"onnx.output={out} holds files its {ONNX_META} does not list ({unknown[:5]}); they would be lost with "
            "the directory: move them or choose another onnx.output"
        )


def _example_tokens(encoder: BiEncoder, tokenizer, side: str) -> dict[str, torch.Tensor]:
    cfg = encoder.cfg
    prefix = cfg.query_prefix if side == "query" else cfg.document_prefix
    texts = check_texts(2, 12)  # two lengths: the padding path is traced too
    return tokenize(tokenizer, texts, prefixes=prefix, max_length=16, cfg=cfg)


def _export_graph(encoder: BiEncoder, tokenizer, side: str, path: Path, opset: int) -> None:
    tokens = _example_tokens(encoder, tokenizer, side)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    tower = _Tower(encoder, side).eval()
    # the exporter's passes log every rewrite at INFO, and "torchvision is not installed" once per vision op
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # both inputs share the batch and sequence dims, which the exporter notes once per input
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        program = torch.onnx.export(
            tower,
            (tokens["input_ids"], tokens["attention_mask"]),
            input_names=["input_ids", "attention_mask"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    root = logging.getLogger()  # the quantiser logs a line per tensor on the root logger
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            # per output channel: one scale per weight tensor costs MiniLM a cosine of 0.90 to fp32 on SciFact
            # abstracts, one per channel 0.99 at the same speed (bench/onnx_export.py)
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def parity(encoder: BiEncoder, tokenizer, onnx_dir: Path, *, n_texts: int) -> dict:
    """Smallest and mean cosine between PyTorch's embeddings and each graph's, per side, on `n_texts` texts."""
    from embedscale.encoder.biencoder import encode_texts

    out: dict[str, dict] = {}
    for precision in ("fp32", "int8"):
        meta = json.loads((onnx_dir / ONNX_META).read_text())
        if precision == "int8" and "int8_graphs" not in meta:
            continue
        runtime = OnnxEncoder(onnx_dir, int8=precision == "int8")
        out[precision] = {}
        for side in SIDES:
            budget = encoder.cfg.query_max_length if side == "query" else encoder.cfg.document_max_length
            texts = check_texts(n_texts, max_words=budget + 8)  # the longest are truncated
            want_ND = encode_texts(encoder, tokenizer, texts, side=side, batch_size=8).numpy()
            got_ND = runtime.encode(texts, side=side, batch_size=8)
            cos_N = (want_ND * got_ND).sum(1) / (np.linalg.norm(want_ND, axis=1) * np.linalg.norm(got_ND, axis=1))
            out[precision][side] = {"min_cosine": float(cos_N.min()), "mean_cosine": float(cos_N.mean())}
    return out


class OnnxEncoder:
    """Encode texts with an ONNX export and onnxruntime: the same tokenisation, batching and output as
    `encode_texts` of the PyTorch model, (N, D) float32 in the input order."""

    def __init__(self, path: str | Path, *, int8: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta_path = self.path / ONNX_META
        if not meta_path.is_file():
            raise ValueError(f"{self.path} is not an embedscale ONNX export (no {ONNX_META}): run `embedscale export`")
        self.meta = json.loads(meta_path.read_text())
        graphs = self.meta.get("int8_graphs") if int8 else self.meta["graphs"]
        if graphs is None:
            raise ValueError(f"{self.path} has no int8 graphs: export with onnx.quantize=int8")
        self.cfg = restore_model_config(ModelConfig(name_or_path=str(self.path)), self.meta["model"])
        self.tokenizer = load_tokenizer(str(self.path), self.cfg)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(self.path / name), options, providers=["CPUExecutionProvider"])
            for name in set(graphs.values())
        }
        self.sessions = {side: sessions[graphs[side]] for side in SIDES}

    def encode(self, texts: list[str], *, side: str, batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
        cfg = self.cfg
        prefix = cfg.query_prefix if side == "query" else cfg.document_prefix
        if max_length is None:
            max_length = cfg.query_max_length if side == "query" else cfg.document_max_length
        session = self.sessions[side]
        chunks, order = [], []
        for idx in length_batches(texts, batch_size):
            tokens = tokenize(self.tokenizer, [texts[i] for i in idx], prefixes=prefix, max_length=max_length, cfg=cfg)
            feed = {"input_ids": tokens["input_ids"].numpy(), "attention_mask": tokens["attention_mask"].numpy()}
            chunks.append(session.run(["embeddings"], feed)[0])
            order += idx
        if not chunks:
            return np.empty((0, 0), dtype=np.float32)
        out_ND = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
        out_ND[np.array(order)] = np.concatenate(chunks)
        return out_ND
