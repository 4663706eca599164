"""A parameter's name as gradtrace records it, and the key that matches names across wrappings.

Training wraps models (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.``
and adapter names), so the same tensor is named differently live, in a checkpoint and in a saved adapter.
"""

from __future__ import annotations

# Prefixes added by DDP / torch.compile around the user's model: never part of a parameter's identity.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Modules that wrap without changing what the parameter is (FSDP1, activation checkpointing, PEFT's base layer).
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}
_PEFT_PREFIX = ("base_model", "model")
# PEFT's per-adapter containers: module dicts (``lora_A.<adapter>.weight``) and parameter dicts
# (``lora_embedding_A.<adapter>``), whose next name segment is the adapter's name.
_PEFT_MODULE_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector")
_PEFT_PARAMETER_DICTS = ("lora_embedding_A", "lora_embedding_B", "trainable_tokens_delta")
# PEFT's ``modules_to_save`` trains a copy of a whole module per adapter (``lm_head.modules_to_save.<adapter>.
# weight``) and saves it under the module's own name (``lm_head.weight``): both segments go.
_PEFT_MODULE_COPIES = "modules_to_save"


def strip_wrapper_prefix(name: str) -> str:
    """Parameter name as the unwrapped model reports it (no DDP ``module.`` / compile prefixes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def drop_adapter_name(name: str) -> str:
    """The name without PEFT's adapter name, as PEFT itself names the tensor in a saved adapter:
    ``…q_proj.lora_A.default.weight`` -> ``…q_proj.lora_A.weight``, ``…lora_embedding_A.default`` ->
    ``…lora_embedding_A``, ``…lm_head.modules_to_save.default.weight`` -> ``…lm_head.weight``."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == _PEFT_MODULE_COPIES and i + 2 < len(parts):
            del parts[i:i + 2]
            continue
        # Idempotent: a name PEFT already saved (``lora_A.weight``, ``lora_embedding_A``) stays as it is.
        module_dict = parts[i] in _PEFT_MODULE_DICTS and i + 2 < len(parts)
        parameter_dict = parts[i] in _PEFT_PARAMETER_DICTS and i + 2 == len(parts)
        if module_dict or parameter_dict:
            del parts[i + 1]
    return ".".join(parts)


def tracked_name(name: str) -> str:
    """The name gradtrace records for a live parameter: wrapper prefixes removed and, for PEFT adapters,
    the adapter name removed, so live masks match ``gradtrace diff`` masks of the saved adapter."""
    return drop_adapter_name(strip_wrapper_prefix(name))


def matching_key(name: str) -> str:
    """A key that is equal for the same parameter however it was wrapped or saved: also drops PEFT's
    ``base_model.model.`` and ``base_layer.``, and every wrapper module on the way. Only for matching
    names that differ otherwise: two parameters of one model can share a key, which callers check."""
    parts = drop_adapter_name(name).split(".")
    if tuple(parts[:2]) == _PEFT_PREFIX:
        parts = parts[2:]
    parts = [p for p in parts if p not in _WRAPPER_PARTS]
    if tuple(parts[:2]) == _PEFT_PREFIX:  # module.base_model.model....
        parts = parts[2:]
    return ".".join(parts)
