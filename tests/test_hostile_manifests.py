"""Hostile input, round three: a manifest edited and its own hash recomputed (anyone can) must still be refused in
one line when it disagrees with itself or with the graphs it describes, by ``verify`` as by ``run`` — never a
traceback, never an exit 0 with an empty answer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import rehash_manifest

from prumerge.artifact.manifest import Int8Record
from prumerge.errors import ArtifactError


@pytest.fixture(scope="module")
def built(artifact_factory):
    return artifact_factory("llava", "prumerge", "padded", llm_precision="fp32")


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _sizes(size: int):
    def edit(data):
        data["vision"]["inputs"][0]["shape"][2:] = [size, size]
        data["preprocess"]["image_size"] = size
        for key in ("resize_shortest_edge", "crop_height", "crop_width"):
            if data["preprocess"].get(key) is not None:
                data["preprocess"][key] = size
    return edit


def _whole_grid(size: int):
    """Every recorded size (reducer grid included) consistently changed: only the graph itself disagrees."""
    def edit(data):
        _sizes(size)(data)
        reducer = data["reducer"]
        reducer["image_size"], reducer["grid"] = size, size // reducer["patch_size"]
        reducer["num_patches"] = reducer["grid"] ** 2
    return edit


CASES = [
    ("files entry not a record", lambda d: d["files"].update({"vision.onnx": "x"}), "files must map"),
    ("no prompt format", _set("llm.prompt_format", None), "prompt_format is required"),
    ("kv dtype", _set("llm.kv_dtype", "float16"), "llm.kv_dtype"),
    ("embeds dtype", _set("llm.embeds_dtype", "float16"), "llm.embeds_dtype"),
    ("embeds name", _set("llm.io.inputs_embeds", "bogus"), "does not have"),
    ("kv heads", lambda d: d["llm"].update(num_kv_heads=d["llm"]["num_kv_heads"] + 1), "llm.num_kv_heads"),
    ("input and preprocess 448", _sizes(448), "image sizes disagree"),
    ("every size 448", _whole_grid(448), "does not describe this graph"),
    ("reducer options", _set("reducer.options", "bogus"), "options must map"),
    ("node stages", _set("vision.node_stages", {"reducer": 5}), "node_stages must map"),
    ("grid a word", _set("reducer.grid", "sixteen"), "reducer.grid must be an integer"),
    ("negative patches", _set("reducer.num_patches", -5), "reducer.num_patches must be an integer"),
    ("grid not the patches", _set("reducer.num_patches", 63), "is inconsistent"),
]


@pytest.mark.parametrize("name, edit, message", CASES, ids=[c[0] for c in CASES])
def test_a_rehashed_manifest_that_disagrees_is_one_line_in_verify_and_run(built, tmp_path, name, edit, message):
    from prumerge.cli import main
    from prumerge.samples import synthetic_images

    art = tmp_path / "art"
    shutil.copytree(built, art)
    rehash_manifest(art, edit)
    synthetic_images(1)[0].save(tmp_path / "photo.png")
    for args in (["verify", str(art), "--no-reference"],
                 ["run", str(art), "--image", str(tmp_path / "photo.png"), "--prompt", "<image> What?",
                  "--max-new-tokens", "2"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0, (name, args[0], result.output)
        assert message in result.output and "Traceback" not in result.output, (name, args[0], result.output)


def test_verify_checks_the_decoder_and_says_so(built):
    from prumerge.export.verify import verify_artifact

    report = verify_artifact(built, images=1, reference=False)
    assert report["llm"].startswith("ok:") and "finite logits" in report["llm"]


def test_non_finite_logits_are_refused_not_decoded_into_an_empty_answer():
    import onnxruntime as ort

    from prumerge.runtime.llm import _rows

    for bad in (np.nan, np.inf):
        logits = np.zeros((1, 2, 8), dtype=np.float32)
        logits[0, -1, 3] = bad
        with pytest.raises(ArtifactError, match="non-finite logits"):
            _rows(ort.OrtValue.ortvalue_from_numpy(logits), all_logits=False)
    assert _rows(ort.OrtValue.ortvalue_from_numpy(np.ones((1, 2, 8), dtype=np.float32)), False).shape == (8,)


def test_int8_float_parts_must_be_measured_tower_parts():
    record = dict(format="QDQ", calibration_method="minmax", calibration_images=4, quantized_ops=["MatMul"],
                  float_nodes=0, per_channel=True, target="cpu", activations="uint8", float_layers=0, seconds=1.0,
                  agreement=dict(images=4, mean_jaccard=0.9, min_jaccard=0.8, mean_count_diff=0.0,
                                 identical_selection=0.5, mean_cosine=0.99),
                  sensitivity=[["embeddings", 0.9], ["layer 0", 0.8], ["layer 1", 0.7]])
    assert Int8Record.from_dict({**record, "float_parts": ["layer 1"]}, "int8").float_parts == ["layer 1"]
    for parts in (["layer 999"], ["layers.1"], ["embeddings; rm -rf /"]):
        with pytest.raises(ArtifactError, match="float_parts"):
            Int8Record.from_dict({**record, "float_parts": parts}, "int8")
    for parts in (["layers.1"], ["embeddings; rm -rf /"], ["layer 00"]):  # no measurement to compare with: the form
        with pytest.raises(ArtifactError, match="float_parts"):
            Int8Record.from_dict({**record, "sensitivity": [], "float_parts": parts}, "int8")
