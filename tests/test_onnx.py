"""`embedscale export`: ONNX graphs equal to the PyTorch encoder, int8 close to it, and nothing of the user's lost.

Every test exports a tiny random model for real (torch.onnx's exporter, onnxruntime on CPU) and compares the
runtime's embeddings with `encode_texts` of the same model on texts the export never saw: other lengths, other
batch sizes, texts past the token budget.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedscale.config import ExportJobConfig, ModelConfig, OnnxConfig, OnnxQuantize, Pooling
from embedscale.encoder.biencoder import encode_texts, load_encoder
from embedscale.export_onnx import ONNX_META, OnnxEncoder, check_texts, export_onnx

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxscript, onnxruntime) is in the lock")

TEXTS = [
    "a",
    "protein binding in the cell",
    "the tumour cohort was dosed twice and the receptor pathway signal fell by half in every patient " * 6,
    "gene expression",
    "mutation",
]


def _cosines(a_ND: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
    return (a_ND * b_ND).sum(1) / (np.linalg.norm(a_ND, axis=1) * np.linalg.norm(b_ND, axis=1))


@pytest.fixture(scope="module")
def exported(tiny_bert_nodrop, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop), document_max_length=24))
    record = export_onnx(encoder, tokenizer, out, OnnxConfig(quantize=OnnxQuantize.int8), source="tiny")
    return out, encoder, tokenizer, record


@pytest.mark.parametrize("side", ["query", "document"])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_fp32_graph_equals_pytorch_at_any_batch_and_length(exported, side, batch_size):
    out, encoder, tokenizer, _ = exported
    want_ND = encode_texts(encoder, tokenizer, TEXTS, side=side).numpy()
    got_ND = OnnxEncoder(out).encode(TEXTS, side=side, batch_size=batch_size)
    assert got_ND.shape == want_ND.shape and got_ND.dtype == np.float32
    np.testing.assert_allclose(got_ND, want_ND, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_ND, axis=1), 1.0, atol=1e-5)  # normalisation is in the graph


def test_int8_graph_is_close_and_the_record_says_how_close(exported):
    out, encoder, tokenizer, record = exported
    meta = json.loads((out / ONNX_META).read_text())
    assert meta["graphs"] == {"query": "model.onnx", "document": "model.onnx"}  # shared towers: one graph
    assert meta["int8_graphs"] == {"query": "model.int8.onnx", "document": "model.int8.onnx"}
    assert set(meta["files"]) == {p.name for p in out.iterdir()}
    assert meta["parity"]["fp32"]["document"]["min_cosine"] >= 0.9999
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 2
    got_ND = OnnxEncoder(out, int8=True).encode(TEXTS, side="document")
    cos_N = _cosines(got_ND, encode_texts(encoder, tokenizer, TEXTS, side="document").numpy())
    assert cos_N.min() > 0.99 and record["parity"]["int8"]["document"]["min_cosine"] > 0.99


def test_separate_towers_export_one_graph_per_side(tiny_bert_nodrop, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_bert_nodrop), shared_towers=False, query_prefix="query: ")
    encoder, tokenizer = load_encoder(cfg)
    with torch.no_grad():  # towers that really differ
        next(encoder.document_backbone.parameters()).add_(0.05)
    export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig())
    runtime = OnnxEncoder(tmp_path / "onnx")
    assert runtime.meta["graphs"] == {"query": "query.onnx", "document": "document.onnx"}
    assert runtime.cfg.query_prefix == "query: "  # the prefix is applied outside the graph, as recorded
    for side in ("query", "document"):
        np.testing.assert_allclose(
            runtime.encode(TEXTS, side=side), encode_texts(encoder, tokenizer, TEXTS, side=side).numpy(), atol=1e-5
        )
    q_ND, d_ND = runtime.encode(TEXTS, side="query"), runtime.encode(TEXTS, side="document")
    assert _cosines(q_ND, d_ND).min() < 0.9999  # each side ran its own tower


def test_decoder_with_last_token_pooling_and_appended_eos(tmp_path):
    from helpers import make_tiny_mistral

    path = make_tiny_mistral(tmp_path / "mistral")
    cfg = ModelConfig(name_or_path=str(path), pooling=Pooling.last_token, padding_side="left", query_max_length=16)
    encoder, tokenizer = load_encoder(cfg)
    export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig())
    texts = ["forest vaccine", "crystal engine river forest vaccine crystal engine forest", "river"]
    got_ND = OnnxEncoder(tmp_path / "onnx").encode(texts, side="query", batch_size=3)
    np.testing.assert_allclose(got_ND, encode_texts(encoder, tokenizer, texts, side="query").numpy(), atol=1e-5)


def test_a_graph_that_differs_from_pytorch_is_refused_and_nothing_is_written(tiny_bert_nodrop, tmp_path):
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    # float rounding alone keeps some cosines just below 1: demanding exactly 1 makes the check fail for real
    with pytest.raises(ValueError, match=r"differ from PyTorch.*onnx.min_cosine=1.0\); nothing was written"):
        export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig(min_cosine=1.0, check_texts=16))
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.iterdir())


def test_non_finite_weights_are_never_exported(tiny_bert_nodrop, tmp_path):
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to export .* NaN or inf"):
        export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig())
    assert not (tmp_path / "onnx").exists()


def test_output_that_is_not_an_onnx_export_is_never_replaced(exported, tmp_path):
    _, encoder, tokenizer, _ = exported
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not an embedscale ONNX export .* nothing there is replaced"):
        export_onnx(encoder, tokenizer, users, OnnxConfig())
    assert (users / "notes.txt").read_text() == "keep me"
    export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig())
    with pytest.raises(ValueError, match=r"already holds an ONNX export: set onnx.overwrite=true"):
        export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig())
    (tmp_path / "onnx" / "results.csv").write_text("mine")
    with pytest.raises(ValueError, match=r"does not list \(\['results.csv'\]\)"):
        export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig(overwrite=True))
    (tmp_path / "onnx" / "results.csv").unlink()
    export_onnx(encoder, tokenizer, tmp_path / "onnx", OnnxConfig(overwrite=True))
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_export_job_writes_beside_a_local_model_and_needs_a_path_for_a_hub_id(tiny_bert_nodrop, tmp_path):
    import shutil

    from embedscale.jobs.export import output_dir, run

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_nodrop, model)
    result = run(ExportJobConfig(model=ModelConfig(name_or_path=str(model)), onnx=OnnxConfig(check_texts=4)))
    assert result["output"] == str(model / "onnx") and (model / "onnx" / "model.onnx").is_file()
    hub = ExportJobConfig(model=ModelConfig(name_or_path="BAAI/bge-small-en-v1.5"))
    with pytest.raises(ValueError, match=r"not a local directory.*set onnx.output=DIR"):
        output_dir(hub)


def test_onnx_keys_are_checked_at_compose_time():
    with pytest.raises(ValueError, match=r"onnx.min_cosine=0.0 is out of range"):
        OnnxConfig(min_cosine=0.0)
    with pytest.raises(ValueError, match=r"onnx.opset=13 is out of range"):
        OnnxConfig(opset=13)
    assert len(check_texts(16, 40)) == 16 and len(check_texts(16, 40)[-1].split()) == 40


# -- publishing: behind hub.push=true; the dry run shows exactly what would be sent, without network ----------------


@pytest.fixture
def exported_model(tiny_bert_nodrop, tmp_path):
    from embedscale.export import export_model

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    return export_model(encoder, tokenizer, tmp_path / "run" / "model", metrics={"scifact/ndcg@10": 0.5})


def test_hub_dry_run_copies_exactly_what_would_be_uploaded(exported_model, tmp_path):
    from embedscale.config import HubConfig
    from embedscale.hub import PLAN, publish_files
    from embedscale.jobs.export import run

    cfg = ExportJobConfig(
        model=ModelConfig(name_or_path=str(exported_model)),
        onnx=OnnxConfig(check_texts=4),
        hub=HubConfig(repo_id="me/tiny-export", dry_run_dir=str(tmp_path / "dry")),
    )
    result = run(cfg)
    target = tmp_path / "dry" / "tiny-export"
    plan = json.loads((target / PLAN).read_text())
    assert result["hub"]["dry_run"] == str(target) and plan["repo_id"] == "me/tiny-export" and plan["private"]
    assert "onnx/model.onnx" in plan["files"] and "model.safetensors" in plan["files"] and "README.md" in plan["files"]
    assert plan["files"] == publish_files(exported_model)  # the model folder as it is, its onnx/ included
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() and p.name != PLAN)
    assert copied == plan["files"] and plan["bytes"] == sum((target / f).stat().st_size for f in copied)
    with pytest.raises(ValueError, match=r"exists and is not empty"):  # refused before the ONNX export starts
        run(cfg)


def test_nothing_is_uploaded_without_push_and_push_refuses_offline(exported_model, monkeypatch):
    from embedscale.config import HubConfig
    from embedscale.hub import publish

    assert publish(exported_model, HubConfig(repo_id="me/x"))["uploaded"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"hub.push=true while HF_HUB_OFFLINE is set"):
        publish(exported_model, HubConfig(repo_id="me/x", push=True))


def test_hub_refuses_a_folder_that_is_not_an_export_before_any_work(tiny_bert_nodrop, tmp_path):
    from embedscale.config import HubConfig
    from embedscale.jobs.export import run

    cfg = ExportJobConfig(
        model=ModelConfig(name_or_path=str(tiny_bert_nodrop)),
        onnx=OnnxConfig(output=str(tmp_path / "onnx")),
        hub=HubConfig(repo_id="me/x", dry_run_dir=str(tmp_path / "dry")),
    )
    with pytest.raises(ValueError, match=r"is not an embedscale export"):
        run(cfg)
    assert not (tmp_path / "onnx").exists()
    for bad, match in (
        (dict(repo_id="no-slash"), r"hub.repo_id='no-slash' must be"),
        (dict(repo_id="a/b", push=True, dry_run_dir="x"), r"choose the upload or the dry run"),
        (dict(push=True), r"without hub.repo_id"),
    ):
        with pytest.raises(ValueError, match=match):
            HubConfig(**bad)


@pytest.mark.slow  # starts the CLI
def test_export_command_line(exported_model, tmp_path):
    import subprocess
    import sys

    from helpers import clean_env

    cmd = [
        sys.executable,
        "-m",
        "embedscale.cli",
        "export",
        f"model.name_or_path={exported_model}",
        "onnx.quantize=int8",
        "onnx.check_texts=4",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {exported_model / 'onnx'}" in proc.stdout
    assert {"model.onnx", "model.int8.onnx", ONNX_META} <= {p.name for p in (exported_model / "onnx").iterdir()}
    bad = subprocess.run(
        [*cmd[:4], "model.name_or_path=BAAI/bge-small-en-v1.5"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert bad.returncode == 1 and "set onnx.output=DIR" in bad.stderr
