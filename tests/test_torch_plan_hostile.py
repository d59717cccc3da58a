"""Hostile and broken plans for ``spa.torch.apply_plan``, each built by code from one real plan.

Every case asserts the promise of ``apply_plan``: a ``PlanFileError`` (a ``SpaError``) of one
line naming the tensor, layer or field and what is wrong, and the module exactly as it was
(its state_dict and its size attributes). The real plan applies (``test_the_plan_applies``),
so each refusal is the edit's doing.
"""

import copy
import json
import os
import struct
import threading
import time
import tracemalloc
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (test extras)")

import spa  # noqa: E402
import spa.torch  # noqa: E402
from spa.errors import PlanFileError  # noqa: E402

MB = 1 << 20


# conv1 -> bn1 -> conv2 -> fc: a conv whose channels its BatchNorm and the next conv share
from test_torch_plan import SmallNet as Net  # noqa: E402


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _sequential():
    """Net's layers (the same tensors and names) as an nn.Sequential: the module itself says
    that each layer reads the one before it."""
    net = _net()
    return torch.nn.Sequential(OrderedDict(
        conv1=net.conv1, bn1=net.bn1, relu1=torch.nn.ReLU(), conv2=net.conv2, relu2=torch.nn.ReLU(),
        pool=torch.nn.AdaptiveAvgPool2d(1), flat=torch.nn.Flatten(), fc=net.fc)).eval()


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """(document, arrays) of an OBSPA plan for Net: slices and value changes."""
    folder = tmp_path_factory.mktemp("plan")
    src = folder / "net.onnx"
    torch.onnx.export(_net(), (torch.randn(2, 3, 16, 16),), str(src), dynamo=True, external_data=False,
                      optimize=False, input_names=["x"], output_names=["y"])
    spa.prune(src, ratio=0.5, criterion="obspa", calib_samples=8, round_to=1).save_plan(folder / "plan.json")
    doc = json.loads((folder / "plan.json").read_text())
    with np.load(folder / "plan.json.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert doc["tensors"]["conv2.weight"].get("delta") and doc["ties"]
    return doc, arrays


def _write(folder, doc, arrays) -> str:
    if arrays is not None:
        np.savez(folder / "plan.json.npz", **arrays)
    (folder / "plan.json").write_text(json.dumps(doc))
    return str(folder / "plan.json")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, repr(model)


def refused(tmp_path, doc, arrays, *words, model=None, as_dict=False, **kw) -> str:
    """Apply the plan; assert a one-line PlanFileError holding ``words`` and the module as it was."""
    model = model or _net()
    before, shape = _state(model)
    where = doc if as_dict else _write(tmp_path, doc, arrays)
    with pytest.raises(PlanFileError) as e:
        spa.torch.apply_plan(model, where, **kw)
    message = str(e.value)
    assert isinstance(e.value, spa.SpaError) and "\n" not in message and len(message) < 400, message
    for w in words:
        assert w in message, (w, message)
    after, shape_after = _state(model)
    assert shape_after == shape and before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    return message


def _edit(plan):
    doc, arrays = plan
    return copy.deepcopy(doc), dict(arrays)


def _without_arrays(doc) -> dict:
    """The plan as a dict that needs no .npz (whose path would be relative to the cwd)."""
    doc["arrays"], doc["added"] = None, {}
    for entry in doc["tensors"].values():
        entry.pop("delta", None)
    return doc


def test_the_plan_applies(tmp_path, plan):
    model = _net()
    spa.torch.apply_plan(model, _write(tmp_path, *plan))
    assert model.conv1.out_channels == model.bn1.num_features == model.conv2.in_channels < 16
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("kept,what", [
    ([3, 16], "out of range"),
    ([-1, 3], "negative"),
    ([3, 3, 4], "duplicated"),
    ([4, 3], "out of order"),
    ([3.0, 4], "not an integer"),
    ([True, 4], "not an integer"),
    (["3", 4], "not an integer"),
    ([[3], 4], "not an integer"),
    ([], "keeps no index"),
    (list(range(17)), "17 indices into an axis of 16"),
    ("0,1,2", "expected a list"),
])
def test_bad_kept_indices(tmp_path, plan, kept, what):
    """With nothing else to give the edit away (a new_shape to match; the ties, checked after
    the tensors, deleted)."""
    doc, arrays = _edit(plan)
    del doc["ties"]
    doc["tensors"]["conv1.weight"]["kept"]["0"] = kept
    doc["tensors"]["conv1.weight"]["new_shape"][0] = len(kept)
    refused(tmp_path, doc, arrays, "'conv1.weight'", "kept axis 0", what)


def test_kept_axis_not_an_axis(tmp_path, plan):
    doc, arrays = _edit(plan)
    doc["tensors"]["conv1.weight"]["kept"]["4"] = [0]
    refused(tmp_path, doc, arrays, "'conv1.weight'", "not an axis of a 4-D tensor")


@pytest.mark.parametrize("tensor,axis", [("bn1.weight", "0"),      # a conv's BatchNorm
                                         ("conv2.weight", "1")])   # the next layer's inputs
def test_kept_lists_of_layers_cut_together_disagree(tmp_path, plan, tensor, axis):
    doc, arrays = _edit(plan)
    kept = doc["tensors"][tensor]["kept"][axis]
    doc["tensors"][tensor]["kept"][axis] = sorted(set(range(16)) - set(kept))[:len(kept)]
    refused(tmp_path, doc, arrays, f"'{tensor}' axis {int(axis)}", "cut together", "different indices")


def _retied(doc) -> dict:
    """The ties written again to fit the edited kept lists, as a careful edit would: then
    only the module can tell the plan does not fit it."""
    by_kept: dict = {}
    for name, entry in doc["tensors"].items():
        for axis, kept in entry["kept"].items():
            by_kept.setdefault((entry["shape"][int(axis)], tuple(kept)), []).append([name, int(axis)])
    doc["ties"] = list(by_kept.values())
    return doc


def test_a_layers_own_tensors_disagree_without_ties_to_tell(tmp_path, plan):
    """Ties rewritten to fit the edit: the tensors of one layer must still keep the same channels."""
    doc, arrays = _edit(plan)
    kept = doc["tensors"]["bn1.running_var"]["kept"]["0"]
    doc["tensors"]["bn1.running_var"]["kept"]["0"] = sorted(set(range(16)) - set(kept))[:len(kept)]
    refused(tmp_path, _retied(doc), arrays, "bn1:", "other output channels", "running_var")


def test_a_layers_tensors_disagree_in_width(tmp_path, plan):
    doc, arrays = _edit(plan)
    entry = doc["tensors"]["bn1.running_mean"]
    entry["kept"]["0"] = entry["kept"]["0"][:-1]
    entry["new_shape"] = [len(entry["kept"]["0"])]
    refused(tmp_path, _retied(doc), arrays, "bn1:")


def test_new_shape_disagrees_with_kept(tmp_path, plan):
    doc, arrays = _edit(plan)
    doc["tensors"]["conv1.weight"]["new_shape"] = [9, 3, 3, 3]
    refused(tmp_path, doc, arrays, "'conv1.weight'", "new_shape", "kept slice")


@pytest.mark.parametrize("change,what", [
    (lambda d: d[:, :, :, :2], "has shape"),
    (lambda d: d.reshape(-1), "has shape"),
    (lambda d: np.where(np.arange(d.size).reshape(d.shape) == 5, np.nan, d).astype(d.dtype), "NaN or infinite"),
    (lambda d: np.full_like(d, np.inf), "NaN or infinite"),
    (lambda d: d.astype(np.complex64), "not numbers"),
    (lambda d: np.array(["x"] * d.size).reshape(d.shape), "not numbers"),
])
def test_bad_delta(tmp_path, plan, change, what):
    doc, arrays = _edit(plan)
    key = doc["tensors"]["conv2.weight"]["delta"]
    arrays[key] = change(arrays[key])
    refused(tmp_path, doc, arrays, "'conv2.weight'", "delta", what)


def test_delta_the_npz_does_not_hold(tmp_path, plan):
    doc, arrays = _edit(plan)
    del arrays[doc["tensors"]["conv2.weight"]["delta"]]
    refused(tmp_path, doc, arrays, "'conv2.weight'", "does not hold")


def _conv_node(doc, **attributes):
    doc["nodes"]["node_conv2"] = {"op": "Conv", "attributes": attributes, "weights": ["conv2.weight", "conv2.bias"]}


@pytest.mark.parametrize("group,what", [(0, "not a positive integer"), (-2, "not a positive integer"),
                                        (2.0, "not a positive integer"), (True, "not a positive integer"),
                                        ("2", "not a positive integer"),
                                        (5, "output channels do not split into 5 groups"),
                                        # divides conv2's new outputs, but not what conv1 now gives it
                                        (2, "never adds groups")])
def test_bad_group_count(tmp_path, plan, group, what):
    doc, arrays = _edit(plan)
    _conv_node(doc, group=group)
    refused(tmp_path, doc, arrays, "conv2", what)


def test_a_fitting_group_count_applies(tmp_path, plan):
    doc, arrays = _edit(plan)
    _conv_node(doc, group=1)
    model = _net()
    spa.torch.apply_plan(model, _write(tmp_path, doc, arrays))
    assert model.conv2.groups == 1


def _added_bias(doc, arrays, value):
    """A bias OBSPA adds to conv1 (bias-free)."""
    doc["nodes"]["node_conv1"] = {"op": "Conv", "attributes": {}, "weights": ["conv1.weight"]}
    doc["added"]["conv1_bias"] = {"shape": list(value.shape), "value": "added/conv1_bias",
                                  "readers": [["node_conv1", 2]]}
    arrays["added/conv1_bias"] = value


def test_added_bias_of_the_wrong_shape(tmp_path, plan):
    doc, arrays = _edit(plan)
    width = len(doc["tensors"]["conv1.weight"]["kept"]["0"])
    _added_bias(doc, arrays, np.ones(width + 1, np.float32))
    refused(tmp_path, doc, arrays, "conv1:", "bias", f"[{width + 1}]", f"[{width}]")
    doc, arrays = _edit(plan)
    _added_bias(doc, arrays, np.ones((width, 1), np.float32))
    refused(tmp_path, doc, arrays, "'conv1_bias'", "not one bias")
    doc, arrays = _edit(plan)                # as declared, or not at all
    _added_bias(doc, arrays, np.ones(width, np.float32))
    doc["added"]["conv1_bias"]["shape"] = [width - 1]
    refused(tmp_path, doc, arrays, "'conv1_bias'", f"has shape [{width}], its declared shape is [{width - 1}]")


def test_added_bias_that_fits_applies(tmp_path, plan):
    doc, arrays = _edit(plan)
    _added_bias(doc, arrays, np.ones(len(doc["tensors"]["conv1.weight"]["kept"]["0"]), np.float32))
    model = _net()
    spa.torch.apply_plan(model, _write(tmp_path, doc, arrays))
    assert model.conv1.bias is not None and model.conv1.bias.shape == (model.conv1.out_channels,)


def test_unknown_module_path(tmp_path, plan):
    doc, arrays = _edit(plan)
    doc["tensors"]["features.0.weight"] = doc["tensors"].pop("conv1.weight")
    doc["tensors"]["features.0.weight"]["fingerprint"] = [1.0, 1.0, 1.0]     # nor by its values
    doc["ties"] = [[["features.0.weight" if m[0] == "conv1.weight" else m[0], m[1]] for m in t] for t in doc["ties"]]
    refused(tmp_path, doc, arrays, "no counterpart", "'features.0.weight'")


def test_tensor_of_another_shape(tmp_path, plan):
    doc, arrays = _edit(plan)
    doc["tensors"]["conv1.weight"]["shape"] = [17, 3, 3, 3]
    refused(tmp_path, doc, arrays, "no counterpart",
            "'conv1.weight' (the plan's is [17, 3, 3, 3], the module's [16, 3, 3, 3])")


def _set(doc, path, value):
    *parents, last = path
    for p in parents:
        doc = doc[p]
    doc[last] = value


@pytest.mark.parametrize("path,value,words", [
    (("tensors",), [], ["the plan's tensors", "expected a dict"]),
    (("tensors", "conv1.weight"), "x", ["'conv1.weight'", "expected a dict"]),
    (("tensors", "conv1.weight", "shape"), "16,3,3,3", ["'conv1.weight', shape"]),
    (("tensors", "conv1.weight", "shape"), [16, 3, 3, -3], ["'conv1.weight', shape", "non-negative"]),
    (("tensors", "conv1.weight", "kept"), [[0, 1]], ["'conv1.weight', kept", "expected a dict"]),
    (("tensors", "conv1.weight", "fingerprint"), "x", ["'conv1.weight'", "fingerprint"]),
    (("tensors", "conv1.weight", "fingerprint"), [float("inf"), 1.0, 2.0], ["'conv1.weight'", "fingerprint"]),
    (("tensors", "conv1.weight", "fingerprint"), [10 ** 400, 1, 2], ["'conv1.weight'", "fingerprint"]),
    (("tensors", "conv2.weight", "delta"), 5, ["'conv2.weight', delta", "names array 5"]),
    (("tensors", "conv1.weight", "copy_of"), ["x"], ["'conv1.weight', copy_of"]),
    (("tensors", "conv1.weight", "readers"), "n", ["'conv1.weight', readers", "expected a list"]),
    (("tensors", "conv1.weight", "readers"), [["n", -1]], ["'conv1.weight'", "not a [node, input index] pair"]),
    (("added",), None, ["the plan's added tensors"]),
    (("nodes",), 3, ["the plan's nodes"]),
    (("nodes", "n"), {"op": "Conv", "attributes": []}, ["plan node 'n', attributes"]),
    (("nodes", "n"), {"op": "Conv", "weights": "conv2.weight"}, ["plan node 'n', weights"]),
    (("nodes", "n"), {"op": "Conv", "weights": [3]}, ["plan node 'n'", "not all tensor names"]),
    (("nodes", "n"), {"attributes": {}}, ["plan node 'n', op"]),
    (("groups",), {}, ["the plan's groups"]),
    (("groups", 0, 0, "removed"), "x", ["groups of pass 0", "removed"]),
    (("groups", 0, 0, "removed"), [99], ["groups of pass 0", "outside its"]),
    (("groups", 0, 0, "kind"), None, ["groups of pass 0", "kind"]),
    (("ties",), "x", ["the plan's ties"]),
    (("ties", 0, 0), "bn1.weight", ["not a [tensor, axis] pair"]),
    (("ties", 0, 0), ["nope", 0], ["'nope' axis 0", "does not slice"]),
    (("version",), True, ["version True is not supported"]),
    (("version",), "1", ["version '1' is not supported"]),
    (("format",), ["spa-plan"], ["not an spa plan file"]),
    (("arrays",), 5, ["names its arrays"]),
    (("arrays",), "../plan.json.npz", ["names its arrays outside its folder"]),
])
def test_wrong_json_types(tmp_path, plan, path, value, words):
    doc, arrays = _edit(plan)
    _set(doc, path, value)
    refused(tmp_path, doc, arrays, *words)


def test_not_a_dict(tmp_path, plan):
    (tmp_path / "plan.json").write_text("[1, 2]")
    model = _net()
    before, shape = _state(model)
    with pytest.raises(PlanFileError, match="not an spa plan file"):
        spa.torch.apply_plan(model, tmp_path / "plan.json")
    with pytest.raises(PlanFileError, match="expected a plan file path or dict"):
        spa.torch.apply_plan(model, 5)
    assert _state(model)[1] == shape


def test_deeply_nested_json(tmp_path, plan):
    """Nesting past the recursion limit: json's RecursionError, as a plan file error."""
    depth = 200_000
    (tmp_path / "plan.json").write_text('{"format": "spa-plan", "version": 1, "tensors": {"conv1.weight": '
                                        '{"shape": [16, 3, 3, 3], "kept": {"0": ' + "[" * depth + "]" * depth
                                        + "}}}}")
    model = _net()
    before, shape = _state(model)
    with pytest.raises(PlanFileError, match="not a readable plan file") as e:
        spa.torch.apply_plan(model, tmp_path / "plan.json")
    assert "\n" not in str(e.value) and _state(model)[1] == shape
    # the same as a dict: nothing walks it recursively
    doc = _without_arrays(_edit(plan)[0])
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    doc["tensors"]["conv1.weight"]["kept"]["0"] = [nested]
    refused(tmp_path, doc, None, "'conv1.weight'", "a list of 1 is not an integer", as_dict=True)


def _peak(fn):
    """(seconds, tracemalloc peak in bytes) of fn(), which must raise PlanFileError."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PlanFileError) as e:
            fn()
        return time.perf_counter() - start, tracemalloc.get_traced_memory()[1], str(e.value)
    finally:
        tracemalloc.stop()


def test_ten_million_indices(tmp_path, plan):
    """A plan listing 10 million indices is refused by its size, in time and memory that
    follow the module's: before the JSON is parsed (file) or any list element read (dict)."""
    doc, arrays = _edit(plan)
    doc["tensors"]["conv1.weight"]["kept"]["0"] = "HUGE"
    head, tail = json.dumps(doc).split('"HUGE"')
    path = tmp_path / "plan.json"
    with open(path, "w") as f:          # written in pieces: the test itself stays small too
        f.write(head + "[0")
        for start in range(1, 10_000_000, 1_000_000):
            f.write("".join(f",{i}" for i in range(start, min(start + 1_000_000, 10_000_000))))
        f.write("]" + tail)
    np.savez(tmp_path / "plan.json.npz", **arrays)
    assert path.stat().st_size > 70 * MB
    model = _net()
    before, shape = _state(model)
    seconds, peak, message = _peak(lambda: spa.torch.apply_plan(model, path))
    assert "larger than a plan for this model can be" in message and "\n" not in message
    assert seconds < 2 and peak < 50 * MB, (seconds, peak)
    doc = _without_arrays(doc)
    doc["tensors"]["conv1.weight"]["kept"]["0"] = [0] * 10_000_000
    seconds, peak, message = _peak(lambda: spa.torch.apply_plan(model, doc))
    assert "the plan lists 10000" in message and "at most" in message
    assert seconds < 2 and peak < 10 * MB, (seconds, peak)
    after, shape_after = _state(model)
    assert shape_after == shape and all(torch.equal(before[k], after[k]) for k in before)


def test_npz_that_declares_a_huge_array(tmp_path, plan):
    """An .npy header is read before its array: a few bytes declaring 8 GB are refused unread."""
    _write(tmp_path, *_edit(plan))
    with zipfile.ZipFile(tmp_path / "plan.json.npz", "a") as z, z.open("huge.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 9,)})
    seconds, peak, message = _peak(lambda: spa.torch.apply_plan(_net(), tmp_path / "plan.json"))
    assert "bytes of arrays" in message and seconds < 2 and peak < 10 * MB, (seconds, peak, message)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"not a zip"])
