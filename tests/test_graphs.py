"""--cuda-graphs: what can be checked without a GPU.

Capture and replay need CUDA (checked on the GPU by benchmarks/checks/check_graphs.py: the same per-step losses,
gradient norms, learning rates and weights as the plain compiled run, and after a resume). Here: the graph key,
the learning rate kept in a tensor that the scheduler fills (the same updates as a float lr), checkpoints that
look the same either way, the eager fallback on a CPU, the refused combinations, and, under an emulated capture,
that steps of several shapes train exactly as eager steps (each capture starts without gradients).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from minialign import cli
from minialign.base.dist import launched_world
from minialign.modeling.policy import TokenLogps
from minialign.training import checkpoint
from minialign.training.batches import prepare_batch
from minialign.training.graphs import GraphedStep, graph_key, plain_lr, use_tensor_lr
from minialign.training.optim import make_scheduler
from tests.test_optim_in_backward import assert_same_params, config, metrics, run, sft_pieces


def test_graph_key_holds_shapes_and_step_constants_not_host_counts():
    batch = {"input_ids": torch.zeros(1, 512, dtype=torch.long), "n_pairs": 4, "n_targets": 37}
    same = {"input_ids": torch.ones(1, 512, dtype=torch.long), "n_pairs": 4, "n_targets": 90}
    assert graph_key(batch) == graph_key(same)  # values and host-only counts do not matter
    assert graph_key(batch) != graph_key({**batch, "input_ids": torch.zeros(1, 1024, dtype=torch.long)})
    assert graph_key(batch) != graph_key({**batch, "input_ids": torch.zeros(1, 512, dtype=torch.int32)})
    assert graph_key(batch) != graph_key({**batch, "n_pairs": 5})  # a constant the step reads: another graph


def _train(lr_as_tensor: bool, steps: int = 5) -> tuple[torch.nn.Linear, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = config(lr=1e-2, warmup_ratio=0.4, schedule="cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, foreach=False)
    scheduler = make_scheduler(optimizer, steps, cfg)
    if lr_as_tensor:
        use_tensor_lr(optimizer, torch.device("cpu"), capturable=False)  # capturable needs CUDA
    x = torch.randn(8, 4)
    for _ in range(steps):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def test_a_tensor_lr_filled_by_the_scheduler_gives_the_same_updates():
    (a, opt_a, _), (b, opt_b, _) = _train(False), _train(True)
    lr = opt_b.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(opt_a.param_groups[0]["lr"], rel=1e-6)
    torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.bias, a.bias, rtol=0, atol=1e-6)


def test_checkpoints_keep_float_learning_rates():
    _, optimizer, scheduler = _train(True)
    saved = checkpoint.optimizer_state(optimizer)
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in saved["param_groups"])
    assert all(type(x) is float for x in checkpoint.scheduler_state(scheduler)["_last_lr"])
    assert torch.is_tensor(optimizer.param_groups[0]["lr"])  # the optimizer itself keeps its tensor
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1.0)
    fresh.load_state_dict(plain_lr(optimizer.state_dict()))
    assert fresh.param_groups[0]["lr"] == pytest.approx(float(optimizer.param_groups[0]["lr"]))


def test_on_a_cpu_the_step_runs_eagerly(tmp_path):
    """--cuda-graphs on a CPU trains exactly as without it (and says nothing is captured)."""
    plain_dir, graphs_dir = tmp_path / "plain", tmp_path / "graphs"
    plain_dir.mkdir()
    graphs_dir.mkdir()
    _, plain, _ = run(config(max_grad_norm=1.0, warmup_ratio=0.3), plain_dir)
    _, graphed, _ = run(config(max_grad_norm=1.0, warmup_ratio=0.3, cuda_graphs=True), graphs_dir)
    assert_same_params(graphed, plain, atol=0)
    assert metrics(graphs_dir) == metrics(plain_dir)
    step = GraphedStep(lambda b, s: {}, lambda: torch.zeros(()), torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]),
                       torch.device("cpu"))
    assert not step.enabled and not step.graphs


@pytest.mark.parametrize("flags,match", [
    (["--grad-accum", "2"], "cuda_graphs needs grad_accum 1 (got 2)"),
    (["--optim-in-backward", "--max-grad-norm", "0"], "cuda_graphs needs no --optim-in-backward"),
    (["--compile", "--compile-mode", "reduce-overhead"], "cuda_graphs needs compile_mode default"),
    (["--grad-checkpointing"], "cuda_graphs needs --compile when --grad-checkpointing is on"),
])
def test_bad_combinations_are_refused(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    status = cli.main(["sft", "--demo", "--cuda-graphs", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and match in err and "Traceback" not in err, err
    assert not out.exists()


def test_several_processes_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="cuda_graphs needs one process"):
        config(cuda_graphs=True).validate(launched_world())


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gpu_presets_build_and_turn_everything_on(kind):
    from minialign.config.presets import build, load_yaml, preset
    from minialign.config.schema import DPOConfig, SFTConfig

    cls = SFTConfig if kind == "sft" else DPOConfig
    cfg = build(cls, load_yaml(preset(f"{kind}-gpu"), cls), {})
    cfg.validate()
    assert cfg.padding_free and cfg.compile and cfg.cuda_graphs and cfg.grad_accum == 1
    plain = build(cls, load_yaml(preset(kind), cls), {})
    assert (cfg.lr, cfg.batch_size, cfg.lora_r) == (plain.lr, plain.batch_size, plain.lora_r)  # only speed differs


def test_held_out_batches_are_rounded_like_training_batches(tmp_path, monkeypatch):
    """Evaluation and the reference table round target counts as training does (a compiled policy would otherwise
    compile one graph per held-out batch and hit torch's recompile limit); the numbers do not change."""
    from minialign.training import tasks
    from minialign.training import train as train_module

    seen = []
    real = prepare_batch

    def spy(batch, **options):
        seen.append(options["target_multiple"])
        return real(batch, **options)

    monkeypatch.setattr(train_module, "prepare_batch", spy)
    model, examples, collate = sft_pieces(config())
    batches = [collate(list(range(i, i + 4))) for i in range(0, 12, 4)]
    policy, task = TokenLogps(model), tasks.SFTTask()

    plain = train_module.evaluate_task(policy, task, batches, torch.device("cpu"), contextlib.nullcontext)
    rounded = train_module.evaluate_task(policy, task, batches, torch.device("cpu"), contextlib.nullcontext, 64)
    assert seen == [0] * 3 + [64] * 3
    assert rounded == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("compile_, padding_free, limit", [(True, True, 256), (True, False, 8), (False, True, 8)])
def test_static_shape_runs_may_compile_every_shape(compile_, padding_free, limit):
    """A compiled padding-free policy compiles one graph per shape: the loop lifts torch's limit of 8 for the run."""
    from minialign.data import collate_sft
    from minialign.modeling.policy import TokenLogps
    from minialign.training.tasks import SFTTask
    from minialign.training.train import train

    seen = []

    class Spy(SFTTask):
        def loss(self, policy, batch):
            seen.append(torch._dynamo.config.recompile_limit)
            return super().loss(policy, batch)

    cfg = config(compile=compile_, padding_free=padding_free, max_steps=2)
    model, examples, _ = sft_pieces(cfg)
    collate = lambda idx: collate_sft([examples[i] for i in idx], pad_id=0, flat=padding_free)  # noqa: E731
    assert torch._dynamo.config.recompile_limit == 8  # torch's default
    train(TokenLogps(model), Spy(), range(len(examples)), collate, cfg, None)  # the policy itself is not compiled here
    assert seen and set(seen) == {limit}
    assert torch._dynamo.config.recompile_limit == 8  # restored


def test_one_capture_per_shape_and_the_first_step_eager(monkeypatch):
    """GraphedStep's bookkeeping, with capture replaced by a stand-in that replays the step eagerly (CUDA graphs
    need a GPU): the first step runs eagerly (AdamW's moments do not exist yet), each new shape is captured once
    and replayed from then on, ``prepare`` of a known shape does nothing, and the parameters end exactly where plain
    eager steps put them."""
    from minialign.modeling.policy import TokenLogps
    from minialign.training.batches import add_target_index
    from minialign.training.optim import make_optimizer
    from minialign.training.tasks import SFTTask
    from minialign.training.train import step_functions

    cfg = config(max_grad_norm=1.0)
    batches = None

    def run_steps(graphed: bool):
        nonlocal batches
        model, examples, collate = sft_pieces(cfg)
        batches = [add_target_index(collate(list(range(i, i + 4))), 64) for i in (0, 4, 0, 8, 4, 12, 0)]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg, torch.device("cpu"))
        fb, update = step_functions(TokenLogps(model), SFTTask(), optimizer, params, cfg, contextlib.nullcontext)
        step = GraphedStep(fb, update, optimizer, torch.device("cpu"))
        captured, replays, eager = [], [], []
        if graphed:
            step.enabled = True

            class StandIn:
                def __init__(self, batch):
                    captured.append(graph_key(batch))

                def replay(self, batch, scale):
                    replays.append(graph_key(batch))
                    return step._eager([batch], scale)

            real_eager = step._eager
            monkeypatch.setattr(step, "_capture", StandIn)
            monkeypatch.setattr(step, "_eager", lambda b, s: (eager.append(1), real_eager(b, s))[1])
        for b in batches:
            step([b], 1.0 / b["n_targets"])
        before = len(captured)
        step.prepare(batches[0])  # already captured: nothing to do
        assert len(captured) == before
        return {n: p.detach().clone() for n, p in model.named_parameters()}, captured, replays, eager

    plain, *_ = run_steps(False)
    graphed, captured, replays, eager = run_steps(True)
    keys = [graph_key(b) for b in batches]
    assert len(set(keys)) >= 3  # several shapes, some seen twice
    assert len(eager) == 1 + len(replays)  # the first step, then the stand-in's own eager replays
    assert captured == list(dict.fromkeys(keys[1:]))  # in order of first appearance, each once
    assert replays == keys[1:]
    assert_same_params(graphed, plain, atol=0)


