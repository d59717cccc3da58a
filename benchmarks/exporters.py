"""Does spa prune ONNX files from exporters other than torch's? (the "prune anything" claim)

    python benchmarks/exporters.py [--models a,b] [--rebuild] [--cache /tmp/foreign]
    python benchmarks/exporters.py --render        # README section from the results file only

1. creates the exporter venvs if missing (models/foreign/make_envs.sh: tensorflow-cpu+tf2onnx,
   jax+flax+jax2onnx, paddlepaddle+paddle2onnx; under $SPA_VENV_DIR, default
   ~/.cache/spa-venvs), then builds the models into --cache (default /tmp/foreign; a group is
   rebuilt only when one of its files is missing, or with --rebuild):
     keras/        models/foreign/keras_cnn.py       (tf venv)      tf2onnx
     jax/          models/foreign/jax_models.py      (jax venv)     jax2onnx
     paddle/       models/foreign/paddle_cnn.py      (paddle venv)  paddle2onnx
     paddle_style/ models/foreign/paddle_style.py    (main env)     hand-written, Constant weights
     torch/        models/foreign/torch_variants.py  (main env)     torch legacy opsets 9/11/13,
                   dynamic axes, onnxruntime-optimised (basic/extended), onnxslim, onnxsim
     sklearn/      models/digits_mlp.py's train()+convert() (main env)  skl2onnx
2. prunes each model in a child process: spa.prune(ratio=0.5, criterion="l1", verify=True),
   checks the pruned model (onnx.checker full check + an onnxruntime session), runs the CLI
   (`spa prune ... --no-verify -q`) on it too, measures latency of original vs pruned
   interleaved on one thread (spa.verify.bench.latency), and the top-1 accuracy before/after for the
   models trained on real data (Keras CNN on Fashion-MNIST, sklearn MLP on digits). Models
   with symbolic spatial dims get --input-shape, and the pruned model is also run at another
   spatial size to check it stayed dynamic.
3. writes benchmarks/results/exporters.jsonl and the table between <!-- exporters:start -->
   and <!-- exporters:end --> in benchmarks/README.md (read-modify-write of that section only).

A model on which spa fails (crash, invalid output, oracle failure) is copied to
/tmp/foreign_fail/<model>.onnx.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import blocking_op, interleaved_latency  # noqa: E402
REPO = HERE.parent
FOREIGN = REPO / "models" / "foreign"
RESULTS = HERE / "results" / "exporters.jsonl"
README = HERE / "README.md"
START, END = "<!-- exporters:start -->", "<!-- exporters:end -->"
FAIL_DIR = Path("/tmp/foreign_fail")
VENV_DIR = Path(os.environ.get("SPA_VENV_DIR", Path.home() / ".cache" / "spa-venvs"))
RATIO, CRITERION = 0.5, "l1"
LATENCY_BUDGET_S = 6.0
MEASURE_TIMEOUT = 900
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}

# group -> how to build it: venv (None = this interpreter), script, files it writes
GROUPS = {
    "keras": {"venv": "tf", "script": FOREIGN / "keras_cnn.py", "timeout": 900,
              "files": ["keras_cnn.onnx", "keras_cnn_test.npz", "keras_mobilenetv2.onnx", "keras_resnet50.onnx",
                        "keras_efficientnetv2b0.onnx"]},
    "jax": {"venv": "jax", "script": FOREIGN / "jax_models.py", "timeout": 600,
            "files": ["jax_cnn.onnx", "jax_cnn_nchw.onnx", "jax_mlp.onnx"]},
    "paddle": {"venv": "paddle", "script": FOREIGN / "paddle_cnn.py", "timeout": 600,
               "files": ["paddle_cnn.onnx", "paddle_mobilenetv2.onnx"]},
    "paddle_style": {"venv": None, "script": FOREIGN / "paddle_style.py", "timeout": 120,
                     "files": ["paddle_style_cnn.onnx"]},
    "torch": {"venv": None, "script": FOREIGN / "torch_variants.py", "timeout": 300,
              "files": [f"torch_{v}.onnx" for v in ("op9", "op11", "op13", "op13_bn", "dynamic", "ort_basic",
                                                    "ort_extended", "onnxslim", "onnxsim")]},
    "sklearn": {"venv": None, "script": None, "timeout": 300, "files": ["digits_mlp.onnx", "digits_eval.npz"]},
}

# model -> (group, exporter label, what the body is, extra)
MODELS = {
    "keras_cnn": ("keras", "tf2onnx (Keras 3, NHWC)", "CNN",
                  {"eval": ("keras_cnn_test.npz", "image", "logits"), "note": "trained on Fashion-MNIST"}),
    "keras_mobilenetv2": ("keras", "tf2onnx (Keras 3, NHWC)", "CNN", {"note": "MobileNetV2 96×96"}),
    "keras_resnet50": ("keras", "tf2onnx (Keras 3, NHWC)", "CNN", {"note": "ResNet50 64×64"}),
    "keras_efficientnetv2b0": ("keras", "tf2onnx (Keras 3, NHWC)", "CNN", {"note": "EfficientNetV2B0 96×96"}),
    "jax_cnn": ("jax", "jax2onnx (Flax nnx, NHWC)", "CNN", {}),
    "jax_cnn_nchw": ("jax", "jax2onnx (Flax nnx, inputs_as_nchw)", "CNN", {}),
    "jax_mlp": ("jax", "jax2onnx (Flax nnx)", "MLP", {}),
    "paddle_cnn": ("paddle", "paddle2onnx", "CNN", {}),
    "paddle_mobilenetv2": ("paddle", "paddle2onnx", "CNN", {"note": "MobileNetV2 ×0.5, 96×96"}),
    "paddle_style_cnn": ("paddle_style", "paddle2onnx-style (hand-written, Constant-node weights)", "CNN", {}),
    "torch_op9": ("torch", "torch legacy, opset 9", "CNN", {}),
    "torch_op11": ("torch", "torch legacy, opset 11", "CNN", {}),
    "torch_op13": ("torch", "torch legacy, opset 13", "CNN", {}),
    "torch_op13_bn": ("torch", "torch legacy, opset 13, BN kept", "CNN", {}),
    "torch_dynamic": ("torch", "torch legacy, opset 13, dynamic N/H/W", "CNN",
                      {"input_shapes": {"input": (1, 3, 32, 32)}, "dyn_check": {"input": (2, 3, 48, 40)}}),
    "torch_ort_basic": ("torch", "onnxruntime optimised (basic)", "CNN", {}),
    "torch_ort_extended": ("torch", "onnxruntime optimised (extended: FusedConv/FusedGemm)", "CNN", {}),
    "torch_onnxslim": ("torch", "onnxslim (of the dynamic export)", "CNN",
                       {"input_shapes": {"input": (1, 3, 32, 32)}, "dyn_check": {"input": (2, 3, 48, 40)}}),
    "torch_onnxsim": ("torch", "onnxsim (of the BN-kept export)", "CNN", {}),
    "digits_mlp": ("sklearn", "skl2onnx (MLPClassifier 256-128, zipmap off)", "MLP",
                   {"eval": ("digits_eval.npz", "X", "probabilities"), "note": "trained on sklearn digits"}),
}


def _first_line(text: str, limit: int = 240) -> str:
    for line in str(text).strip().splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _last_error_line(stderr: str) -> str:
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    for line in reversed(lines):
        if re.match(r"^(spa: |[\w.]*(Error|Exception|Killed)\b)", line):
            return _first_line(line)
    return _first_line(lines[-1]) if lines else ""


def _run(cmd: list[str], timeout: float, env=None) -> tuple[int | None, str, str, float]:
    """Run cmd in its own session; kill that process group on timeout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env or CHILD_ENV, start_new_session=True, cwd=str(REPO))
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err, time.perf_counter() - t0


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return "?"


