"""paged_backend: a paged-KV LLM inference engine with a vLLM-compatible API.

    from paged_backend import LLM, SamplingParams
    llm = LLM()  # the embedded default model
    for out in llm.generate(["The capital of France is"], SamplingParams(temperature=0)):
        print(out.outputs[0].text)
"""

from paged_backend.outputs import CompletionOutput, Logprob, RequestOutput
from paged_backend.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "BeamSearchParams", "SamplingParams", "RequestOutput", "CompletionOutput",
           "Logprob", "RequestOutputKind", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers: load it on first use.
    if name == "LLM":
        from paged_backend.llm import LLM
        return LLM
    if name == "BeamSearchParams":
        from paged_backend.beam_search import BeamSearchParams
        return BeamSearchParams
    if name == "LLMEngine":
        from paged_backend.engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'paged_backend' has no attribute {name!r}")
