"""moekit: Mixture-of-Experts transformers in PyTorch."""

from moekit.config import CapacityConfig, ConfigError, LossConfig, MoEConfig, RouterConfig

__version__ = "0.1.0"

__all__ = ["CapacityConfig", "ConfigError", "LossConfig", "MoEConfig", "RouterConfig", "__version__"]