def _short_reason(reason: str, op: str | None = None) -> str:
    r = reason
    if op and r.startswith("node '"):
        r = op + r[len("node"):]
    r = re.sub(r"'[^']*'", "", r)
    r = re.sub(r"\([^)]*\)", "", r)
    return re.sub(r"\s+", " ", r).strip(" :,;")


def _is_io(reason: str) -> bool:
    return reason.startswith("graph input") or reason.startswith("graph output")


# ops of a classifier's output head: they act on the class axis, which the graph output pins anyway
HEAD_OPS = {"Softmax", "LogSoftmax", "ArgMax", "ArgMin", "TopK", "ArrayFeatureExtractor", "ZipMap"}


def classify_blocks(m: dict) -> tuple[list[dict], list[str]]:
    """(what blocked pruning other than the graph I/O: [{reason, kind, count}],
    head blocks counted as output: short reasons). A blocked group whose size is the last dim
    of a graph output (the class axis), and a blocked node of a classifier-head op when such a
    group exists, count as output blocks."""
    out_dims = set(m.get("output_dims") or [])
    reasons, head = collections.Counter(), []
    class_axis = False
    for bl in m.get("blocked", []):
        if _is_io(bl["reason"]):
            continue
        if bl["channels"] in out_dims:
            class_axis = True
            head.append(_short_reason(bl["reason"], bl.get("op")))
            continue
        reasons[(_short_reason(bl["reason"], bl.get("op")), "group")] += 1
    for bn in m.get("blocked_nodes", []):
        if _is_io(bn["reason"]):
            continue
        if class_axis and bn.get("op") in HEAD_OPS:
            head.append(_short_reason(bn["reason"], bn.get("op")))
            continue
        reasons[(_short_reason(bn["reason"], bn.get("op")), "node")] += 1
    return ([{"reason": r, "kind": k, "count": c} for (r, k), c in reasons.most_common()],
            list(dict.fromkeys(head)))


