"""The config of a Hugging Face model inside a module ``apply_plan`` pruned: its sizes (MLP width,
query and key/value heads, head size) made those of the pruned layers where every layer agrees,
so that ``save_pretrained`` + ``from_pretrained`` give the pruned model back; otherwise left as it
was, with a note of which fields differ. Optional extra: needs torch, never imported by spa itself."""

from __future__ import annotations

from dataclasses import dataclass


from .torch_sizes import qualified

__all__ = ["config_proposals", "write_configs"]


@dataclass
class _ConfigProposal:
    """The new values of one Hugging Face model's config, or why there are none."""

    name: str                      # the model's module name
    model: object                  # the transformers PreTrainedModel
    values: dict                   # config field -> new value (only where it changes)
    differ: dict                   # config field -> {layer module name: its value}: not uniform


def _hf_models(module):
    """The outermost transformers models in ``module``: (name, model). Each config is one
    object shared by the model's submodules, so writing it once is enough."""
    import sys
    transformers = sys.modules.get("transformers")      # a module of it exists only once it is imported
    if transformers is None:
        return []
    base = transformers.PreTrainedModel
    out, seen = [], set()
    for mname, m in module.named_modules():
        if isinstance(m, base) and id(getattr(m, "config", None)) not in seen:
            seen.add(id(m.config))
            out.append((mname, m))
    return out


def config_proposals(module, staged) -> list:
    """Per Hugging Face model, the config values its pruned layers give (from ``staged``,
    before anything is assigned): each field's value per layer, written where uniform."""
    import torch.nn as nn
    new = {(id(m), a): v for m, a, v in staged.attributes}

    def after(m, attr):
        return new.get((id(m), attr), getattr(m, attr, None))
    proposals = []
    for name, model in _hf_models(module):
        cfg = model.config
        per_layer: dict = {}      # field -> {layer: value}
        attention = set()
        for mname, m in model.named_modules():
            sizes = _attention_heads(m, after, staged.shape)
            if sizes is None:
                continue
            attention.update(id(c) for c in m.modules())
            for key, value in sizes.items():
                if hasattr(cfg, key):
                    per_layer.setdefault(key, {})[qualified(name, mname)] = value
        inter = getattr(cfg, "intermediate_size", None)
        hidden = getattr(cfg, "hidden_size", None)
        if isinstance(inter, int) and inter != hidden:      # equal widths: which Linear is which is unknown
            for mname, m in model.named_modules():
                if not isinstance(m, nn.Linear) or id(m) in attention:
                    continue
                out, inp = staged.shape(m, "weight")
                mname = mname.rpartition(".")[0]     # one entry per MLP, not per projection
                if m.out_features == inter and m.in_features == hidden:      # up (and gate) projections
                    per_layer.setdefault("intermediate_size", {})[qualified(name, mname)] = out
                elif m.in_features == inter and m.out_features == hidden:    # the down projection
                    per_layer.setdefault("intermediate_size", {})[qualified(name, mname)] = inp
        values, differ = {}, {}
        for key, layers in per_layer.items():
            distinct = set(layers.values())
            if len(distinct) > 1:
                differ[key] = layers
            elif distinct and (value := distinct.pop()) != getattr(cfg, key):
                values[key] = value
        if "num_attention_heads" in values and "head_dim" in per_layer and "head_dim" not in differ:
            values["head_dim"] = next(iter(per_layer["head_dim"].values()))   # explicit: not hidden / heads
        if values or differ:
            proposals.append(_ConfigProposal(name or "the module", model, values, differ))
    return proposals


def _attention_heads(m, after, shape) -> dict | None:
    """A Hugging Face attention's head counts after pruning (None: not one): query heads,
    key/value heads and head size, from its projections' widths and its new head size."""
    q = getattr(m, "q_proj", None) or getattr(m, "query", None)
    k = getattr(m, "k_proj", None) or getattr(m, "key", None)
    head_attr = "head_dim" if hasattr(m, "head_dim") else "attention_head_size" if hasattr(
        m, "attention_head_size") else None
    if q is None or head_attr is None or not hasattr(q, "weight") or not after(m, head_attr):
        return None
    d = after(m, head_attr)
    out = {"num_attention_heads": shape(q, "weight")[0] // d, "head_dim": d}
    if k is not None and hasattr(k, "weight") and hasattr(m, "num_key_value_groups"):
        out["num_key_value_heads"] = shape(k, "weight")[0] // d
    return out


def write_configs(proposals, applied):
    """Write each uniform proposal into its config once a model built from that config has
    the pruned model's shapes (built on the meta device: no memory, no weights); otherwise
    leave the config as it was and say why in ``applied.config_notes`` and a warning."""
    import warnings
    for p in proposals:
        if p.differ:
            fields = "; ".join(f"{key}: " + ", ".join(f"{layer} {value}" for layer, value in layers.items())
                               for key, layers in p.differ.items())
            note = (f"{p.name}: its config was left as it was: the layers differ in {', '.join(p.differ)}, "
                    f"which one config value cannot express ({fields}); save the module's state_dict "
                    "(torch.save) instead of save_pretrained, or prune every layer alike "
                    "(--mlp / --heads with --round-to 1 rather than a budget)")
        else:
            note = _check_config(p)
            if note is None:
                for key, value in p.values.items():
                    setattr(p.model.config, key, value)
                applied.config[p.name] = dict(p.values)
                continue
        applied.config_notes.append(note)
        warnings.warn(note, stacklevel=3)


def _check_config(p) -> str | None:
    """None where ``type(p.model)(config with p.values)`` has every tensor of the pruned model
    in its shape; else what differs."""
    import copy
    import torch
    cfg = copy.deepcopy(p.model.config)
    for key, value in p.values.items():
        setattr(cfg, key, value)
    try:
        with torch.device("meta"):
            fresh = type(p.model)(cfg)
    except Exception as e:          # the config class refuses the values (a check of its own)
        return (f"{p.name}: its config was left as it was: {type(p.model).__name__} cannot be built with "
                f"{p.values} ({type(e).__name__}: {e})")
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    wrong = [(k, want[k], tuple(v.shape)) for k, v in p.model.state_dict().items()
             if k in want and want[k] != tuple(v.shape)]
    if not wrong:
        return None
    shown_wrong = ", ".join(f"{k} {list(got)} (config gives {list(w)})" for k, w, got in wrong[:3])
    return (f"{p.name}: its config was left as it was: {type(p.model).__name__} built from {p.values} "
            f"would not have the pruned shapes of {len(wrong)} tensor(s): {shown_wrong}"
            f"{'...' if len(wrong) > 3 else ''}; the model class does not read these sizes from its "
            "config (save the state_dict instead of save_pretrained)")