def test_bench_measure_makes_room_for_static_shapes(monkeypatch):
    """``minialign bench`` and bench_gpu.py time static-shape compiled runs through ``measure``: the limit is lifted
    there too (a DPO full run has a policy and a reference, each compiled per row length)."""
    from minialign.data import collate_sft
    from minialign.training import bench

    seen = []
    real = bench.SFTTask.loss

    def spy(self, policy, batch):
        seen.append(torch._dynamo.config.recompile_limit)
        return real(self, policy, batch)

    monkeypatch.setattr(bench.SFTTask, "loss", spy)
    cfg = config(max_steps=1)
    model, examples, _ = sft_pieces(cfg)
    batches = [collate_sft(examples[:4], pad_id=0, flat=True)]
    bench.measure(model, batches, task="sft", full=True, steps=1, warmup=1)
    assert set(seen) == {8}
    torch._dynamo.reset()
    seen.clear()
    bench.measure(model, batches, task="sft", full=True, steps=1, warmup=1, compile="default")
    assert seen and set(seen) == {256}
    assert torch._dynamo.config.recompile_limit == 8
    torch._dynamo.reset()


def test_a_capture_after_another_graphs_replays_starts_without_gradients(monkeypatch):
    """The real ``GraphedStep._capture`` under an emulated CUDA graph: the recorded step does not run (parameters and
    AdamW state are put back when the capture ends) and a replay runs it eagerly on the graph's own inputs, with each
    parameter's gradient being the tensor it was when the capture began: a backward recorded over an existing
    gradient adds into that buffer at every replay. Several shapes, uncompiled (no warm-up before later captures,
    ``--fast`` without ``--compile``): every step must still apply its own gradient, exactly as plain eager steps do.
    Without the reset before each capture, later shapes trained on a running sum of stale gradients (on a GPU:
    llama-1b SFT LoRA ended 7.36 instead of 7.13; benchmarks/NOTES.md entry 24)."""
    from minialign.training.batches import add_target_index
    from minialign.training.optim import make_optimizer
    from minialign.training.tasks import SFTTask
    from minialign.training.train import step_functions

    cfg = config(max_grad_norm=1.0)

    def run_steps(graphed: bool):
        model, examples, collate = sft_pieces(cfg)
        batches = [add_target_index(collate(list(range(i, i + 4))), 64) for i in (0, 4, 0, 8, 4, 12, 0, 8)]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg, torch.device("cpu"))
        fb, update = step_functions(TokenLogps(model), SFTTask(), optimizer, params, cfg, contextlib.nullcontext)
        step = GraphedStep(fb, update, optimizer, torch.device("cpu"), warm_up=False)
        if graphed:
            step.enabled, step.stream = True, _NoStream()
            monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
            monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
            monkeypatch.setattr(torch.cuda, "CUDAGraph", _EmulatedGraph)
            monkeypatch.setattr(torch.cuda, "graph", _emulated_capture(params, optimizer))
            monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
            real_capture = step._capture

            def capture(batch):
                captured = real_capture(batch)
                captured.graph.bind(captured, fb, update, params)
                return captured

            monkeypatch.setattr(step, "_capture", capture)
        for b in batches:
            step([b], 1.0 / b["n_targets"])
        assert not graphed or len(step.graphs) >= 3  # several captures, each after other graphs' replays
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    assert_same_params(run_steps(True), run_steps(False), atol=1e-6)


class _NoStream:
    def wait_stream(self, other) -> None:
        pass


class _EmulatedGraph:
    """A recorded step: ``replay`` runs it eagerly on the captured inputs, over the gradients it was recorded with."""

    def bind(self, captured, forward_backward, update, params) -> None:
        self.captured, self.fb, self.update, self.params = captured, forward_backward, update, params

    def replay(self) -> None:
        for p, g in zip(self.params, self.grads_at_capture):
            p.grad = g  # None: the recorded backward writes a fresh gradient; a tensor: it adds into that buffer
        c = self.captured
        sums = self.fb([c.inputs], c.scale)
        grad_norm = self.update()
        c.outputs.copy_(torch.stack([sums[k].float() for k in c.names] + [grad_norm.float()]))


def _emulated_capture(params, optimizer):
    """``torch.cuda.graph`` stand-in: notes the gradients at the start; the body runs, then its effects are undone
    (a real capture records kernels without running them)."""
    import copy

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None):
        graph.grads_at_capture = [p.grad for p in params]
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(optimizer.state_dict())
        yield
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        optimizer.load_state_dict(state)

    return capture