# ---------------------------------------------------------------------------
# building the models
# ---------------------------------------------------------------------------
def ensure_envs(groups: list[str]) -> dict:
    venvs = sorted({GROUPS[g]["venv"] for g in groups if GROUPS[g]["venv"]})
    if not venvs:
        return {}
    rc, out, err, wall = _run(["bash", str(FOREIGN / "make_envs.sh"), *venvs], 3600, env=dict(os.environ))
    print(out.strip(), file=sys.stderr)
    if rc != 0:
        print(err[-3000:], file=sys.stderr)
    return {v: (rc == 0) for v in venvs}


def venv_versions(venv: str) -> dict:
    freeze = VENV_DIR / venv / ".spa-freeze.txt"
    keep = {"tf": ("tensorflow-cpu", "tensorflow_cpu", "keras", "tf2onnx", "onnx", "numpy", "protobuf"),
            "jax": ("jax", "jaxlib", "flax", "jax2onnx", "onnx", "numpy", "protobuf"),
            "paddle": ("paddlepaddle", "paddle2onnx", "onnx", "polygraphy", "numpy", "protobuf")}[venv]
    out = {}
    if freeze.exists():
        for line in freeze.read_text().splitlines():
            if "==" in line:
                name, ver = line.split("==", 1)
                if name.lower() in keep:
                    out[name.lower()] = ver
    return out


