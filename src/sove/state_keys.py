"""State-dict key prefixes: the one list of what wrappers and other codebases put before parameter names.

Torch-free and below ``models`` and ``train``: :mod:`sove.train.checkpoint` strips the wrappers' prefixes
from every checkpoint it loads, :mod:`sove.models.pretrained` also the backbone owners' prefixes.
"""

from __future__ import annotations

#: Prefixes that wrappers put before state-dict keys: DDP (``module.``), torch.compile (``_orig_mod.``), Fabric.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")
#: The wrappers' prefixes and those of a backbone's owner in other codebases' checkpoints (DINO, iBOT, ...).
BACKBONE_PREFIXES = WRAPPER_PREFIXES + ("backbone.", "vit.", "swin.")


def strip_key_prefixes(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """``key`` without any leading run of ``prefixes``, in any order (``module._orig_mod.x`` -> ``x``).

    Why ours and not torch's ``consume_prefix_in_state_dict_if_present``: that strips one given prefix
    once, from a whole dict in place; checkpoints stack wrappers (DDP over torch.compile, Fabric's), and
    :mod:`sove.models.pretrained` tells heads from backbone weights key by key.
    """
    while prefix := next((p for p in prefixes if key.startswith(p)), None):
        key = key[len(prefix):]
    return key
