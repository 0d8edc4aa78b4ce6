"""The Hugging Face model families lmtrain converts, one module each, and how a model finds its family.

Adding a family is one module (config translation both ways, tensor rules, `fits()`, PEFT module names; see
base.py and gpt2.py for the smallest example) and one line in `_MODULES` below. The order of `FAMILIES` is the
order in which export tries the families that fit a model no imported family is preferred for.
"""

from __future__ import annotations

from lmtrain.interop.families import bert, gpt2, llama, t5
from lmtrain.interop.families.base import Family, HFConfig, HFInteropError, TensorRule, classifier_labels
from lmtrain.model.layers import ModelConfig

__all__ = ["FAMILIES", "SUPPORTED_ARCHITECTURES", "Family", "HFConfig", "HFInteropError", "TensorRule",
           "classifier_labels", "family_for_hf_config", "family_for_model"]

_MODULES = (
    gpt2,
    llama,  # Llama, Mistral, Qwen2
    bert,  # BERT, RoBERTa
    t5,  # T5 v1.0, T5 v1.1 / Flan-T5 (encoder-decoder)
)
FAMILIES: dict[str, Family] = {family.name: family for module in _MODULES for family in module.FAMILIES}

SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(a for fam in FAMILIES.values()
                                              for a in (*fam.architectures, fam.classifier, *dict(fam.heads).values())))


def family_for_hf_config(hf: dict, source: str) -> Family:
    """The family named by config.json's `architectures` (or `model_type`); an error lists the supported ones."""
    names = hf.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HFInteropError(f"{source}: 'architectures' is {names!r}; it must be a list of class names such as "
                             f"[\"{SUPPORTED_ARCHITECTURES[0]}\"]. Fix config.json.")
    for fam in FAMILIES.values():
        known = (*fam.architectures, fam.classifier)
        if any(n in known for n in names) or (not names and hf.get("model_type") == fam.model_type):
            return fam
    found = ", ".join(names) if names else f"model_type={hf.get('model_type')!r}"
    raise HFInteropError(
        f"{source}: architecture {found} is not supported. lmtrain imports: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )


def family_for_model(cfg: ModelConfig, preferred: str | None = None) -> Family:
    """The HF family that reproduces an lmtrain model exactly; `preferred` (the imported family) wins if it fits."""
    if not isinstance(cfg, ModelConfig):  # an encoder-decoder (lmtrain.model.encdec)
        for fam in FAMILIES.values():
            if fam.encoder_decoder and fam.fits(cfg):
                return fam
        raise HFInteropError(f"no Hugging Face family reproduces this lmtrain model ({type(cfg).__name__}) exactly.")
    candidates = [fam for fam in FAMILIES.values() if fam.causal == cfg.causal and not fam.encoder_decoder]
    needs = ", ".join(fam.needs for fam in candidates if fam.needs)
    if not cfg.causal and not any(fam.fits(cfg) for fam in candidates):
        raise HFInteropError(
            f"no Hugging Face encoder reproduces this lmtrain model exactly (model.causal=False). {needs}; this model "
            f"has pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, "
            f"norm_position={cfg.norm_position}, embed_norm={cfg.embed_norm}, type_vocab_size={cfg.type_vocab_size}.")
    if cfg.causal and (cfg.norm_position != "pre" or cfg.embed_norm or cfg.type_vocab_size):
        raise HFInteropError(f"no Hugging Face decoder has norm_position={cfg.norm_position}, embed_norm={cfg.embed_norm} "
                             f"or type_vocab_size={cfg.type_vocab_size} (encoder parts); a decoder exports with the "
                             "defaults 'pre', False and 0.")
    wanted = FAMILIES.get(preferred) if preferred else None
    if wanted in candidates and wanted.fits(cfg):
        return wanted
    for fam in candidates:
        if fam.fallback and fam.fits(cfg):
            return fam
    raise HFInteropError(
        f"no Hugging Face family reproduces this lmtrain model exactly (pos_embedding={cfg.pos_embedding}, "
        f"norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, qkv_bias={cfg.qkv_bias}). Exportable: {needs}."
    )
