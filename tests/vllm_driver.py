"""Runs one vLLM engine for tests/test_vllm.py, in its own process (vLLM's model registry and plugins are
per process, so stock vLLM and the plugin cannot share one).

    python tests/vllm_driver.py JOB.pickle RESULT.pickle

JOB: {"model", "plugin" (bool), "overrides" (hf_overrides), "tp", "mm_embeds" (bool), "max_tokens",
"record" (bool), "requests": [{"question", "image_seeds", "mm_processor_kwargs"}, {"conversation": [user turns
as {"question", "image_seeds"}]} (answered "Sure."), or {"question", "embeds"}]}.
RESULT: {"requests": [{"prompt_ids", "output_ids", "logprobs", "cached"}], "records": [...]}, where with
"record" each image the plugin's model selected for is recorded in the worker (its rows, text ids, the
text rows, the kept indices) and, for Qwen2.5-VL, each position recompute (prompt ids, positions).
"""

import os
import pickle
import sys


def install_recorder(worker):
    model = worker.model_runner.get_model()
    model.trimcpp_records = []
    kept_indices = type(model).kept_indices

    def recorded_kept(rows, plan, text):
        keep = kept_indices(model, rows, plan, text)
        text_ids = [] if text is None else text.reshape(-1).tolist()
        text_rows = None
        if text_ids:
            text_rows = model.get_language_model().embed_input_ids(text.reshape(-1).to(rows.device)).float().cpu().numpy()
        model.trimcpp_records.append({"kind": "select", "rows": rows.detach().float().cpu().numpy(), "text_ids": text_ids,
                                      "text_rows": text_rows, "plan": [float(x) for x in plan],
                                      "keep": None if keep is None else keep.cpu().numpy()})
        return keep

    model.kept_indices = recorded_kept
    if hasattr(type(model), "recompute_mrope_positions"):
        recompute = type(model).recompute_mrope_positions

        def recorded_recompute(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
            out = recompute(model, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
            model.trimcpp_records.append({"kind": "positions", "prompt_ids": list(input_ids),
                                          "positions": out[1].cpu().numpy().copy()})
            return out

        model.recompute_mrope_positions = recorded_recompute
    return True


def fetch_records(worker):
    return worker.model_runner.get_model().trimcpp_records


def main() -> None:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    if not job["plugin"]:
        os.environ["VLLM_PLUGINS"] = ""  # no plugin: vLLM's own models
    if job.get("record"):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with this file's functions
    import base64
    import io

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from trimcpp.testing import demo_image

    llm = LLM(model=job["model"], enforce_eager=True, max_model_len=4096, dtype="float32", seed=0,
              hf_overrides=job.get("overrides") or None, tensor_parallel_size=job.get("tp", 1),
              limit_mm_per_prompt={"image": 2, "video": 0}, enable_mm_embeds=job.get("mm_embeds", False),
              block_size=32)  # prefix-cache blocks small enough for these short prompts
    if job.get("record"):
        llm.collective_rpc(install_recorder)
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0, logprobs=1)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    results = []
    for request in job["requests"]:
        if "embeds" in request:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request["question"]}]}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": torch.from_numpy(request["embeds"])[None]}},
                               params, use_tqdm=False)
        else:
            messages = []
            for turn in request.get("conversation", [request]):
                if messages:
                    messages.append({"role": "assistant", "content": "Sure."})
                parts = []
                for seed in turn.get("image_seeds", [0]):
                    buf = io.BytesIO()
                    demo_image(seed=seed).save(buf, "PNG")
                    parts.append({"type": "image_url", "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
                messages.append({"role": "user", "content": [*parts, {"type": "text", "text": turn["question"]}]})
            out = llm.chat(messages, params, use_tqdm=False, mm_processor_kwargs=request.get("mm_processor_kwargs"))
        completion = out[0].outputs[0]
        results.append({"prompt_ids": list(out[0].prompt_token_ids), "output_ids": list(completion.token_ids),
                        "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                        "cached": out[0].num_cached_tokens or 0})
    records = llm.collective_rpc(fetch_records)[0] if job.get("record") else []
    with open(result_path, "wb") as f:
        pickle.dump({"requests": results, "records": records}, f)


if __name__ == "__main__":
    main()
