"""Mutation testing: break the engine on purpose, check that the tests notice.

Copies the ``spa`` package to a temporary directory, applies one deliberate break at a time
to the copy, runs the tests that should catch it against the copy, and prints one line per
break: ``caught`` (the tests fail) or ``NOT CAUGHT``. The unbroken copy runs first and must
pass, so a break is not "caught" by tests that fail anyway.

    python benchmarks/mutations.py            # every break (about 12 minutes on 2 cores)
    python benchmarks/mutations.py -k split   # the breaks whose name contains "split"

The package is installed editable, so ``import spa`` would find /work/main whatever
PYTHONPATH says; each test run goes through a wrapper that drops the editable finder from
``sys.meta_path``, puts the copy first on ``sys.path``, and checks where ``spa`` came from.
Exit status 1 when a break is not caught or a mutation no longer applies (the code moved:
update its ``old`` text).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


@dataclass
class Break:
    name: str
    file: str          # relative to the package
    old: str           # must occur exactly once
    new: str
    tests: list[str]   # pytest arguments, relative to tests/ ("-kEXPR" selects within them)


BREAKS = [
    # issue 20, trust round two
    Break("a side file spa did not write is replaced all the same", "loading/files.py",
          "    if not os.path.lexists(side) or refers():\n", "    if True:\n",
          ["test_trust.py", "-kforeign"]),
    Break("a path a model's name derives may leave -o", "cli/sweep.py",
          '    odd = [str(m) for m, s in zip(models, stems) if len(models) > 1 and s in ("", ".", "..")]\n',
          "    odd = []\n",
          ["test_trust.py", "-ksweep"]),
    Break("external data is opened again by path, not read through the checked descriptor", "loading/model.py",
          "    fd = _DATA_FILES.get(location)\n    if fd is not None:\n",
          "    fd = _DATA_FILES.get(location)\n    if False:\n",
          ["test_trust.py", "-kfifo"]),
    Break("every array of a data file is read, named or not", "loading/data_files.py",
          "            return {k: _read_member(z, k, path, what, limit) for k in names if k in z.files}\n",
          "            return {k: _read_member(z, k, path, what, limit) for k in z.files}\n",
          ["test_trust.py", "-kdecompressed"]),
    Break("calibration data that does not fit falls back to l1 silently", "pipeline.py",
          "        if not opts.may_fall_back or (isinstance(e, SpaError) and calibration.data is not None):\n",
          "        if not opts.may_fall_back:\n",
          ["test_trust.py", "-kfit_the_model"]),
    Break("--eval arrays are not checked against the model", "loading/data_files.py",
          "        data[name] = _as_input(data[name], vi, f\"{path}: --eval array {name!r}\")\n", "        pass\n",
          ["test_trust.py", "-keval"]),
    Break("an invalid IR-3 model is written", "loading/model.py",
          "    _check_old_ir(model, path)\n", "",
          ["test_trust.py", "-kir3"]),
    # issue 21, the house
    Break("an option's range goes unchecked", "options.py",
          "            if not _number(value) or not 0 <= value < 1:\n", "            if not _number(value):\n",
          ["test_options.py", "-kchecked"]),
    Break("a failure does not say the stages run", "pipeline.py",
          "            error.spa_stages = list(self.run)\n", "            error.spa_stages = []\n",
          ["test_options.py", "-kstages"]),
    Break("oracle's numeric comparison replaced by pass (ok always True)", "verify/oracle.py",
          "    if err <= tol:\n", "    if True:\n",
          ["test_oracle.py"]),
    Break("oracle forgives any float error as rewrite noise (noise term huge)", "verify/oracle.py",
          "\nNOISE_FACTOR = 4.0\n", "\nNOISE_FACTOR = 1e6\n",
          ["test_oracle.py"]),
    Break("oracle credits the pruned model's own rewrite noise without a cap", "verify/oracle.py",
          "min(noise_pruned, REWRITE_RTOL * scale)", "noise_pruned",
          ["test_oracle.py"]),
    Break("oracle lets any number of quantized outputs be a step off", "verify/rounding.py",
          "    allowed = min(max(1, int(QDQ_SHARE * diff.size), int(QDQ_NOISE_FACTOR * noise_count)),\n",
          "    allowed = diff.size or min(max(1, int(QDQ_SHARE * diff.size), int(QDQ_NOISE_FACTOR * noise_count)),\n",
          ["test_oracle.py"]),
    Break("oracle lets quantized outputs be any number of steps off", "verify/rounding.py",
          "    steps = min(max(1, noise_steps), QDQ_MAX_STEPS)\n", "    steps = 10 ** 6\n",
          ["test_oracle.py"]),
    Break("oracle credits the masked original's rewrite noise without a cap", "verify/oracle.py",
          "min(noise_masked, MASKED_NOISE_RTOL * scale)", "noise_masked",
          ["test_oracle.py"]),
    Break("oracle compares only the first output of a multi-output model", "verify/oracle.py",
          "        for j, (g, w) in enumerate(zip(got, want)):\n",
          "        for j, (g, w) in enumerate(zip(got[:1], want[:1])):\n",
          ["test_oracle.py"]),
    Break("oracle judges an output by its pre-activation whatever tail reads it", "verify/oracle.py",
          "if p is not None and p == m}", "if p is not None and m is not None and p[0] == m[0]}",
          ["test_oracle.py"]),
    Break("oracle passes an output by its pre-activation without comparing it", "verify/oracle.py",
          "    agrees = _gap(g, w) <= atol + rtol * ", "    agrees = True or _gap(g, w) <= atol + rtol * ",
          ["test_oracle.py"]),
    Break("oracle never judges an output by its pre-activation (saturated sigmoid maps refused)", "verify/oracle.py",
          "                                or _upstream_agrees(pair, sample, j, rtol, atol, result))",
          "                                or False)",
          ["test_oracle.py"]),
    Break("oracle checks no float twin of a quantized graph (onnxruntime's flips the only yardstick)",
          "verify/oracle.py", "    twins = float_twin(pruned), float_twin(masked)\n", "    twins = None, None\n",
          ["test_oracle.py"]),
    Break("oracle ignores a quantized graph's float twin that disagrees", "verify/oracle.py",
          "            if not twin.ok:\n                return twin\n", "",
          ["test_oracle.py"]),
    Break("the float twin keeps a per-axis activation QuantizeLinear out too", "verify/rounding.py",
          "    return tensor_array(values[q.input[1]]).size == 1\n", "    return True\n",
          ["test_oracle.py"]),
    Break("initializers named as onnxruntime's optimizer names its own are kept (default session fails)",
          "loading/model.py", "    _rename_generated(model)\n", "",
          ["test_fused.py", "-kopt_level_1"]),
    Break("data-free statistics collected on the unsteered model", "score/obspa.py",
          "    stats = collect_stats(source, used, batches, axis_of, seed=calibration.seed)\n",
          "    stats = collect_stats(model, used, batches, axis_of, seed=calibration.seed)\n",
          ["test_data_aware.py", "-ksteer"]),
    Break("steered BatchNorm normalizes with the running statistics after all", "score/steer.py",
          "        nodes.extend(_batch_statistics_norm(steered, node, int(scale.dims[0]), prefix))\n",
          "        nodes.append(node)\n",
          ["test_data_aware.py", "-ksteer"]),
    Break("grouped conv MACs count every input channel", "verify/metrics.py",
          "        return [(int(np.prod(ys)) * int(np.prod(ws[1:])), over(y, ys) + [(w, 1)])]\n",
          "        return [(int(np.prod(ys)) * int(xs[1]) * int(np.prod(ws[2:])), over(y, ys) + [(w, 1)])]\n",
          ["test_options.py", "-kgrouped"]),
    Break("--global ignores --max-ratio", "plan/planner.py",
          "    cap = [min(g.size - 1, int(np.floor(g.size * opts.max_ratio + 1e-9))) for g in groups]\n",
          "    cap = [g.size - 1 for g in groups]\n",
          ["test_options.py", "-kcap"]),
    Break("weights normalized at run time are not computed once", "analysis.py",
          "    fold_normalized_weights(model)\n", "",
          ["test_fold.py"]),
    Break("the fold's growth guard lets anything through", "loading/fold.py",
          "\nGROWTH = 4\n", "\nGROWTH = 10 ** 12\n",
          ["test_fold.py"]),
    Break("a uniform budget keeps what rounding overshot", "plan/allocate.py",
          "    keeps = _top_up(groups, free, keeps_at(hi), hi, opts, resource, goal)\n",
          "    keeps = keeps_at(hi)\n",
          ["test_allocate.py", "-kovershot"]),
    Break("self-generated text written again for every pruned model of a pruning", "score/selfgen.py",
          "    if written is not None and shape in written:\n", "    if False:\n",
          ["test_data.py", "-ktext"]),
    Break("--round-to ignored", "plan/planner.py",
          "    if group.kind != \"channels\" or round_to <= 1:\n", "    if True:\n",
          ["test_cli.py"]),
    Break("rewrite slices other channels than the plan keeps (report and oracle follow the plan)", "rewrite/apply.py",
          "            w = np.take(w, kept, axis=axis)\n",
          "            w = np.take(w, (kept + 1) % w.shape[axis], axis=axis)\n",
          ["test_cli.py"]),
    Break("report lists other channels than the plan removes", "plan/plan.py",
          '"removed_channels": c.removed.tolist()',
          '"removed_channels": ((c.removed + 1) % c.size).tolist()',
          ["test_cli.py"]),
    Break("an unchanged computed Slice bound left computed (it follows the pruned width)", "graph/fixups.py",
          "    if np.array_equal(old, new) and (computed or name in view.inits) and not freeze:\n",
          "    if np.array_equal(old, new) and not freeze:\n",
          ["test_plan.py"]),
    Break("apply_plan drops OBSPA's value changes", "torch.py",
          "            values = _plus(values, arrays[entry[\"delta\"]], t, f\"plan tensor {shown(plan_name)}\")\n",
          "            values = values\n",
          ["test_torch_plan.py", "-kcompose or resnet18-False"]),
    Break("apply_plan takes every matrix the way it is stored", "torch.py",
          "    return transposed is not None and abs(transposed - fp[2]) < abs(got[2] - fp[2])\n", "    return False\n",
          ["test_torch_plan.py", "-kbert"]),
    Break("folded BatchNorms do not follow their convolution", "torch.py",
          "        if type(m).__name__ not in _NORMS or previous is None:\n",
          "        if True:\n",
          ["test_torch_plan.py", "-kresnet18-True"]),
    Break("apply_plan: kept indices past the axis accepted", "plan/plan_check.py",
          "        if i >= size:\n",
          "        if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: negative kept indices accepted", "plan/plan_check.py",
          "        if i < 0:\n",
          "        if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: duplicated or unsorted kept indices accepted", "plan/plan_check.py",
          "        if i <= previous:\n",
          "        if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: non-integer kept indices accepted", "plan/plan_check.py",
          "        if not _is_int(i):\n",
          "        if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: an empty kept list accepted", "plan/plan_check.py",
          "    if not kept:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: a kept list longer than its axis read element by element", "plan/plan_check.py",
          "    if len(kept) > size:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_kept_indices"]),
    Break("apply_plan: indices not counted against the module's sizes", "plan/plan_check.py",
          "    if total > limits.indices:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kten_million"]),
    Break("apply_plan: the plan's JSON read whole before its size is checked", "plan/plan_file.py",
          "            if max_bytes is not None and size > max_bytes:\n"
          '                raise PlanFileError(f"{path}: larger than a plan for this model can be '
          '({max_bytes} bytes)")\n'
          "            # at most one byte past the limit: a file that grew since fstat is bounded too\n"
          "            text = f.read(-1 if max_bytes is None else min(size, max_bytes) + 1)\n",
          "            text = f.read()\n",
          ["test_torch_plan_hostile.py", "-kten_million"]),
    Break("apply_plan: .npz arrays loaded before their headers' sizes are checked", "plan/plan_file.py",
          "            if max_bytes is not None and total > max_bytes:\n",
          "            if False:\n",
          ["test_torch_plan_hostile.py", "-khuge_array"]),
    Break("apply_plan: JSON nested past the stack escapes as RecursionError", "plan/plan_file.py",
          "    except (ValueError, RecursionError) as e:",
          "    except ValueError as e:",
          ["test_torch_plan_hostile.py", "-knested"]),
    Break("apply_plan: the plan's files opened by path (a FIFO blocks)", "plan/plan_file.py",
          '    with os.fdopen(open_regular(path, "the plan file", PlanFileError), "rb") as f:\n',
          '    with open(path, "rb") as f:\n',
          ["test_torch_plan_hostile.py", "-kfifo"]),
    Break("apply_plan and --calib: an .npy header read whole before its length is checked", "loading/data_files.py",
          "    if length > MAX_NPY_HEADER:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kheader_too_long"]),
    Break("apply_plan: value changes checked finite only in their own dtype", "torch.py",
          "    if past.any():\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kpast_the_modules_dtype"]),
    Break("apply_plan: a plan without ties read as one whose axes agree", "plan/plan_check.py",
          '    if "ties" not in doc:\n'
          '        raise PlanFileError("the plan has no ties (the axes it cuts together), '
          'which this spa needs to check "\n'
          '                            "it: write the plan again with this spa")\n'
          '    _check_ties(doc["ties"], tensors)\n',
          '    _check_ties(doc.get("ties", []), tensors)\n',
          ["test_torch_plan_hostile.py", "-kties_dropped"]),
    Break("apply_plan: a sliced axis need not be in a tie", "plan/plan_check.py",
          "            if (name, int(key)) not in seen:\n",
          "            if False:\n",
          ["test_torch_plan_hostile.py", "-kties_dropped or slicing_dropped"]),
    Break("apply_plan: the layers of an nn.Sequential need not agree in width", "torch.py",
          "    _check_chains(module, staged)\n",
          "",
          ["test_torch_plan_hostile.py", "-kslicing_dropped"]),
    Break("apply_plan: a plan may raise a conv's group count", "torch.py",
          "    if new_groups > groups or new_width * groups > width * new_groups:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kgroup_count"]),
    Break("apply_plan: a value change of another shape than its kept slice", "plan/plan_check.py",
          "    if list(a.shape) != shape:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_delta"]),
    Break("apply_plan: NaN or infinite value changes accepted", "plan/plan_check.py",
          '    if a.dtype.kind == "f" and not np.isfinite(a).all():\n',
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kbad_delta"]),
    Break("apply_plan: ties not compared", "plan/plan_check.py",
          "            elif kept != first[2]:\n",
          "            elif False:\n",
          ["test_torch_plan_hostile.py", "-kcut_together"]),
    Break("apply_plan: plan files written without ties", "plan/plan_file.py",
          '"ties": _ties(tensors),',
          '"ties": [],',
          ["test_torch_plan_hostile.py", "-kcut_together"]),
    Break("apply_plan: a layer's tensors may keep different channels", "torch.py",
          "            elif not np.array_equal(first[1], kept):\n",
          "            elif False:\n",
          ["test_torch_plan_hostile.py", "-kwithout_ties"]),
    Break("apply_plan: group counts not checked as positive integers", "plan/plan_check.py",
          '        if key in ("group", "num_groups") and not (_is_int(value) and value >= 1):\n',
          "        if False:\n",
          ["test_torch_plan_hostile.py", "-kgroup_count"]),
    Break("apply_plan: a conv's channels need not split into its groups", "torch.py",
          "    if w[0] % groups:\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kgroup_count"]),
    Break("apply_plan: a layer's bias need not fit its outputs", "torch.py",
          "    if got is not None and got != tuple(want):\n",
          "    if False:\n",
          ["test_torch_plan_hostile.py", "-kadded_bias"]),
    Break("apply_plan: tensors assigned while the plan is still being checked", "torch.py",
          "        self.tensors[(id(owner), attr)] = (owner, attr, new)\n",
          "        self.tensors[(id(owner), attr)] = (owner, attr, new)\n"
          "        setattr(owner, attr, new) if isinstance(new, torch.nn.Parameter) else "
          "owner._buffers.__setitem__(attr, new)\n",
          ["test_torch_plan_hostile.py", "-kwithout_ties or width or group_count or added_bias or counterpart"]),
    Break("plan file: a later pass's kept indices not composed with the earlier", "plan/plan_file.py",
          "                total[(name, axis)] = k if prev is None else prev[k]\n",
          "                total[(name, axis)] = k\n",
          ["test_torch_plan.py", "-kcompose"]),
    Break("oracle compares quantized (QDQ) graphs through onnxruntime's fused integer kernels", "verify/oracle.py",
          "    s_pruned, s_masked = session(pruned, optimize=False), session(masked, optimize=False)\n",
          "    s_pruned, s_masked = session(pruned, optimize=True), session(masked, optimize=True)\n",
          ["test_foreign.py", "-kquantizer or unfused"]),
    Break("a 1-element quantization scale read as blocked quantization", "graph/rules/indexing.py",
          "        if int(np.prod(shape)) == 1:\n", "        if not shape:\n",
          ["test_foreign.py", "-kquantizer"]),
    Break("an integer layer's input pruned whoever else reads the quantized tensor", "graph/rules/quantized.py",
          "    if producer is None or producer.op_type != \"DynamicQuantizeLinear\" or _summed_axis(\n",
          "    if producer is None or producer.op_type != \"DynamicQuantizeLinear\" or False and _summed_axis(\n",
          ["test_foreign.py", "-kdynamic"]),
    Break("MatMulNBits input rows pruned inside quantization blocks", "graph/rules/quantized.py",
          "    ctx.fix(per_block, f\"MatMulNBits {ctx.name!r} quantizes its input rows in blocks of {block}: whole blocks only\")\n",
          "",
          ["test_foreign.py", "-knbits"]),
    Break("DynamicQuantizeLSTM's removed units silenced in R only (their W rows still move the state)",
          "graph/rules/recurrent.py",
          "    for k, (_, zero_point) in _QUANTIZATION.items():\n        per_row",
          "    for k, (_, zero_point) in list(_QUANTIZATION.items())[1:]:\n        per_row",
          ["test_recurrent.py", "-kdynamic_quantize_lstm_prunes"]),
    Break("oracle's uint8 reading of int8 integer-GEMM weights reinterprets their bits (no shift by 128)",
          "verify/integer_kernels.py",
          "np.array(128, np.int32)", "np.array(256, np.int32)",
          ["test_integer_kernels.py"]),
    Break("a constant table cut at a run-time length pruned (BERT's position ids)", "graph/rules/layout.py",
          "        elif window:\n", "        elif False:\n",
          ["test_rules.py", "-kconstant_table"]),
    Break("oracle leaves removed channels of integer inputs as they are (QOperator graphs)", "verify/masked.py",
          "    _insert_before(masked, _by_node(plan.integer_contractions), to_zero_point)\n",
          "",
          ["test_foreign.py", "-kqoperator"]),
    Break("plan not validated before the rewrite", "rewrite/apply.py",
          "    plan.check(model)\n", "",
          ["test_plan.py"]),
    Break("LRN treated as per-channel", "graph/rules/normalization.py",
          "        if i == axis or (coerced_2d and i > axis):\n",
          "        if (i == axis and ctx.op != \"LRN\") or (coerced_2d and i > axis):\n",
          ["test_rules.py"]),
    Break("Split sizes reversed", "graph/rules/layout.py",
          "    entries = {k: ctx.outp(k, axis) for k in range(len(ctx.node.output))}\n",
          "    entries = {k: ctx.outp(len(ctx.node.output) - 1 - k, axis) for k in range(len(ctx.node.output))}\n",
          ["test_rules.py", "test_property.py"]),
    Break("Softmax treated as per-channel", "graph/rules/normalization.py",
          "        if i == axis or (coerced_2d and i > axis):\n",
          "        if (i == axis and ctx.op != \"Softmax\") or (coerced_2d and i > axis):\n",
          ["test_rules.py"]),
    Break("--global ranks kinds that share a ratio value together", "plan/planner.py",
          "        for kind in dict.fromkeys(g.kind for g in groups):\n"
          "            idx = [i for i, g in enumerate(groups) if g.kind == kind]\n"
          "            r = by_kind.get(kind, opts.ratio)\n",
          "        for r in set(ratio_of):\n"
          "            idx = [i for i, ri in enumerate(ratio_of) if ri == r]\n",
          ["test_cli.py"]),
    Break("oracle tolerance back to 1e-3 of the output scale", "verify/oracle.py",
          "\nRTOL = 1e-4\n", "\nRTOL = 1e-3\n",
          ["test_oracle.py"]),
    Break("oracle's absolute floor back to 1e-5 (tiny outputs judged by it alone)", "verify/oracle.py",
          "\nATOL = float(np.finfo(np.float32).tiny)\n", "\nATOL = 1e-5\n",
          ["test_oracle.py"]),
    Break("low-rank OBS refit drops the damping term (wide layers)", "score/obs.py",
          "        p = ((self.weight[:, a] @ self.rows[:, a].T) @ xk) + self.lam * self.weight[:, k]\n",
          "        p = ((self.weight[:, a] @ self.rows[:, a].T) @ xk)\n",
          ["test_obs.py"]),
    Break("calibrated OBSPA never falls back when data does worse than none", "score/calibrated.py",
          '    if error(default) > error("data-free"):\n', '    if error(default) > float("inf"):\n',
          ["test_data_aware.py", "-kheld_out"]),
    Break("normalization refit written to the wrong channels", "rewrite/perp.py",
          "    out[kept] = new\n", "    out[kept] = new[::-1]\n",
          ["test_data_aware.py", "-knormalizations"]),
    Break("a model whose later tokens change earlier logits writes its own text anyway", "score/selfgen.py",
          "    if not np.allclose(later[:, :-1], got[logits][:, :-1], rtol=1e-4, atol=1e-5):\n",
          "    if False:\n",
          ["test_data.py", "-kwrite"]),
    Break("diverse calibration samples: the first N instead of one per cluster", "score/select.py",
          "        chosen.append(int(next(i for i in order if i not in chosen)))\n",
          "        chosen.append(len(chosen))\n",
          ["test_data.py", "-kdiverse"]),
    Break("padding rows kept in the statistics", "score/data.py",
          "                    real = np.flatnonzero(mask)    # padding's rows are no input the layer must serve\n",
          "                    real = np.arange(mask.size)\n",
          ["test_data_aware.py", "-kpadding"]),
]

WRAPPER = """
import os, sys
copy = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path[:] = [os.path.dirname(copy)] + [p for p in sys.path if p not in ('', '.')]
import spa
assert spa.__file__.startswith(copy), f"spa imported from {spa.__file__}, not the copy {copy}"
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def run_tests(copy: Path, tests: list[str]) -> tuple[int, str, float]:
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(copy), "-q", "-x", "-p", "no:cacheprovider",
                           "--no-header", "-W", "ignore", *tests],
                          cwd=TESTS, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(copy.parent), "COLUMNS": "300"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or "error" in ln),
                   (proc.stderr.strip().splitlines() or ["?"])[-1])
    first_failure = next((ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")), "")
    return proc.returncode, (first_failure or summary).strip()[:220], time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the breaks whose name contains this")
    args = ap.parse_args()
    breaks = [b for b in BREAKS if args.k.lower() in b.name.lower()]
    with tempfile.TemporaryDirectory(prefix="spa-mutations-") as tmp:
        copy = Path(tmp) / "spa"
        shutil.copytree(ROOT / "spa", copy, ignore=shutil.ignore_patterns("__pycache__"))
        # whole files: a break's -k selection narrows only its own run
        everything = sorted({t for b in breaks for t in b.tests if not t.startswith("-k")})
        code, line, secs = run_tests(copy, everything)
        print(f"unbroken copy: {'passes' if code == 0 else 'FAILS'} ({' '.join(everything)}; {secs:.0f} s)",
              flush=True)
        if code != 0:
            print(f"  {line}\nthe tests fail without a break: nothing to measure")
            sys.exit(1)
        missed = 0
        for b in breaks:
            target = copy / b.file
            original = target.read_text()
            if original.count(b.old) != 1:
                print(f"MUTATION DOES NOT APPLY  {b.name}: its text occurs {original.count(b.old)} times in "
                      f"spa/{b.file}", flush=True)
                missed += 1
                continue
            target.write_text(original.replace(b.old, b.new))
            try:
                code, line, secs = run_tests(copy, b.tests)
            finally:
                target.write_text(original)
            caught = code != 0
            missed += not caught
            print(f"{'caught    ' if caught else 'NOT CAUGHT'}  {b.name}  [{' '.join(b.tests)}, {secs:.0f} s]"
                  f"{'' if not caught else '  <- ' + line}", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
