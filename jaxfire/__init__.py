"""jaxfire: FP8 mixture-of-experts serving (Mixtral) in JAX and Pallas for NVIDIA Hopper GPUs."""

from jaxfire.api import Generation, Model, TokenEvent, generate, generate_stream, load, logits
from jaxfire.config import Config
from jaxfire.engine import ContiguousEngine, Engine, PagedEngine, Request, RequestMetrics
from jaxfire.errors import JaxfireError
from jaxfire.sharding import make_mesh

__all__ = ["Config", "ContiguousEngine", "Engine", "Generation", "JaxfireError", "Model", "PagedEngine", "Request",
           "RequestMetrics", "TokenEvent", "generate", "generate_stream", "load", "logits", "make_mesh"]
__version__ = "0.1.0"
