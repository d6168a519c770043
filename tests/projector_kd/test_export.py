"""Format-neutral parts of the export: the model card, the staged output folder, reading .safetensors weights."""

import re

import pytest
import safetensors.torch
import torch
import yaml

from projector_kd.engine.checkpoint import CheckpointError
from projector_kd.engine.errors import UserError
from projector_kd.engine.export import (
    CITATION,
    EvalTransform,
    ModelCard,
    load_weights_file,
    render_model_card,
    staged_output_dir,
)


def _card(**overrides) -> ModelCard:
    fields = dict(
        title="deit_conv_tiny (projector KD)",
        architecture="deit_conv_tiny",
        description="A student.",
        transform=EvalTransform(),
        source="ckpt_epoch_299.pth",
        teacher="timm `regnety_160`",
        metrics={"val top-1 (%)": 77.2, "val top-5 (%)": 93.7},
        recipe={"epochs": 300, "method": "projector"},
        params=6_630_000,
    )
    return ModelCard(**{**fields, **overrides})


def test_model_card_is_markdown_with_hub_metadata_metrics_recipe_and_citation():
    text = render_model_card(_card())
    front, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S).groups()
    assert yaml.safe_load(front) == {
        "license": "mit",
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "knowledge-distillation"],
    }
    headings = re.findall(r"^(#+) (.+)$", re.sub(r"```.*?```", "", body, flags=re.S), flags=re.M)
    assert headings == [
        ("#", "deit_conv_tiny (projector KD)"),
        ("##", "Model details"),
        ("##", "Results"),
        ("##", "Training recipe"),
        ("##", "Usage"),
        ("##", "License"),
        ("##", "Citation"),
    ]
    assert "| metric | value |\n| --- | --- |\n| val top-1 (%) | 77.20 |\n| val top-5 (%) | 93.70 |\n" in body
    assert "- **epochs:** 300\n- **method:** projector\n" in body
    assert "- **Parameters:** 6.63M" in body and "- **Teacher:** timm `regnety_160`" in body
    assert (
        "- **Evaluation transform:** resize to 256 (bilinear), center crop 224, mean [0.485, 0.456, 0.406], "
        "std [0.229, 0.224, 0.225]"
    ) in body
    assert f"```bibtex\n{CITATION}\n```" in body and "Miles, Roy and Mikolajczyk, Krystian" in CITATION
    assert "import deit" in body and body.count("```") == 4  # two closed code blocks
    assert "import deit" not in render_model_card(_card(architecture="resnet18", metrics={}, recipe={}))
    assert "## Results" not in render_model_card(_card(metrics={}))


def test_staged_output_dir_replaces_only_when_asked_and_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out, force=False, source=tmp_path / "src.pth") as staging:
        (staging / "a.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(UserError, match=f"output folder {out} is not empty; choose a new folder or pass --force"):
        with staged_output_dir(out, force=False, source=tmp_path / "src.pth"):
            pass
    with pytest.raises(RuntimeError):
        with staged_output_dir(out, force=True, source=tmp_path / "src.pth") as staging:
            (staging / "b.txt").write_text("second")
            raise RuntimeError("export failed")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    with staged_output_dir(out, force=True, source=tmp_path / "src.pth") as staging:
        (staging / "b.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    with pytest.raises(UserError, match=f"output folder {out} holds the source"):
        with staged_output_dir(out, force=True, source=out / "b.txt"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with staged_output_dir(tmp_path / "file", force=True, source=tmp_path / "src.pth"):
            pass


def test_load_weights_file_reads_tensors_and_names_bad_files(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    for path in (tmp_path, tmp_path / "model.safetensors"):
        loaded = load_weights_file(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert torch.equal(
        load_weights_file(tmp_path, preferred=("other.safetensors", "model.safetensors"))["w"], torch.zeros(1)
    )
    with pytest.raises(CheckpointError, match="weights file not found: .*missing.safetensors"):
        load_weights_file(tmp_path / "missing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="garbage.safetensors is truncated or corrupt"):
        load_weights_file(tmp_path / "garbage.safetensors")
