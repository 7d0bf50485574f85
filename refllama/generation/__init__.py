"""Generation: requests and responses, the one decode loop (greedy, sampled, batched, streamed), sampling and
chat templates."""

from refllama.generation.requests import GenerationRequest, GenerationResponse, Timings, TokenLogprob, Usage

__all__ = ["GenerationRequest", "GenerationResponse", "Timings", "TokenLogprob", "Usage"]
