"""bench.py, the GPU benchmark, run end to end at toy sizes on the CPU so it cannot rot before
a GPU runs it; and its pass/fail judgement of issue #16's goals on made-up GPU numbers."""
import json
import math

import torch

import bench


def test_tiny_run_writes_every_table(tmp_path, monkeypatch):
    for key, value in dict(tiny=True, out_dir=str(tmp_path), batch_size=2, warmup_steps=1, timed_steps=1,
                           kernel_tests="poisoning").items():
        monkeypatch.setattr(bench, key, value)
    bench.main()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == {}
    assert results["kernel_tests"]["passed"] and "1 passed" in results["kernel_tests"]["summary"]
    assert "1 passed" in (tmp_path / "kernel_tests.txt").read_text()
    impls = {(k["op"], k["impl"]) for k in results["kernels"]}
    for op in ("rmsnorm", "swiglu", "rotary", "head"):
        assert {(op, "triton"), (op, "eager")} <= impls
    assert all(k["ms"] > 0 for k in results["kernels"])
    steps = {s["key"]: s for s in results["steps"]}
    assert set(steps) == {"text", "text_sync", "mixed", "baseline", "fsdp_text", "fsdp_mixed"}
    vocab = bench.bench_model_config(True)[0].vocab_size
    for s in steps.values():
        assert s["tokens_per_s"] > 0
        # random tokens at initialisation: every model's loss is about ln(vocab)
        assert abs(s["loss"] - math.log(vocab)) < 0.1, s
    # the same matmul FLOPs per token, so tokens/s and MFU compare like with like
    assert steps["text"]["flops_per_token"] == steps["baseline"]["flops_per_token"]
    table = (tmp_path / "results.md").read_text()
    assert "| ours, kernels off, mixed (image_ratio 0.1) |" in table  # the CPU runs the references
    assert "| textbook Llama, text |" in table


def test_textbook_llama_matches_our_decoders_shape():
    config = bench.bench_model_config(True)[0]
    ours, baseline = bench.VLM(config), bench.TextbookLlama(config)
    assert ours.num_params("decoder") == sum(p.numel() for p in baseline.parameters())
    assert ours.flops_per_token(32) == baseline.flops_per_token(32)
    x = torch.randint(0, config.vocab_size, (2, 32))
    loss = baseline(x, x.roll(-1, dims=1))
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in baseline.parameters())


def test_goals_judge_gpu_numbers(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cuda")
    step = dict(mfu=0.62, tokens_per_s=66_000, peak_gib=40.0)
    results = {
        "kernel_tests": dict(summary="28 passed", passed=True),
        "steps": [dict(step, key="text"), dict(step, key="mixed", mfu=0.50, peak_gib=47.0),
                  dict(step, key="baseline", tokens_per_s=52_000)],
        "kernels": [dict(op="head", impl="triton", ms=30.0, extra_gib=1.5),
                    dict(op="head", impl="torch.compile", ms=33.6, extra_gib=3.5),
                    dict(op="rmsnorm", impl="triton", ms=0.25, extra_gib=0.1),
                    dict(op="rmsnorm", impl="torch.compile", ms=0.234, extra_gib=0.1)],
    }
    goals = {goal: ok for goal, _, ok in bench.goals(results)}
    assert len(goals) == 10
    assert goals["kernel tests pass, compiled"] is True
    assert goals["MFU, text steps >= 60%"] is True and goals["MFU, mixed steps >= 55%"] is False
    assert goals["tokens/s, text / textbook compiled >= 1.2x"] is True  # 66k / 52k = 1.27
    assert goals["peak memory, mixed, batch 8 <= 45 GiB"] is False
    assert goals["head: triton at or below torch.compile"] is True
    assert goals["rmsnorm: triton faster than torch.compile"] is False
    assert goals["head: triton's extra memory <= 0.9 GiB"] is False


def test_a_failing_step_is_reported_and_the_next_ones_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "tiny", True)
    monkeypatch.setattr(bench, "out_dir", str(tmp_path))
    monkeypatch.setattr(bench, "run_kernel_tests", lambda selection: (
        dict(command="pytest", summary="9 passed", passed=True), "9 passed"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(bench, "bench_ours", out_of_memory)
    monkeypatch.setattr(bench, "bench_kernels", lambda shapes, device, rows, **kw: rows.append(
        dict(op="rmsnorm", impl="triton", ms=1.0, extra_gib=None)))
    results = bench.main()
    assert list(results["errors"]) == ["our training steps", "our training steps under FSDP2"]
    assert "out of memory" in results["errors"]["our training steps"]
    assert [s["key"] for s in results["steps"]] == ["baseline"] and len(results["kernels"]) == 1
    assert json.loads((tmp_path / "results.json").read_text())["errors"] == results["errors"]
    assert "**our training steps failed:** `OutOfMemoryError: CUDA out of memory" in (tmp_path / "results.md").read_text()