def test_damaged_npz(tmp_path, plan, content):
    doc, arrays = _edit(plan)
    _write(tmp_path, doc, arrays)
    (tmp_path / "plan.json.npz").write_bytes(content)
    refused(tmp_path, doc, None, "cannot read the plan's arrays")


def _flip_inputs_of_conv2(doc):
    """conv2 reads other channels than conv1 keeps (as many): the module runs, silently wrong."""
    entry = doc["tensors"]["conv2.weight"]
    entry["kept"]["1"] = sorted(set(range(16)) - set(entry["kept"]["1"]))[:len(entry["kept"]["1"])]
    entry.pop("delta")


def _drop_from_ties(doc, name, axis):
    doc["ties"] = [[m for m in tie if m != [name, axis]] for tie in doc["ties"]]


@pytest.mark.parametrize("edit,words", [
    (lambda doc: doc.pop("ties"), ["has no ties", "write the plan again with this spa"]),
    (lambda doc: doc.update(ties=[]), ["'bn1.weight' axis 0", "in none of the plan's ties"]),
    (lambda doc: _drop_from_ties(doc, "conv2.weight", 1), ["'conv2.weight' axis 1", "in none of the plan's ties"]),
])
def test_ties_dropped_with_an_edit(tmp_path, plan, edit, words):
    """The ties tell an edited kept list from a real one only if an edit cannot drop them:
    every sliced axis is in one, and a plan without ties is refused."""
    doc, arrays = _edit(plan)
    _flip_inputs_of_conv2(doc)
    edit(doc)
    refused(tmp_path, doc, arrays, *words)


