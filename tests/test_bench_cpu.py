"""bench_cpu.py at toy sizes, so the benchmark the README quotes cannot rot."""

import bench_cpu


def test_bench_cpu_times_every_variant(capsys):
    rates = bench_cpu.main(["--n_layer=1", "--n_head=2", "--n_embd=32", "--ffn_hidden=64", "--seq_len=32",
                            "--batch_size=2", "--vocab_size=64", "--rounds=2", "--steps_per_round=1",
                            "--warmup_steps=1"])
    assert len(rates) == 4 and all(r > 0 for r in rates.values())
    assert any("compiled" in name for name in rates)  # pretrain.py's --compile=True step
    out = capsys.readouterr().out
    assert "textbook (float32)" in out and "textbook (bf16 autocast)" in out
    assert "goals, ours eager:" in out and "goals, ours compiled:" in out
    assert "GFLOP/s, float32" in out  # the matmul ceiling beside the steps


def test_bench_finetune_cpu_times_every_row_layout(tmp_path, capsys):
    import bench_finetune_cpu
    from data.toyworld import prepare
    prepare.main(["--out_dir", str(tmp_path / "world"), "--scale", "0.02"])
    rates = bench_finetune_cpu.main([f"--data_dir={tmp_path / 'world'}", "--positions_per_step=384", "--rounds=1",
                                     "--steps_per_round=2", "--warmup_steps=0"])
    assert list(rates) == ["one a row of 64, full head", "one a row of 64", "packed, rows of 96",
                           "packed, rows of 128"] and all(r > 0 for r in rates.values())
    assert "| packed, rows of 96 |" in capsys.readouterr().out