def build_group(group: str, cache: Path, rebuild: bool) -> dict:
    spec = GROUPS[group]
    out_dir = cache / group
    log = out_dir / "export.jsonl"
    if not rebuild and all((out_dir / f).exists() for f in spec["files"]):
        return {"cached": True, "lines": _read_jsonl(log)}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if group == "sklearn":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "sklearn", str(out_dir)]
    else:
        py = str(VENV_DIR / spec["venv"] / "bin" / "python") if spec["venv"] else sys.executable
        cmd = [py, str(spec["script"]), str(out_dir)]
    env = dict(CHILD_ENV)
    env.pop("PYTHONPATH", None)
    print(f"[exporters] building {group}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc, out, err, wall = _run(cmd, spec["timeout"], env=env)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    log.write_text("\n".join(lines) + "\n")
    (out_dir / "export.stderr").write_text(err[-20000:])
    missing = [f for f in spec["files"] if not (out_dir / f).exists()]
    res = {"cached": False, "seconds": round(wall, 1), "lines": [json.loads(l) for l in lines]}
    if rc != 0 or missing:
        res["error"] = (f"timeout after {spec['timeout']} s" if rc is None else
                        f"exit {rc}: {_last_error_line(err)}") + (f"; missing {missing}" if missing else "")
    return res


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip().startswith("{")]