def test_next_layers_slicing_dropped(tmp_path, plan):
    """conv2 left reading all 16 channels conv1 no longer gives: its tie goes with it (the
    plan's ties tell), or the ties are written again to fit (an nn.Sequential tells)."""
    doc, arrays = _edit(plan)
    entry = doc["tensors"]["conv2.weight"]
    del entry["kept"]["1"], entry["delta"]
    entry["new_shape"][1] = 16
    whole = copy.deepcopy(doc)
    whole["ties"] = [t for t in doc["ties"] if ["conv2.weight", 1] not in t]
    refused(tmp_path, whole, arrays, "'bn1.weight' axis 0", "in none of the plan's ties")
    refused(tmp_path, _retied(doc), arrays, "conv2: it would read 16 channels", "bn1 before it would give",
            model=_sequential())


def test_the_plan_applies_to_a_sequential(tmp_path, plan):
    """The widths of a chain checked: a real plan still applies (fc after Flatten not judged)."""
    model = _sequential()
    spa.torch.apply_plan(model, _write(tmp_path, *plan))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    assert model.conv1.out_channels == model.conv2.in_channels < 16


@pytest.mark.parametrize("tensor,value", [
    ("conv2.weight", lambda d: np.full(d.shape, 1e300)),                       # finite as float64 only
    ("conv2.weight", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 7, 3.5e38, d.astype(np.float64))),
    ("conv1_bias", None),
])
def test_values_past_the_modules_dtype(tmp_path, plan, tensor, value):
    """A change is finite in its own dtype, but is applied in the module's: there it must be
    finite too, not inf."""
    doc, arrays = _edit(plan)
    if value is None:
        _added_bias(doc, arrays, np.full(len(doc["tensors"]["conv1.weight"]["kept"]["0"]), 1e300))
    else:
        key = doc["tensors"][tensor]["delta"]
        arrays[key] = value(arrays[key])
    refused(tmp_path, doc, arrays, f"'{tensor}'", "past what the module's torch.float32 holds")


