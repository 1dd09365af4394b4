"""The caller's files are safe: save/export never replace what graphprune did not write, never
leave a half-written file, and a corrupt or edited file fails with a LoadError naming it."""
from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile

import pytest
from conftest import analysed

import graphprune
from graphprune import export, io
from graphprune.api import CompiledModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


@pytest.fixture(scope="module")
def hf_compiled():
    model, traced, _ = analysed("llama_gqa")  # a transformers model: the folder gets model.safetensors too
    return graphprune.compile(model, 0.3, example_kwargs=traced.example_kwargs, progress=False)


@pytest.fixture(scope="module")
def plain_compiled():
    model, traced, _ = analysed("tiny_mlp_lm")
    return graphprune.compile(model, 0.3, example_kwargs=traced.example_kwargs, progress=False)


@pytest.fixture(scope="module")
def saved(hf_compiled, tmp_path_factory):
    return hf_compiled.save(tmp_path_factory.mktemp("saved") / "m", hf=True, plot=False)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def contents(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def no_export(*args, **kwargs):
    raise AssertionError("the target should have been refused before any work")


# ---------------------------------------------------------------- 1. save replaces only its own folders
def test_save_refuses_a_file_or_a_folder_of_user_files_before_any_work(plain_compiled, tmp_path, monkeypatch):
    monkeypatch.setattr(CompiledModel, "export_program", no_export)
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(graphprune.GraphpruneError, match="notes.txt exists and is a file, not a folder saved by graphprune"):
        plain_compiled.save(user_file)
    source = tmp_path / "src"  # e.g. `graphprune compile SRC --out SRC`
    source.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        (source / name).write_text(name)
    with pytest.raises(graphprune.GraphpruneError,
                       match=r"src exists and is not a folder saved by graphprune \(it has config.json, model.safetensors, "
                             r"tokenizer.json, \.\.\.\): choose another folder or remove it"):
        plain_compiled.save(source)
    assert user_file.read_text() == "mine" and contents(source) == {n: n.encode() for n in contents(source)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"], "nothing else written"


def test_save_replaces_an_empty_folder_and_its_own_save(plain_compiled, tmp_path):
    (tmp_path / "m").mkdir()
    folder = plain_compiled.save(tmp_path / "m", plot=False)
    assert (folder / "graphprune.json").is_file()
    (folder / "model.onnx").write_text("an export next to the save")  # the CLI's --onnx puts one there
    plain_compiled.save(folder, plot=False)
    assert not (folder / "model.onnx").exists() and graphprune.load(folder).plan.fingerprint == plain_compiled.plan.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary folders left behind"


# ---------------------------------------------------------------- 2. ONNX export to a folder, rolled-back moves
def test_export_onnx_to_a_folder_fails_up_front(plain_compiled, tmp_path, monkeypatch):
    monkeypatch.setattr(CompiledModel, "export_program", no_export)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(graphprune.ExportError, match="out is a folder: give the ONNX file to write"):
        plain_compiled.export_onnx(target, external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(target.iterdir())


def test_a_failed_final_rename_leaves_the_earlier_export_as_it_was(plain_compiled, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    plain_compiled.export_onnx(target, external_data=True)
    (tmp_path / "m.onnx.data").write_bytes(b"the earlier weights")  # to tell it from the new export's
    before = contents(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(target):
            raise PermissionError(13, "Permission denied", os.fspath(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(graphprune.ExportError, match="cannot write .*m.onnx: Permission denied") as info:
        plain_compiled.export_onnx(target, external_data=True)
    assert isinstance(info.value.__cause__, PermissionError)
    assert contents(tmp_path) == before, "the earlier model and weights must stay, and no temporary folder"
    target.unlink()
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(graphprune.ExportError, match="cannot write"):
        plain_compiled.export_onnx(target, external_data=True)
    assert not any(tmp_path.iterdir()), "no stray m.onnx.data when the model could not be moved into place"


# ---------------------------------------------------------------- 3. same-size corruption
def weight_byte(path) -> int:
    """The offset of a byte of weights (not of the headers or the program text, whose damage shows)."""
    if path.suffix == ".safetensors":
        return path.stat().st_size - 8  # the header is at the start
    with zipfile.ZipFile(path) as pt2:  # a .pt2 is a zip: weights are stored members
        info = next(i for i in pt2.infolist() if "/weights/" in i.filename and i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


@pytest.mark.parametrize("name", ["model.pt2", "model.safetensors"])
def test_same_size_corruption_is_detected(saved, tmp_path, name):
    broken = copy_of(saved, tmp_path)
    data = bytearray((broken / name).read_bytes())
    data[weight_byte(broken / name)] ^= 0x55  # one weight changes; the size does not
    (broken / name).write_bytes(bytes(data))
    message = rf"{name} is corrupt or was changed after saving \(SHA-256 differs from graphprune.json\)"
    if name == "model.pt2":
        with pytest.raises(graphprune.LoadError, match=message):
            graphprune.load(broken)
    else:  # load reads the graph only (and does not hash a file it does not read); the checkpoint's readers check it
        loaded = graphprune.load(broken)
        with pytest.raises(graphprune.LoadError, match=message):
            loaded.to_hf()
        with pytest.raises(graphprune.LoadError, match=message):
            graphprune.load_hf(broken)


def test_manifests_without_digests_still_load(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    manifest = json.loads((folder / "graphprune.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) == {"model.pt2", "model.safetensors"}
    del manifest["sha256"]  # as saved before digests were recorded
    (folder / "graphprune.json").write_text(json.dumps(manifest))
    loaded = graphprune.load(folder)
    assert sum(p.numel() for p in loaded.to_hf().parameters()) == loaded.plan.params_after
    graphprune.load_hf(folder)


# ---------------------------------------------------------------- 4. valid JSON of the wrong shape
def edit_json(folder, name, change) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def setting(key, value):
    def change(data):
        data[key] = value
        return data
    return change


def widths(record):
    return setting(io.WIDTHS_KEY, record)


def keep(values):
    def change(plan):
        plan["groups"][0]["keep"] = values
        return plan
    return change


WRONG_SHAPES = {
    "manifest-list": ("graphprune.json", lambda d: [], "load", r"graphprune.json is not a graphprune model manifest"),
    "manifest-version": ("graphprune.json", setting("version", "2"), "load", r"graphprune.json: 'version' must be an integer, got '2'"),
    "manifest-sizes": ("graphprune.json", setting("files", {"model.pt2": "big"}), "load", r"graphprune.json: 'files' must map names to sizes"),
    "plan-version": ("plan.json", setting("version", "2"), "load", r"plan.json: plan: 'version' must be an integer"),
    "plan-floats": ("plan.json", keep([0.5, 1.7]), "load", r"plan.json: .*invalid kept indices \(not a list of integers"),
    "plan-duplicates": ("plan.json", keep([0, 0]), "load", r"plan.json: .*invalid kept indices \(duplicates\)"),
    "plan-range": ("plan.json", keep([0, 10_000]), "load", r"plan.json: .*invalid kept indices \(out of \[0, "),
    "report-list": ("report.json", lambda d: [], "load", r"corrupt .*report.json: a list, not an object"),
    "widths-list": ("config.json", widths([1]), "load_hf", r"config.json: graphprune_widths is a list, not an object"),
    "widths-version": ("config.json", widths({"version": "2"}), "load_hf", r"graphprune_widths: 'version' must be an integer"),
    "widths-params": ("config.json", widths({"version": 2, "params": {"lm_head.weight": "big"}}), "load_hf", r"'params' must map"),
    "widths-groups": ("config.json", widths({"version": 2, "groups": [["g", "channels", 1.5]]}), "load_hf", r"'groups' must be a list"),
}


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_files_of_the_wrong_shape_raise_a_load_error_naming_them(saved, tmp_path, case):
    name, change, how, message = WRONG_SHAPES[case]
    folder = copy_of(saved, tmp_path)
    edit_json(folder, name, change)
    with pytest.raises(graphprune.LoadError, match=message):
        (graphprune.load if how == "load" else graphprune.load_hf)(folder)


def test_a_plan_of_non_integer_indices_is_not_replayed(plain_compiled):
    plan = plain_compiled.plan.to_dict()
    plan["groups"][0]["keep"] = [0.5, 1.7]
    with pytest.raises(graphprune.LoadError, match="invalid kept indices"):
        graphprune.PruningPlan.from_dict(plan)
    built = graphprune.PruningPlan.from_dict(plain_compiled.plan.to_dict())
    built.groups[0].keep = [0.5, 1.7]  # a plan made in code is checked when replayed
    model, traced, _ = analysed("tiny_mlp_lm")
    with pytest.raises(graphprune.PlanError, match="invalid kept indices"):
        graphprune.compile(model, plan=built, example_kwargs=traced.example_kwargs, progress=False)


# ---------------------------------------------------------------- 5. unwritable places, a bad tokenizer
def test_saving_or_exporting_under_a_file_is_a_clear_error(plain_compiled, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(graphprune.GraphpruneError, match="cannot write .*afile/m: .*afile is a file, not a folder") as info:
        plain_compiled.save(tmp_path / "afile" / "m")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(graphprune.ExportError, match="cannot write .*afile/sub/m.onnx: .*afile is a file, not a folder"):
        plain_compiled.export_onnx(tmp_path / "afile" / "sub" / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_a_read_only_folder_is_a_clear_error(plain_compiled, tmp_path, monkeypatch):
    # as root a chmod does not stop writes: the refusal is simulated where the folder is first written
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(CompiledModel, "export_program", no_export)
    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(graphprune.GraphpruneError, match="cannot write .*m: Permission denied") as info:
        plain_compiled.save(tmp_path / "m")
    assert isinstance(info.value.__cause__, PermissionError)
    monkeypatch.undo()
    monkeypatch.setattr(export.os, "access", lambda *args, **kwargs: False)
    monkeypatch.setattr(CompiledModel, "export_program", no_export)
    with pytest.raises(graphprune.ExportError, match="cannot write .*m.onnx: Permission denied"):
        plain_compiled.export_onnx(tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


def test_a_tokenizer_that_is_not_one_is_named(plain_compiled, tmp_path, monkeypatch):
    monkeypatch.setattr(CompiledModel, "export_program", no_export)
    with pytest.raises(graphprune.GraphpruneError, match=r"tokenizer must be a tokenizer or the path of a folder .*got object"):
        plain_compiled.save(tmp_path / "m", tokenizer=object())
    with pytest.raises(graphprune.GraphpruneError, match=r"save\(tokenizer=...\) takes a transformers tokenizer .*got a function"):
        plain_compiled.save(tmp_path / "m", tokenizer=lambda text: text)  # callable, but nothing to save
    assert not any(tmp_path.iterdir())