def child_sklearn(out_dir: str) -> int:
    """models/digits_mlp.py's training and conversion, saved into out_dir (not models/)."""
    import numpy as np
    import onnx
    sys.path.insert(0, str(REPO / "models"))
    import digits_mlp as d
    import sklearn
    import skl2onnx
    clf, sk_acc = d.train()
    onx = d.convert(clf)
    out = Path(out_dir)
    onnx.save(onx, str(out / "digits_mlp.onnx"))
    ev = d.samples("eval")
    np.savez_compressed(out / "digits_eval.npz", **ev)
    print(json.dumps({"model": "digits_mlp", "onnx": "digits_mlp.onnx", "test_acc_sklearn": sk_acc,
                      "test_acc_onnx": d.accuracy(onx, ev), "n_test": int(len(ev["label"])),
                      "scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                      "opset": 17}))
    return 0


# ---------------------------------------------------------------------------
# measuring one model (child process)
# ---------------------------------------------------------------------------
def child_measure(name: str, cache: str, out_json: str) -> int:
    import numpy as np
    import onnx
    import spa
    import spa.verify.bench
    import spa.runtime

    spa.runtime.THREADS = 1   # one thread, shared machine

    group, _exporter, _body, extra = MODELS[name]
    path = Path(cache) / group / f"{name}.onnx"
    shapes = extra.get("input_shapes")
    res: dict = {}

    def dump():
        Path(out_json).write_text(json.dumps(res, default=str))

    t0 = time.perf_counter()
    try:
        result = spa.prune(str(path), ratio=RATIO, criterion=CRITERION, verify=True, input_shapes=shapes)
        res["prune_s"] = round(time.perf_counter() - t0, 2)
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {_first_line(str(e))}"
        res["error_stage"] = "verify" if type(e).__name__ == "VerificationError" else "prune"
        res["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        dump()
        try:
            result = spa.prune(str(path), ratio=RATIO, criterion=CRITERION, verify=False, input_shapes=shapes)
        except BaseException:  # noqa: BLE001
            return 0
    rep = result.report
    res.setdefault("verify", rep.get("verify"))
    res["before"] = {k: rep["before"].get(k) for k in ("params", "macs")}
    res["after"] = {k: rep["after"].get(k) for k in ("params", "macs")}
    res["input_shapes"] = rep.get("input_shapes")
    res["output_dims"] = sorted({o.type.tensor_type.shape.dim[-1].dim_value for o in result.original.graph.output
                                 if o.type.tensor_type.shape.dim and o.type.tensor_type.shape.dim[-1].dim_value})
    res["n_groups"] = len(rep.get("groups", []))
    res["n_pruned_groups"] = sum(1 for g in rep.get("groups", []) if g.get("removed"))
    res["blocked"] = [{"channels": b["channels"] if isinstance(b["channels"], int) else len(b["channels"]),
                       "reason": b["reason"], "op": blocking_op(b)} for b in rep.get("blocked", [])]
    res["blocked_nodes"] = [{"node": b.get("node"), "op": b.get("op"), "reason": b["reason"]}
                            for b in rep.get("blocked_nodes", [])]
    dump()

    # the pruned model must be a valid file that onnxruntime loads
    try:
        onnx.checker.check_model(result.model, full_check=True)
        spa.runtime.session(result.model, threads=1)
        res["valid"] = True
    except BaseException as e:  # noqa: BLE001
        res["valid"] = False
        res["invalid"] = f"{type(e).__name__}: {_first_line(str(e))}"
    dump()

    # dynamic dims survive: run both at another spatial size
    if extra.get("dyn_check"):
        try:
            rng = np.random.default_rng(1)
            feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in extra["dyn_check"].items()}
            yo = spa.runtime.session(result.original, threads=1).run(None, feeds)
            yp = spa.runtime.session(result.model, threads=1).run(None, feeds)
            same = [a.shape == b.shape for a, b in zip(yo, yp)]
            res["dyn_check"] = "ok" if all(same) else f"output shapes differ {[a.shape for a in yo]} vs {[b.shape for b in yp]}"
        except BaseException as e:  # noqa: BLE001
            res["dyn_check"] = f"{type(e).__name__}: {_first_line(str(e))}"
        dump()

    # accuracy on the held-out labelled sample
    if extra.get("eval"):
        fname, inp, out_name = extra["eval"]
        with np.load(Path(cache) / group / fname) as f:
            data = {k: f[k] for k in f.files}

        def acc(model):
            sess = spa.runtime.session(model, threads=1)
            x, y = data[inp], data["label"]
            pred = np.concatenate([sess.run([out_name], {inp: x[i:i + 500]})[0].argmax(1)
                                   for i in range(0, len(x), 500)])
            return float((pred == y).mean())

        try:
            res["accuracy"] = {"before": acc(result.original), "after": acc(result.model), "n": int(len(data["label"]))}
        except BaseException as e:  # noqa: BLE001
            res["accuracy"] = {"error": f"{type(e).__name__}: {_first_line(str(e))}"}
        dump()

    # latency, interleaved, one thread
    res["latency"] = interleaved_latency(result.original, result.model, rep.get("input_shapes") or shapes or {},
                                         LATENCY_BUDGET_S, 20, 500)
    dump()
    return 0


def run_cli(path: Path, extra: dict, tmp: Path) -> dict:
    spa_exe = shutil.which("spa")
    cmd = ([spa_exe] if spa_exe else [sys.executable, "-m", "spa.cli.commands"]) + [
        "prune", str(path), "-o", str(tmp / "cli.onnx"), "--ratio", str(RATIO), "--criterion", CRITERION,
        "--no-verify", "-q"]
    for k, v in (extra.get("input_shapes") or {}).items():
        cmd += ["--input-shape", f"{k}={','.join(map(str, v))}"]
    rc, out, err, wall = _run(cmd, 600)
    res = {"rc": rc, "wall_s": round(wall, 2), "cmd": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}
    if rc != 0:
        res["error"] = "timeout" if rc is None else _last_error_line(err)
    elif not (tmp / "cli.onnx").exists():
        res["error"] = "no output file"
    else:
        try:
            import onnx
            import onnxruntime as ort
            m = onnx.load(str(tmp / "cli.onnx"))
            onnx.checker.check_model(m, full_check=True)
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        except BaseException as e:  # noqa: BLE001
            res["error"] = f"invalid CLI output: {type(e).__name__}: {_first_line(str(e))}"
    return res


def run_one(name: str, cache: Path, build: dict) -> dict:
    group, exporter, body, extra = MODELS[name]
    path = cache / group / f"{name}.onnx"
    entry: dict = {"model": name, "exporter": exporter, "body": body, "group": group,
                   "spa_rev": _git_rev(), "time": datetime.datetime.now().isoformat(timespec="seconds")}
    if extra.get("note"):
        entry["note"] = extra["note"]
    export_info = next((l for l in build.get("lines", []) if l.get("model") == name), {})
    entry["export"] = export_info
    if not path.exists():
        entry.update(status="failed", stage="export", error=f"export failed: {build.get('error', 'no file')}")
        return entry
    try:
        import onnx
        m = onnx.load(str(path), load_external_data=False)
        entry["opset"] = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
        entry["file_bytes"] = path.stat().st_size
        entry["ops"] = sorted({(n.domain + ":" if n.domain else "") + n.op_type for n in m.graph.node})
    except Exception as e:  # noqa: BLE001
        entry["load_error"] = str(e)
    tmp = Path(tempfile.mkdtemp(prefix="exporters."))
    try:
        rc, out, err, wall = _run([sys.executable, str(Path(__file__).resolve()), "--_child", "measure", name,
                                   str(cache), str(tmp / "m.json")], MEASURE_TIMEOUT)
        m = json.loads((tmp / "m.json").read_text()) if (tmp / "m.json").exists() else {}
        if rc != 0 and "error" not in m:
            m["error"] = (f"timeout after {MEASURE_TIMEOUT} s" if rc is None else
                          f"child died (exit {rc}): {_last_error_line(err)}")
            m.setdefault("error_stage", "after-prune" if "before" in m else "prune")
        entry["measure"] = m
        entry["cli"] = cli = run_cli(path, extra, tmp)
        b, a = m.get("before"), m.get("after")
        if b and a:
            entry["macs_ratio"] = a["macs"] / b["macs"] if b.get("macs") else None
            entry["params_ratio"] = a["params"] / b["params"] if b.get("params") else None
        lat = m.get("latency") or {}
        if "ratio" in lat:
            entry["latency_ratio"] = lat["ratio"]
        entry["blocking"], entry["head_blocks"] = classify_blocks(m)
        if "error" in m:
            entry.update(status="failed", stage=m.get("error_stage"), error=m["error"])
        elif m.get("valid") is False:
            entry.update(status="failed", stage="invalid output", error=m.get("invalid"))
        elif m.get("dyn_check", "ok") != "ok":
            entry.update(status="failed", stage="dynamic shapes", error=m["dyn_check"])
        elif cli.get("error"):
            entry.update(status="failed", stage="cli", error=f"spa prune CLI: {cli['error']}")
        elif "skipped" in (m.get("verify") or {}):
            entry.update(status="failed", stage="verify", error=f"oracle skipped: {m['verify']['skipped']}")
        elif entry["blocking"]:
            entry["status"] = "partial"
        else:
            entry["status"] = "ok"
        if entry["status"] == "failed":
            FAIL_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, FAIL_DIR / path.name)
            entry["saved"] = str(FAIL_DIR / path.name)
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def _fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def _oracle(e: dict) -> str:
    v = (e.get("measure") or {}).get("verify") or {}
    if "skipped" in v:
        return "skipped"
    if "ok" in v:
        return f"{'pass' if v['ok'] else 'FAIL'} ({v.get('max_rel_error', 0):.1e})"
    return "–"


def _notes(e: dict) -> str:
    parts = []
    if e.get("status") == "failed":
        parts.append(f"**{e.get('stage')}**: {e.get('error')}")
    if e.get("blocking"):
        parts.append("; ".join(f"{b['reason']} ({b['count']} {b['kind']}{'s' if b['count'] > 1 else ''})"
                               for b in e["blocking"][:3]))
    if e.get("head_blocks"):
        parts.append("output class axis also held by: " + ", ".join(e["head_blocks"]))
    m = e.get("measure") or {}
    if m.get("dyn_check") == "ok":
        parts.append("pruned model still runs at another H×W")
    if (m.get("latency") or {}).get("error"):
        parts.append(f"latency: {m['latency']['error']}")
    fused = [o for o in e.get("ops", []) if ":" in o]
    if fused:
        parts.append("ops " + ", ".join(fused))
    if e.get("note"):
        parts.append(e["note"])
    return "; ".join(parts).replace("|", "\\|")


def render_markdown(results: list[dict], meta: dict) -> str:
    L = ["## Foreign exporters", ""]
    L.append("Models built and exported by other frameworks' converters (each in its own virtual "
             "environment), pruned with `ratio=0.5, criterion=\"l1\", verify=True` (default options "
             "otherwise) by `benchmarks/exporters.py`; model scripts in `models/foreign/`.")
    L.append("")
    L.append(f"- command: `{meta.get('command', 'python benchmarks/exporters.py')}`")
    L.append(f"- spa revision: `{meta.get('spa_rev', '?')}`; run {meta.get('started', '?')}; "
             f"machine: {meta.get('machine', '?')}")
    L.append(f"- main env: {meta.get('main_versions', '?')}")
    for venv, vers in (meta.get("venvs") or {}).items():
        L.append(f"- `{venv}` venv (`models/foreign/make_envs.sh`): "
                 + ", ".join(f"{k} {v}" for k, v in vers.items()))
    L.append("- status: **ok** = pruned, oracle passes, valid output, CLI works, nothing blocked but the "
             "graph input/output; **partial** = the same, but some groups/nodes are blocked by something "
             "else (reason in notes; blocks of the output class axis by a classifier head, e.g. Softmax/ArgMax "
             "over the logits, count as graph output since that axis is pinned anyway); **failed** = export "
             "failure, spa error, invalid output, oracle failure "
             "or skipped oracle (failing files copied to `/tmp/foreign_fail/`).")
    L.append("- latency: onnxruntime CPU, 1 thread, original and pruned interleaved (`spa.verify.bench.latency`), "
             "median; ratio = pruned / original. Oracle: pruned vs masked original on random inputs, "
             "max relative error in brackets. Accuracy: top-1 on the held-out test sample "
             "(Keras: first 2000 Fashion-MNIST test images; sklearn: 450 digits test samples), "
             "before → after pruning, no fine-tuning.")
    st = collections.Counter(e.get("status") for e in results)
    cnn = [e for e in results if e.get("body") in ("CNN", "MLP")]
    hit = [e for e in cnn if e.get("macs_ratio") is not None and e["macs_ratio"] <= 0.70]
    L.append("")
    L.append(f"**{len(results)} models: ok {st.get('ok', 0)}, partial {st.get('partial', 0)}, failed "
             f"{st.get('failed', 0)}; CNN/MLP bodies losing ≥ 30% of MACs: {len(hit)}/{len(cnn)}.**")
    L.append("")
    L.append("Exporter quirks met while building these (handled in `models/foreign/`, not by spa): tf2onnx's "
             "`from_keras` does not take Keras 3 models, so the scripts convert a `tf.function` with "
             "`from_function`; random-init Keras applications have vanishing logits (MobileNetV2 ~1e-11, "
             "which makes any oracle with an absolute tolerance vacuous), so their BatchNorm statistics are "
             "set from one random batch; Keras EfficientNet(V1) exports its never-adapted `Normalization` "
             "mean/variance as extra graph inputs (EfficientNetV2B0 with `include_preprocessing=False` is used); "
             "jax2onnx writes NHWC `value_info` for tensors that are NCHW (onnxruntime warns, spa copes); "
             "paddle2onnx's polygraphy step pip-installs onnx_graphsurgeon/sympy at run time unless present "
             "(pinned in the venv). The torch files are one CNN, so their rows differ only in layout.")
    L.append("")
    L.append("| model | exporter | body | opset | status | MACs ratio | params ratio | latency ratio | oracle "
             "| accuracy before → after | notes |")
    L.append("|---|---|---|---:|---|---:|---:|---:|---|---|---|")
    for e in results:
        acc = ((e.get("measure") or {}).get("accuracy") or {})
        acc_s = f"{acc['before']:.3f} → {acc['after']:.3f}" if "before" in acc else ("error" if acc else "")
        L.append(f"| {e['model']} | {e['exporter']} | {e.get('body', '')} | {e.get('opset', '–')} "
                 f"| {e.get('status')} | {_fmt(e.get('macs_ratio'))} | {_fmt(e.get('params_ratio'))} "
                 f"| {_fmt(e.get('latency_ratio'))} | {_oracle(e)} | {acc_s} | {_notes(e)} |")
    return "\n".join(L) + "\n"


def write_readme(body: str) -> None:
    section = f"{START}\n{body}{END}"
    text = README.read_text() if README.exists() else "# Benchmarks\n"   # read right before writing
    if START in text and END in text and text.index(START) < text.index(END):
        pre, rest = text.split(START, 1)
        text = pre + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


def _main_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = [f"python {platform.python_version()}"]
    for pkg in ("onnx", "onnxruntime", "numpy", "torch", "scikit-learn", "skl2onnx", "onnxslim", "onnxsim"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def _machine() -> str:
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    return f"{os.cpu_count()} cores, {cpu} (shared with other jobs)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":
        if argv[1] == "measure":
            return child_measure(*argv[2:5])
        if argv[1] == "sklearn":
            return child_sklearn(argv[2])
        raise SystemExit(f"unknown child {argv[1]}")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated subset (results of the others are kept)")
    ap.add_argument("--cache", default="/tmp/foreign")
    ap.add_argument("--rebuild", action="store_true", help="re-export even if the files exist")
    ap.add_argument("--render", action="store_true", help="only re-render README from the results file")
    args = ap.parse_args(argv)
    meta_path = RESULTS.with_suffix(".meta.json")
    if args.render:
        results = _read_jsonl(RESULTS)
        write_readme(render_markdown(results, json.loads(meta_path.read_text()) if meta_path.exists() else {}))
        return 0

    names = [n.strip() for n in args.models.split(",")] if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    groups = list(dict.fromkeys(MODELS[n][0] for n in names))
    meta = {"command": "python benchmarks/exporters.py" + (" " + " ".join(argv) if argv else ""),
            "spa_rev": _git_rev(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": _machine(), "main_versions": _main_versions()}
    need_envs = [g for g in groups if GROUPS[g]["venv"] and
                 (args.rebuild or not all((cache / g / f).exists() for f in GROUPS[g]["files"]))]
    ensure_envs(need_envs)
    builds = {g: build_group(g, cache, args.rebuild) for g in groups}
    for g, b in builds.items():
        print(f"[exporters] {g}: {'cached' if b.get('cached') else 'built'}"
              f"{' ERROR ' + b['error'] if b.get('error') else ''}", file=sys.stderr, flush=True)
    old = {e["model"]: e for e in _read_jsonl(RESULTS)}
    for name in names:
        t0 = time.time()
        e = run_one(name, cache, builds[MODELS[name][0]])
        old[name] = e
        print(f"[exporters] {name}: {e.get('status')} MACs {_fmt(e.get('macs_ratio'))} "
              f"lat {_fmt(e.get('latency_ratio'))} {e.get('error', '')} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    results = [old[n] for n in MODELS if n in old]
    prev_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    venvs = dict(prev_meta.get("venvs") or {})
    for v in ("tf", "jax", "paddle"):
        if (VENV_DIR / v / ".spa-freeze.txt").exists():
            venvs[v] = venv_versions(v)
    meta["venvs"] = venvs
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("".join(json.dumps(e, default=str) + "\n" for e in results))
    meta_path.write_text(json.dumps(meta, indent=1))
    write_readme(render_markdown(results, meta))
    print(f"[exporters] wrote {RESULTS} and the README section", file=sys.stderr)
    return 1 if any(e.get("status") == "failed" for e in results) else 0


if __name__ == "__main__":
    sys.exit(main())