def _refused_at_once(fn, fifo):
    """fn() raises PlanFileError without blocking on ``fifo``; a blocked reader is let go by
    opening the FIFO's other end, so a failing test still ends."""
    box = {}

    def call():
        try:
            fn()
        except Exception as e:       # noqa: BLE001 (reported below)
            box["error"] = e
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))       # the reader gets end of file
        t.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    assert isinstance(box.get("error"), PlanFileError), box
    return str(box["error"])


@pytest.mark.parametrize("which", ["plan.json", "plan.json.npz"])
def test_a_fifo_is_refused_without_blocking(tmp_path, plan, which):
    path = _write(tmp_path, *_edit(plan))
    os.unlink(tmp_path / which)
    os.mkfifo(tmp_path / which)
    model = _net()
    before, shape = _state(model)
    message = _refused_at_once(lambda: spa.torch.apply_plan(model, path), tmp_path / which)
    assert "not a regular file (a FIFO)" in message and "\n" not in message
    assert _state(model)[1] == shape


def _header_bomb(path, declared=32 * MB):
    """An .npz member whose (version 2) .npy header declares ``declared`` bytes, and holds
    them: spaces, a few kilobytes deflated."""
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, z.open("bomb.npy", "w", force_zip64=True) as f:
        f.write(np.lib.format.MAGIC_PREFIX + bytes([2, 0]) + struct.pack("<I", declared))
        for _ in range(declared // MB):
            f.write(b" " * MB)


def test_npy_header_too_long_is_refused_unread(tmp_path, plan):
    """numpy reads a whole .npy header before its own size check: spa reads its length
    first, for the plan's arrays and for --calib/--eval data alike."""
    from spa.loading.data_files import read_npz
    _write(tmp_path, *_edit(plan))
    _header_bomb(tmp_path / "plan.json.npz")
    seconds, peak, message = _peak(lambda: spa.torch.apply_plan(_net(), tmp_path / "plan.json"))
    assert "'bomb.npy'" in message and "header declares" in message and peak < 8 * MB, (peak, message)
    np.savez(tmp_path / "calib.npz", x=np.zeros(3, np.float32))
    _header_bomb(tmp_path / "calib.npz")
    tracemalloc.start()
    try:
        with pytest.raises(spa.SpaError, match="'bomb'.*header declares"):
            read_npz(tmp_path / "calib.npz", "--calib file", ["x", "bomb"], 1 << 30)
        assert tracemalloc.get_traced_memory()[1] < 8 * MB
    finally:
        tracemalloc.stop()
