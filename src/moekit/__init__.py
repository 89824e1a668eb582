"""moekit: Mixture-of-Experts transformers in PyTorch."""

from moekit.config import CapacityConfig, ConfigError, LossConfig, MoEConfig, RouterConfig

__version__ = "0.1.0"


def patch(hf_model):
    """Swap the MoE blocks of a loaded transformers model for moekit's MoELayer in place (same weights)."""
    from moekit.interop.patch import patch as _patch

    return _patch(hf_model)


__all__ = ["CapacityConfig", "ConfigError", "LossConfig", "MoEConfig", "RouterConfig", "__version__", "patch"]
