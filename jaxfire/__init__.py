"""jaxfire: FP8 mixture-of-experts serving (Mixtral) in JAX and Pallas for NVIDIA Hopper GPUs."""

from jaxfire.api import Generation, Model, TokenEvent, generate, generate_stream, load, logits
from jaxfire.config import Config
from jaxfire.errors import JaxfireError

__all__ = ["Config", "Generation", "JaxfireError", "Model", "TokenEvent", "generate", "generate_stream", "load",
           "logits"]
__version__ = "0.1.0"
