"""Runs vLLM offline (its CPU build, in its own venv) for tests/pop_fx/serving/test_vllm_engine.py.

    .venv-vllm/bin/python tests/pop_fx/serving/vllm_driver.py spec.json out.json

spec: {"model": folder, "llm": LLM kwargs, "pop": POP_FX_VLLM's JSON or null, "runs": [{"name", "prompts": token
id lists, "max_tokens", "force": null | "layouts" | "ragged"}]}. One LLM, the runs in order, each one
``LLM.generate`` call over all its prompts at once (greedy, ignore_eos). out: each run's tokens and cached
prompt tokens per request, the plugin's counters, and the seconds taken. The engine stays in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor) so the driver can read the plugin's counters.
"""

import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("pop") is not None:
        os.environ["POP_FX_VLLM"] = json.dumps(spec["pop"])
    else:
        os.environ.pop("POP_FX_VLLM", None)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], distributed_executor_backend="uni", seed=0, **spec["llm"])
    init_s = time.perf_counter() - t0
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    pop = getattr(runner, "_pop", None)
    out = {"init_s": init_s, "runs": {}, "runner": type(runner).__name__,
           "mlps": [type(layer.mlp).__name__ for layer in runner.model.model.layers]}
    for run in spec["runs"]:
        if pop is not None:
            pop.step.forced = run.get("force")
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params, use_tqdm=False)
        out["runs"][run["name"]] = {
            "tokens": [list(r.outputs[0].token_ids) for r in res],
            "cached": [r.num_cached_tokens or 0 for r in res],
            "seconds": time.perf_counter() - t0,
        }
        if pop is not None:
            out["runs"][run["name"]].update(paths=dict(pop.step.paths), stats=dict(pop.requests.stats),
                                            calls=sum(f.calls for f in pop.ffns))
            for f in pop.ffns:
                f.calls = 0
            pop.step.paths.clear()
            pop.requests.stats.clear()
    if pop is not None:
        out["table"] = {str(n): p for n, p in pop.step.table.items()}
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
